"""The conformance suite: every op x backend x layout x dtype x edge case, through the public ops
(``vqfast.ops.*``), forward and backward, against the ``torch`` backend (the reference); plus gradcheck,
float64 through ``auto``, no hidden copies of large inputs, and no host synchronisation.

Backends are the registry's (``vqfast.backends()``): a new one is one more parameter and one more row
of ``TOLERANCE``. One that declines inputs when named explicitly ("cannot run") is skipped for that case
with its reason. The cases live in ``conformance_cases.py``.

Triton runs CPU tensors only under ``TRITON_INTERPRET=1``, which must be set before triton is first
imported (the conftest's diffusers imports it): ``test_triton_under_the_interpreter`` reruns this file
in a child pytest with the variable set, where only the triton cases run (the rest ran here). To run
them directly: ``TRITON_INTERPRET=1 pytest tests/test_conformance.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vqfast
from conformance_cases import ALL_CASES, BF16, F16, F32, F64, LAYOUTS, Case, in_layout
from vqfast.layout import memory_format

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:  # numpy, on inf - inf and exp overflow inside the interpreter's kernels
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class Tolerance(NamedTuple):
    rtol: float
    atol: float  # relative to the expected tensor's largest magnitude (or the case's ``magnitude``)
    search: float  # nearest_code: exact chosen distance - exact minimum <= search * (|z|^2 + max |c|^2)


_KERNEL = {  # float32 arithmetic in another order than the reference, then rounded to the output dtype
    F64: Tolerance(1e-10, 1e-10, 1e-12),
    F32: Tolerance(1e-5, 1e-5, 1e-5),
    F16: Tolerance(2e-3, 2e-3, 1e-5),
    BF16: Tolerance(1.6e-2, 1.6e-2, 1e-5),
}
TOLERANCE: dict[str, dict[torch.dtype, Tolerance]] = {
    # Values: the reference against itself on contiguous copies (a layout's other summation order);
    # its search is judged against exact distances like any other.
    "torch": {
        F64: Tolerance(1e-12, 1e-12, 1e-12),
        F32: Tolerance(2e-6, 2e-6, 1e-5),
        F16: _KERNEL[F16],
        BF16: _KERNEL[BF16],
    },
    "triton": _KERNEL,
    "native": _KERNEL,
    "cuda_host": _KERNEL,
}

# The registry op a public op's selection names: spatial_norm_act lowers to group_norm_act.
REGISTRY_OP = {"spatial_norm_act": "group_norm_act"}
# The arguments a gradient is compared for.
DIFFERENTIABLE = {
    "nearest_code": (),
    "vector_quantize": ("z", "codebook"),
    "group_norm_act": ("x", "weight", "bias"),
    "spatial_norm_act": ("f", "scale", "shift", "weight", "bias"),
    "codebook_gather": ("codebook",),
}


def _backend_params() -> list:
    params = []
    for name, status in vqfast.backends().items():
        if INTERPRETED and name != "triton":
            continue  # this process runs the triton cases only: the parent ran the others
        marks = [] if status.available else [pytest.mark.skip(reason=f"{name} is unavailable: {status.reason}")]
        params.append(pytest.param(name, marks=marks))
    return params


BACKENDS = _backend_params()
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]  # the reference is exempt: see test_no_hidden_copy
# CUDA cases (marked ``cuda``) only where a GPU is; the interpreter's process runs CPU tensors.
CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICES = ["cpu", *([pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA else [])]


# ------------------------------------------------------------------------------------------- running


class Result(NamedTuple):
    outputs: tuple[torch.Tensor, ...]
    grads: dict[str, torch.Tensor | None]
    args: dict[str, Any]  # the arguments as the op saw them (laid out)


def _selected(op: str, backend: str):
    return vqfast.use_backend(**{REGISTRY_OP.get(op, op): backend})


def _declined(error: BaseException, backend: str) -> bool:
    """Whether ``error`` is the registry's answer that ``backend``, named explicitly, cannot run the inputs."""
    return isinstance(error, RuntimeError) and f"vqfast backend {backend!r} cannot run" in str(error)


@contextlib.contextmanager
def _skipped_if_declined(backend: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:
        if _declined(error, backend):
            pytest.skip(str(error))
        raise


def _cotangents(case: Case, outputs, device, *, reference: bool) -> list[torch.Tensor]:
    """Fixed random output gradients in the case's layout (contiguous copies for the reference)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + 1)
    grads = []
    for out in outputs:
        if out.is_floating_point():
            grad = torch.randn(out.shape, generator=g, dtype=F64).to(device, out.dtype)
            grad = in_layout(grad, case.layout)
            grads.append(grad.contiguous() if reference else grad)
    return grads


def prepare(case: Case, device: str, *, reference: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the leaves gradients are taken for, the op's arguments): laid out for a backend under test,
    contiguous copies of the same values for the reference."""
    leaves, args = {}, {}
    for name, value in case.inputs().items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if case.backward and name in DIFFERENTIABLE[case.op]:
                value = leaves[name] = value.detach().clone().requires_grad_()
            if name in case.laid_out:
                value = in_layout(value, case.layout)
            if reference:
                value = value.contiguous()
        args[name] = value
    return leaves, args


def run(case: Case, backend: str, device: str, *, reference: bool = False, prepared=None, options=None) -> Result:
    """``case`` through the public op on ``backend`` (with the keyword ``options``, if any), forward and
    backward. A backend that declines the inputs skips the case with its reason."""
    leaves, args = prepared or prepare(case, device, reference=reference)
    with _selected(case.op, backend):
        with contextlib.nullcontext() if reference else _skipped_if_declined(backend):
            outputs = getattr(vqfast.ops, case.op)(**args, **(options or {}))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if leaves:
            differentiable = [out for out in outputs if out.requires_grad]
            torch.autograd.backward(differentiable, _cotangents(case, differentiable, device, reference=reference))
    return Result(tuple(out.detach() for out in outputs), {k: v.grad for k, v in leaves.items()}, args)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, case: Case, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what}: {actual.shape} {actual.dtype}"
    finite = expected[expected.isfinite()]
    scale = max(case.magnitude, finite.abs().max().item() if finite.numel() else 0.0)
    torch.testing.assert_close(
        actual, expected, rtol=tol.rtol * case.condition, atol=tol.atol * case.condition * scale, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


# ----------------------------------------------------------------------------------------- judging


def check_nearest(indices: torch.Tensor, expected: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, dim: int,
                  tol: Tolerance, exact: bool, what: str = "indices") -> None:
    """DESIGN 2.1: judged by distance. The chosen code's float64 distance is within ``tol.search`` of
    the true minimum; where best and second best are well apart the index is float64's argmin; cases
    of exact arithmetic, ties and non-finite input (``exact``) must equal the reference's indices."""
    assert indices.dtype == torch.int64 and indices.shape == expected.shape, f"{what}: {indices.shape} {indices.dtype}"
    indices, expected = indices.cpu(), expected.cpu()
    if exact:
        differ = (indices != expected).nonzero()[:8].tolist()
        assert torch.equal(indices, expected), f"{what}: differ from the reference at {differ}"
        return
    if not indices.numel():
        return
    rows = z.detach().cpu().double().movedim(dim, -1).reshape(-1, codebook.shape[1])
    codes = codebook.detach().cpu().double()
    distances = (rows[:, None, :] - codes[None]).square().sum(-1)  # exact enough; not cdist's matmul form
    best, chosen = distances.min(1).values, distances.gather(1, indices.view(-1, 1)).squeeze(1)
    slack = tol.search * (rows.square().sum(1) + codes.square().sum(1).max())
    worse = chosen - best > slack
    assert not worse.any(), f"{what}: rows {worse.nonzero().view(-1)[:8].tolist()} chose a farther code"
    if codes.shape[0] > 1:
        two = distances.topk(2, dim=1, largest=False).values
        apart = two[:, 1] - two[:, 0] > 2 * slack
        wrong = apart & (indices.view(-1) != distances.argmin(1))
        assert not wrong.any(), f"{what}: rows {wrong.nonzero().view(-1)[:8].tolist()} differ from a clear argmin"


def check_stats(stats, expected, z: torch.Tensor, tol: Tolerance, case: Case) -> None:
    """vector_quantize's (counts, sums): the counts exactly, the sums (float32 sums of the same rows in
    another order) within the tolerance, in the statistics dtype."""
    (counts, sums), (counts_ref, sums_ref) = stats, expected
    assert counts.dtype == torch.float32 and counts.shape == counts_ref.shape, f"counts: {counts.shape} {counts.dtype}"
    assert torch.equal(counts, counts_ref), f"counts differ at {(counts != counts_ref).nonzero()[:8].tolist()}"
    assert sums.dtype == torch.promote_types(z.dtype, torch.float32), f"sums: {sums.dtype}"
    assert_close(sums, sums_ref, tol, case, "sums")


def check_case(case: Case, actual: Result, expected: Result, tol: Tolerance) -> None:
    op, args = case.op, actual.args
    if op == "nearest_code":
        z, dim = args["z"], args["dim"] % args["z"].dim()
        check_nearest(actual.outputs[0], expected.outputs[0], z, args["codebook"], dim, tol, case.exact)
    elif op == "vector_quantize":
        (z_q, loss, indices, *stats), (z_q_ref, loss_ref, indices_ref, *stats_ref) = actual.outputs, expected.outputs
        if stats_ref:
            check_stats(stats, stats_ref, args["z"], tol, case)
        # The vectors lie near their codes (or tie exactly): every backend's search finds the same.
        assert torch.equal(indices, indices_ref), f"indices differ at {(indices != indices_ref).nonzero()[:8].tolist()}"
        assert z_q.stride() == torch.empty_like(args["z"]).stride(), "z_q is not in z's layout"
        # z + (q - z) in z's dtype: diffusers' value bit for bit.
        torch.testing.assert_close(z_q, z_q_ref, rtol=0, atol=0, equal_nan=True)
        assert loss.shape == () and loss.dtype == args["z"].dtype
        assert_close(loss, loss_ref, tol, case, "loss")
    elif op in ("group_norm_act", "spatial_norm_act"):
        y, y_ref = actual.outputs[0], expected.outputs[0]
        main = args["x" if op == "group_norm_act" else "f"]
        assert y.stride() == torch.empty_like(main).stride(), f"output strides {y.stride()}, not the input's layout"
        assert_close(y, y_ref, tol, case, "output")
    elif op == "codebook_gather":
        out, out_ref = actual.outputs[0], expected.outputs[0]
        assert out.is_contiguous() and out.shape == out_ref.shape and out.dtype == out_ref.dtype
        if out.numel():
            storage = args["codebook"].untyped_storage().data_ptr()
            assert out.untyped_storage().data_ptr() != storage, "a view of the codebook"
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)  # a gather is exact
    for name, grad in actual.grads.items():
        grad_ref = expected.grads[name]
        assert (grad is None) == (grad_ref is None), f"gradient of {name}"
        if grad is not None:
            assert_close(grad, grad_ref, tol, case, f"gradient of {name}")


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_matches_the_reference(case: Case, backend: str, device: str):
    tol = TOLERANCE[backend][case.dtype]
    expected = run(case, "torch", device, reference=True)
    actual = run(case, backend, device)
    check_case(case, actual, expected, tol)


STATS = {"return_stats": True}
QUANTIZE_CASES = [c for c in ALL_CASES if c.op == "vector_quantize"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda c: c.id)
def test_vector_quantize_stats_match_the_reference(case: Case, backend: str, device: str):
    """``return_stats=True``: z_q, loss, indices and the gradients as the reference's (as without
    stats), the per-code counts exactly and the sums within the tolerance."""
    tol = TOLERANCE[backend][case.dtype]
    expected = run(case, "torch", device, reference=True, options=STATS)
    actual = run(case, backend, device, options=STATS)
    assert len(actual.outputs) == 5
    check_case(case, actual, expected, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_quantize_stats_have_no_gradient(backend: str):
    z, codebook = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    with _selected("vector_quantize", backend), _skipped_if_declined(backend):
        z_q, loss, _, counts, sums = vqfast.ops.vector_quantize(z, codebook, return_stats=True)
    assert z_q.requires_grad and loss.requires_grad
    assert not counts.requires_grad and not sums.requires_grad


@pytest.mark.skipif(INTERPRETED, reason="ran in the parent process")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.dtype == F64], ids=lambda c: c.id)
def test_float64_through_auto(case: Case, device: str):
    """Issue 11: a float64 model raised a TypeError. ``auto`` runs float64 on every op (ending at torch)."""
    loosest = max((TOLERANCE[p.values[0]][F64] for p in BACKENDS if not p.marks), key=lambda t: t.rtol)
    check_case(case, run(case, "auto", device), run(case, "torch", device, reference=True), loosest)


def _gradcheck_inputs(op: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(shape, generator=g, dtype=F64).requires_grad_()

    if op == "group_norm_act":
        return (leaf(1, 4, 3, 2), 2, leaf(4), leaf(4)), {}
    if op == "spatial_norm_act":
        return (leaf(1, 4, 3, 2), leaf(1, 4, 2, 1), leaf(1, 4, 2, 1), 2, leaf(4), leaf(4)), {}
    return (torch.randint(5, (2, 3), generator=g), leaf(5, 3)), {"dim": 1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["group_norm_act", "spatial_norm_act", "codebook_gather"])
def test_gradcheck(op: str, backend: str):
    """Numerical against analytic gradients in float64 (the torch backend's formulas included).
    vector_quantize is straight-through by contract (its gradient is not its value's derivative), and
    nearest_code has none: they are judged against the reference only."""
    args, kwargs = _gradcheck_inputs(op)
    fn = getattr(vqfast.ops, op)
    with _selected(op, backend):
        with _skipped_if_declined(backend):
            fn(*args, **kwargs)
        assert torch.autograd.gradcheck(lambda *a: fn(*a, **kwargs), args, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [c for c in ALL_CASES if c.op in ("vector_quantize", "codebook_gather") and c.name in ("base", "k1")
     and c.layout == "contiguous" and c.dtype == F32],
    ids=lambda c: c.id,
)
def test_deterministic_backward(case: Case, backend: str, device: str):
    """The codebook gradients (scatter-adds, all rows into one code for K = 1) are the same bits run
    after run under ``torch.use_deterministic_algorithms(True)``."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(case, backend, device), run(case, backend, device)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, grad in first.grads.items():
        assert torch.equal(grad, second.grads[name]), f"gradient of {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [c for c in QUANTIZE_CASES if c.name in ("base", "k1", "many_rows") and c.layout == "contiguous"
     and c.dtype == F32],
    ids=lambda c: c.id,
)
def test_deterministic_stats(case: Case, backend: str, device: str):
    """vector_quantize's counts and sums (all rows in one code for K = 1; many rows over a few codes)
    are the same bits run after run under ``torch.use_deterministic_algorithms(True)``."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run(case, backend, device, options=STATS) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(("counts", "sums"), first.outputs[3:], second.outputs[3:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 11])
def test_codebook_gather_out_of_range_raises(backend: str, bad: int):
    indices, codebook = torch.tensor([[0, 3], [bad, 2]]), torch.randn(11, 4)
    with _selected("codebook_gather", backend), pytest.raises((IndexError, RuntimeError)) as raised:
        vqfast.ops.codebook_gather(indices, codebook)
    if _declined(raised.value, backend):
        pytest.skip(str(raised.value))


# ------------------------------------------------------------------------------- no host synchronisation


def _meta_calls():
    z, cb = torch.empty(2, 4, 8, 8, device="meta"), torch.empty(16, 4, device="meta")
    x, low = torch.empty(2, 8, 6, 6, device="meta"), torch.empty(2, 8, 3, 3, device="meta")
    indices = torch.empty(2, 8, 8, dtype=torch.long, device="meta")
    return {
        "nearest_code": (lambda: vqfast.ops.nearest_code(z, cb), [(2, 8, 8)]),
        "vector_quantize": (lambda: vqfast.ops.vector_quantize(z, cb), [(2, 4, 8, 8), (), (128,)]),
        "vector_quantize_stats": (
            lambda: vqfast.ops.vector_quantize(z, cb, return_stats=True), [(2, 4, 8, 8), (), (128,), (16,), (16, 4)]
        ),
        "group_norm_act": (lambda: vqfast.ops.group_norm_act(x, 4), [(2, 8, 6, 6)]),
        "spatial_norm_act": (lambda: vqfast.ops.spatial_norm_act(x, low, low, 4), [(2, 8, 6, 6)]),
        "codebook_gather": (lambda: vqfast.ops.codebook_gather(indices, cb, 1), [(2, 4, 8, 8)]),
    }


@pytest.mark.skipif(INTERPRETED, reason="ran in the parent process")
@pytest.mark.parametrize("op", list(_meta_calls()))
def test_runs_on_meta_tensors(op: str):
    """No data-dependent step in the lowering (issue 11: codebook_gather called .item() on meta indices)."""
    call, shapes = _meta_calls()[op]
    outputs = call()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [tuple(o.shape) for o in outputs] == shapes and all(o.device.type == "meta" for o in outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [*DIFFERENTIABLE, "vector_quantize_stats"])
def test_no_host_sync(op: str, backend: str, device: str, monkeypatch):
    """DESIGN 2: no ``.item()`` or other read of a tensor's value on the host, forward or backward
    (issue 11: codebook_gather checked its bounds with two), so the ops run inside CUDA graphs."""
    if INTERPRETED and device == "cpu":
        pytest.skip("the interpreter runs Triton kernels on the host: a host check there waits for nothing")
    options = STATS if op == "vector_quantize_stats" else None
    op = op.removesuffix("_stats")
    case = next(c for c in ALL_CASES if c.op == op and c.name == "base" and c.layout == "contiguous" and c.dtype == F32)
    prepared = prepare(case, device)

    def sync(self, *args, **kwargs):
        raise AssertionError("a host synchronisation: the op read a tensor's value")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        run(case, backend, device, prepared=prepared, options=options)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------ no hidden copies


def _allocated_bytes(fn, device: str) -> tuple[Any, int]:
    """``fn()`` and the bytes it allocated on ``device`` (every allocation, freed or not): the CUDA
    caching allocator's count, or on the CPU the allocations the profiler saw."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    total, pending = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.alloc_size > 0:
            total += event.extra_fields.alloc_size
    return result, total


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _large_call(op: str, layout: str, device: str, emulated: bool):
    """(the main input in ``layout``, a call of ``op`` on it, the tensors to differentiate): 1 MiB of
    float32 or 512 KiB of indices (1/16 of that for an emulated backend: the Triton interpreter or the
    CUDA kernels' host build, which are slow), against small codebooks and parameters."""
    g = torch.Generator().manual_seed(0)
    side = 16 if emulated else 64

    def leaf(*shape, grad=True):
        return torch.randn(shape, generator=g).to(device).requires_grad_(grad)

    if op == "codebook_gather":
        main = in_layout(torch.randint(16, (4, 2 * side, 2 * side), generator=g).to(device), layout)
        codebook = leaf(16, 4)
        return main, (lambda: vqfast.ops.codebook_gather(main, codebook, 1)), [codebook]
    main = in_layout(leaf(4, 16, side, side, grad=False), layout).requires_grad_(op != "nearest_code")
    if op in ("nearest_code", "vector_quantize"):
        codebook = leaf(32, 16, grad=op == "vector_quantize")
        call = getattr(vqfast.ops, op)
        return main, (lambda: call(main, codebook)), [main, codebook]
    weight, bias = leaf(16), leaf(16)
    if op == "group_norm_act":
        return main, (lambda: vqfast.ops.group_norm_act(main, 4, weight, bias)), [main, weight, bias]
    low = leaf(4, 16, side // 4, side // 4)
    return main, (lambda: vqfast.ops.spatial_norm_act(main, low, low, 4, weight, bias)), [main, low, weight, bias]


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_no_hidden_copy(op: str, backend: str, layout: str, device: str):
    """The spec: a kernel backend reads any strides or declines the layout, and never copies a large
    input (z, x, indices, the output gradient) whole: what a call allocates stays below its outputs
    plus half the input. The torch backend is exempt: it is the readable answer, not a fast path, and
    copies where that reads more simply."""
    main, call, leaves = _large_call(op, layout, device, emulated=INTERPRETED or backend == "cuda_host")

    def cotangents(outputs):
        grads = [torch.ones_like(o) for o in outputs if o.is_floating_point()]
        # The lowering hands kernels the gradient in the input's memory format (a copy otherwise, by
        # contract): give it so. The gather's output gradient may come in any layout.
        if main.is_floating_point():
            grads[0] = grads[0].contiguous(memory_format=memory_format(main))
        else:
            grads[0] = in_layout(grads[0], layout)
        return grads

    def backward(outputs, grads):
        differentiable = [o for o in outputs if o.is_floating_point()]
        return torch.autograd.grad(differentiable, [t for t in leaves if t.requires_grad], grads)

    with _selected(op, backend):
        with _skipped_if_declined(backend):
            call()  # warm up: one-time tables (the upsampling map), kernel builds
        outputs, allocated = _allocated_bytes(lambda: _outputs(call()), device)
        budget = _nbytes(*outputs) + _nbytes(main) // 2
        sizes = f"outputs {_nbytes(*outputs)}, input {_nbytes(main)}"
        assert allocated <= budget, f"forward allocated {allocated} B: {sizes}"
        if op != "nearest_code":
            grads = cotangents(outputs)
            grads, allocated = _allocated_bytes(lambda: backward(outputs, grads), device)
            budget = _nbytes(*grads) + _nbytes(main) // 2
            sizes = f"gradients {_nbytes(*grads)}, input {_nbytes(main)}"
            assert allocated <= budget, f"backward allocated {allocated} B: {sizes}"


# ------------------------------------------------------------------------------ triton on the CPU


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter's")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_under_the_interpreter():
    """The triton cases on CPU tensors, in a child pytest started with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-rfEs", __file__]
    child = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]
    print(child.stdout.splitlines()[-1])
