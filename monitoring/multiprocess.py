"""Multiprocess metrics set-up that must run before ``prometheus_client`` is imported.

A prefork worker is several processes: the children count, the parent serves. That is
prometheus-client's multiprocess mode, and it is only right when

1. ``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client`` is first imported
   (it picks its value storage then): :func:`prepare_multiprocess` refuses otherwise;
2. the directory is emptied at start, or counters of a previous run are added in;
3. children that died stop contributing to live gauges: the exporter's
   ``LiveMultiProcessCollector`` marks dead pids at every scrape, which also covers
   children killed with SIGKILL, for whom no shutdown hook ever runs.

This module imports nothing from prometheus-client.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(directory: Path) -> None:
    """Point prometheus-client at an empty ``directory``. Call before importing it."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
