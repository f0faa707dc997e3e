"""Desired configuration from Git: ``FLEET_DRIFT_GIT_URL`` at ``FLEET_DRIFT_GIT_REF``.

With the git CLI, into a cache under ``FLEET_HOME/drift-git/``: a bare repository per URL,
fetched shallowly (``--depth 1``) once per run, with a timeout; the commit fetched is kept
as ``refs/fleet/last``. Its tree is checked out into ``tree-<commit>`` (made once per
commit), and ``FLEET_DRIFT_GIT_PATH`` inside it is the folder holding ``environments/``
and ``drift-rules.yaml``. A remote that cannot be fetched leaves the last fetched commit in
use, said in the run's summary and counted; with none fetched yet, there is no desired
configuration, said as an ``invalid_source`` finding. Drift runs hold the fleet-wide drift
locks, so one worker fetches per run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

LAST = "refs/fleet/last"
TREES_KEPT = 2


class GitUnavailable(Exception):
    """No commit to compare with: the remote cannot be fetched and none was before."""


@dataclass(frozen=True)
class Revision:
    url: str  # masked: never a password
    ref: str
    commit: str
    root: Path  # the folder holding environments/ and drift-rules.yaml
    fresh: bool  # fetched by this run (False: the last fetched one, the remote failed)
    error: str | None = None

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "ref": self.ref,
            "commit": self.commit,
            "fresh": self.fresh,
            "error": self.error,
        }


def masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _git(*args: str, cwd: Path | None = None, timeout: float = 60.0) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed"]
        fatal = next((line for line in lines if line.startswith("fatal:")), lines[-1])
        options = {"--git-dir", "--work-tree"}
        words = [a for i, a in enumerate(args) if i == 0 or args[i - 1] not in options]
        command = next((w for w in words if not w.startswith("-")), "")
        raise RuntimeError(f"git {command}: {fatal.removeprefix('fatal: ')}")
    return done.stdout.strip()


def fetch(home: Path, url: str, ref: str, path: str, timeout: float) -> Revision:
    """The desired tree at ``ref``: fetched now, or the last fetched one when the remote
    fails (``fresh`` False, ``error`` said). Raises GitUnavailable with neither."""
    cache = home / "drift-git" / hashlib.sha256(url.encode()).hexdigest()[:16]
    repo = cache / "repo.git"
    if not repo.is_dir():
        repo.mkdir(parents=True)
        _git("init", "--quiet", "--bare", str(repo))
    error = None
    try:
        _git(
            "--git-dir", str(repo), "fetch", "--quiet", "--depth", "1", "--no-tags",
            url, ref, timeout=timeout,
        )  # fmt: skip
        commit = _git("--git-dir", str(repo), "rev-parse", "FETCH_HEAD^{commit}")
        _git("--git-dir", str(repo), "update-ref", LAST, commit)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        error = (
            f"git fetch: timed out after {timeout:g}s"
            if isinstance(exc, subprocess.TimeoutExpired)
            else str(exc).replace(url, masked(url))
        )
        try:
            commit = _git("--git-dir", str(repo), "rev-parse", "--verify", "--quiet", LAST)
        except RuntimeError:
            raise GitUnavailable(f"{masked(url)} {ref}: {error}; nothing fetched before") from None
    tree = cache / f"tree-{commit}"
    if not tree.is_dir():
        staging = cache / f"staging-{commit}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _git(
            "--git-dir", str(repo), "--work-tree", str(staging), "checkout", "-f", commit, "--", "."
        )
        staging.rename(tree)
        _prune(cache, keep=tree)
    root = tree / path if path else tree
    return Revision(masked(url), ref, commit, root, fresh=error is None, error=error)


def _prune(cache: Path, keep: Path) -> None:
    trees = sorted(cache.glob("tree-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [t for t in trees if t != keep][TREES_KEPT - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def last_root(home: Path, url: str, path: str) -> Path | None:
    """The tree of the last fetched commit, if any (without fetching)."""
    cache = home / "drift-git" / hashlib.sha256(url.encode()).hexdigest()[:16]
    repo = cache / "repo.git"
    if not repo.is_dir():
        return None
    try:
        commit = _git("--git-dir", str(repo), "rev-parse", "--verify", "--quiet", LAST)
    except RuntimeError:
        return None
    tree = cache / f"tree-{commit}"
    if not tree.is_dir():
        return None
    return tree / path if path else tree
