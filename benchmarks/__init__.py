"""vqfast's benchmarks: the comparison runner (``python -m benchmarks.run``, ``make bench``), the
pytest-benchmark suites (``pytest benchmarks/``) and the derivation of ``auto``'s order from the results
(``python -m benchmarks.auto_order``). Speed lives here, never in the test suite."""
