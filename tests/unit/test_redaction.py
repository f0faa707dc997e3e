from __future__ import annotations

import io

import orjson
import pytest
import structlog

from workers.logs import REDACTED, Redactor, configure_logging, get_logger, register_secret


@pytest.mark.parametrize(
    "field",
    [
        "password",
        "db_password",
        "PASSWD",
        "secret",
        "client_secret",
        "token",
        "vault_token",
        "api_key",
        "apiKey",
        "Authorization",
        "private_key",
        "credentials",
        "signing_key",
    ],
)
def test_secret_looking_fields_are_hidden(field: str) -> None:
    event = Redactor()(None, "info", {"event": "x", field: "hunter22"})
    assert event[field] == REDACTED


@pytest.mark.parametrize("field", ["path", "user", "status", "owner"])
def test_ordinary_fields_are_kept(field: str) -> None:
    assert Redactor()(None, "info", {field: "visible"})[field] == "visible"


def test_the_event_name_is_never_hidden_for_its_field_name() -> None:
    assert Redactor()(None, "info", {"event": "token_refreshed"})["event"] == "token_refreshed"


def test_known_values_are_hidden_anywhere() -> None:
    redactor = Redactor(["Zq9-secret-VALUE"])
    event = redactor(
        None,
        "info",
        {
            "event": "login failed for Zq9-secret-VALUE",
            "detail": {"nested": ["a", "pw=Zq9-secret-VALUE;"]},
            "error": ValueError("bad Zq9-secret-VALUE"),
        },
    )
    dumped = orjson.dumps(event, default=str).decode()
    assert "Zq9-secret-VALUE" not in dumped
    assert event["detail"]["nested"][1] == f"pw={REDACTED};"
    assert event["error"] == f"ValueError: bad {REDACTED}"


def test_longest_secret_wins_when_one_contains_another() -> None:
    redactor = Redactor(["abcd", "abcdefgh"])
    assert redactor.text("x abcdefgh y") == f"x {REDACTED} y"


def test_short_values_are_not_registered() -> None:
    redactor = Redactor(["abc", ""])
    assert redactor.text("abc") == "abc"


def test_empty_secret_fields_stay_empty() -> None:
    assert Redactor()(None, "info", {"password": None})["password"] is None


def test_logged_lines_are_json_with_context_and_no_secrets() -> None:
    stream = io.StringIO()
    configure_logging(
        level="INFO", log_format="json", secrets=["S3cretFromSettings"], stream=stream
    )
    register_secret("ValueReadFromVault")
    structlog.contextvars.bind_contextvars(job="fleet.heartbeat", task_id="t-1", schedule="hb")
    try:
        log = get_logger("test")
        log.info("rotated", path="db/app", password="x1234", note="old ValueReadFromVault")
        import logging

        logging.getLogger("celery.worker").warning("conn S3cretFromSettings refused")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "rotated"
    assert (lines[0]["job"], lines[0]["task_id"], lines[0]["schedule"]) == (
        "fleet.heartbeat",
        "t-1",
        "hb",
    )
    assert lines[0]["password"] == REDACTED
    assert lines[0]["note"] == f"old {REDACTED}"
    assert lines[1]["event"] == f"conn {REDACTED} refused"
    assert lines[1]["logger"] == "celery.worker"
    text = stream.getvalue()
    assert "S3cretFromSettings" not in text and "ValueReadFromVault" not in text
