"""Generates the Grafana dashboards in monitoring/grafana/dashboards/ (committed JSON).

    python -m monitoring.grafana.generate      # rewrite the JSON files

The dashboards are built with Grafana's typed builders (grafana-foundation-sdk, the flavour
for the Grafana version docker-compose.yml runs), which lay the panels out on the grid and
write the fields Grafana itself writes. A test checks that the committed files are what this
writes, and that every metric their queries use is one the fleet defines.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import stat
from grafana_foundation_sdk.models.common import BigValueColorMode, ReduceDataOptions
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")
DIRECTORY = Path(__file__).resolve().parent / "dashboards"
STAT_OPTIONS = stat.Options(
    color_mode=BigValueColorMode.BACKGROUND,
    reduce_options=ReduceDataOptions(calcs=["lastNotNull"]),
)


class Board:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.ids = uid, 0
        self.dashboard = (
            dashboard.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["config-fleet"])
            .timezone("utc")
            .editable()
            .refresh("30s")
            .time("now-6h", "now")
            .version(1)
            .annotations([])
            .variables([])
        )

    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def row(self, title: str) -> Board:
        self.dashboard.with_row(dashboard.Row(title).id(self._id()))
        return self

    def add(
        self,
        kind: str,
        title: str,
        targets: list[tuple[str, str]],
        *,
        width: int = 12,
        height: int = 8,
        unit: str = "short",
        description: str = "",
    ) -> Board:
        panel = (
            dashboard.Panel()
            .type(kind)
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .span(width)
            .height(height)
            .unit(unit)
        )
        for i, (expr, legend) in enumerate(targets):
            query = prometheus.Dataquery().ref_id(chr(65 + i)).datasource(DATASOURCE)
            panel.with_target(query.expr(expr).legend_format(legend))
        if kind == "stat":
            panel.options(STAT_OPTIONS)
        self.dashboard.with_panel(panel)
        return self


def overview() -> Board:
    board = Board(
        "fleet-overview",
        "config-fleet: overview",
        "The health of every job at a glance, queues, task outcomes and durations.",
    )
    board.add("stat", "Workers up", [('sum(up{job="fleet-workers"})', "")], width=4, height=4)
    board.add("stat", "Schedulers up", [('sum(up{job="fleet-schedulers"})', "")], width=4, height=4)
    board.add("stat", "Exporter up", [('sum(up{job="fleet-exporter"})', "")], width=4, height=4)
    board.add("stat", "Broker up", [("min(fleet_broker_up)", "")], width=4, height=4)
    board.add("stat", "Database up", [("min(fleet_database_up)", "")], width=4, height=4)
    board.add(
        "stat",
        "Build",
        [("count by (version) (fleet_build_info)", "{{version}}")],
        width=4,
        height=4,
    )
    board.row("Jobs")
    board.add(
        "stat",
        "Seconds since last success, by job",
        [("fleet:job_seconds_since_success", "{{task}}")],
        width=24,
        unit="s",
        description="The dead man's switch alerts at three times each job's interval.",
    )
    board.add(
        "timeseries",
        "Runs by outcome (per second)",
        [("sum by (task, outcome) (rate(fleet_task_runs_total[5m]))", "{{task}} {{outcome}}")],
    )
    board.add(
        "timeseries",
        "Failure ratio (15m)",
        [("fleet:task_failure_ratio:rate15m", "{{task}}")],
        unit="percentunit",
    )
    board.add(
        "timeseries",
        "Run duration p95",
        [
            (
                "histogram_quantile(0.95, sum by (task, le)"
                " (rate(fleet_task_duration_seconds_bucket[5m])))",
                "{{task}}",
            )
        ],
        unit="s",
    )
    board.add("timeseries", "Queue depth", [("max by (queue) (fleet_queue_depth)", "{{queue}}")])
    board.add(
        "timeseries",
        "Messages refused (per hour)",
        [("sum by (reason) (increase(fleet_messages_refused_total[1h]))", "{{reason}}")],
        description="Unsigned, badly signed or unknown messages a worker would not run.",
    )
    board.row("Scheduler")
    board.add(
        "timeseries",
        "Fires by result (per minute)",
        [
            (
                "sum by (schedule, result) (rate(fleet_schedule_fires_total[5m])) * 60",
                "{{schedule}} {{result}}",
            )
        ],
    )
    board.add(
        "table",
        "Next fire",
        [("max by (schedule) (fleet_schedule_next_fire_timestamp_seconds) * 1000", "{{schedule}}")],
        unit="dateTimeAsIso",
    )
    return board


def secrets() -> Board:
    board = Board("fleet-secrets", "config-fleet: secrets", "Rotation status of managed secrets.")
    board.add(
        "stat",
        "Secrets by status",
        [("max by (status) (fleet_secrets)", "{{status}}")],
        width=12,
        height=5,
    )
    board.add("stat", "Store up", [("min(fleet_secret_store_up)", "")], width=6, height=5)
    board.add(
        "stat",
        "Stuck rotations",
        [("max(fleet_secret_rotations_stuck)", "")],
        width=6,
        height=5,
        description="No candidate password logs in: fix the role, then fleet secrets unstick.",
    )
    board.add(
        "table",
        "Days until due (negative: overdue)",
        [
            (
                "(max by (path) (fleet_secret_rotation_due_timestamp_seconds) - time()) / 86400",
                "{{path}}",
            )
        ],
        unit="d",
    )
    board.add(
        "table",
        "Age of the current version",
        [("max by (path) (fleet_secret_age_seconds)", "{{path}}")],
        unit="s",
    )
    board.add(
        "timeseries",
        "Rotations",
        [
            (
                "sum by (outcome, step) (increase(fleet_secret_rotations_total[1h]))",
                "{{outcome}} at {{step}}",
            )
        ],
        width=24,
    )
    return board


def impressions() -> Board:
    board = Board(
        "fleet-impressions",
        "config-fleet: impressions",
        "Flag impressions drained from Redis into per-minute counts.",
    )
    quantile = (
        "histogram_quantile({q}, sum by (le) (rate(fleet_impressions_batch_seconds_bucket[5m])))"
    )
    board.add(
        "timeseries",
        "Impressions counted per second",
        [("sum(rate(fleet_impressions_processed_total[1m]))", "counted")],
    )
    board.add(
        "timeseries",
        "Waiting in feature_flag_impressions",
        [("max(fleet_impressions_queue_depth)", "waiting")],
    )
    board.add(
        "timeseries",
        "Age of the oldest waiting impression",
        [("max(fleet_impressions_oldest_age_seconds)", "oldest")],
        unit="s",
    )
    board.add(
        "timeseries",
        "Batch time p50 / p99",
        [
            (quantile.format(q=0.5), "p50"),
            (quantile.format(q=0.99), "p99"),
        ],
        unit="s",
    )
    board.add(
        "timeseries",
        "Dead-lettered by reason (per minute)",
        [("sum by (reason) (rate(fleet_impressions_dead_lettered_total[5m])) * 60", "{{reason}}")],
    )
    board.add(
        "timeseries",
        "Dead letters, batches in flight, orphaned and recovered",
        [
            ("max(fleet_impressions_dead_letters)", "dead letters"),
            ("max(fleet_impressions_inflight_batches)", "batches in flight"),
            ("max(fleet_impressions_orphaned_batches)", "batches orphaned"),
            ("max(fleet_impressions_oldest_unparsable)", "unreadable at the old end"),
            ("sum(increase(fleet_impressions_recovered_batches_total[1h]))", "recovered (1h)"),
            (
                "sum by (reason) (increase(fleet_impressions_users_recovered_total[1h]))",
                "user sketches saved again (1h): {{reason}}",
            ),
            ("sum(increase(fleet_impressions_folded_rows_total[1h]))", "minute rows folded (1h)"),
        ],
    )
    return board


def drift() -> Board:
    board = Board("fleet-drift", "config-fleet: drift", "Configuration drift findings.")
    board.add(
        "stat",
        "Open critical findings in production",
        [('sum(fleet_drift_findings{environment="production", severity="critical"})', "")],
        width=8,
        height=5,
    )
    board.add(
        "stat",
        "Open findings by severity",
        [("sum by (severity) (fleet_drift_findings)", "{{severity}}")],
        width=16,
        height=5,
    )
    board.add(
        "timeseries",
        "Open findings by environment and kind",
        [
            (
                'sum by (environment, kind) (fleet_drift_findings{severity!="info"})',
                "{{environment}} {{kind}}",
            )
        ],
    )
    board.add(
        "timeseries",
        "Opened and resolved (per hour)",
        [
            ("sum(increase(fleet_drift_findings_opened_total[1h]))", "opened"),
            ("sum(increase(fleet_drift_findings_resolved_total[1h]))", "resolved"),
        ],
    )
    board.add(
        "timeseries",
        "Sources (per hour)",
        [
            ("sum(increase(fleet_drift_git_fetch_failures_total[1h]))", "Git fetch failures"),
            (
                "sum by (environment) (increase(fleet_drift_cache_healed_total[1h]))",
                "stale cache entries healed {{environment}}",
            ),
        ],
    )
    board.add(
        "table",
        "Last run",
        [
            (
                "max by (environment) (fleet_drift_last_run_timestamp_seconds) * 1000",
                "{{environment}}",
            )
        ],
        unit="dateTimeAsIso",
    )
    return board


def canary() -> Board:
    board = Board("fleet-canary", "config-fleet: canary", "Configuration canaries and verdicts.")
    board.add(
        "stat",
        "Deployments by state",
        [("max by (state) (fleet_canary_deployments)", "{{state}}")],
        width=24,
        height=5,
    )
    board.add(
        "timeseries",
        "Score by deployment",
        [("max by (deployment) (fleet_canary_score)", "{{deployment}}")],
    )
    board.add(
        "timeseries",
        "Analyses by verdict (per hour)",
        [("sum by (verdict) (increase(fleet_canary_analyses_total[1h]))", "{{verdict}}")],
    )
    board.add(
        "timeseries",
        "Decisions (per hour)",
        [("sum by (decision) (increase(fleet_canary_decisions_total[1h]))", "{{decision}}")],
    )
    board.add(
        "timeseries",
        "Writes not announced (per hour)",
        [("sum(increase(fleet_config_announce_failures_total[1h]))", "not announced")],
        description="Committed configuration or flag writes whose cache invalidation or "
        "change event failed (Redis unreachable).",
    )
    board.row("Guarded flag rollouts")
    board.add(
        "timeseries",
        "Rollout percentage by flag",
        [
            (
                "max by (flag, environment) (fleet_rollout_percentage)",
                "{{flag}} {{environment}}",
            )
        ],
        unit="percent",
    )
    board.add(
        "stat",
        "Rollouts by state",
        [("max by (state) (fleet_rollouts)", "{{state}}")],
    )
    board.add(
        "timeseries",
        "Rollout decisions (per hour)",
        [("sum by (decision) (increase(fleet_rollout_steps_total[1h]))", "{{decision}}")],
    )
    board.add(
        "timeseries",
        "Time in the current step",
        [
            (
                "time() - max by (flag, environment) "
                "(fleet_rollout_step_started_timestamp_seconds)",
                "{{flag}} {{environment}}",
            )
        ],
        unit="s",
    )
    return board


def audit() -> Board:
    board = Board("fleet-audit", "config-fleet: audit shipping", "Audit events to their sinks.")
    board.add(
        "stat",
        "Sinks up",
        [("min by (sink) (fleet_audit_sink_up)", "{{sink}}")],
        width=24,
        height=5,
    )
    board.add(
        "timeseries",
        "Shipped per second",
        [
            (
                "sum by (sink, source) (rate(fleet_audit_events_shipped_total[5m]))",
                "{{sink}} {{source}}",
            )
        ],
    )
    board.add(
        "timeseries",
        "Lag",
        [("max by (sink, source) (fleet_audit_ship_lag_seconds)", "{{sink}} {{source}}")],
        unit="s",
    )
    board.add(
        "timeseries",
        "Backlog",
        [("max by (sink, source) (fleet_audit_backlog_events)", "{{sink}} {{source}}")],
    )
    board.add(
        "timeseries",
        "Errors, malformed rows, id gaps passed (per hour)",
        [
            (
                "sum by (sink, kind) (increase(fleet_audit_sink_errors_total[1h]))",
                "{{sink}} {{kind}}",
            ),
            (
                "sum by (source) (increase(fleet_audit_malformed_events_total[1h]))",
                "malformed {{source}}",
            ),
            (
                "sum by (source) (increase(fleet_audit_id_gaps_total[1h]))",
                "id gaps passed {{source}}",
            ),
        ],
    )
    return board


BOARDS = (overview, secrets, impressions, drift, canary, audit)


def rendered() -> dict[str, str]:
    boards = [make().dashboard.build() for make in BOARDS]
    return {
        f"{board.uid}.json": json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        for board in boards
    }


def main() -> None:
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (DIRECTORY / name).write_text(text)


if __name__ == "__main__":
    main()
