"""docker-compose.yml, the Dockerfile and deploy/ checked as files (Docker does not run
here): everything they name exists in the repository and matches what the fleet reads."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT
from tests.vault_policy import allowed, load_policy
from workers.settings import ENV_PREFIX, FleetSettings, load_settings

COMPOSE = ROOT / "docker-compose.yml"
FLEET_SERVICES = {"migrate", "worker-1", "worker-2", "scheduler-1", "scheduler-2", "exporter"}
# The scrape job of each fleet service, and the port it serves on past FLEET_METRICS_PORT.
SCRAPE_JOBS = {"worker-": ("fleet-workers", 0), "scheduler-": ("fleet-schedulers", 1)}
SCRAPE_JOBS["exporter"] = ("fleet-exporter", 2)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry."""
    found = []
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        found.append((parts[0], parts[1], len(parts) > 2 and parts[2] == "ro"))
    return found


def container_path(service: dict[str, Any], path: str) -> Path | None:
    """The repository file behind ``path`` in ``service``'s container, if bind-mounted."""
    for source, target, _ in mounts(service):
        if not source.startswith("./"):
            continue
        target_path = PurePosixPath(target)
        wanted = PurePosixPath(path)
        if wanted == target_path or target_path in wanted.parents:
            return ROOT / source / wanted.relative_to(target_path)
    return None


def fleet_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in service["environment"].items()}


def test_every_service_is_there_with_pinned_images(compose: dict[str, Any]) -> None:
    found = services(compose)
    assert set(found) == FLEET_SERVICES | {
        "redis",
        "postgres",
        "vault",
        "vault-init",
        "prometheus",
        "grafana",
    }
    for name, service in found.items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", tag), (name, image)
        if name in FLEET_SERVICES:
            assert service["build"] == "."


def test_dependencies_exist_and_wait_for_health_or_completion(compose: dict[str, Any]) -> None:
    found = services(compose)
    for name, service in found.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in found, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in found[dependency], f"{dependency} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, dependency)
                assert found[dependency].get("restart") == "no", dependency
    for name in ("worker-1", "worker-2"):
        needs = found[name]["depends_on"]
        assert {"migrate", "vault-init", "redis"} <= set(needs)
    for name in FLEET_SERVICES - {"migrate"}:
        assert "healthcheck" in found[name], name
        assert found[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_volumes_are_declared_used_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in services(compose).items():
        for source, _target, _ in mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
    assert used == declared


def test_fleet_variables_are_settings_the_fleet_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fields = {ENV_PREFIX + name.upper() for name in FleetSettings.model_fields}
    monkeypatch.chdir(tmp_path)  # no .env
    for name in FLEET_SERVICES:
        service = services(compose)[name]
        env = fleet_env(service)
        assert set(env) <= fields, f"{name}: unknown {set(env) - fields}"
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        # The token file exists only in the container: validate the rest with a stand-in.
        token_file = PurePosixPath(env["FLEET_VAULT_TOKEN_FILE"])
        (tmp_path / "token").write_text("hvs.stand-in\n")
        monkeypatch.setenv("FLEET_VAULT_TOKEN_FILE", str(tmp_path / "token"))
        settings = load_settings()
        assert settings.database_url and settings.database_url.startswith("postgresql://")
        assert settings.redis_url == "redis://redis:6379/0"
        # The files and directories it names are mounted into the container.
        config = container_path(service, str(settings.config_dir))
        assert config is not None and (config / "environments").is_dir()
        assert (config / "rotation-policies.yaml").is_file()
        token_dir = str(token_file.parent)
        assert (settings.vault_addr or "").startswith("http://vault:")
        assert (settings.prometheus_url or "").startswith("http://prometheus:")
        volumes = {target: source for source, target, _ in mounts(service)}
        assert volumes[token_dir] == "vault-token"
    init = services(compose)["vault-init"]["environment"]
    worker = fleet_env(services(compose)["worker-1"])
    assert init["FLEET_VAULT_MOUNT"] == worker["FLEET_VAULT_MOUNT"]
    assert init["FLEET_VAULT_PATH_PREFIX"] == worker["FLEET_VAULT_PATH_PREFIX"]
    assert (
        PurePosixPath(init["TOKEN_FILE"]).name
        == PurePosixPath(worker["FLEET_VAULT_TOKEN_FILE"]).name
    )


def test_prometheus_scrapes_the_fleets_processes_where_they_serve(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    prometheus = found["prometheus"]
    config_path = container_path(prometheus, "/etc/prometheus/prometheus.yml")
    assert config_path is not None
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        mounted = container_path(prometheus, rule_file)
        assert mounted is not None and mounted.is_file(), rule_file
    port = int(fleet_env(found["worker-1"])["FLEET_METRICS_PORT"])
    expected: dict[str, set[str]] = {}
    for name in FLEET_SERVICES - {"migrate"}:
        job, offset = next(v for prefix, v in SCRAPE_JOBS.items() if name.startswith(prefix))
        expected.setdefault(job, set()).add(f"{name}:{port + offset}")
        probe = " ".join(found[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port + offset}/metrics" in probe, name
    targets = {
        job["job_name"]: {t for static in job["static_configs"] for t in static["targets"]}
        for job in config["scrape_configs"]
    }
    assert targets == expected


def test_grafana_is_provisioned_from_the_repository(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    provisioning = container_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    providers = yaml.safe_load((provisioning / "dashboards" / "fleet.yml").read_text())
    dashboards = container_path(grafana, providers["providers"][0]["options"]["path"])
    assert dashboards is not None and len(list(dashboards.glob("*.json"))) == 6
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_file = container_path(grafana, home)
    assert home_file is not None and home_file.is_file()


def test_vault_init_writes_the_policy_the_tests_check(compose: dict[str, Any]) -> None:
    init = services(compose)["vault-init"]
    script = container_path(init, init["entrypoint"][-1])
    policy = container_path(init, init["environment"]["POLICY_FILE"])
    assert script is not None and script.is_file()
    assert policy == ROOT / "deploy" / "vault" / "fleet-policy.hcl"
    assert policy is not None
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    text = script.read_text()
    assert "secrets enable -path=" in text and "-version=2 kv" in text
    assert "vault policy write config-fleet" in text
    token_dir = str(PurePosixPath(init["environment"]["TOKEN_FILE"]).parent)
    assert (token_dir, False) in {(t, ro) for s, t, ro in mounts(init) if s == "vault-token"}
    # The policy covers the mount and prefix the fleet is configured with, and only them.
    rules = load_policy(policy)
    env = init["environment"]
    base = f"{env['FLEET_VAULT_MOUNT']}/%s/{env['FLEET_VAULT_PATH_PREFIX']}/"
    assert allowed(rules, base % "metadata", "list")
    assert allowed(rules, base % "data" + "db/app", "read")
    assert not allowed(rules, f"{env['FLEET_VAULT_MOUNT']}/data/elsewhere/db", "read")
    assert not allowed(rules, "sys/policies/acl/config-fleet", "update")


def test_the_dockerfile_copies_what_exists_and_installs_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE)
    assert base and re.search(r":\d+\.\d+\.\d+-", base.group(1)), "pin the base image"
    copied = []
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        *sources, _target = line.split()
        copied += sources
    for source in copied:
        assert (ROOT / source).exists(), source
    packaged = yaml.safe_load(
        re.search(r"include = (\[.*\])", (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    )
    assert {p.rstrip("*") for p in packaged} <= set(copied)
    exposed = set(re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)[0].split())
    assert exposed == {"9808", "9809"}
    assert '"fleet"' in re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]
