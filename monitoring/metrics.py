"""Every metric the fleet emits, defined once.

Import this module only after the process has decided on prometheus-client's
multiprocess mode (``fleet worker`` sets ``PROMETHEUS_MULTIPROC_DIR`` first): the client
picks its value storage when it is first imported.

Label values are bounded: job and schedule names come from the code and the schedule file,
outcomes and results from small fixed sets, queues from the fleet's queue list. Never a
user id, a secret path of an unbounded set or a raw key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
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
    "Job runs finished, by job and outcome (success, failure, retry, skipped, lost, "
    "duplicate, expired).",
    ["task", "outcome"],
)
MESSAGES_REFUSED = Counter(
    "fleet_messages_refused",
    "Messages a worker refused and dropped unrun, by reason (unsigned, bad_signature, "
    "content_not_accepted, undecodable, invalid).",
    ["reason"],
)
TASK_DURATION = Histogram(
    "fleet_task_duration_seconds",
    "Wall time of one job run, from start to its outcome.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
SCHEDULE_FIRES = Counter(
    "fleet_schedule_fires",
    "Schedule fires seen by this scheduler replica, by result "
    "(enqueued, already_claimed, misfired, error, recovered, caught_up, missed).",
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

DRIFT_OPENED = Counter(
    "fleet_drift_findings_opened",
    "Drift findings opened (new, or back after being resolved).",
    ["environment", "kind", "severity"],
)
DRIFT_GIT_FETCH_FAILURES = Counter(
    "fleet_drift_git_fetch_failures",
    "Drift runs whose Git fetch of the desired configuration failed (the last fetched "
    "commit used instead, or none).",
)
DRIFT_CACHE_HEALED = Counter(
    "fleet_drift_cache_healed",
    "Stale entries of the platform's configuration cache deleted (and their change events "
    "published) by drift detection, with FLEET_DRIFT_HEAL_CACHE=true.",
    ["environment"],
)
DRIFT_RESOLVED = Counter(
    "fleet_drift_findings_resolved",
    "Drift findings resolved: the difference is gone.",
    ["environment", "kind", "severity"],
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
IMPRESSIONS_USERS_RECOVERED = Counter(
    "fleet_impressions_users_recovered",
    "User sketches saved again after a fault: taken by a save whose worker died "
    "(orphaned_take), or merged with the stored copy because Redis had lost users or read "
    "them before a later read was stored (kept_stored).",
    ["reason"],
)
for _reason in ("orphaned_take", "kept_stored"):
    IMPRESSIONS_USERS_RECOVERED.labels(reason=_reason)
IMPRESSIONS_FOLDED = Counter(
    "fleet_impressions_folded_rows",
    "Minute rows folded into hourly rows by the retention job.",
)

# Secrets -------------------------------------------------------------------------------

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

CANARY_ANALYSES = Counter(
    "fleet_canary_analyses",
    "Canary analyses by verdict (pass, marginal, fail, nodata, error).",
    ["verdict"],
)
CANARY_DECISIONS = Counter(
    "fleet_canary_decisions",
    "Canary decisions taken (promote, rollback, or conflict: another hand's change found).",
    ["decision"],
)
ROLLOUT_STEPS = Counter(
    "fleet_rollout_steps",
    "Looks at guarded flag rollouts by decision (advance, complete, rollback, conflict, "
    "wait, error).",
    ["decision"],
)
CONFIG_ANNOUNCE_FAILURES = Counter(
    "fleet_config_announce_failures",
    "Configuration writes committed whose cache invalidation or change event failed "
    "(Redis unreachable): readers may see the old value until the cache entry expires.",
)

# Fleet-wide state, read at scrape time by ``fleet exporter`` only ---------------------
#
# Per-process metrics above are events each process counts (sum them in PromQL). What
# follows describes the fleet as Redis and the database hold it: one collector reads it at
# every scrape, in the one process kind that serves it, so it is neither doubled by the
# number of workers nor left stale by a worker that has not re-run the job.


@dataclass(frozen=True)
class ScrapeTimeMetric:
    name: str
    help: str
    labels: tuple[str, ...] = ()


QUEUE_DEPTH = ScrapeTimeMetric(
    "fleet_queue_depth", "Messages waiting in the broker queue, read from Redis.", ("queue",)
)
BROKER_UP = ScrapeTimeMetric(
    "fleet_broker_up", "1 when the broker (Redis) answered this scrape's reads, else 0."
)
IMPRESSIONS_DEPTH = ScrapeTimeMetric(
    "fleet_impressions_queue_depth", "Impressions waiting in feature_flag_impressions."
)
IMPRESSIONS_OLDEST = ScrapeTimeMetric(
    "fleet_impressions_oldest_age_seconds",
    "Age of the oldest waiting impression with a readable timestamp (0 when the list is "
    "empty; unreadable ones are passed over and counted in "
    "fleet_impressions_oldest_unparsable).",
)
IMPRESSIONS_OLDEST_UNPARSABLE = ScrapeTimeMetric(
    "fleet_impressions_oldest_unparsable",
    "Unreadable impressions at the old end of the list, passed over to find the oldest age "
    "(of the oldest 64; the next drain dead-letters them).",
)
IMPRESSIONS_IN_FLIGHT = ScrapeTimeMetric(
    "fleet_impressions_inflight_batches",
    "Impression batches taken by a drainer and not finished yet.",
)
IMPRESSIONS_ORPHANED = ScrapeTimeMetric(
    "fleet_impressions_orphaned_batches",
    "Impression batches in flight for longer than the take-over timeout: their worker seems "
    "gone, and no drainer has taken them over yet.",
)
IMPRESSIONS_DEAD = ScrapeTimeMetric(
    "fleet_impressions_dead_letters", "Dead letters waiting in feature_flag_impressions:dead."
)
DATABASE_UP = ScrapeTimeMetric(
    "fleet_database_up", "1 when the database answered this scrape's reads, else 0."
)
JOB_LAST_SUCCESS = ScrapeTimeMetric(
    "fleet_job_last_success_timestamp_seconds",
    "Unix time of the job's last successful (or skipped) run, whichever worker ran it "
    "(the dead man's switch reads this).",
    ("task",),
)
DRIFT_FINDINGS = ScrapeTimeMetric(
    "fleet_drift_findings",
    "Open drift findings by environment, kind and severity (info: declared as expected).",
    ("environment", "kind", "severity"),
)
DRIFT_LAST_RUN = ScrapeTimeMetric(
    "fleet_drift_last_run_timestamp_seconds",
    "Unix time of the last completed drift run covering the environment.",
    ("environment",),
)
SECRETS = ScrapeTimeMetric(
    "fleet_secrets",
    "Managed secrets by status (ok, due_soon, overdue, unmanaged, error), as last checked.",
    ("status",),
)
SECRET_AGE = ScrapeTimeMetric(
    "fleet_secret_age_seconds",
    "Age of the secret's current version (label: the managed secret's path).",
    ("path",),
)
SECRET_DUE = ScrapeTimeMetric(
    "fleet_secret_rotation_due_timestamp_seconds",
    "Unix time at which the secret's current version is due for rotation (absent when it "
    "has no due date, or is gone).",
    ("path",),
)
SECRET_ROTATIONS_STUCK = ScrapeTimeMetric(
    "fleet_secret_rotations_stuck",
    "Managed secrets whose rotation is stuck (no candidate password logs in), as last checked.",
)
SECRET_STORE_UP = ScrapeTimeMetric(
    "fleet_secret_store_up",
    "1 when the last check could read the secret store; 0 when unreachable, sealed or refusing.",
)
AUDIT_LAG = ScrapeTimeMetric(
    "fleet_audit_ship_lag_seconds",
    "Age of the oldest audit event a sink has not received yet (0 when caught up).",
    ("source", "sink"),
)
AUDIT_BACKLOG = ScrapeTimeMetric(
    "fleet_audit_backlog_events", "Audit events a sink has not received yet.", ("source", "sink")
)
AUDIT_SINK_UP = ScrapeTimeMetric(
    "fleet_audit_sink_up",
    "1 when the sink confirmed the last shipment; 0 when down or stopped after a refusal.",
    ("sink",),
)
CANARY_SCORE = ScrapeTimeMetric(
    "fleet_canary_score",
    "Score (0-100) of the last analysis of each deployment being judged or decided today.",
    ("deployment",),
)
CANARY_DEPLOYMENTS = ScrapeTimeMetric(
    "fleet_canary_deployments",
    "Canary deployments by state (pending, analyzing, promoted, rolled_back, aborted, conflict).",
    ("state",),
)
ROLLOUT_PERCENTAGE = ScrapeTimeMetric(
    "fleet_rollout_percentage",
    "The flag's rollout_percentage now, for each flag with a rollout not finished or "
    "finished today.",
    ("flag", "environment"),
)
ROLLOUT_STEP_STARTED = ScrapeTimeMetric(
    "fleet_rollout_step_started_timestamp_seconds",
    "Unix time at which an active rollout's current step began.",
    ("flag", "environment"),
)
ROLLOUTS = ScrapeTimeMetric(
    "fleet_rollouts",
    "Guarded flag rollouts by state (active, paused, completed, rolled_back, aborted, conflict).",
    ("state",),
)
# Label values of the counters whose increase() an alert watches, known before any event.
ROLLOUT_DECISIONS = ("advance", "complete", "rollback", "conflict", "wait", "error")
CANARY_DECISION_NAMES = ("promote", "rollback", "conflict")
REFUSAL_REASONS = ("unsigned", "bad_signature", "content_not_accepted", "undecodable", "invalid")


def start_at_zero(
    jobs: Iterable[str],
    environments: Iterable[str],
    dead_letter_reasons: Iterable[str],
    drift_kinds: Iterable[str],
) -> None:
    """Create at 0 every series an alert takes the increase() of, for the label values a
    worker knows when it starts. A labelled series otherwise first appears at its first
    event, already at 1, and increase() of a series that holds 1 from its first sample is
    0: the first rollback, lost run or refused message of each worker's life never
    alerted. Prometheus's own advice: initialise the label values you know."""
    for job in jobs:
        for outcome in ("failure", "lost"):
            TASK_RUNS.labels(job, outcome)
    for reason in REFUSAL_REASONS:
        MESSAGES_REFUSED.labels(reason)
    for reason in dead_letter_reasons:
        IMPRESSIONS_DEAD_LETTERED.labels(reason)
    for decision in CANARY_DECISION_NAMES:
        CANARY_DECISIONS.labels(decision)
    for decision in ROLLOUT_DECISIONS:
        ROLLOUT_STEPS.labels(decision)
    for environment in environments:
        for kind in drift_kinds:
            for severity in ("critical", "warning"):  # FleetNewDrift leaves info out
                DRIFT_OPENED.labels(environment, kind, severity)


SCRAPE_TIME = (
    QUEUE_DEPTH,
    BROKER_UP,
    IMPRESSIONS_DEPTH,
    IMPRESSIONS_OLDEST,
    IMPRESSIONS_OLDEST_UNPARSABLE,
    IMPRESSIONS_IN_FLIGHT,
    IMPRESSIONS_ORPHANED,
    IMPRESSIONS_DEAD,
    DATABASE_UP,
    JOB_LAST_SUCCESS,
    DRIFT_FINDINGS,
    DRIFT_LAST_RUN,
    SECRETS,
    SECRET_AGE,
    SECRET_DUE,
    SECRET_STORE_UP,
    SECRET_ROTATIONS_STUCK,
    AUDIT_LAG,
    AUDIT_BACKLOG,
    AUDIT_SINK_UP,
    CANARY_SCORE,
    CANARY_DEPLOYMENTS,
    ROLLOUT_PERCENTAGE,
    ROLLOUT_STEP_STARTED,
    ROLLOUTS,
)
SCRAPE_TIME_NAMES = tuple(metric.name for metric in SCRAPE_TIME)


def _family(metric: ScrapeTimeMetric, values: Mapping[Any, float]) -> GaugeMetricFamily:
    """A gauge family from {label value(s): value}; a bare key for a single label."""
    family = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    for key, value in sorted(values.items()):
        family.add_metric([str(k) for k in (key if isinstance(key, tuple) else (key,))], value)
    return family


def _single(metric: ScrapeTimeMetric, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(metric.name, metric.help, value=value)


class BacklogCollector(Collector):
    """Reads what waits in Redis at scrape time (``read`` returns a workers.backlog.Backlog
    or raises when Redis is unreachable), so the values are never stale."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            backlog = self._read()
        except Exception:  # the broker being down is itself the measurement
            yield _single(BROKER_UP, 0)
            return
        yield _single(BROKER_UP, 1)
        yield _family(QUEUE_DEPTH, backlog.queues)
        yield _single(IMPRESSIONS_DEPTH, backlog.impressions)
        yield _single(IMPRESSIONS_DEAD, backlog.impressions_dead)
        yield _single(IMPRESSIONS_OLDEST, backlog.oldest_impression_age or 0.0)
        yield _single(IMPRESSIONS_OLDEST_UNPARSABLE, backlog.oldest_unparsable)
        yield _single(IMPRESSIONS_IN_FLIGHT, backlog.batches_in_flight)
        yield _single(IMPRESSIONS_ORPHANED, backlog.batches_orphaned)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class FleetStateCollector(Collector):
    """Reads the fleet's state from the database at scrape time (``read`` returns a
    workers.fleetstate.FleetState or raises when the database is unreachable)."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = self._read()
        except Exception:  # the database being down is itself the measurement
            yield _single(DATABASE_UP, 0)
            return
        yield _single(DATABASE_UP, 1)
        yield _family(JOB_LAST_SUCCESS, state.last_success)
        yield _family(DRIFT_FINDINGS, state.drift_findings)
        yield _family(DRIFT_LAST_RUN, state.drift_last_run)
        yield _family(SECRETS, state.secrets)
        yield _family(SECRET_AGE, state.secret_age)
        yield _family(SECRET_DUE, state.secret_due)
        if state.secret_store_up is not None:
            yield _single(SECRET_STORE_UP, state.secret_store_up)
        yield _single(SECRET_ROTATIONS_STUCK, state.secret_rotations_stuck)
        yield _family(AUDIT_LAG, state.audit_lag)
        yield _family(AUDIT_BACKLOG, state.audit_backlog)
        yield _family(AUDIT_SINK_UP, state.audit_sink_up)
        yield _family(CANARY_SCORE, state.canary_score)
        yield _family(CANARY_DEPLOYMENTS, state.canary_deployments)
        yield _family(ROLLOUT_PERCENTAGE, state.rollout_percentage)
        yield _family(ROLLOUT_STEP_STARTED, state.rollout_step_started)
        yield _family(ROLLOUTS, state.rollouts)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def defined_label_names() -> set[str]:
    """Every label name a fleet metric carries (a test checks none is one a scrape sets)."""
    names = {label for metric in SCRAPE_TIME for label in metric.labels}
    for value in globals().values():
        if isinstance(value, Counter | Gauge | Histogram):
            names.update(value._labelnames)
    return names


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
