"""Benchmarks; run them from the repository root as modules (``python -m benchmarks.bench_generate ...``), so that
they import generate.py, scripts/ and the test helpers (tests/support.py) as modules."""
