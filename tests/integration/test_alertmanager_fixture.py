"""The Prometheus + Alertmanager fixtures end to end, with no fleet processes: the shipped
prometheus.yml's jobs, pointed at dead loopback ports, fire an alert that reaches the
webhook receiver through a real Alertmanager."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.alertmanager_server import Alert, WebhookReceiver, alertmanager
from tests.helpers import ROOT, free_port
from tests.prometheus_server import prometheus_from_config

SHIPPED = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
RULES = """
groups:
  - name: fixture
    rules:
      - alert: TestTargetDown
        expr: up == 0
        for: 0s
        labels: {severity: test}
"""


def shipped_jobs() -> list[str]:
    return [job["job_name"] for job in yaml.safe_load(SHIPPED.read_text())["scrape_configs"]]


def test_a_down_target_alerts_through_alertmanager(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    jobs = shipped_jobs()
    # Free ports nobody listens on: every scrape is refused, so up == 0 at once.
    targets = {job: [f"127.0.0.1:{free_port()}"] for job in jobs}
    with (
        WebhookReceiver() as receiver,
        alertmanager(receiver.url) as alertmanager_url,
        prometheus_from_config(SHIPPED, targets, [rules], alertmanager_url),
    ):

        def down(alert: Alert) -> bool:
            return (
                alert["status"] == "firing"
                and alert["labels"].get("alertname") == "TestTargetDown"
                and alert["labels"].get("job") in jobs
            )

        alert = receiver.wait_for(down, timeout=30, what="a firing TestTargetDown")
    labels = alert["labels"]
    assert labels["severity"] == "test"
    assert labels["instance"] in targets[labels["job"]]


@pytest.mark.parametrize("change", ["drop", "add"])
def test_targets_must_match_the_shipped_jobs(change: str) -> None:
    targets = {job: ["127.0.0.1:1"] for job in shipped_jobs()}
    if change == "drop":
        named = shipped_jobs()[-1]
        del targets[named]
    else:
        named = "fleet-not-shipped"
        targets[named] = ["127.0.0.1:1"]
    with (
        pytest.raises(pytest.fail.Exception, match=named),
        prometheus_from_config(SHIPPED, targets, []),
    ):
        pass
