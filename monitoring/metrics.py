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
from typing import Any

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

# Impressions -------------------------------------------------------------------------

IMPRESSIONS_PROCESSED = Counter(
    "fleet_impressions_processed",
    "Impressions counted into flag_impression_counts (each exactly once).",
)
IMPRESSIONS_DEAD_LETTERED = Counter(
    "fleet_impressions_dead_lettered",
    "Impressions moved to feature_flag_impressions:dead, by reason.",
    ["reason"],
)
IMPRESSIONS_BATCH_SECONDS = Histogram(
    "fleet_impressions_batch_seconds",
    "Time to commit and clean up one batch of impressions, or a group committed together.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IMPRESSIONS_RECOVERED_BATCHES = Counter(
    "fleet_impressions_recovered_batches",
    "In-flight batches taken over from a worker presumed dead.",
)
IMPRESSIONS_FOLDED = Counter(
    "fleet_impressions_folded_rows",
    "Minute rows folded into hourly rows by the retention job.",
)

# Secrets -------------------------------------------------------------------------------

SECRET_AGE = Gauge(
    "fleet_secret_age_seconds",
    "Age of the secret's current version (label: the managed secret's path); NaN once gone.",
    ["path"],
    multiprocess_mode="mostrecent",
)
SECRET_DUE = Gauge(
    "fleet_secret_rotation_due_timestamp_seconds",
    "Unix time at which the secret's current version is due for rotation; NaN when it has "
    "no due date (unmanaged) or is gone.",
    ["path"],
    multiprocess_mode="mostrecent",
)
SECRETS = Gauge(
    "fleet_secrets",
    "Managed secrets by status (ok, due_soon, overdue, unmanaged, error).",
    ["status"],
    multiprocess_mode="mostrecent",
)
SECRET_STORE_UP = Gauge(
    "fleet_secret_store_up",
    "1 when the last check could read the secret store; 0 when unreachable, sealed or refusing.",
    multiprocess_mode="mostrecent",
)
SECRET_ROTATIONS = Counter(
    "fleet_secret_rotations",
    "Rotations by outcome (rotated, resumed, undone_then_rotated, failed) and last step.",
    ["outcome", "step"],
)

# Audit shipping --------------------------------------------------------------------------

AUDIT_SHIPPED = Counter(
    "fleet_audit_events_shipped",
    "Audit events delivered to a sink and committed, by source table and sink.",
    ["source", "sink"],
)
AUDIT_LAG = Gauge(
    "fleet_audit_ship_lag_seconds",
    "Age of the oldest audit event a sink has not received yet (0 when caught up).",
    ["source", "sink"],
    multiprocess_mode="mostrecent",
)
AUDIT_BACKLOG = Gauge(
    "fleet_audit_backlog_events",
    "Audit events a sink has not received yet.",
    ["source", "sink"],
    multiprocess_mode="mostrecent",
)
AUDIT_SINK_UP = Gauge(
    "fleet_audit_sink_up",
    "1 when the sink confirmed the last shipment; 0 when down or stopped after a refusal.",
    ["sink"],
    multiprocess_mode="mostrecent",
)
AUDIT_SINK_ERRORS = Counter(
    "fleet_audit_sink_errors",
    "Shipments a sink did not confirm: unavailable (retried later) or refused (sink stopped).",
    ["sink", "kind"],
)
AUDIT_MALFORMED = Counter(
    "fleet_audit_malformed_events",
    "Source rows shipped as raw text because their metadata is not JSON.",
    ["source"],
)
AUDIT_ID_GAPS = Counter(
    "fleet_audit_id_gaps",
    "Gaps in a source's ids passed over once no transaction could fill them (rolled back).",
    ["source", "sink"],
)

# Canary analysis ---------------------------------------------------------------------

CANARY_SCORE = Gauge(
    "fleet_canary_score",
    "Score of the deployment's last analysis (0-100).",
    ["deployment"],
    multiprocess_mode="mostrecent",
)
CANARY_ANALYSES = Counter(
    "fleet_canary_analyses",
    "Canary analyses by verdict (pass, marginal, fail, nodata, error).",
    ["verdict"],
)
CANARY_DEPLOYMENTS = Gauge(
    "fleet_canary_deployments",
    "Canary deployments by state (pending, analyzing, promoted, rolled_back, aborted).",
    ["state"],
    multiprocess_mode="mostrecent",
)
CANARY_DECISIONS = Counter(
    "fleet_canary_decisions",
    "Canary decisions taken (promote, rollback).",
    ["decision"],
)

# Read from Redis at scrape time (BacklogCollector), so they show with no worker running.
QUEUE_DEPTH_NAME = "fleet_queue_depth"
QUEUE_DEPTH_HELP = "Messages waiting in the broker queue, read from Redis at scrape time."
BROKER_UP_NAME = "fleet_broker_up"
BROKER_UP_HELP = "1 when the broker (Redis) answered the last scrape's reads, else 0."
IMPRESSIONS_DEPTH_NAME = "fleet_impressions_queue_depth"
IMPRESSIONS_DEPTH_HELP = "Impressions waiting in feature_flag_impressions."
IMPRESSIONS_OLDEST_NAME = "fleet_impressions_oldest_age_seconds"
IMPRESSIONS_OLDEST_HELP = "Age of the oldest waiting impression (0 when the list is empty)."
IMPRESSIONS_DEAD_NAME = "fleet_impressions_dead_letters"
IMPRESSIONS_DEAD_HELP = "Dead letters waiting in feature_flag_impressions:dead."
SCRAPE_TIME_NAMES = (
    QUEUE_DEPTH_NAME,
    BROKER_UP_NAME,
    IMPRESSIONS_DEPTH_NAME,
    IMPRESSIONS_OLDEST_NAME,
    IMPRESSIONS_DEAD_NAME,
)


class BacklogCollector(Collector):
    """Reads what waits in Redis at scrape time (``read`` returns a workers.backlog.Backlog
    or raises when Redis is unreachable), so the values are never stale."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(BROKER_UP_NAME, BROKER_UP_HELP)
        try:
            backlog = self._read()
        except Exception:  # the broker being down is itself the measurement
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(QUEUE_DEPTH_NAME, QUEUE_DEPTH_HELP, labels=["queue"])
        for queue, value in sorted(backlog.queues.items()):
            depth.add_metric([queue], value)
        yield depth
        yield GaugeMetricFamily(
            IMPRESSIONS_DEPTH_NAME, IMPRESSIONS_DEPTH_HELP, value=backlog.impressions
        )
        yield GaugeMetricFamily(
            IMPRESSIONS_DEAD_NAME, IMPRESSIONS_DEAD_HELP, value=backlog.impressions_dead
        )
        yield GaugeMetricFamily(
            IMPRESSIONS_OLDEST_NAME,
            IMPRESSIONS_OLDEST_HELP,
            value=backlog.oldest_impression_age or 0.0,
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def defined_metric_names() -> set[str]:
    """Every series name the fleet can expose (the monitoring tests check rules against it)."""
    names: set[str] = set(SCRAPE_TIME_NAMES)
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
