"""One contract, every secret store: the embedded SQL store (PostgreSQL and SQLite) and
Vault KV v2 through hvac, against tests/vault_double.py (Vault cannot be installed here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from tasks.secrets.stores import (
    CasMismatch,
    SecretNotFound,
    SecretStore,
    SqlStore,
    StoreUnavailable,
    VaultStore,
    load_or_create_key,
)
from tests.vault_double import VaultState, vault_double
from workers.db import make_engine
from workers.db.models import FleetSecretVersion
from workers.settings import FleetSettings

TOKEN = "hvs.contract-token"


@pytest.fixture(params=["sql-postgres", "sql-sqlite", "vault"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretStore]:
    if request.param == "vault":
        with vault_double(TOKEN) as (address, _state):
            yield VaultStore(FleetSettings(vault_addr=address, vault_token=TOKEN, home=tmp_path))
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


# Vault's failure modes ---------------------------------------------------------------------


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[tuple[VaultStore, VaultState, str]]:
    with vault_double(TOKEN) as (address, state):
        settings = FleetSettings(vault_addr=address, vault_token=TOKEN, home=tmp_path)
        yield VaultStore(settings), state, address


def test_a_sealed_vault_is_unavailable(vault: tuple[VaultStore, VaultState, str]) -> None:
    store, state, _ = vault
    state.sealed = True
    with pytest.raises(StoreUnavailable, match="sealed"):
        store.health()
    with pytest.raises(StoreUnavailable, match="sealed"):
        store.list_paths()


def test_a_refused_token_is_unavailable(
    vault: tuple[VaultStore, VaultState, str], tmp_path: Path
) -> None:
    _, _, address = vault
    wrong = VaultStore(FleetSettings(vault_addr=address, vault_token="hvs.wrong", home=tmp_path))
    with pytest.raises(StoreUnavailable, match=r"permission denied \(403\)"):
        wrong.health()


def test_an_unreachable_vault_is_unavailable(tmp_path: Path) -> None:
    from tests.helpers import free_port

    store = VaultStore(
        FleetSettings(
            vault_addr=f"http://127.0.0.1:{free_port()}",
            vault_token=TOKEN,
            vault_timeout=2,
            home=tmp_path,
        )
    )
    with pytest.raises(StoreUnavailable, match="ConnectionError"):
        store.health()


def test_server_errors_on_write_are_unavailable(vault: tuple[VaultStore, VaultState, str]) -> None:
    store, state, _ = vault
    state.fail_writes = True
    with pytest.raises(StoreUnavailable):
        store.write("db/app", {"password": "x"})


def test_approle_login(tmp_path: Path) -> None:
    with vault_double(TOKEN) as (address, state):
        state.approles["role-1"] = "secret-id-1"
        settings: dict[str, Any] = {
            "vault_addr": address,
            "vault_role_id": "role-1",
            "home": tmp_path,
        }
        VaultStore(FleetSettings(**settings, vault_secret_id="secret-id-1")).health()
        with pytest.raises(StoreUnavailable):
            VaultStore(FleetSettings(**settings, vault_secret_id="wrong")).health()


def test_namespaces_are_sent(tmp_path: Path) -> None:
    with vault_double(TOKEN, namespace="team-a") as (address, _state):
        good = VaultStore(
            FleetSettings(
                vault_addr=address, vault_token=TOKEN, vault_namespace="team-a", home=tmp_path
            )
        )
        good.write("db/app", {"v": "1"})
        bad = VaultStore(FleetSettings(vault_addr=address, vault_token=TOKEN, home=tmp_path))
        with pytest.raises(StoreUnavailable):
            bad.read("db/app")
