"""deploy/vault/init.sh, compose's vault-init, against a real Vault-API server: a fresh OpenBao
dev server of each test's own (init.sh changes it: a policy, a token, a sample secret), with
OpenBao's ``bao`` CLI standing in for ``vault`` (same commands and flags). The fleet's own
VaultStore then works with the token it wrote, and only within its policy."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.secrets.stores import StoreUnavailable, VaultStore
from tests.helpers import ROOT
from tests.openbao_server import ROOT_TOKEN, OpenBao, bao_binary, openbao_server
from workers.settings import FleetSettings

INIT = ROOT / "deploy" / "vault" / "init.sh"
POLICY = ROOT / "deploy" / "vault" / "fleet-policy.hcl"
SAMPLE = "apis/payments"


@pytest.fixture
def bare_openbao() -> Iterator[OpenBao]:
    """A dev server as compose's is before vault-init: KV v2 at secret/ and nothing of the
    fleet's (openbao_server() writes the fleet's policy itself: removed here, so that what
    the test finds is what init.sh wrote)."""
    with openbao_server() as bao:
        bao.api("DELETE", "sys/policies/acl/config-fleet")
        yield bao


def run_init(bao: OpenBao, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "vault").symlink_to(bao_binary())
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": ROOT_TOKEN,
        "POLICY_FILE": str(POLICY),
        "TOKEN_FILE": str(tmp_path / "token"),
        "FLEET_VAULT_MOUNT": "secret",
        "FLEET_VAULT_PATH_PREFIX": "platform",
    }
    return subprocess.run(
        ["sh", str(INIT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def fleet_store(bao: OpenBao, tmp_path: Path, prefix: str = "platform") -> VaultStore:
    """The fleet's store as a worker builds it from compose's settings (the token file)."""
    return VaultStore(
        FleetSettings(
            vault_addr=bao.url,
            vault_token=None,
            vault_token_file=tmp_path / "token",
            vault_role_id=None,
            vault_secret_id=None,
            vault_namespace=None,
            vault_mount="secret",
            vault_path_prefix=prefix,
            home=tmp_path,
        )
    )


def server_state(bao: OpenBao) -> dict[str, Any]:
    """What init.sh may set up, as the server reports it (the token aside)."""
    mount = bao.api("GET", "sys/mounts")["data"]["secret/"]
    metadata = bao.api("GET", f"secret/metadata/platform/{SAMPLE}")["data"]
    return {
        "mount": {k: mount[k] for k in ("type", "options", "uuid", "accessor", "config")},
        "policy": bao.api("GET", "sys/policies/acl/config-fleet")["data"]["policy"],
        "sample": metadata,
        "sample_data": bao.api("GET", f"secret/data/platform/{SAMPLE}")["data"]["data"],
        "managed": bao.api("LIST", "secret/metadata/platform/")["data"]["keys"],
    }


def lookup_self(bao: OpenBao, token: str) -> dict[str, Any]:
    data: dict[str, Any] = bao.api("GET", "auth/token/lookup-self", token=token)["data"]
    return data


@pytest.mark.parametrize("mounted", [True, False], ids=["dev-mount", "no-mount"])
def test_init_sets_up_the_fleet_on_a_real_server_and_runs_again(
    bare_openbao: OpenBao, tmp_path: Path, mounted: bool
) -> None:
    bao = bare_openbao
    if not mounted:  # a server without dev mode's secret/: init.sh enables KV v2 there
        bao.api("DELETE", "sys/mounts/secret")

    first = run_init(bao, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    token_file = tmp_path / "token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o444  # the workers' uid reads it
    assert not (tmp_path / "token.new").exists()

    me = lookup_self(bao, token)
    assert sorted(me["policies"]) == ["config-fleet", "default"]
    assert me["period"] == 768 * 3600  # periodic: renewed by the workers, never expires
    state = server_state(bao)
    assert state["policy"] == POLICY.read_text()
    assert state["mount"]["type"] == "kv" and state["mount"]["options"]["version"] == "2"
    assert state["sample"]["custom_metadata"] == {
        "rotation_interval_days": "30",
        "owner": "payments",
    }

    store = fleet_store(bao, tmp_path)
    store.health()
    assert store.list_paths() == [SAMPLE]
    sample = store.metadata(SAMPLE)
    assert sample.current_version == 1
    assert sample.custom_metadata == {"rotation_interval_days": "30", "owner": "payments"}
    assert store.read(SAMPLE)["api_key"].startswith("demo-")
    with pytest.raises(StoreUnavailable, match=r"403"):  # outside its prefix
        fleet_store(bao, tmp_path, prefix="elsewhere").write("x", {"k": "v"}, cas=0)
    with pytest.raises(StoreUnavailable, match=r"403"):  # operators create managed secrets
        store.write("apis/new", {"k": "v"}, cas=0)

    second = run_init(bao, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    new_token = token_file.read_text().strip()
    assert new_token != token
    assert sorted(lookup_self(bao, new_token)["policies"]) == ["config-fleet", "default"]
    assert server_state(bao) == state  # nothing else changed: not even the sample's version
    assert fleet_store(bao, tmp_path).list_paths() == [SAMPLE]


def test_init_refuses_to_run_without_the_root_token(tmp_path: Path) -> None:
    done = subprocess.run(
        ["sh", str(INIT)],
        env={"PATH": "/usr/bin:/bin", "VAULT_ADDR": "http://127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0 and "VAULT_TOKEN" in done.stderr
