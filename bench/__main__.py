"""`python -m bench [name...]`: run the benchmarks and print their figures."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: tuple[str, ...] = (
    "bench.fires",
    "bench.drift",
    "bench.impressions",
    "bench.secrets",
    "bench.audit",
)


def main(names: list[str]) -> None:
    chosen = [f"bench.{n}" for n in names] if names else list(BENCHMARKS)
    for name in chosen:
        module = importlib.import_module(name)
        print(f"== {name}", flush=True)
        module.main()


if __name__ == "__main__":
    main(sys.argv[1:])
