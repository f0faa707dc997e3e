"""A shipper process for the audit tests: ships until caught up, and can kill itself
with SIGKILL right after the sink wrote (and fsynced) its Nth batch, before the commit.

    python -m tests.audit_shipper [--die-after-batch N] [--batch-size S]
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import tasks.audit as job
from tasks.audit.sinks import FileSink
from workers.logs import configure_logging
from workers.runtime import Runtime, install
from workers.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--die-after-batch", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    options = parser.parse_args()
    configure_logging(level="WARNING", log_format="json")
    settings = load_settings(audit_batch_size=options.batch_size)
    rt = install(Runtime(settings))
    if options.die_after_batch:
        delivered = {"n": 0}
        original = FileSink.deliver

        def deliver(self: FileSink, *args: Any, **kwargs: Any) -> Any:
            position = original(self, *args, **kwargs)
            delivered["n"] += 1
            if delivered["n"] == options.die_after_batch:
                os.kill(os.getpid(), signal.SIGKILL)  # written and fsynced, not committed
            return position

        FileSink.deliver = deliver  # type: ignore[method-assign]
    job.ship(rt, budget_seconds=120)
    rt.close()


if __name__ == "__main__":
    main()
