"""Benchmarks run on the lent GPU; each module is a ``python -m`` entry point writing JSON."""
