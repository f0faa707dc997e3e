"""The pure drift core, by tables: kinds, types, rules, expiry, masking, bad sources."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tasks.drift.diff import DriftInput, detect, same
from tasks.drift.model import CROSS, MASK, Finding
from tasks.drift.rules import Rules, RulesError, parse_rules
from tasks.drift.sources import (
    LiveRow,
    LiveState,
    SourceProblem,
    flatten,
    read_desired,
    read_live,
    unflatten,
)
from workers.configstore import platform_checksum

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NO_RULES = Rules()


def live_state(values: dict[str, dict[str, Any]]) -> LiveState:
    return LiveState(values={env: dict(flat) for env, flat in values.items()})


def run(
    desired: dict[str, dict[str, Any]],
    live: dict[str, dict[str, Any]] | LiveState | None = None,
    rules: Rules = NO_RULES,
    *,
    environments: list[str] | None = None,
    cross: bool = True,
    now: datetime = NOW,
    problems: list[SourceProblem] | None = None,
) -> list[Finding]:
    state = live if isinstance(live, LiveState) else live_state(live or {})
    envs = environments or sorted(set(desired) | set(state.values))
    data = DriftInput(
        desired=desired,
        live=state,
        rules=rules,
        environments=envs,
        cross=cross,
        problems=problems or [],
    )
    return detect(data, now)


def kinds(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return sorted((f.kind, f.environment, f.key) for f in findings)


# Flattening ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "flat"),
    [
        ({"a": 1}, {"a": 1}),
        ({"a": {"b": {"c": True}}}, {"a.b.c": True}),
        ({"a": [1, {"x": 2}]}, {"a": [1, {"x": 2}]}),
        ({"a": None, "b": {}}, {"a": None, "b": {}}),
        ({"a": {"b": 1, "c": {"d": "x"}}}, {"a.b": 1, "a.c.d": "x"}),
    ],
)
def test_flatten_and_back(tree: dict[str, Any], flat: dict[str, Any]) -> None:
    assert flatten(tree) == flat
    assert unflatten(flat) == tree


# Equality --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (1, 1, True),
        (1, 1.0, True),
        (True, 1, False),
        (False, 0, False),
        ("1", 1, False),
        (None, None, True),
        (None, 0, False),
        ([1, True], [1, 1], False),
        ([1, 2], [1, 2], True),
        ([1, 2], [2, 1], False),
        ({"a": True}, {"a": 1}, False),
        ({"a": [1]}, {"a": [1]}, True),
        ("x", "x", True),
    ],
)
def test_same_respects_json_types(a: Any, b: Any, equal: bool) -> None:
    assert same(a, b) is equal


# Desired against live --------------------------------------------------------------------

DESIRED = {"production": {"db.pool": 20, "db.host": "h", "cors": ["https://a"], "x": None}}


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        (dict(DESIRED["production"]), []),
        ({**DESIRED["production"], "db.pool": 5}, [("value_changed", "production", "db.pool")]),
        ({**DESIRED["production"], "db.pool": "20"}, [("value_changed", "production", "db.pool")]),
        ({**DESIRED["production"], "x": 0}, [("value_changed", "production", "x")]),
        (
            {**DESIRED["production"], "cors": ["https://a", "https://b"]},
            [("value_changed", "production", "cors")],
        ),
        (
            {k: v for k, v in DESIRED["production"].items() if k != "db.host"},
            [("missing_in_live", "production", "db.host")],
        ),
        ({**DESIRED["production"], "debug": True}, [("unexpected_in_live", "production", "debug")]),
        ({**DESIRED["production"], "db.pool": 20.0}, []),
    ],
)
def test_desired_against_live(live: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    found = run(DESIRED, {"production": live})
    assert kinds(found) == expected
    assert all(f.severity == "critical" for f in found)  # production


def test_values_are_shown_before_and_after() -> None:
    (finding,) = run(DESIRED, {"production": {**DESIRED["production"], "db.pool": 5}})
    assert (finding.before, finding.after) == ("20", "5")
    assert finding.source == "live"


def test_other_environments_warn() -> None:
    (finding,) = run({"staging": {"a": 1}}, {"staging": {"a": 2}})
    assert finding.severity == "warning"


# Between environments --------------------------------------------------------------------


def test_missing_in_environment_names_where_it_is_missing() -> None:
    desired = {"development": {"a": 1}, "staging": {"a": 1, "b": 2}, "production": {"a": 1, "b": 3}}
    found = [f for f in run(desired, cross=True) if f.kind == "missing_in_environment"]
    assert kinds(found) == [("missing_in_environment", "development", "b")]
    (finding,) = found
    assert finding.environments == ("development", "production", "staging")
    assert "present in production, staging" in finding.message
    assert finding.severity == "warning" and finding.scope == "cross"


@pytest.mark.parametrize(
    ("values", "mismatch"),
    [
        ((1, 2, 3), False),
        ((1, 2.5, 3), False),  # all JSON numbers
        ((1, "2", 3), True),
        ((None, "rs0", "rs0"), True),
        ((True, False, True), False),
        ((True, 1, True), True),
        (([1], [2], [3]), False),
        (([1], {"a": 1}, [1]), True),
    ],
)
def test_type_mismatch_between_environments(values: tuple[Any, ...], mismatch: bool) -> None:
    desired = {
        env: {"k": v}
        for env, v in zip(("development", "staging", "production"), values, strict=True)
    }
    found = [f for f in run(desired) if f.kind == "type_mismatch"]
    assert bool(found) is mismatch
    if mismatch:
        assert found[0].environment == CROSS and found[0].severity == "warning"


def test_type_mismatch_between_every_pair_of_environments_that_declare_the_key() -> None:
    """A key that only two of three environments declare is still compared (issue 19)."""
    desired = {
        "development": {"a": 1, "pool": 10},
        "staging": {"a": 1, "pool": "10"},
        "production": {"a": 1},
    }
    found = [f for f in run(desired) if f.kind == "type_mismatch"]
    assert [(f.key, f.environments, f.source) for f in found] == [
        ("pool", ("development", "staging"), "desired")
    ]
    assert found[0].message == "JSON types differ: development=number, staging=string"
    desired["production"]["pool"] = 10
    found = [f for f in run(desired) if f.kind == "type_mismatch"]
    assert [f.environments for f in found] == [("development", "production", "staging")]


def test_type_mismatch_between_live_values_is_its_own_finding() -> None:
    """Desired files agree; the live rows do not: the live comparison finds it, with source
    ``live`` and its own fingerprint, and never shows either value."""
    desired = {env: {"timeout": 30} for env in ("staging", "production")}
    live = {"staging": {"timeout": 30}, "production": {"timeout": "s3cr3t-30"}}
    found = [f for f in run(desired, live) if f.kind == "type_mismatch"]
    assert [(f.source, f.environments) for f in found] == [("live", ("production", "staging"))]
    assert found[0].message == "JSON types differ (live values): production=string, staging=number"
    assert "s3cr3t" not in repr(found[0].as_dict())
    both = {"staging": {"timeout": "30"}, "production": {"timeout": 30}}
    found = [f for f in run(both, both) if f.kind == "type_mismatch"]
    assert sorted(f.source for f in found) == ["desired", "live"]
    assert len({f.fingerprint for f in found}) == 2


def test_a_single_environment_run_does_not_compare_environments() -> None:
    desired = {"staging": {"a": 1, "b": 1}, "production": {"a": 1}}
    found = run(desired, {"production": {"a": 1}}, environments=["production"], cross=False)
    assert found == []


def test_an_unreadable_environment_is_left_out_of_comparisons() -> None:
    problem = SourceProblem("staging", "environments/staging.yaml:3", "not valid YAML: oops")
    desired = {"development": {"a": 1}, "production": {"a": 1}}
    found = run(
        desired, desired, environments=["development", "production", "staging"], problems=[problem]
    )
    assert kinds(found) == [("invalid_source", "staging", "environments/staging.yaml:3")]
    assert "not valid YAML" in found[0].message


# Schema ----------------------------------------------------------------------------------

PROD_OK = flatten(
    {
        "services": {
            "chat": {
                "replicas": 10,
                "autoscaling": {"enabled": True, "min_replicas": 10, "max_replicas": 100},
            }
        },
        "security": {"cors_origins": ["https://app.example.com"], "csrf_protection": True},
        "database": {
            "postgresql": {"host": "h", "port": 5432, "database": "d"},
            "mongodb": {"host": "h", "port": 27017, "database": "d"},
            "redis": {"cluster_endpoints": ["a:1", "b:1"], "cluster_mode": True},
        },
        "external_apis": {"openai": {"base_url": "https://api.openai.com/v1", "timeout": 30}},
    }
)


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (
            {"services.chat.autoscaling.min_replicas": 200},
            "services.chat.autoscaling",
            "min_replicas (200) is greater than max_replicas (100)",
        ),
        ({"services.chat.replicas": 5}, "services.chat.replicas", "outside autoscaling bounds"),
        ({"services.chat.replicas": 0}, "services.chat.replicas", "outside the bounds (minimum 1)"),
        (
            {"services.chat.resources.limits.memory": "2GB"},
            "services.chat.resources.limits.memory",
            "does not match",
        ),
        ({"database.redis.host": "one"}, "database.redis", "single host"),
        (
            {"database.redis.cluster_endpoints": ["a:1"]},
            "database.redis.cluster_endpoints",
            "1 endpoint",
        ),
        (
            {"database.postgresql.port": 70000},
            "database.postgresql.port",
            "outside the bounds (maximum 65535)",
        ),
        (
            {"database.postgresql.ssl_mode": "maybe"},
            "database.postgresql.ssl_mode",
            "not one of the allowed values:",
        ),
        ({"security.cors_origins": ["*"]}, "security.cors_origins.0", "wildcard CORS origin"),
        (
            {"security.cors_origins": ["http://app.example.com"]},
            "security.cors_origins.0",
            "plain-http CORS origin",
        ),
        ({"security.csrf_protection": False}, "security.csrf_protection", "CSRF protection is off"),
        (
            {"external_apis.openai.timeout": 0},
            "external_apis.openai.timeout",
            "outside the bounds (",
        ),
        (
            {"external_apis.openai.base_url": "not a url"},
            "external_apis.openai.base_url",
            "not a valid uri",
        ),
    ],
)
def test_schema_and_cross_field_violations(change: dict[str, Any], key: str, words: str) -> None:
    desired = {"production": {**PROD_OK, **change}}
    found = [
        f
        for f in run(desired, {"production": desired["production"]})
        if f.kind == "schema_violation"
    ]
    assert found, "no violation found"
    matching = [f for f in found if f.key == key and words in f.message]
    assert matching, [(f.key, f.message) for f in found]
    assert {f.source for f in found} == {"desired", "live"}
    assert all(f.severity == "critical" for f in found)


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (
            {"database.postgresql.password": 98765432109876},
            "database.postgresql.password",
            "expected string, got integer",
        ),
        ({"database.redis": "redis-pass-98765"}, "database.redis", "expected object, got string"),
        (
            {"database.postgresql.ssl_mode": "pw-98765"},
            "database.postgresql.ssl_mode",
            "not one of",
        ),
        (
            {"external_apis.openai.base_url": "pw 98765"},
            "external_apis.openai.base_url",
            "not a valid uri",
        ),
    ],
)
def test_schema_messages_never_quote_the_value(
    change: dict[str, Any], key: str, words: str
) -> None:
    """jsonschema's messages quote the value (a password declared as a number, a whole
    mapping with its password); findings are written from the rule instead."""
    desired = {"production": {**PROD_OK, **change}}
    found = [f for f in run(desired, desired) if f.kind == "schema_violation" and f.key == key]
    assert found and all(words in f.message for f in found), [f.message for f in found]
    assert not any("98765" in f.message for f in found)


def test_a_clean_production_has_no_schema_findings() -> None:
    assert run({"production": PROD_OK}, {"production": PROD_OK}) == []


def test_security_checks_only_apply_to_critical_environments() -> None:
    loose = {**PROD_OK, "security.csrf_protection": False, "security.cors_origins": ["http://x.io"]}
    assert run({"development": loose}, {"development": loose}) == []


# Rules ------------------------------------------------------------------------------------

RULES = """
critical_environments: [production, dr]
expected:
  - key: "services.*.replicas"
    environments: [staging]
    kinds: [value_changed]
    reason: staging is scaled down by hand at night
  - key: "feature.*"
    reason: feature toggles are flipped live
    expires: 2026-06-30
sensitive: ["*.password", "*token*"]
severity:
  - key: "monitoring.*"
    kinds: [value_changed]
    severity: info
"""


def test_a_declared_difference_is_info_and_explained() -> None:
    rules = parse_rules(RULES, "rules.yaml")
    (finding,) = run(
        {"staging": {"services.chat.replicas": 3}},
        {"staging": {"services.chat.replicas": 1}},
        rules,
    )
    assert (finding.severity, finding.expected) == ("info", True)
    assert finding.reason == "staging is scaled down by hand at night"


def test_a_rule_narrowed_to_an_environment_does_not_cover_others() -> None:
    rules = parse_rules(RULES, "rules.yaml")
    (finding,) = run(
        {"production": {"services.chat.replicas": 3}},
        {"production": {"services.chat.replicas": 1}},
        rules,
    )
    assert (finding.severity, finding.expected) == ("critical", False)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 6, 30, 23, 59, tzinfo=UTC), True),
        (datetime(2026, 7, 1, 0, 0, tzinfo=UTC), False),
    ],
)
def test_an_expired_rule_no_longer_applies(now: datetime, expected: bool) -> None:
    rules = parse_rules(RULES, "rules.yaml")
    (finding,) = run(
        {"production": {"feature.x": True}}, {"production": {"feature.x": False}}, rules, now=now
    )
    assert finding.expected is expected
    assert finding.severity == ("info" if expected else "critical")


def test_severity_overrides_and_custom_critical_environments() -> None:
    rules = parse_rules(RULES, "rules.yaml")
    found = run(
        {"dr": {"monitoring.rate": 1, "a": 1}}, {"dr": {"monitoring.rate": 2, "a": 2}}, rules
    )
    assert {(f.key, f.severity) for f in found} == {("monitoring.rate", "info"), ("a", "critical")}


@pytest.mark.parametrize(
    ("key", "desired", "live"),
    [
        ("db.password", "hunter2", "hunter3"),
        ("api.token_v2", "tok-a", "tok-b"),
    ],
)
def test_sensitive_values_are_never_shown(key: str, desired: str, live: str) -> None:
    rules = parse_rules(RULES, "rules.yaml")
    (finding,) = run({"production": {key: desired}}, {"production": {key: live}}, rules)
    assert (finding.before, finding.after) == (MASK, MASK)
    assert desired not in str(finding.as_dict()) and live not in str(finding.as_dict())


def test_rows_marked_sensitive_are_masked_and_encrypted_ones_compared_by_checksum() -> None:
    rows = [
        LiveRow(1, "production", "svc.key", '"live-secret"', True, False, None),
        LiveRow(
            2,
            "production",
            "svc.cert",
            "gAAAAB-ciphertext",
            True,
            True,
            json.dumps({"checksum": platform_checksum("the-cert")}),
        ),
        LiveRow(
            3,
            "production",
            "svc.old",
            "gAAAAB-other",
            True,
            True,
            json.dumps({"checksum": platform_checksum("old")}),
        ),
    ]
    state = read_live(rows)
    desired = {
        "production": {"svc.key": "declared-secret", "svc.cert": "the-cert", "svc.old": "new"}
    }
    found = run(desired, state)
    assert kinds(found) == [
        ("value_changed", "production", "svc.key"),
        ("value_changed", "production", "svc.old"),
    ]
    assert all((f.before, f.after) == (MASK, MASK) for f in found)


def test_an_encrypted_value_without_a_checksum_is_reported_not_compared() -> None:
    rows = [LiveRow(4, "production", "svc.cert", "gAAAAB-x", True, True, '{"version": "v1"}')]
    state = read_live(rows)
    found = run({"production": {"svc.cert": "c"}}, state, problems=state.problems)
    assert kinds(found) == [("invalid_source", "production", "svc.cert")]
    assert "encrypted value without a checksum" in found[0].message


def test_checksum_is_the_platforms() -> None:
    """json.dumps(value, sort_keys=True) then SHA-256, spaces and all, as the reference."""
    expected = hashlib.sha256(b'{"a": [1, 2], "b": 1}').hexdigest()
    assert platform_checksum({"b": 1, "a": [1, 2]}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("expected: [\n", "rules.yaml:2: not valid YAML"),
        ("expected:\n  - key: a\n", "rules.yaml: expected.0.reason: Field required"),
        ("expected:\n  - {key: a, reason: r, kinds: [oops]}\n", "unknown kind 'oops'"),
        ("severity:\n  - {key: a, severity: urgent}\n", "severity 'urgent' is not one of"),
        ("expected:\n  - {key: a, reason: r, expires: someday}\n", "expected.0.expires"),
        ("colour: red\n", "rules.yaml: colour: Extra inputs are not permitted"),
    ],
)
def test_bad_rules_are_one_line(text: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# Bad sources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("a: [1, 2\nb: 3\n", ":2", "not valid YAML"),
        ("- a\n- b\n", ":1", "expected a mapping, got list"),
        ("", ":1", "expected a mapping, got empty"),
        ("just text", ":1", "expected a mapping, got str"),
    ],
)
def test_bad_desired_files_are_problems_not_crashes(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    path = tmp_path / "staging.yaml"
    path.write_text(text)
    flat, problem = read_desired(path, "staging")
    assert flat is None and problem is not None
    assert problem.where == f"{path}{where}"
    assert reason in problem.reason


def test_a_live_value_that_is_not_json_is_one_finding_not_also_missing() -> None:
    rows = [
        LiveRow(7, "staging", "a", "{not json", False, False, None),
        LiveRow(8, "staging", "b", "2", False, False, None),
    ]
    state = read_live(rows)
    found = run({"staging": {"a": 1, "b": 2}}, state, problems=state.problems)
    assert kinds(found) == [("invalid_source", "staging", "a")]
    assert found[0].message.startswith("configurations id=7: value is not valid JSON")


def test_fingerprints_are_stable_and_ignore_values() -> None:
    first = run(DESIRED, {"production": {**DESIRED["production"], "db.pool": 5}})
    second = run(DESIRED, {"production": {**DESIRED["production"], "db.pool": 6}})
    assert [f.fingerprint for f in first] == [f.fingerprint for f in second]
    assert first[0].after != second[0].after
