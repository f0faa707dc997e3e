from __future__ import annotations

import subprocess
import sys

import pytest

from workers.bookkeeping import MAX_RESULT_BYTES, describe_error, outcome_of, result_summary
from workers.logs import register_secret


@pytest.mark.parametrize(
    ("state", "retval", "outcome"),
    [
        ("SUCCESS", {"ok": 1}, "success"),
        ("SUCCESS", None, "success"),
        ("SUCCESS", {"skipped": True, "reason": "lock held"}, "skipped"),
        ("SUCCESS", {"skipped": "yes"}, "success"),
        ("RETRY", None, "retry"),
        ("FAILURE", ValueError("x"), "failure"),
        ("REJECTED", None, "failure"),
        (None, None, "failure"),
    ],
)
def test_outcome_of_a_run(state: str | None, retval: object, outcome: str) -> None:
    assert outcome_of(state, retval) == outcome


def test_result_summary_is_json_and_bounded() -> None:
    assert result_summary({"n": 1, "at": object.__name__}) == {"n": 1, "at": "object"}
    assert result_summary([1, 2]) == {"value": [1, 2]}
    assert result_summary(None) is None
    assert result_summary(ValueError("x")) is None
    big = result_summary({"blob": "x" * (MAX_RESULT_BYTES + 1)})
    assert big is not None and big["truncated"] is True


def test_error_text_is_one_redacted_line() -> None:
    register_secret("pw-Q7x!vault")
    text = describe_error(RuntimeError("login\nwith pw-Q7x!vault\tfailed"))
    assert text == "RuntimeError: login with *** failed"
    assert describe_error(None) is None
    assert len(describe_error("x" * 5000) or "") == 2000


def test_the_cli_does_not_import_prometheus_client_before_a_worker_chooses_its_mode() -> None:
    """`fleet worker` must set multiprocess mode before prometheus_client's first import."""
    code = (
        "import sys; import workers.cli as c; c._register_commands(); "
        "assert 'prometheus_client' not in sys.modules, 'imported too early'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
