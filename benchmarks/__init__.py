"""Benchmarks: rfs against the same build done without a cache. Run `python -m benchmarks`."""
