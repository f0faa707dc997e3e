"""Every metric the fleet emits, defined once.

Import this module only after the process has decided on prometheus-client's
multiprocess mode (``fleet worker`` sets ``PROMETHEUS_MULTIPROC_DIR`` first): the client
picks its value storage when it is first imported.

Label values are bounded: job and schedule names come from the code and the schedule file,
outcomes and results from small fixed sets, queues from the fleet's queue list. Never a
user id, a secret path of an unbounded set or a raw key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Outcomes of one run, as recorded in task_runs and fleet_task_runs_total.
OUTCOMES = ("success", "failure", "retry", "skipped", "lost")
# Results of one schedule fire in one scheduler replica.
FIRE_RESULTS = ("enqueued", "already_claimed", "misfired", "error", "recovered")

TASK_RUNS = Counter(
    "fleet_task_runs",
    "Job runs finished, by job and outcome (success, failure, retry, skipped, lost).",
    ["job", "outcome"],
)
TASK_DURATION = Histogram(
    "fleet_task_duration_seconds",
    "Wall time of one job run, from start to its outcome.",
    ["job"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
JOB_LAST_SUCCESS = Gauge(
    "fleet_job_last_success_timestamp_seconds",
    "Unix time of the job's last successful run (the dead man's switch reads this).",
    ["job"],
    multiprocess_mode="max",
)
SCHEDULE_FIRES = Counter(
    "fleet_schedule_fires",
    "Schedule fires seen by this scheduler replica, by result "
    "(enqueued, already_claimed, misfired, error, recovered).",
    ["schedule", "result"],
)
SCHEDULE_NEXT_FIRE = Gauge(
    "fleet_schedule_next_fire_timestamp_seconds",
    "Unix time of the schedule's next fire, as this scheduler replica computes it.",
    ["schedule"],
    multiprocess_mode="max",
)
BUILD_INFO = Gauge(
    "fleet_build_info",
    "Always 1; the labels say which fleet version and process kind is running.",
    ["version", "python", "process"],
    multiprocess_mode="max",
)

# Drift detection ----------------------------------------------------------------------

DRIFT_FINDINGS = Gauge(
    "fleet_drift_findings",
    "Open drift findings by environment, kind and severity (info: declared as expected).",
    ["environment", "kind", "severity"],
    multiprocess_mode="mostrecent",
)
DRIFT_OPENED = Counter(
    "fleet_drift_findings_opened",
    "Drift findings opened (new, or back after being resolved).",
    ["environment", "kind", "severity"],
)
DRIFT_RESOLVED = Counter(
    "fleet_drift_findings_resolved",
    "Drift findings resolved: the difference is gone.",
    ["environment", "kind", "severity"],
)
DRIFT_LAST_RUN = Gauge(
    "fleet_drift_last_run_timestamp_seconds",
    "Unix time of the last completed drift run covering the environment.",
    ["environment"],
    multiprocess_mode="max",
)

QUEUE_DEPTH_NAME = "fleet_queue_depth"
QUEUE_DEPTH_HELP = "Messages waiting in the broker queue, read from Redis at scrape time."
BROKER_UP_NAME = "fleet_broker_up"
BROKER_UP_HELP = "1 when the broker (Redis) answered the last scrape's queue reads, else 0."


class QueueDepthCollector(Collector):
    """Reads queue lengths from the broker at scrape time, so the value is never stale.

    ``read_depths`` returns ``{queue: depth}`` or raises when the broker is unreachable.
    """

    def __init__(self, read_depths: Callable[[], dict[str, int]]) -> None:
        self._read_depths = read_depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(QUEUE_DEPTH_NAME, QUEUE_DEPTH_HELP, labels=["queue"])
        up = GaugeMetricFamily(BROKER_UP_NAME, BROKER_UP_HELP)
        try:
            depths = self._read_depths()
        except Exception:  # the broker being down is itself the measurement
            up.add_metric([], 0)
            yield up
            return
        for queue, value in sorted(depths.items()):
            depth.add_metric([queue], value)
        up.add_metric([], 1)
        yield depth
        yield up

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def defined_metric_names() -> set[str]:
    """Every series name the fleet can expose (the monitoring tests check rules against it)."""
    names: set[str] = {QUEUE_DEPTH_NAME, BROKER_UP_NAME}
    for value in globals().values():
        if isinstance(value, Counter | Gauge | Histogram):
            for family in value.describe():
                for suffix in _suffixes(family.type):
                    names.add(family.name + suffix)
    return names


def _suffixes(kind: str) -> tuple[str, ...]:
    if kind == "counter":
        return ("_total", "_created")
    if kind == "histogram":
        return ("_bucket", "_sum", "_count", "_created")
    return ("",)
