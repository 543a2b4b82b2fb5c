"""What only the Triton backend has: its ``unsupported`` rules, the split plan of its norm kernels, its
search precisions, the regressions of its gather, its kernels at model dims and tile sizes, and its
launch grids. Values against the reference on every layout and dtype are the conformance suite's
(tests/test_conformance.py). Every kernel specialization these tests and the conformance suite launch is
compiled ahead of time for sm_90 and sm_80 by ``python -m benchmarks.resources`` (``make test`` runs it
with ``--check``).

CPU cases run the kernels under ``TRITON_INTERPRET=1`` (numpy, so shapes stay small). ``@triton.jit``
reads TRITON_INTERPRET when it decorates, triton's own library included, so the mode is fixed when
triton is first imported, and the conftest's diffusers imports it (through torch._dynamo) before this
file is read: in a process where triton is compiled, the CPU cases run in a child pytest started with
TRITON_INTERPRET=1 (``test_cpu_cases_under_the_interpreter``), so the variable is never set for other
test files. To run them directly: ``TRITON_INTERPRET=1 pytest tests/test_triton.py``.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from vqfast import layout  # noqa: E402
from vqfast.reference.vector_quantize_stats import code_stats  # noqa: E402

INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
HAS_CUDA = torch.cuda.is_available()
ON_CPU = pytest.mark.skipif(
    not INTERPRETED, reason="triton is compiled in this process: see test_cpu_cases_under_the_interpreter"
)
CPU = pytest.param("cpu", marks=ON_CPU)
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")]
)
DEVICES = [CPU, CUDA]


@pytest.mark.skipif(INTERPRETED, reason="the CPU cases run in this process")
def test_cpu_cases_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


OPS = ("nearest_code", "group_norm_act", "vector_quantize", "codebook_gather")


def kernels():
    """The backend's op modules, in OPS's order (imported here, in this process's triton mode)."""
    return tuple(importlib.import_module(f"vqfast.triton.{op}") for op in OPS)


# ------------------------------------------------------------------------------------ unsupported


@ON_CPU
def test_unsupported_reads_triton_interpret_at_call_time(monkeypatch):
    nearest_code = kernels()[0]
    inputs = importlib.import_module("vqfast.ops.nearest_code").Inputs(torch.randn(4, 3), torch.randn(5, 3), 1)
    assert nearest_code.unsupported(inputs) == ""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in nearest_code.unsupported(inputs)
    meta = type(inputs)(torch.randn(4, 3, device="meta"), torch.randn(5, 3, device="meta"), 1)
    assert "not meta" in nearest_code.unsupported(meta)


@ON_CPU
def test_unsupported_declines_float64_and_layouts_it_would_have_to_copy():
    nearest_op, norm_op, vq_op, gather_op = (importlib.import_module(f"vqfast.ops.{op}") for op in OPS)
    nearest_code, group_norm_act, vector_quantize, codebook_gather = kernels()
    codebook = torch.randn(5, 3)
    # four batch dims of a rank-5 z that do not merge, and a z of rank 6 whose do
    z = torch.randn(2, 3, 4, 5, 3).permute(4, 2, 0, 3, 1)[:, ::2]
    z6 = torch.randn(2, 3, 3, 2, 2, 2)
    for unsupported, inputs in (
        (nearest_code.unsupported, nearest_op.Inputs),
        (vector_quantize.unsupported, lambda z, cb, dim: vq_op.Inputs(z, cb, 1.0, 0.25, dim)),
    ):
        assert "float64" in unsupported(inputs(z6.double(), codebook.double(), 2))
        assert "merge" in unsupported(inputs(z, codebook, 0))
        assert unsupported(inputs(z6, codebook, 2)) == ""
        assert unsupported(inputs(z[:0], codebook, 0)) == ""  # empty: nothing to read

    def norm(x, weight=None):
        return norm_op.Inputs(x, 2, weight, None, None, None, None, 1e-6, True)

    x = torch.randn(2, 4, 3, 4, 5)
    assert group_norm_act.unsupported(norm(x)) == ""
    assert group_norm_act.unsupported(norm(torch.randn(1, 2, 2, 3, 2, 2, 3))) == ""  # 5 spatial dims, merged
    assert "merge" in group_norm_act.unsupported(norm(x.transpose(2, 3)))
    assert "float64" in group_norm_act.unsupported(norm(x.double()))
    assert "float64" in group_norm_act.unsupported(norm(x, torch.randn(4, dtype=torch.float64)))

    indices = torch.randint(5, (2, 3, 4, 5)).permute(3, 1, 0, 2)[:, ::2]
    assert "merge" in codebook_gather.unsupported(gather_op.Inputs(indices, codebook, 0))
    assert codebook_gather.unsupported(gather_op.Inputs(torch.tensor(1).expand(2, 3, 4, 5), codebook, 4)) == ""


# --------------------------------------------------------------------------------- layout helpers


def test_row_layout_enumerates_rows_in_order():
    """Each layout helper's offsets address the elements that ``movedim(dim, -1)`` enumerates."""
    t = torch.arange(2 * 3 * 4 * 5 * 6).view(2, 3, 4, 5, 6)
    cases = [
        (t, 1),  # contiguous: the batch dims around dim merge pairwise
        (t.permute(0, 2, 1, 3, 4)[:, :, ::2], 2),  # sliced: three batch dims stay
        (t.flip(3)[..., 1:2], 4),  # reversed strides, a size-1 dim
        (torch.tensor(7).expand(3, 4, 5), 1),  # expanded: zero strides
    ]
    for tensor, dim in cases:
        rows, (strides,) = layout.rows_along(dim, tensor)
        r = torch.arange(tensor.numel() // tensor.shape[dim])
        rest = r // rows.inner
        offsets = (rest // rows.middle) * strides.outer + (rest % rows.middle) * strides.middle
        offsets = offsets + (r % rows.inner) * strides.inner
        along = torch.arange(tensor.shape[dim]) * strides.vector
        flat = torch.as_strided(tensor, (tensor.untyped_storage().nbytes() // 8,), (1,), 0)
        read = flat[tensor.storage_offset() + offsets[:, None] + along[None, :]]
        assert torch.equal(read, tensor.movedim(dim, -1).reshape(-1, tensor.shape[dim]))


def test_norm_layout_merges_spatial_dims_into_two():
    x = torch.randn(2, 3, 4, 5, 6)
    inner, (strides,) = layout.norm_layout(x)
    assert inner == 120 and strides == layout.NormStrides(360, 120, 0, 1)
    inner, (cl,) = layout.norm_layout(x[:, :, :, :, 0].contiguous(memory_format=torch.channels_last))
    assert inner == 20 and cl.inner == 3  # channels_last: the spatial dims merge, at stride C
    inner, (sliced,) = layout.norm_layout(x[..., ::2])
    assert inner == 60 and sliced == layout.NormStrides(360, 120, 0, 2)  # slicing the last dim: one
    inner, (cropped,) = layout.norm_layout(x[..., :4])
    assert inner == 4 and cropped == layout.NormStrides(360, 120, 6, 1)
    assert layout.norm_layout(x.transpose(2, 3)) is None


# ---------------------------------------------------------------------------------- codebook_gather


def gather_expected(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return codebook[indices].movedim(-1, dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_codebook_gather_reads_the_indices_strides(device, deterministic):
    """Regressions: 1-D strided indices gathered the wrong rows, expanded ones read past their storage;
    0-d indices; the backward reads the same strides."""
    codebook_gather = kernels()[3]
    torch.manual_seed(0)
    codebook = torch.randn(11, 5, device=device)
    cases = [
        (torch.arange(11, device=device).flip(0)[::2], 1),
        (torch.tensor([3], device=device).expand(6), 0),
        (torch.tensor(4, device=device), 0),
        (torch.randint(11, (3, 1, 4), device=device).expand(3, 5, 4).transpose(0, 2), 2),
    ]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for indices, dim in cases:
            out = codebook_gather.forward(indices, codebook, dim)
            assert torch.equal(out, gather_expected(indices, codebook, dim)) and out.is_contiguous()
            grad = torch.randn_like(out)
            rows = grad.movedim(dim, -1).reshape(-1, 5)
            expected = torch.zeros_like(codebook).index_add_(0, indices.reshape(-1), rows)
            torch.testing.assert_close(codebook_gather.backward(grad, indices, 11, dim), expected)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_codebook_gather_backward_of_an_expanded_gradient(device):
    """Autograd hands ``sum()``'s gradient expanded (all strides 0): read as such."""
    codebook_gather = kernels()[3]
    indices = torch.tensor([[1, 2, 1], [0, 2, 2]], device=device)
    grad = torch.ones((), device=device).expand(2, 4, 3)
    counts = torch.bincount(indices.view(-1), minlength=3).float()
    torch.testing.assert_close(codebook_gather.backward(grad, indices, 3, 1), counts[:, None].expand(3, 4))


@ON_CPU
@pytest.mark.parametrize("bad", [11, -1])
def test_codebook_gather_out_of_range_raises(bad):
    """Under the interpreter (which ignores device assertions) the launcher checks the CPU indices."""
    codebook_gather = kernels()[3]
    with pytest.raises(IndexError, match="indices"):
        codebook_gather.forward(torch.tensor([0, bad, 3]), torch.randn(11, 4), 1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")
def test_codebook_gather_out_of_range_asserts_on_the_device():
    """A device-side assertion poisons the CUDA context: run it in a child process."""
    code = (
        "import torch; from vqfast.triton import codebook_gather as g\n"
        "g.forward(torch.tensor([0, 11], device='cuda'), torch.randn(11, 4, device='cuda'), 1)\n"
        "torch.cuda.synchronize()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode != 0 and "out of range" in run.stderr + run.stdout


# ------------------------------------------------------------------------ group_norm_act: the plan


@pytest.fixture(params=["fused", "split"])
def plan(request, monkeypatch):
    """Both ways a group is covered: whole in one program, or split over programs in small tiles."""
    group_norm_act = kernels()[1]
    if request.param == "split":
        monkeypatch.setattr(group_norm_act, "FUSED_MAX", 0)
        monkeypatch.setattr(group_norm_act, "TILE", 16)
        monkeypatch.setattr(group_norm_act, "_target_programs", lambda device: 64)
    return request.param


def norm_expected(x, groups, weight, bias, scale, shift, silu):
    """float64 ``act((group_norm(x) * weight + bias) * up(scale) + up(shift))`` by torch's own ops."""
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps=1e-6)
    if scale is not None:
        size = x.shape[2:]
        y = y * F.interpolate(scale.double(), size=size) + F.interpolate(shift.double(), size=size)
    return F.silu(y) if silu else y


NORM_CASES = [
    # (x shape, groups, small maps' size or None, layout): both plans, each variant, spatial dims that
    # merge into one (SIMPLE), two, and three into two
    ((2, 6, 5, 7), 3, None, torch.contiguous_format),
    ((1, 8, 6, 5), 2, (3, 2), torch.channels_last),
    ((2, 4, 5, 3), 2, None, "sliced"),
    ((1, 4, 3, 4, 5), 2, (2, 2, 3), torch.contiguous_format),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, groups, small, memory_format", NORM_CASES)
def test_group_norm_act_plans(device, plan, shape, groups, small, memory_format):
    """Forward and backward of the fused and the split kernels, against float64 autograd."""
    group_norm_act = kernels()[1]
    torch.manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, device=device) * 3 + 1
    if memory_format == "sliced":
        x = torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
    elif memory_format is torch.channels_last:
        x = x.contiguous(memory_format=memory_format)
    weight, bias = torch.randn(c, device=device), torch.randn(c, device=device)
    scale = shift = source = None
    if small is not None:
        scale, shift = torch.randn(n, c, *small, device=device), torch.randn(n, c, *small, device=device)
        source = layout.nearest_source(tuple(shape[2:]), small, x.device)
    y, mean, rstd = group_norm_act.forward(x, groups, weight, bias, scale, shift, source, 1e-6, True)
    inputs = (x, weight, bias) + (() if small is None else (scale, shift))
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    expected = norm_expected(leaves[0], groups, *leaves[1:3], *(leaves[3:] or (None, None)), True)
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(x).contiguous(memory_format=layout.memory_format(x))
    grads = group_norm_act.backward(grad, x, weight, bias, scale, shift, source, mean, rstd, True)
    expected.backward(grad.double())
    for ours, leaf in zip(grads, leaves):
        torch.testing.assert_close(ours.double(), leaf.grad, rtol=1e-4, atol=1e-4)
    if small is None:
        assert [t.shape for t in grads[3:]] == [(0,), (0,)]


@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_act_statistics_of_a_large_mean(device, plan):
    """Chan's merge: no cancellation when the mean dwarfs the spread (the float32 input itself only
    holds 1e4 + x to within 1e-3)."""
    group_norm_act = kernels()[1]
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9, device=device) + 1e4
    y, _, _ = group_norm_act.forward(x, 2, None, None, None, None, None, 1e-6, False)
    torch.testing.assert_close(y, F.group_norm(x.double(), 2, eps=1e-6).float(), rtol=0, atol=4e-3)


# ------------------------------------------------------------------------- nearest_code precisions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_nearest_code_precision_modes(device, precision):
    """The stated accuracy of each mode: the chosen code's exact distance exceeds the minimum by at most
    2 (2u + u^2) (sum_i |z_i c_i| over the chosen code + over the nearest one), plus float32 rounding."""
    nearest_code = kernels()[0]
    torch.manual_seed(0)
    z = F.normalize(torch.randn(200, 64, device=device), dim=1)
    codebook = F.normalize(torch.randn(150, 64, device=device), dim=1)
    with nearest_code.search_precision(precision):
        indices = nearest_code.forward(z, codebook, 1)
    dist = torch.cdist(z.double(), codebook.double()).square()
    best = dist.argmin(1)
    u = nearest_code.PRECISIONS[precision]
    weight = z.double().abs() @ codebook.double().abs().t()
    bound = 2 * (2 * u + u * u) * (weight.gather(1, indices[:, None]) + weight.gather(1, best[:, None]))
    excess = dist.gather(1, indices[:, None]) - dist.gather(1, best[:, None])
    assert bool((excess <= bound + 1e-5).all())
    if precision == "bf16":  # the mode is in force: it does pick other codes than exact float32 here
        assert not torch.equal(indices, best)
    with pytest.raises(ValueError, match="precision"):
        nearest_code.set_search_precision("fp8")


# ------------------------------------------- at model dims and tile sizes (compiled by benchmarks/resources)


SEARCH_DIMS = [  # (dtype, D): 16 in each dtype, aMUSEd's 64, 256 (LDM's 3, MoVQ's 4: the conformance suite's)
    (torch.float32, 16),
    (torch.float16, 16),
    (torch.bfloat16, 16),
    (torch.float32, 64),
    (torch.float32, 256),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, d", SEARCH_DIMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_search_at_model_dims(device, dtype, d, memory_format):
    """nearest_code and vector_quantize at longer code dims than the conformance suite's, NCHW and
    channels_last: the chosen code is the nearest (exact distance within float32 rounding of the minimum)."""
    nearest_code, _, vector_quantize, _ = kernels()
    torch.manual_seed(0)
    z = torch.randn(2, d, 4, 4, device=device).to(dtype).contiguous(memory_format=memory_format)
    codebook = torch.randn(50, d, device=device).to(dtype)
    indices = nearest_code.forward(z, codebook, 1)
    rows = z.movedim(1, -1).reshape(-1, d).double()
    dist = torch.cdist(rows, codebook.double()).square()
    chosen = dist.gather(1, indices.view(-1, 1))[:, 0]
    assert bool((chosen <= dist.min(1).values + 1e-4 * d).all())
    z_q, _, vq_indices = vector_quantize.forward(z, codebook, 1.0, 0.25, 1)
    assert torch.equal(vq_indices, indices.view(-1))
    torch.testing.assert_close(z_q.float(), codebook[indices].movedim(-1, 1).float(), rtol=1e-2, atol=1e-2)
    # With statistics (atomics): the same outputs, the rows counted and summed per code.
    z_q_stats, _, stats_indices, counts, sums = vector_quantize.forward_stats(z, codebook, 1.0, 0.25, 1)
    assert torch.equal(z_q_stats, z_q) and torch.equal(stats_indices, vq_indices)
    expected_counts, expected_sums = code_stats(z, vq_indices, codebook.shape[0], 1)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 8, 64, 64), (1, 8, 16, 32)], ids=["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_spatial_norm_at_model_tile_sizes(device, shape, dtype, memory_format):
    """The spatial variant with the default plan (1024-element split tiles, or a fused group) and 4x
    nearest upsampling, forward and backward, against float64 autograd."""
    group_norm_act = kernels()[1]
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
    weight, bias = torch.randn(c, device=device), torch.randn(c, device=device)
    scale, shift = torch.randn(n, c, h // 4, w // 4, device=device), torch.randn(n, c, h // 4, w // 4, device=device)
    source = layout.nearest_source((h, w), (h // 4, w // 4), x.device)
    y, mean, rstd = group_norm_act.forward(x, 4, weight, bias, scale, shift, source, 1e-6, True)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, scale, shift)]
    expected = norm_expected(leaves[0], 4, *leaves[1:], True)
    rounding = 1e-5 if dtype == torch.float32 else 2e-2  # of outputs in x's dtype
    torch.testing.assert_close(y.double(), expected, rtol=rounding, atol=rounding)
    grad = torch.randn_like(x)
    grads = group_norm_act.backward(grad, x, weight, bias, scale, shift, source, mean, rstd, True)
    expected.backward(grad.double())
    for ours, leaf, tolerance in zip(grads, leaves, [rounding] + [1e-4] * 4):
        torch.testing.assert_close(ours.double(), leaf.grad, rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------- on CUDA, at model sizes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")
def test_cuda_split_plan_at_model_size():
    """A batch-1 group norm of a real VQModel, split over programs, against torch."""
    group_norm_act = kernels()[1]
    torch.manual_seed(0)
    x = torch.randn(1, 128, 256, 256, device="cuda", dtype=torch.float16)
    weight, bias = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xm = x.contiguous(memory_format=memory_format)
        y, _, _ = group_norm_act.forward(xm, 32, weight, bias, None, None, None, 1e-6, True)
        expected = F.silu(F.group_norm(x.float(), 32, weight, bias, eps=1e-6))
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------ launch grids


GRID_SHAPES = [  # (z shape, codes): batch-1 latents of the benchmark shapes
    ((1, 256, 16, 16), 1024),
    ((1, 256, 32, 32), 1024),
    ((1, 4, 64, 64), 8192),
]
SMS = 132  # an H100's multiprocessors


def _grids(monkeypatch, launch) -> list[tuple[str, int, int]]:
    """``(kernel, programs, BLOCK_N or 0)`` of each launch ``launch()`` makes on a device reporting SMS multiprocessors,
    recorded, not run (an autotuned grid at each config's block sizes: the fewest programs)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    nearest_code, group_norm_act = kernels()[:2]
    monkeypatch.setattr(nearest_code, "multiprocessors", lambda device: SMS)
    monkeypatch.setattr(group_norm_act, "_target_programs", lambda device: 4 * SMS)
    grids = []

    def record(self, grid):
        configs = getattr(self, "compiled_configs", [triton.Config({})]) if isinstance(self, Autotuner) else [None]
        name = (self.fn if isinstance(self, Autotuner) else self).__name__
        for config in configs:
            size = grid(config.kwargs) if callable(grid) else grid
            block_n = config.kwargs.get("BLOCK_N", 0) if config else 0
            grids.append((name, int(torch.tensor(size).prod()), block_n))
        return lambda *args, **kwargs: None

    monkeypatch.setattr(KernelInterface, "__getitem__", record)
    launch()
    return grids


@pytest.mark.parametrize("shape, codes", GRID_SHAPES)
def test_search_grids_fill_two_waves_where_the_work_allows(monkeypatch, shape, codes):
    """nearest_code and vector_quantize split the codebook when the rows alone give too few programs:
    two waves of the GPU, or every (BLOCK_N rows x 64 codes) tile its own program when there are fewer."""
    nearest_code, _, vector_quantize, _ = kernels()
    z, codebook = torch.randn(shape), torch.randn(codes, shape[1])
    rows = z.numel() // shape[1]
    for launch in (lambda: nearest_code.forward(z, codebook, 1), lambda: vector_quantize.forward(z, codebook, 1, 0.25, 1)):
        grids = _grids(monkeypatch, launch)
        searches = [(n, block_n) for name, n, block_n in grids if name == "_nearest_code_kernel"]
        assert len(searches) == len(nearest_code.SEARCH_CONFIGS), grids
        for programs, block_n in searches:
            assert programs >= min(2 * SMS, -(-rows // block_n) * -(-codes // 64)), grids
        monkeypatch.undo()


def test_group_norm_grid_fills_two_waves(monkeypatch):
    """NCHW (1, 512, 64, 64) in 32 groups: each group split along its positions (was 64 programs)."""
    group_norm_act = kernels()[1]
    x = torch.randn(1, 512, 64, 64)
    launch = lambda: group_norm_act.forward(x, 32, None, None, None, None, None, 1e-6, True)  # noqa: E731
    grids = _grids(monkeypatch, launch)
    assert grids and min(n for _, n, _ in grids) >= 2 * SMS, grids
