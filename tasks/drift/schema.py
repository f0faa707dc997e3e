"""The platform's configuration schemas (from its design document) and cross-field checks.

Each problem is returned as ``(dotted key, message)``; the caller makes findings of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema import Draft7Validator, FormatChecker, ValidationError

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_MEMORY = {"type": "string", "pattern": "^[0-9]+(Mi|Gi)$"}
_CPU = {"type": "string", "pattern": "^[0-9]+(m)?$"}
_RESOURCE = {"type": "object", "properties": {"memory": _MEMORY, "cpu": _CPU}}

SCHEMAS: dict[str, dict[str, Any]] = {
    "database": {
        "type": "object",
        "required": ["postgresql", "mongodb", "redis"],
        "properties": {
            "postgresql": {
                "type": "object",
                "required": ["host", "port", "database"],
                "properties": {
                    "host": {"type": "string"},
                    "port": _PORT,
                    "database": {"type": "string"},
                    "username": {"type": "string"},
                    "password": {"type": "string"},
                    "pool_size": {"type": "integer", "minimum": 1, "maximum": 100},
                    "ssl_mode": {
                        "type": "string",
                        "enum": ["disable", "require", "verify-ca", "verify-full"],
                    },
                },
            },
            "mongodb": {
                "type": "object",
                "required": ["host", "port", "database"],
                "properties": {
                    "host": {"type": "string"},
                    "port": _PORT,
                    "database": {"type": "string"},
                    "replica_set": {"type": ["string", "null"]},
                    "ssl": {"type": "boolean"},
                },
            },
            "redis": {
                "type": "object",
                "oneOf": [
                    {
                        "properties": {
                            "host": {"type": "string"},
                            "port": {"type": "integer"},
                            "database": {"type": "integer"},
                            "cluster_mode": {"const": False},
                        },
                        "required": ["host", "port"],
                    },
                    {
                        "properties": {
                            "cluster_endpoints": {"type": "array", "items": {"type": "string"}},
                            "cluster_mode": {"const": True},
                        },
                        "required": ["cluster_endpoints"],
                    },
                ],
            },
        },
    },
    "services": {
        "type": "object",
        "patternProperties": {
            "^[a-z_]+$": {
                "type": "object",
                "properties": {
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 100},
                    "resources": {
                        "type": "object",
                        "properties": {"requests": _RESOURCE, "limits": _RESOURCE},
                    },
                    "autoscaling": {
                        "type": "object",
                        "properties": {
                            "enabled": {"type": "boolean"},
                            "min_replicas": {"type": "integer", "minimum": 1},
                            "max_replicas": {"type": "integer", "minimum": 1},
                            "target_cpu_utilization": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 100,
                            },
                            "target_memory_utilization": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 100,
                            },
                        },
                    },
                },
            }
        },
    },
    "external_apis": {
        "type": "object",
        "patternProperties": {
            "^[a-z_]+$": {
                "type": "object",
                "required": ["base_url"],
                "properties": {
                    "base_url": {"type": "string", "format": "uri"},
                    "timeout": {"type": "integer", "minimum": 1, "maximum": 300},
                    "max_retries": {"type": "integer", "minimum": 0, "maximum": 10},
                    "rate_limit_per_minute": {"type": "integer", "minimum": 1},
                },
            }
        },
    },
    "security": {
        "type": "object",
        "properties": {
            "cors_origins": {"type": "array", "items": {"type": "string", "format": "uri"}},
            "csrf_protection": {"type": "boolean"},
            "rate_limiting": {
                "type": "object",
                "properties": {
                    "enabled": {"type": "boolean"},
                    "requests_per_minute": {"type": "integer", "minimum": 1},
                },
            },
            "compliance": {
                "type": "object",
                "properties": {
                    "gdpr_enabled": {"type": "boolean"},
                    "hipaa_enabled": {"type": "boolean"},
                    "soc2_enabled": {"type": "boolean"},
                },
            },
        },
    },
}

_VALIDATORS = {
    name: Draft7Validator(schema, format_checker=FormatChecker())
    for name, schema in SCHEMAS.items()
}

Problem = tuple[str, str]


def _dotted(section: str, path: Any) -> str:
    return ".".join([section, *(str(part) for part in path)])


def schema_problems(config: Mapping[str, Any]) -> Iterator[Problem]:
    """Every schema error of every section the document has (one per location)."""
    for section, validator in _VALIDATORS.items():
        if section not in config:
            continue
        seen: set[str] = set()
        for error in sorted(validator.iter_errors(config[section]), key=lambda e: list(e.path)):
            key = _dotted(section, error.absolute_path)
            if key in seen:
                continue
            seen.add(key)
            yield key, describe(error)


_JSON_TYPES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def describe(error: ValidationError) -> str:
    """The error from its rule and the schema, never from the value: jsonschema's own
    messages quote the value (``98765432109876 is not of type 'string'``, a whole mapping
    with its password), and a finding, a log line or a report must never carry one."""
    rule, expected = error.validator, error.validator_value
    if rule == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return f"expected {wanted}, got {_type_of(error.instance)}"
    if rule == "required":
        return error.message  # names the missing key (from the schema), holds no value
    if rule == "additionalProperties":
        return "keys not in the schema"
    if rule in ("enum", "const"):
        allowed = expected if isinstance(expected, list) else [expected]
        return "not one of the allowed values: " + ", ".join(str(v) for v in allowed)
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"outside the bounds ({rule} {expected})"
    if rule in ("minLength", "maxLength", "minItems", "maxItems", "minProperties"):
        return f"wrong size ({rule} {expected})"
    if rule == "pattern":
        return f"does not match the pattern {expected}"
    if rule == "format":
        return f"not a valid {expected}"
    return f"fails the schema's {rule} rule"


def cross_field_problems(config: Mapping[str, Any], critical: bool) -> Iterator[Problem]:
    """The reference's cross-field checks; the security ones apply where ``critical``."""
    yield from _autoscaling(config.get("services"))
    yield from _redis_cluster(config.get("database"))
    if critical:
        yield from _production_security(config.get("security"))


def _autoscaling(services: Any) -> Iterator[Problem]:
    if not isinstance(services, Mapping):
        return
    for name, service in services.items():
        if not isinstance(service, Mapping) or not isinstance(service.get("autoscaling"), Mapping):
            continue
        scaling = service["autoscaling"]
        if not scaling.get("enabled"):
            continue
        low, high = scaling.get("min_replicas", 1), scaling.get("max_replicas", 1)
        replicas = service.get("replicas", 1)
        if not all(isinstance(v, int) for v in (low, high, replicas)):
            continue  # the schema reports the types
        base = f"services.{name}"
        if low > high:
            yield (
                f"{base}.autoscaling",
                f"min_replicas ({low}) is greater than max_replicas ({high})",
            )
        elif not low <= replicas <= high:
            yield (
                f"{base}.replicas",
                f"replicas ({replicas}) outside autoscaling bounds {low}..{high}",
            )


def _redis_cluster(database: Any) -> Iterator[Problem]:
    redis = database.get("redis") if isinstance(database, Mapping) else None
    if not isinstance(redis, Mapping) or redis.get("cluster_mode") is not True:
        return
    endpoints = redis.get("cluster_endpoints")
    if "host" in redis:
        yield "database.redis", "cluster mode with a single host configuration"
    elif isinstance(endpoints, list) and len(endpoints) < 2:
        yield "database.redis.cluster_endpoints", f"cluster mode with {len(endpoints)} endpoint(s)"


def _production_security(security: Any) -> Iterator[Problem]:
    if not isinstance(security, Mapping):
        return
    origins = security.get("cors_origins")
    for index, origin in enumerate(origins if isinstance(origins, list) else []):
        if origin == "*":
            yield f"security.cors_origins.{index}", "wildcard CORS origin"
        elif isinstance(origin, str) and origin.startswith("http://"):
            yield f"security.cors_origins.{index}", f"plain-http CORS origin {origin}"
    if security.get("csrf_protection") is not True:
        yield "security.csrf_protection", "CSRF protection is off"
