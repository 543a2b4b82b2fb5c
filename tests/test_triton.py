"""The Triton backend against the torch reference, through the public ops (forward and autograd).

CPU cases run the kernels under ``TRITON_INTERPRET=1`` (numpy, so shapes stay small); CUDA cases
(marked ``cuda``) compile them. ``@triton.jit`` reads TRITON_INTERPRET when it decorates, triton's own
library included, so the mode is fixed when triton is first imported, and the conftest's diffusers
imports it (through torch._dynamo) before this file is read: in a process where triton is compiled,
the CPU cases run in a child pytest started with TRITON_INTERPRET=1
(``test_cpu_cases_under_the_interpreter``), so the variable is never set for other test files. To run
them directly: ``TRITON_INTERPRET=1 pytest tests/test_triton.py``.
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")

import vqfast  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from vqfast import ops  # noqa: E402
from vqfast.backend import OPS  # noqa: E402
from vqfast.reference import group_norm_act as reference_group_norm_act  # noqa: E402
from vqfast.reference import nearest_code as reference_nearest_code  # noqa: E402

INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
ON_CPU = pytest.mark.skipif(
    not INTERPRETED, reason="triton is compiled in this process: see test_cpu_cases_under_the_interpreter"
)
CPU = pytest.param("cpu", marks=ON_CPU)
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")]
)
DEVICES = [CPU, CUDA]
TOLERANCE = {  # (rtol, atol): outputs rounded from float32 values that may differ in the last bits
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.mark.skipif(INTERPRETED, reason="the CPU cases run in this process")
def test_cpu_cases_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


def _forget_kernels() -> None:
    for op in OPS:
        sys.modules.pop(f"vqfast.triton.{op}", None)


@pytest.fixture(autouse=True, scope="module")
def _fresh_kernel_modules():
    """Kernel modules built here for this process's mode are imported anew, and dropped on the way out."""
    _forget_kernels()
    yield
    _forget_kernels()


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    """``vqfast.triton.supports`` takes CPU tensors only while TRITON_INTERPRET=1."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def kernels(op: str):
    return importlib.import_module(f"vqfast.triton.{op}")


def both(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the triton backend, then with the reference."""
    with vqfast.use_backend("triton"):
        ours = fn(*args, **kwargs)
    with vqfast.use_backend("torch"):
        return ours, fn(*args, **kwargs)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    rtol, atol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t (N, C, *spatial) in another memory layout with the same values."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a view, not dense: every other column of a wider map
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if kind == "reversed":  # dense, spatial dims in reverse order in memory: they do not merge
        order = (0, 1, *reversed(range(2, t.dim())))
        return t.permute(order).contiguous().permute(order)
    return t


# ----------------------------------------------------------------------------------------- backend


@ON_CPU
def test_supports_reads_triton_interpret_at_call_time(monkeypatch):
    import vqfast.triton

    cpu = torch.device("cpu")
    assert vqfast.triton.supports("nearest_code", cpu) == ""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in vqfast.triton.supports("nearest_code", cpu)
    assert vqfast.triton.supports("nearest_code", torch.device("cuda")) == ""
    assert "no Triton kernel" in vqfast.triton.supports("no_such_op", cpu)


# ------------------------------------------------------------------------------------ nearest_code


def exact_distances(z_rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared distances in float64: the truth the search is judged by."""
    return torch.cdist(z_rows.double(), codebook.double()).square()


def check_nearest(z: torch.Tensor, codebook: torch.Tensor, dim: int, indices: torch.Tensor, slack: float) -> None:
    """Indices equal to the reference's except where both codes are within ``slack`` (relative to the
    distances' scale) of the float64 minimum: a near-tie that float32 rounding may break either way."""
    expected = reference_nearest_code.forward(z.cpu(), codebook.cpu(), dim % z.dim())
    indices = indices.cpu()
    assert indices.shape == expected.shape and indices.dtype == torch.long
    rows = z.cpu().movedim(dim, -1).reshape(-1, codebook.shape[1])
    dist = exact_distances(rows, codebook.cpu())
    best = dist.min(1).values
    scale = rows.double().square().sum(1) + codebook.cpu().double().square().sum(1).max()
    chosen = dist.gather(1, indices.view(-1, 1)).squeeze(1)
    assert bool((chosen - best <= slack * scale).all())
    differs = indices.view(-1) != expected.view(-1)
    ref_chosen = dist.gather(1, expected.view(-1, 1)).squeeze(1)
    assert bool(((chosen - ref_chosen).abs()[differs] <= slack * scale[differs]).all())


NEAREST_CASES = [
    # (z shape, dim, K, dtype, layout): D of 3 and 4 on the FMA path, 24 and 70 through tl.dot
    ((2, 3, 5, 7), 1, 37, torch.float32, "contiguous"),
    ((2, 4, 5, 3), 1, 150, torch.bfloat16, "channels_last"),
    ((3, 4, 3, 5), 1, 70, torch.float16, "strided"),
    ((61, 3), -1, 130, torch.float32, "contiguous"),
    ((2, 5, 3, 4), 1, 30, torch.float32, "reversed"),
    ((2, 24, 3, 5), 1, 100, torch.float16, "contiguous"),
    ((2, 24, 3, 3), 1, 45, torch.bfloat16, "channels_last"),
    ((45, 70), 1, 100, torch.float32, "contiguous"),
    ((0, 4, 3, 3), 1, 10, torch.float32, "contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dim, k, dtype, kind", NEAREST_CASES)
def test_nearest_code(device, shape, dim, k, dtype, kind):
    torch.manual_seed(0)
    z = torch.randn(shape, device=device).to(dtype)
    z = layout(z, kind)
    codebook = torch.randn(k, shape[dim], device=device).to(dtype)
    with vqfast.use_backend("triton"):
        indices = ops.nearest_code(z, codebook, dim)
    check_nearest(z, codebook, dim, indices, slack=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_code_random_shapes(device):
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        d, k, n = (int(torch.randint(low, high, (), generator=gen)) for low, high in ((1, 40), (1, 200), (1, 90)))
        dtype = [torch.float32, torch.float16, torch.bfloat16][int(torch.randint(3, (), generator=gen))]
        z = torch.randn(n, d, generator=gen).to(device, dtype)
        codebook = torch.randn(k, d, generator=gen).to(device, dtype)
        with vqfast.use_backend("triton"):
            indices = ops.nearest_code(z.t(), codebook, dim=0)  # (D, N): vectors strided in memory
        check_nearest(z, codebook, -1, indices, slack=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_code_other_ranks(device):
    torch.manual_seed(0)
    codebook = torch.randn(20, 5, device=device)
    vector = torch.randn(5, device=device)
    # rank 6 with four unmergeable batch dims: the one layout that goes through a copy
    z6 = torch.randn(2, 3, 5, 2, 3, 4, device=device).permute(5, 3, 1, 2, 4, 0)[..., :1].transpose(1, 2)
    for z, dim in ((vector, 0), (z6, 3)):
        ours, expected = both(ops.nearest_code, z, codebook, dim)
        assert torch.equal(ours, expected)
    (z_q, loss, indices), (z_q_ref, loss_ref, indices_ref) = both(ops.vector_quantize, z6, codebook, 0.25, True, 3)
    assert torch.equal(indices, indices_ref) and torch.equal(z_q, z_q_ref) and z_q.stride() == z_q_ref.stride()
    close(loss, loss_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [4, 40])
def test_nearest_code_ties_go_to_the_first_index(device, d):
    torch.manual_seed(0)
    codes = torch.randn(70, d, device=device)
    codebook = torch.cat([codes, codes])  # each code twice, in another tile and lane
    picked = torch.randperm(70)[:40]
    z = torch.cat([codes[picked], torch.randn(25, d, device=device)])
    with vqfast.use_backend("triton"):
        indices = ops.nearest_code(z, codebook, -1)
    assert bool((indices < 70).all())
    # Each copied row is at distance 0 from its code and from that code's duplicate only: the first
    # copy wins. (A float64 cdist argmin is no judge here: its two zeros may round differently.)
    assert torch.equal(indices[:40].cpu(), picked)
    check_nearest(z, codebook, -1, indices, slack=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [3, 40])
def test_nearest_code_near_ties(device, d):
    """Codes z + e and z - e (plus noise far from z): equidistant in exact arithmetic, apart only by
    rounding; either is right, and nothing else is."""
    torch.manual_seed(0)
    z = torch.randn(50, d, device=device)
    e = 1e-3 * torch.randn(50, d, device=device)
    codebook = torch.cat([3 * torch.randn(20, d, device=device), z + e, z - e])
    with vqfast.use_backend("triton"):
        indices = ops.nearest_code(z, codebook, -1)
    rows = torch.arange(50, device=device)
    assert bool(((indices == 20 + rows) | (indices == 70 + rows)).all())
    check_nearest(z, codebook, -1, indices, slack=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on inf - inf in the interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [4, 40])
def test_nearest_code_non_finite(device, d):
    torch.manual_seed(0)
    nan, inf = float("nan"), float("inf")
    z = torch.randn(8, d, device=device)
    z[1, 0], z[2, 1], z[3, 2], z[4] = nan, inf, -inf, inf
    finite = torch.randn(70, d, device=device)  # 70 codes: the last tile is padded
    infinite = finite.clone()
    infinite[9, 2], infinite[12, 0], infinite[66] = inf, -inf, 0.0
    with_nan = finite.clone()
    with_nan[67, 1] = nan
    for codebook in (finite, infinite, with_nan):
        ours, expected = both(ops.nearest_code, z, codebook, -1)
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_nearest_code_precision_modes(device, precision):
    """The stated accuracy of each mode: the chosen code's exact distance exceeds the minimum by at most
    2 (2u + u^2) (sum_i |z_i c_i| over the chosen code + over the nearest one), plus float32 rounding."""
    nearest_code = kernels("nearest_code")
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 64, device=device), dim=1)
    codebook = torch.nn.functional.normalize(torch.randn(200, 64, device=device), dim=1)
    with vqfast.use_backend("triton"), nearest_code.search_precision(precision):
        indices = ops.nearest_code(z, codebook, -1)
    dist = exact_distances(z, codebook)
    best = dist.argmin(1)
    u = nearest_code.PRECISIONS[precision]
    weight = (z.double().abs() @ codebook.double().abs().t()).cpu()
    bound = 2 * (2 * u + u * u) * (weight.gather(1, indices.cpu()[:, None]) + weight.gather(1, best.cpu()[:, None]))
    excess = dist.gather(1, indices[:, None]) - dist.gather(1, best[:, None])
    assert bool((excess.cpu() <= bound + 1e-5).all())
    if precision == "ieee":
        check_nearest(z, codebook, -1, indices, slack=1e-6)
    with pytest.raises(ValueError, match="precision"):
        nearest_code.set_search_precision("fp8")


# ------------------------------------------------------------------------ group_norm_act (+ spatial)


@pytest.fixture(params=["fused", "split"])
def plan(request, monkeypatch):
    """Both ways a group is covered: whole in one program, or split over programs in small tiles."""
    if request.param == "split":
        group_norm_act = kernels("group_norm_act")
        monkeypatch.setattr(group_norm_act, "FUSED_MAX", 0)
        monkeypatch.setattr(group_norm_act, "TILE", 16)
        monkeypatch.setattr(group_norm_act, "_target_programs", lambda device: 64)
    return request.param


def run_with_grads(fn, inputs: dict, grad_out: torch.Tensor, **kwargs):
    """``(output, grads of inputs)`` of ``fn`` under the triton backend, with the inputs in their own
    strides, and under the reference, on contiguous copies (the reference's group norm needs them)."""
    results = []
    for backend in ("triton", "torch"):
        leaves = {
            k: None if v is None else (v.detach() if backend == "triton" else v.detach().contiguous()).requires_grad_()
            for k, v in inputs.items()
        }
        with vqfast.use_backend(backend):
            out = fn(**leaves, **kwargs)
        out.backward(grad_out)
        results.append((out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}))
    return results


GROUP_NORM_CASES = [
    # (x shape, groups, dtype, layout, affine parameters, activation)
    ((2, 6, 5, 7), 3, torch.float32, "contiguous", "both", "silu"),
    ((2, 8, 5, 3), 4, torch.bfloat16, "channels_last", "weight", "silu"),
    ((1, 12, 9, 11), 4, torch.float16, "contiguous", "none", "silu"),
    ((2, 6, 3, 5), 2, torch.float32, "strided", "both", None),
    ((1, 10, 7, 7), 5, torch.float32, "channels_last", "bias", "silu"),
    ((2, 6, 13), 3, torch.float16, "contiguous", "both", "silu"),
    ((2, 6, 5, 3), 3, torch.float32, "reversed", "both", "silu"),
    ((2, 4, 3, 5, 7), 2, torch.bfloat16, "reversed", "both", "silu"),
    ((0, 6, 3, 3), 3, torch.float32, "contiguous", "both", "silu"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, groups, dtype, kind, affine, activation", GROUP_NORM_CASES)
def test_group_norm_act(device, plan, shape, groups, dtype, kind, affine, activation):
    torch.manual_seed(0)
    x = layout((torch.randn(shape, device=device) * 3 + 1).to(dtype), kind)
    c = shape[1]
    weight = torch.randn(c, device=device) if affine in ("both", "weight") else None  # float32: autocast's case
    bias = torch.randn(c, device=device).to(dtype) if affine in ("both", "bias") else None
    grad = torch.randn(shape, device=device).to(dtype)
    inputs = dict(x=x, weight=weight, bias=bias)
    (y, grads), (y_ref, grads_ref) = run_with_grads(
        ops.group_norm_act, inputs, grad, num_groups=groups, eps=1e-6, activation=activation
    )
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    close(y, y_ref)
    for name in grads_ref:
        close(grads[name], grads_ref[name], dtype)
    group_norm_act = kernels("group_norm_act")
    _, mean, rstd = group_norm_act.forward(x, groups, weight, bias, 1e-6, activation)
    _, mean_ref, rstd_ref = reference_group_norm_act.forward(x.contiguous(), groups, weight, bias, 1e-6, activation)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_act_statistics_of_a_large_mean(device, plan):
    """Chan's merge: no cancellation when the mean dwarfs the spread (the float32 input itself only
    holds 1e4 + x to within 1e-3)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9, device=device) + 1e4
    with vqfast.use_backend("triton"):
        y = ops.group_norm_act(x, 2, activation=None)
    expected = torch.nn.functional.group_norm(x.double(), 2, eps=1e-6).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=4e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_act_under_autocast_keeps_the_dtype(device):
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.bfloat16)
    weight = torch.ones(4, device=device)
    with vqfast.use_backend("triton"), torch.autocast(device, dtype=torch.bfloat16):
        y = ops.group_norm_act(x, 2, weight, None)
    assert y.dtype == torch.bfloat16


SPATIAL_CASES = [
    # (f shape, scale and shift size, dtype, layout): nearest upsampling by uneven, even, equal and
    # down factors
    ((2, 6, 7, 9), (3, 4), torch.float32, "contiguous"),
    ((1, 8, 8, 8), (4, 4), torch.bfloat16, "channels_last"),
    ((2, 4, 5, 3), (5, 3), torch.float16, "strided"),
    ((1, 4, 3, 5), (1, 7), torch.float32, "channels_last"),
    ((2, 4, 9), (4,), torch.float32, "contiguous"),
    ((1, 4, 3, 4, 5), (2, 2, 3), torch.float16, "reversed"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, size, dtype, kind", SPATIAL_CASES)
def test_spatial_norm_act(device, plan, shape, size, dtype, kind):
    torch.manual_seed(0)
    n, c = shape[:2]
    f = layout(torch.randn(shape, device=device).to(dtype), kind)
    scale = torch.randn(n, c, *size, device=device).to(dtype)
    shift = layout(torch.randn(n, c, *size, device=device).to(dtype), "reversed")  # strides of its own
    weight, bias = torch.randn(c, device=device), torch.randn(c, device=device)
    inputs = dict(f=f, scale=scale, shift=shift, weight=weight, bias=bias)
    grad = torch.randn(shape, device=device).to(dtype)
    (y, grads), (y_ref, grads_ref) = run_with_grads(ops.spatial_norm_act, inputs, grad, num_groups=2)
    assert y.stride() == torch.empty_like(f).stride()
    close(y, y_ref)
    for name in grads_ref:
        close(grads[name], grads_ref[name], dtype)


# ---------------------------------------------------------------------------------- vector_quantize


VQ_CASES = [
    # (z shape, dim, K, dtype, layout, legacy)
    ((2, 3, 5, 7), 1, 37, torch.float32, "contiguous", True),
    ((2, 4, 3, 5), 1, 50, torch.bfloat16, "channels_last", False),
    ((2, 4, 3, 5), 1, 50, torch.float16, "strided", True),
    ((33, 70), -1, 90, torch.float32, "contiguous", False),
    ((2, 24, 3, 3), 1, 40, torch.bfloat16, "contiguous", True),
    ((0, 4, 3, 3), 1, 10, torch.float32, "contiguous", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape, dim, k, dtype, kind, legacy", VQ_CASES)
def test_vector_quantize(device, deterministic, shape, dim, k, dtype, kind, legacy):
    torch.manual_seed(0)
    z = layout(torch.randn(shape, device=device).to(dtype), kind)
    codebook = torch.randn(k, shape[dim], device=device).to(dtype)
    grad_z_q = torch.randn(shape, device=device).to(dtype)
    results = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for backend in ("triton", "torch", "triton"):
            z_leaf, cb_leaf = z.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
            with vqfast.use_backend(backend):
                z_q, loss, indices = ops.vector_quantize(z_leaf, cb_leaf, 0.25, legacy, dim)
            torch.autograd.backward([z_q, loss], [grad_z_q, torch.tensor(1.7, device=device, dtype=dtype)])
            results.append((z_q.detach(), loss.detach(), indices, z_leaf.grad, cb_leaf.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    (z_q, loss, indices, grad_z, grad_cb), expected, again = results
    z_q_ref, loss_ref, indices_ref, grad_z_ref, grad_cb_ref = expected
    assert torch.equal(indices, indices_ref)
    assert torch.equal(z_q, z_q_ref) and z_q.stride() == z_q_ref.stride()  # bit for bit, in z's layout
    assert loss.dtype == dtype
    close(loss, loss_ref)
    close(grad_z, grad_z_ref)
    close(grad_cb, grad_cb_ref)
    if deterministic:
        assert torch.equal(grad_cb, again[4])


# ---------------------------------------------------------------------------------- codebook_gather


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "index_shape, dim, dtype",
    [
        ((2, 5, 7), 1, torch.float32),
        ((13,), -1, torch.bfloat16),
        ((3, 4, 5), 3, torch.float16),
        ((0, 3), 1, torch.float32),
    ],
)
def test_codebook_gather(device, deterministic, index_shape, dim, dtype):
    torch.manual_seed(0)
    k, d = 11, 37
    indices = torch.randint(k, index_shape, device=device)
    codebook = torch.randn(k, d, device=device).to(dtype)
    out_shape = list(index_shape)
    out_shape.insert(dim % (len(index_shape) + 1), d)
    grad = torch.randn(out_shape, device=device).to(dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        (out, grads), (out_ref, grads_ref) = run_with_grads(
            ops.codebook_gather, dict(codebook=codebook), grad, indices=indices, dim=dim
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(out, out_ref) and out.is_contiguous()
    # The reference sums in the codebook's dtype; the kernels in float32.
    close(grads["codebook"], grads_ref["codebook"], dtype)


# --------------------------------------------------------------------------------- larger, on CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")
def test_cuda_model_sized_shapes():
    """Shapes of a real VQModel on the compiled kernels: batch-1 group norms split over programs,
    a 64x64 latent against an 8192-code codebook."""
    torch.manual_seed(0)
    x = torch.randn(1, 128, 256, 256, device="cuda", dtype=torch.float16)
    weight, bias = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    grad = torch.randn_like(x)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        inputs = dict(x=x.contiguous(memory_format=memory_format), weight=weight, bias=bias)
        (y, grads), (y_ref, grads_ref) = run_with_grads(ops.group_norm_act, inputs, grad, num_groups=32)
        close(y, y_ref)
        for name in grads_ref:
            torch.testing.assert_close(grads[name].float(), grads_ref[name].float(), rtol=1e-2, atol=1e-2)
    z = torch.randn(1, 3, 64, 64, device="cuda")
    codebook = torch.randn(8192, 3, device="cuda")
    with vqfast.use_backend("triton"):
        indices = ops.nearest_code(z, codebook, 1)
    check_nearest(z, codebook, 1, indices, slack=1e-6)
    assert math.prod(indices.shape) == 64 * 64


# ------------------------------------------------------------------------------- custom-op contract


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    """``torch.library.opcheck`` on the triton kernels: fake (meta) outputs like the real ones, no
    aliasing between outputs, autograd and AOT dispatch, with channels_last inputs."""
    torch.manual_seed(0)

    def leaf(*shape, channels_last=False):
        t = torch.randn(*shape, device=device)
        return (t.contiguous(memory_format=torch.channels_last) if channels_last else t).requires_grad_()

    x, weight, bias = leaf(2, 4, 5, 3, channels_last=True), leaf(4), leaf(4)
    scale, shift = leaf(2, 4, 2, 2, channels_last=True), leaf(2, 4, 2, 2)
    z, codebook = leaf(2, 3, 4, 5, channels_last=True), leaf(7, 3)
    args = {
        "nearest_code": (z.detach(), codebook.detach(), 1),
        "group_norm_act": (x, 2, weight, bias, 1e-6, "silu"),
        "spatial_norm_act": (x, scale, shift, 2, weight, bias, 1e-6, "silu"),
        "vector_quantize": (z, codebook, 0.25, True, 1),
        "codebook_gather": (torch.randint(7, (2, 4, 5), device=device), codebook, 1),
    }[op]
    with vqfast.use_backend("triton"):
        torch.library.opcheck(getattr(torch.ops.vqfast, op).default, args)


# ------------------------------------------------------------------------- compiled, without a GPU


@pytest.mark.slow  # about a minute of ptxas on a cold cache
@pytest.mark.skipif(INTERPRETED, reason="triton is interpreted in this process")
def test_kernels_compile_for_an_h100(monkeypatch):
    """Every kernel path, with every autotune config, compiles for sm_90 down to a cubin (ptxas)
    without a GPU: launches become warmups, on a stand-in driver that names the target."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class Target:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = set()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled.add(self.fn.__name__)
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    monkeypatch.setattr(driver, "_active", Target())
    monkeypatch.setattr(JITFunction, "run", compile_only)
    monkeypatch.setattr(Autotuner, "run", lambda self, *args, warmup=False, **kwargs: self.warmup(*args, **kwargs))
    nearest_code, vector_quantize = kernels("nearest_code"), kernels("vector_quantize")
    codebook_gather, group_norm_act = kernels("codebook_gather"), kernels("group_norm_act")
    spatial_norm_act = kernels("spatial_norm_act")
    try:
        for d, dtype, precisions in (
            (4, torch.float32, ["ieee"]),
            (70, torch.float32, list(nearest_code.PRECISIONS)),
            (24, torch.bfloat16, ["ieee"]),
        ):
            z = torch.randn(2, d, 8, 8, dtype=dtype)
            codebook = torch.randn(50, d, dtype=dtype)
            for precision in precisions:
                with nearest_code.search_precision(precision):
                    nearest_code.forward(z, codebook, 1)
            if d != 70:  # the same code as D = 24 but for the count of D chunks
                _, _, indices = vector_quantize.forward(z, codebook, 0.25, True, 1)
        indices = indices.remainder(50).view(2, 8, 8)
        codebook_gather.forward(indices, codebook, 1)
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            vector_quantize.backward(z, torch.ones((), dtype=dtype), z, codebook, indices, 0.25, True, 1)
            codebook_gather.backward(z, indices, 50, 1)
        torch.use_deterministic_algorithms(False)
        weight = torch.randn(8)
        for shape in ((1, 8, 9, 11), (1, 8, 80, 80)):  # one program per group, and split
            x = torch.randn(shape, dtype=torch.bfloat16)
            scale = torch.randn(1, 8, 3, 4, dtype=torch.bfloat16)
            for x in (x, x.contiguous(memory_format=torch.channels_last)):
                _, mean, rstd = group_norm_act.forward(x, 4, weight, weight, 1e-6, "silu")
                group_norm_act.backward(x, x, weight, weight, mean, rstd, "silu")
            spatial_norm_act.forward(x, scale, scale, 4, None, None, 1e-6, None)
            spatial_norm_act.backward(x, x, scale, scale, None, None, mean, rstd, None)
    finally:
        torch.use_deterministic_algorithms(False)
        _forget_kernels()  # their caches now hold kernels for the stand-in device
    assert len(compiled) == 12, compiled
