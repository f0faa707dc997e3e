"""The alerts, recording rules and dashboards under monitoring/ are checked like code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from monitoring.grafana import generate
from monitoring.metrics import SCRAPE_TIME_NAMES, defined_label_names, defined_metric_names
from schedules.table import default_schedule_file, load_schedules
from tests.helpers import ROOT, installed
from workers.celery_app import JOB_MODULES, load_jobs

PROMETHEUS = ROOT / "monitoring" / "prometheus"
GRAFANA = ROOT / "monitoring" / "grafana"
RUNBOOK = ROOT / "monitoring" / "RUNBOOK.md"

# What each job must show the on-call engineer: on some dashboard and in some alert.
KEY_METRICS = {
    "runtime": [
        "fleet_task_runs_total",
        "fleet_job_last_success_timestamp_seconds",
        "fleet_broker_up",
    ],
    "secrets": [
        "fleet_secret_rotation_due_timestamp_seconds",
        "fleet_secrets",
        "fleet_secret_store_up",
    ],
    "impressions": [
        "fleet_impressions_queue_depth",
        "fleet_impressions_oldest_age_seconds",
        "fleet_impressions_dead_lettered_total",
        "fleet_impressions_orphaned_batches",
    ],
    "drift": ["fleet_drift_findings", "fleet_drift_findings_opened_total"],
    "canary": ["fleet_canary_decisions_total"],
    "rollouts": [
        "fleet_rollout_steps_total",
        "fleet_rollouts",
        "fleet_rollout_step_started_timestamp_seconds",
    ],
    "audit": ["fleet_audit_ship_lag_seconds", "fleet_audit_sink_up"],
}
# Prometheus's own series, which the fleet does not define.
PROMETHEUS_SERIES = {"up"}
# Labels a scrape attaches to every series: a metric's own label of that name would be
# renamed exported_job / exported_instance, and every rule grouping by it would be wrong.
TARGET_LABELS = {"job", "instance"}


def _rules(name: str) -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / name).read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return _rules("alerts.yml")


def _recordings() -> dict[str, list[str]]:
    """Recording rule name -> the expressions recorded under it."""
    recorded: dict[str, list[str]] = {}
    for rule in _rules("rules.yml"):
        recorded.setdefault(rule["record"], []).append(str(rule["expr"]))
    return recorded


def _dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text())
        for path in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    for name, board in _dashboards().items():
        for panel in _panels(board):
            for target in panel.get("targets", []):
                yield f"{name}: {panel['title']}", target["expr"]


def selectors(expression: str) -> set[str]:
    """The series names ``expression`` selects, from its parsed AST."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"{expression}: a selector without a metric name"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def _expand(names: set[str], recorded: dict[str, list[str]]) -> set[str]:
    """``names`` plus every series the recording rules among them are computed from."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for expression in recorded.get(name, []):
            todo.extend(selectors(expression))
    return seen


def test_the_parser_finds_every_selector() -> None:
    found = selectors(
        "histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / ignoring (x) b"
        " + max_over_time(c[5m:1m]) + -(d offset 1m) + absent(e) + vector(1)"
    )
    assert found == {"a_bucket", "b", "c", "d", "e"}


def test_every_metric_named_in_rules_alerts_and_dashboards_is_defined() -> None:
    defined = defined_metric_names()
    recorded = _recordings()
    known = defined | set(recorded) | PROMETHEUS_SERIES
    uses: list[tuple[str, str]] = []
    uses += [(f"rules.yml: {name}", e) for name, es in recorded.items() for e in es]
    uses += [(f"alerts.yml: {a['alert']}", str(a["expr"])) for a in _alerts()]
    uses += list(_dashboard_queries())
    assert len(uses) > 40
    unknown = [
        f"{where}: {name}"
        for where, expression in uses
        for name in selectors(expression)
        if name not in known
    ]
    assert unknown == []
    assert all(name.startswith("fleet:") for name in recorded)


def test_an_undefined_metric_would_be_caught() -> None:
    known = defined_metric_names()
    assert "fleet_secret_rotation_due_timestamp_seconds" in known
    assert "fleet_task_runs_total" in known and "fleet_task_duration_seconds_bucket" in known
    assert not selectors("fleet_secret_rotation_due_timestamp < time()") <= known


def test_every_jobs_key_metrics_are_on_a_dashboard_and_in_an_alert() -> None:
    recorded = _recordings()
    alerted = _expand({n for a in _alerts() for n in selectors(str(a["expr"]))}, recorded)
    shown = _expand({n for _, e in _dashboard_queries() for n in selectors(e)}, recorded)
    defined = defined_metric_names()
    missing = []
    for job, metrics in KEY_METRICS.items():
        for metric in metrics:
            assert metric in defined, metric
            if metric not in alerted:
                missing.append(f"{job}: {metric} is in no alert")
            if metric not in shown:
                missing.append(f"{job}: {metric} is on no dashboard")
    assert missing == []


def test_no_fleet_metric_has_a_label_a_scrape_sets() -> None:
    labels = defined_label_names()
    assert {"task", "outcome", "path", "sink"} <= labels
    assert labels & TARGET_LABELS == set()


def _label_uses(expression: str) -> set[tuple[str, str]]:
    """(series name or "", label) for every label ``expression`` matches, groups or joins
    on, from its parsed AST ("" for grouping and joining, which apply to any series)."""
    used: set[tuple[str, str]] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            for matcher in node.matchers.matchers:
                used.add((node.name or "", matcher.name))
        modifier = getattr(node, "modifier", None)
        for labels in (
            getattr(modifier, "labels", None),  # by / without
            getattr(getattr(modifier, "matching", None), "labels", None),  # on / ignoring
            getattr(modifier, "group_labels", None),  # group_left / group_right
        ):
            used.update(("", label) for label in labels or ())

    promql_parser.walk(promql_parser.parse(expression), visit)
    return used


def _target_label_misuses(expression: str) -> list[str]:
    """Uses of a scrape's labels other than selecting a scrape job's ``up``."""
    return [
        f"{name or 'grouping'}: {label}"
        for name, label in _label_uses(expression)
        if label in TARGET_LABELS and name not in PROMETHEUS_SERIES
    ]


def test_no_rule_or_dashboard_groups_or_matches_on_a_label_a_scrape_sets() -> None:
    uses = [(f"rules.yml: {n}", e) for n, es in _recordings().items() for e in es]
    uses += [(f"alerts.yml: {a['alert']}", str(a["expr"])) for a in _alerts()]
    uses += list(_dashboard_queries())
    wrong = [f"{where}: {bad}" for where, e in uses for bad in _target_label_misuses(e)]
    assert wrong == []
    for rule in _rules("rules.yml") + _alerts():
        assert set(rule.get("labels", {})) & TARGET_LABELS == set(), rule
    # The check itself can fail.
    assert _target_label_misuses("max by (job) (fleet_job_last_success_timestamp_seconds)")
    assert _target_label_misuses("a > on (instance) b")
    assert _target_label_misuses('fleet_task_runs_total{job="drift.detect"}')
    assert not _target_label_misuses('sum(up{job="fleet-workers"})')


def _scrape_jobs() -> set[str]:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    return {scrape["job_name"] for scrape in config["scrape_configs"]}


def test_promtool_input_series_are_shaped_like_a_scrape() -> None:
    """Each input series carries the scrape's job and instance, as Prometheus stores it, and
    fleet-wide gauges come from the exporter's scrape job (per-process ones never do)."""
    document = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    jobs = _scrape_jobs()
    series = [s["series"] for case in document["tests"] for s in case["input_series"]]
    assert len(series) > 30
    for text in series:
        selector = promql_parser.parse(text)
        assert isinstance(selector, promql_parser.VectorSelector), text
        labels = {m.name: m.value for m in selector.matchers.matchers}
        assert not any(name.startswith("exported_") for name in labels), text
        assert labels.get("job") in jobs and labels.get("instance"), text
        if selector.name in SCRAPE_TIME_NAMES:
            assert labels["job"] == "fleet-exporter", text
        elif selector.name != "up":
            assert labels["job"] != "fleet-exporter", text


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    sections = {
        line[3:].strip().lower()
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    alerts = _alerts()
    names = [alert["alert"] for alert in alerts]
    assert len(names) == len(set(names)) >= 16
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook"] == f"monitoring/RUNBOOK.md#{name.lower()}"
        assert name.lower() in sections, f"{name} has no section in RUNBOOK.md"
    assert sections == {name.lower() for name in names}


def test_every_alert_is_tested_firing_and_quiet() -> None:
    document = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            expected = check.get("exp_alerts") or []
            if expected:
                fires.add(check["alertname"])
                for alert in expected:
                    assert "severity" in alert["exp_labels"], check["alertname"]
                    assert set(alert["exp_annotations"]) == {"summary", "description", "runbook"}
            else:
                quiet.add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def _expected_intervals() -> dict[str, float]:
    jobs = load_jobs(JOB_MODULES)
    intervals: dict[str, float] = {}
    start = datetime(2026, 1, 5, 0, 0, 0, 500_000, tzinfo=UTC)
    for schedule in load_schedules(default_schedule_file(), jobs):
        if not schedule.enabled:
            continue
        fires = schedule.next_fires(start, count=3)
        gaps = {(later - earlier).total_seconds() for earlier, later in pairwise(fires)}
        assert len(gaps) == 1, f"{schedule.name}: irregular intervals {gaps}"
        intervals[schedule.job] = min(intervals.get(schedule.job, 1e12), gaps.pop())
    return intervals


def test_the_dead_mans_switch_knows_every_scheduled_job_and_its_interval() -> None:
    configured = {}
    for rule in _rules("rules.yml"):
        if rule.get("record") == "fleet:job_expected_interval_seconds":
            value = re.fullmatch(r"vector\((\d+)\)", str(rule["expr"]).strip())
            assert value, rule
            configured[rule["labels"]["task"]] = float(value.group(1))
    assert configured == _expected_intervals()


def test_the_committed_dashboards_are_what_the_generator_writes() -> None:
    rendered = generate.rendered()
    on_disk = {path.name: path.read_text() for path in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == rendered, "run: python -m monitoring.grafana.generate"


def test_dashboards_use_the_provisioned_data_source_and_unique_ids() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {source["uid"] for source in datasources}
    boards = _dashboards()
    assert {"fleet-overview.json"} < set(boards) and len(boards) == 6
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [panel["id"] for panel in _panels(board)]
        assert len(ids) == len(set(ids)), name
        for panel in _panels(board):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, (name, panel["title"])
                assert panel["targets"], (name, panel["title"])
                assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def _promtool() -> str:
    return installed("promtool", "prometheus")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules() -> None:
    result = _run([_promtool(), "check", "rules", "rules.yml", "alerts.yml"], PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = _run([_promtool(), "test", "rules", "alerts_test.yml"], PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_unit_tests_would_catch_a_broken_alert(tmp_path: Path) -> None:
    for name in ("rules.yml", "alerts_test.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    broken = (
        (PROMETHEUS / "alerts.yml")
        .read_text()
        .replace(
            "fleet_secret_rotation_due_timestamp_seconds) < time()",
            "fleet_secret_rotation_due_timestamp_seconds) > time()",
        )
    )
    (tmp_path / "alerts.yml").write_text(broken)
    result = _run([_promtool(), "test", "rules", "alerts_test.yml"], tmp_path)
    assert result.returncode != 0
    assert "FleetSecretRotationOverdue" in result.stdout + result.stderr


def test_prometheus_config_is_valid_and_loads_the_rules(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    files = [Path(path).name for path in config["rule_files"]]
    assert files == ["rules.yml", "alerts.yml"]
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    assert jobs == {"fleet-workers", "fleet-schedulers", "fleet-exporter"}
    for alert in _alerts():
        for job in re.findall(r'up\{job="([^"]+)"\}', str(alert["expr"])):
            assert job in jobs, alert["alert"]
    for name in files:
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    config["rule_files"] = [str(tmp_path / name) for name in files]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = _run([_promtool(), "check", "config", "prometheus.yml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
