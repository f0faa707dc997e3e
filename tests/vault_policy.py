"""Vault policies (HCL) read statically: which capabilities a policy file grants on a path,
by Vault's matching rules (an exact path beats a glob, the longest glob wins, ``deny``
overrides). tests/unit/test_deploy_files.py checks the shipped policy with it without a
server; the integration tests have OpenBao enforce the same file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

Policy = Mapping[str, frozenset[str]]


def load_policy(path: Path) -> dict[str, frozenset[str]]:
    """A Vault policy file (HCL): {path rule: capabilities}."""
    import hcl2

    document = hcl2.loads(path.read_text())
    rules: dict[str, frozenset[str]] = {}
    for block in document.get("path", []):
        for rule, body in block.items():
            name = rule.strip('"')
            if "+" in name or ("*" in name and not name.endswith("*")):
                raise ValueError(f"{path}: {name}: this reader knows only trailing '*' globs")
            rules[name] = frozenset(c.strip('"') for c in body["capabilities"])
    return rules


def allowed(policy: Policy, path: str, capability: str) -> bool:
    """Whether ``policy`` grants ``capability`` on ``path`` (Vault's matching, no '+')."""
    granted = policy.get(path)
    if granted is None:
        globs = [r for r in policy if r.endswith("*") and path.startswith(r[:-1])]
        if not globs:
            return False
        granted = policy[max(globs, key=len)]
    return "deny" not in granted and capability in granted
