"""pytest-benchmark suites for the ops: ``pytest benchmarks/`` (needs the ``bench`` extra), e.g.
``pytest benchmarks/ -k "nearest_code and float32" --benchmark-group-by=group``.

The same cases and implementations as the runner (``python -m benchmarks.run``), on CUDA when
present, else the CPU. Not part of the test command: pyproject's testpaths is tests/ only.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import BASELINES, LAYOUTS, OPS, build, implementation, make_cases, plan
from vqfast.backend import BACKENDS, EMULATED

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = ["float32", "bfloat16"] + ["float16"] * (DEVICE.type == "cuda")
PARAMS = [
    pytest.param(case, impl, id=f"{case.label.replace(' ', '-')}-{impl}")
    for case in make_cases(list(OPS), None, DTYPES, list(LAYOUTS), quick=False)
    for impl in plan(case, DEVICE, [*(b for b in BACKENDS if b not in EMULATED), *BASELINES])[0]
]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_op(benchmark, case, impl):
    bench = build(case, DEVICE)
    call = bench.call(implementation(bench, case, impl))
    call()  # compiles under torch.compile; warms up otherwise

    def synchronized() -> None:
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case.label
    benchmark.extra_info.update(impl=impl, bytes=bench.bytes, flops=bench.flops)
    benchmark(synchronized)
