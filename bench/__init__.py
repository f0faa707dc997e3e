"""Benchmarks: `make bench` runs every module listed in BENCHMARKS."""
