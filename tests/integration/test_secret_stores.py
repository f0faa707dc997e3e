"""One contract, every secret store: the embedded SQL store (PostgreSQL and SQLite) and
Vault KV v2 through hvac against a real Vault-API server (OpenBao dev mode, see
tests/openbao_server.py), with a token and with AppRole. Then what only a real server shows:
sealing, refused tokens, KV v2 settings operators use (``cas_required``,
``delete_version_after``, ``max_versions``), metadata-only keys and metadata limits, and the
token's lifecycle (renewal, re-login, a rewritten token file)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from tasks.secrets.model import rotation_status
from tasks.secrets.stores import (
    CasMismatch,
    SecretNotFound,
    SecretStore,
    SqlStore,
    StoreRefused,
    StoreUnavailable,
    VaultStore,
    load_or_create_key,
)
from tests.openbao_server import OpenBao
from workers.db import make_engine
from workers.db.models import FleetSecretVersion
from workers.settings import FleetSettings


def bao_settings(openbao: OpenBao, prefix: str, home: Path, **auth: Any) -> FleetSettings:
    return FleetSettings(vault_addr=openbao.url, vault_path_prefix=prefix, home=home, **auth)


def operator_store(openbao: OpenBao, home: Path, how: str = "token") -> VaultStore:
    """A store on a prefix of its own, with an operator's rights on it."""
    prefix = openbao.prefix()
    policy = openbao.operator_policy(prefix)
    if how == "approle":
        role_id, secret_id = openbao.approle(f"role-{prefix}", policy)
        auth: dict[str, Any] = {"vault_role_id": role_id, "vault_secret_id": secret_id}
    else:
        auth = {"vault_token": openbao.token(policy)}
    return VaultStore(bao_settings(openbao, prefix, home, **auth))


@pytest.fixture(params=["sql-postgres", "sql-sqlite", "openbao-token", "openbao-approle"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretStore]:
    if request.param.startswith("openbao"):
        openbao: OpenBao = request.getfixturevalue("openbao")
        yield operator_store(openbao, tmp_path, request.param.removeprefix("openbao-"))
        return
    fixture = "postgres_url" if request.param == "sql-postgres" else "sqlite_url"
    engine = make_engine(request.getfixturevalue(fixture))
    yield SqlStore(engine, Fernet.generate_key(), prefix="platform")
    engine.dispose()


def test_versions_and_check_and_set(store: SecretStore) -> None:
    assert store.write("db/app", {"username": "app", "password": "one"}, cas=0) == 1
    with pytest.raises(CasMismatch):
        store.write("db/app", {"password": "two"}, cas=0)
    assert store.write("db/app", {"username": "app", "password": "two"}, cas=1) == 2
    with pytest.raises(CasMismatch):
        store.write("db/app", {"password": "three"}, cas=1)
    assert store.write("db/app", {"username": "app", "password": "three"}) == 3
    assert store.read("db/app") == {"username": "app", "password": "three"}
    assert store.read("db/app", version=1)["password"] == "one"
    meta = store.metadata("db/app")
    assert meta.current_version == 3
    assert sorted(meta.versions) == [1, 2, 3]
    assert meta.versions[1].created_time <= meta.versions[3].created_time
    assert meta.current is not None and meta.current.deletion_time is None


def test_custom_metadata(store: SecretStore) -> None:
    store.write("db/app", {"password": "x"})
    store.set_custom_metadata("db/app", {"rotation_interval_days": "30", "owner": "platform"})
    assert store.metadata("db/app").custom_metadata == {
        "rotation_interval_days": "30",
        "owner": "platform",
    }
    store.write("db/app", {"password": "y"})
    assert store.metadata("db/app").custom_metadata["owner"] == "platform"  # kept across versions


def test_recursive_listing_and_delete(store: SecretStore) -> None:
    assert store.list_paths() == []
    for path in ("db/app", "db/reports/readonly", "apis/openai", ".rotation/db/app"):
        store.write(path, {"v": "1"})
    assert store.list_paths() == [
        ".rotation/db/app",
        "apis/openai",
        "db/app",
        "db/reports/readonly",
    ]
    store.delete(".rotation/db/app")
    assert ".rotation/db/app" not in store.list_paths()
    with pytest.raises(SecretNotFound):
        store.read(".rotation/db/app")


def test_missing_secrets(store: SecretStore) -> None:
    with pytest.raises(SecretNotFound):
        store.read("nope")
    with pytest.raises(SecretNotFound):
        store.metadata("nope")
    store.health()


def test_values_are_registered_as_secrets(store: SecretStore) -> None:
    from workers.logs import redact

    store.write("apis/openai", {"api_key": "sk-contract-abcdef"})
    store.read("apis/openai")
    assert redact("key sk-contract-abcdef leaked") == "key *** leaked"


# The embedded store in particular ---------------------------------------------------------


def test_values_are_encrypted_at_rest(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    store = SqlStore(engine, Fernet.generate_key())
    store.write("db/app", {"password": "plain-text-never-stored"})
    with engine.connect() as connection:
        (ciphertext,) = connection.execute(select(FleetSecretVersion.ciphertext)).one()
    assert "plain-text-never-stored" not in ciphertext
    other = SqlStore(engine, Fernet.generate_key())
    with pytest.raises(Exception, match="cannot decrypt"):
        other.read("db/app")
    engine.dispose()


def test_the_key_is_generated_once_with_tight_permissions(tmp_path: Path) -> None:
    settings = FleetSettings(home=tmp_path)
    key = load_or_create_key(settings)
    assert load_or_create_key(settings) == key
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    given = Fernet.generate_key().decode()
    assert load_or_create_key(FleetSettings(home=tmp_path, secret_key=given)) == given.encode()


# What a real server does ------------------------------------------------------------------


def test_a_sealed_server_is_unavailable_until_unsealed(openbao: OpenBao, tmp_path: Path) -> None:
    store = operator_store(openbao, tmp_path)
    store.write("db/app", {"password": "before-seal"})
    openbao.seal()
    try:
        with pytest.raises(StoreUnavailable, match="sealed"):
            store.health()
        with pytest.raises(StoreUnavailable, match="sealed"):
            store.list_paths()
    finally:
        openbao.unseal()
    assert store.list_paths() == ["db/app"]


def test_a_token_without_the_policy_is_refused(openbao: OpenBao, tmp_path: Path) -> None:
    owner = operator_store(openbao, tmp_path)
    owner.write("db/app", {"password": "p"})
    stranger_policy = openbao.operator_policy(openbao.prefix())
    settings = bao_settings(
        openbao, owner._prefix, tmp_path, vault_token=openbao.token(stranger_policy)
    )
    stranger = VaultStore(settings)
    stranger.health()  # the token itself is fine
    for attempt in (lambda: stranger.read("db/app"), lambda: stranger.metadata("db/app")):
        with pytest.raises(StoreUnavailable, match=r"permission denied \(403\)"):
            attempt()
    wrong = VaultStore(bao_settings(openbao, owner._prefix, tmp_path, vault_token="s.wrong"))
    with pytest.raises(StoreUnavailable, match=r"permission denied \(403\)"):
        wrong.health()


def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    from tests.helpers import free_port

    store = VaultStore(
        FleetSettings(
            vault_addr=f"http://127.0.0.1:{free_port()}",
            vault_token="s.any",
            vault_timeout=2,
            home=tmp_path,
        )
    )
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        store.health()


def kv_mount(openbao: OpenBao, **config: Any) -> str:
    """A KV v2 mount of the test's own, with mount-wide ``config`` (cas_required, ...)."""
    name = f"kv-{openbao.prefix()}"
    openbao.api("POST", f"sys/mounts/{name}", json={"type": "kv", "options": {"version": "2"}})
    if config:
        openbao.api("POST", f"{name}/config", json=config)
    return name


def mount_store(openbao: OpenBao, mount: str, home: Path) -> VaultStore:
    prefix = openbao.prefix()
    policy = openbao.operator_policy(prefix, mount=mount)
    settings = bao_settings(openbao, prefix, home, vault_token=openbao.token(policy))
    return VaultStore(settings.model_copy(update={"vault_mount": mount}))


def test_writes_work_where_check_and_set_is_required(openbao: OpenBao, tmp_path: Path) -> None:
    store = mount_store(openbao, kv_mount(openbao, cas_required=True), tmp_path)
    assert store.write("db/app", {"password": "one"}) == 1  # cas 0: a new key
    assert store.write("db/app", {"password": "two"}) == 2  # cas: the version just read
    with pytest.raises(CasMismatch):
        store.write("db/app", {"password": "three"}, cas=1)
    assert store.read("db/app") == {"password": "two"}


def test_a_version_that_will_be_deleted_later_is_current(openbao: OpenBao, tmp_path: Path) -> None:
    """delete_version_after gives every new version a deletion time in the future: the
    version is current, readable, and its status says when it goes."""
    store = mount_store(openbao, kv_mount(openbao, delete_version_after="240h"), tmp_path)
    store.write("db/app", {"password": "short-lived"})
    store.set_custom_metadata("db/app", {"rotation_interval_days": "30"})
    meta = store.metadata("db/app")
    assert meta.current is not None and meta.current.deletion_time is not None
    now = datetime.now(UTC)
    assert meta.current.deletion_time > now + timedelta(days=9)
    assert store.read("db/app") == {"password": "short-lived"}
    status = rotation_status(meta, [], now)
    assert status.status == "ok"
    assert status.reason is not None and "will be deleted at" in status.reason
    # Once that time has passed, the version is gone.
    assert rotation_status(meta, [], now + timedelta(days=11)).status == "error"


def test_a_key_with_metadata_and_no_version(openbao: OpenBao, tmp_path: Path) -> None:
    store = operator_store(openbao, tmp_path)
    store.set_custom_metadata("db/planned", {"rotation_interval_days": "30"})
    meta = store.metadata("db/planned")
    assert (meta.current_version, dict(meta.versions)) == (0, {})
    status = rotation_status(meta, [], datetime.now(UTC))
    assert (status.status, status.reason) == ("error", "no version (metadata only)")


def test_custom_metadata_keeps_the_operators_key_settings(openbao: OpenBao, tmp_path: Path) -> None:
    store = operator_store(openbao, tmp_path)
    store.write("db/app", {"password": "p"})
    path = f"secret/metadata/{store._full('db/app')}"
    settings = {"max_versions": 7, "cas_required": True, "delete_version_after": "72h0m0s"}
    openbao.api("POST", path, json=settings)
    store.set_custom_metadata("db/app", {"owner": "platform"})
    data = openbao.api("GET", path)["data"]
    assert {k: data[k] for k in settings} == settings
    assert data["custom_metadata"] == {"owner": "platform"}


def test_metadata_over_the_servers_limits_is_refused_for_good(
    openbao: OpenBao, tmp_path: Path
) -> None:
    from workers.jobs import PermanentError

    store = operator_store(openbao, tmp_path)
    store.write("db/app", {"password": "p"})
    too_many = {f"key{i}": "v" for i in range(65)}
    with pytest.raises(StoreRefused, match=r"refused \(400\)") as refused:
        store.set_custom_metadata("db/app", too_many)
    assert isinstance(refused.value, PermanentError)  # never retried
    with pytest.raises(StoreRefused):
        store.set_custom_metadata("db/app", {"k" * 129: "v"})


# The token's lifecycle ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def token_info(openbao: OpenBao, token: str) -> dict[str, Any]:
    info: dict[str, Any] = openbao.api("POST", "auth/token/lookup", json={"token": token})["data"]
    return info


def test_a_renewable_token_is_renewed_past_half_its_ttl(openbao: OpenBao, tmp_path: Path) -> None:
    prefix = openbao.prefix()
    policy = openbao.operator_policy(prefix)
    token = openbao.token(policy, ttl="1h", renewable=True)
    clock = Clock()
    store = VaultStore(bao_settings(openbao, prefix, tmp_path, vault_token=token), clock=clock)
    store.list_paths()
    clock.now += 1700  # not yet half of the hour
    store.list_paths()
    assert not token_info(openbao, token).get("last_renewal_time")
    clock.now += 200  # past half
    store.list_paths()
    assert token_info(openbao, token).get("last_renewal_time")


def test_a_revoked_approle_token_logs_in_again_once(openbao: OpenBao, tmp_path: Path) -> None:
    store = operator_store(openbao, tmp_path, "approle")
    store.write("db/app", {"password": "p"})
    first = store._client().token
    openbao.api("POST", "auth/token/revoke", json={"token": first})
    assert store.read("db/app") == {"password": "p"}  # logged in again
    assert store._client().token != first


def test_a_revoked_plain_token_is_reported(openbao: OpenBao, tmp_path: Path) -> None:
    store = operator_store(openbao, tmp_path)
    store.write("db/app", {"password": "p"})
    openbao.api("POST", "auth/token/revoke", json={"token": store._client().token})
    with pytest.raises(StoreUnavailable, match=r"permission denied \(403\)"):
        store.read("db/app")


def test_a_rewritten_token_file_is_read_again(openbao: OpenBao, tmp_path: Path) -> None:
    """As Vault Agent does: a new token renamed into place, the old one revoked."""
    prefix = openbao.prefix()
    policy = openbao.operator_policy(prefix)
    token_file = tmp_path / "token"
    token_file.write_text(openbao.token(policy) + "\n")
    store = VaultStore(bao_settings(openbao, prefix, tmp_path, vault_token_file=token_file))
    store.write("db/app", {"password": "p"})
    old = token_file.read_text().strip()
    fresh = tmp_path / "token.new"
    fresh.write_text(openbao.token(policy) + "\n")
    fresh.replace(token_file)
    openbao.api("POST", "auth/token/revoke", json={"token": old})
    assert store.read("db/app") == {"password": "p"}
    assert store._client().token == token_file.read_text().strip()
