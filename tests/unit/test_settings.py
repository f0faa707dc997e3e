from __future__ import annotations

from pathlib import Path

import pytest

from workers.settings import FleetSettings, SettingsError, load_settings, mask_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FLEET_* from the developer's shell, and no .env but the test's own."""
    import os

    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_embedded_default() -> None:
    settings = load_settings()
    assert settings.embedded_database and settings.embedded_redis
    assert settings.sqlalchemy_url.startswith("sqlite:///")
    assert settings.sqlalchemy_url.endswith(".fleet/fleet.db")
    assert settings.metrics_port == 9808
    assert settings.describe()["redis"] == "embedded"


def test_postgres_url_uses_psycopg3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", "postgresql://fleet@db:5432/fleet")
    assert load_settings().sqlalchemy_url == "postgresql+psycopg://fleet@db:5432/fleet"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FLEET_METRICS_PORT", "abc", "FLEET_METRICS_PORT='abc': Input should be a valid integer"),
        ("FLEET_METRICS_PORT", "70000", "FLEET_METRICS_PORT='70000': Input should be less than"),
        ("FLEET_LOG_FORMAT", "xml", "FLEET_LOG_FORMAT='xml': Input should be 'json' or 'console'"),
        ("FLEET_REDIS_URL", "http://x", "FLEET_REDIS_URL: scheme must be one of redis, rediss"),
        ("FLEET_DATABASE_URL", "mysql://x", "FLEET_DATABASE_URL: scheme must be one of"),
        ("FLEET_VAULT_ADDR", "vault:8200", "FLEET_VAULT_ADDR: must be an http:// or https://"),
        ("FLEET_VISIBILITY_TIMEOUT", "0", "FLEET_VISIBILITY_TIMEOUT='0': Input should be greater"),
        ("FLEET_TIME_LIMITS", "{not json", "FLEET_TIME_LIMITS: not valid JSON"),
        ("FLEET_TIME_LIMITS", '{"a": [5, 3]}', "FLEET_TIME_LIMITS: a: soft limit 5.0 must be"),
        ("FLEET_VAULT_TOKEN_FILE", "/nonexistent/token", "FLEET_VAULT_TOKEN_FILE: /nonexistent"),
        ("FLEET_EXTRA_JOB_MODULES", "tasks.x", "FLEET_EXTRA_JOB_MODULES: not valid JSON"),
        ("FLEET_WORKER_LOST_AFTER", "20", "FLEET_WORKER_LOST_AFTER (20s) must be at least twice"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_several_bad_values_report_the_first_and_count_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_METRICS_PORT", "x")
    monkeypatch.setenv("FLEET_WORKER_CONCURRENCY", "0")
    with pytest.raises(SettingsError, match=r"\(and 1 more\)$"):
        load_settings()


def test_empty_value_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", "")
    monkeypatch.setenv("FLEET_VAULT_ADDR", "")
    for name in ("EXTRA_JOB_MODULES", "VAULT_DATABASE_MOUNTS", "TIME_LIMITS", "AUDIT_SINK_HEADERS"):
        monkeypatch.setenv(f"FLEET_{name}", "")  # JSON settings too (they failed to parse)
    settings = load_settings()
    assert settings.database_url is None and settings.vault_addr is None
    assert settings.extra_job_modules == settings.vault_database_mounts == []
    assert settings.time_limits == settings.audit_sink_headers == {}


def test_a_json_setting_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_EXTRA_JOB_MODULES", "[not json")
    with pytest.raises(SettingsError, match=r"^FLEET_EXTRA_JOB_MODULES"):
        load_settings()


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FLEET_METRICS_PORT=9999\nFLEET_LOG_FORMAT=console\n")
    settings = load_settings()
    assert settings.metrics_port == 9999
    assert settings.log_format == "console"


def test_environment_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FLEET_METRICS_PORT=9999\n")
    monkeypatch.setenv("FLEET_METRICS_PORT", "7000")
    assert load_settings().metrics_port == 7000


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.metrics_port = 1  # type: ignore[misc]


SECRET = "s3cr3t-Pa55word"


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("hvs.TOKENFROMFILE\n")
    monkeypatch.setenv("FLEET_DATABASE_URL", f"postgresql://fleet:{SECRET}@db/fleet")
    monkeypatch.setenv("FLEET_REDIS_URL", f"redis://:{SECRET}x@cache:6379/0")
    monkeypatch.setenv("FLEET_VAULT_TOKEN", "hvs.DIRECTTOKEN")
    settings = load_settings()
    shown = repr(settings) + str(settings) + str(settings.describe())
    assert SECRET not in shown
    assert "hvs.DIRECTTOKEN" not in shown
    assert settings.describe()["database"] == "postgresql+psycopg://fleet:***@db/fleet"
    assert set(settings.secret_values()) == {SECRET, SECRET + "x", "hvs.DIRECTTOKEN"}
    monkeypatch.delenv("FLEET_VAULT_TOKEN")
    from_file = FleetSettings(vault_token_file=token_file)
    assert from_file.vault_token_value() == "hvs.TOKENFROMFILE"
    assert "TOKENFROMFILE" not in repr(from_file)


def test_token_and_token_file_together_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("FLEET_VAULT_TOKEN", "hvs.X")
    monkeypatch.setenv("FLEET_VAULT_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(SettingsError, match=r"^FLEET_VAULT_TOKEN and FLEET_VAULT_TOKEN_FILE"):
        load_settings()


def test_a_bad_secret_is_not_echoed_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", f"oracle://fleet:{SECRET}@db/fleet")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
