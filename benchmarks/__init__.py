"""vqfast's benchmarks: the comparison runner (``python -m benchmarks.run``, ``make bench``) and the
pytest-benchmark suites (``pytest benchmarks/``). Speed lives here, never in the test suite."""
