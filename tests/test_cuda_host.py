"""The CUDA kernels (csrc/cuda/) run on the host (the cuda_host backend, csrc/host/) against the torch
reference, op by op at the lowered signatures, forward and backward, in float32, float16 and bfloat16,
on the layouts and edge cases the kernels treat apart: the D = 4 search and the run-time-D one, the
codebook split over blocks (the grid chosen for 132 SMs), group norm's per-channel reductions split over
blocks and tiled by 32 channels when channels last, 16-byte accesses and their scalar fallbacks, the
int64_t index paths, ties, NaN, batch 0, the deterministic (chunked) and the atomic scatters,
device-side asserts; and the launch grids at the shapes they were sized for. The public ops on this
backend are the conformance suite's."""

import contextlib
import importlib.machinery
import math
import importlib.util
import os

import pytest
import torch

from vqfast.layout import memory_format, nearest_source
from vqfast.ops.codebook_gather import Inputs as GatherInputs
from vqfast.ops.group_norm_act import Inputs as NormInputs
from vqfast.ops.nearest_code import Inputs as NearestInputs
from vqfast.ops.vector_quantize import Inputs as QuantizeInputs
from vqfast.reference import IMPLEMENTATIONS as REFERENCE
from vqfast.reference.vector_quantize_stats import code_stats

cuda_host = pytest.importorskip("vqfast.cuda_host", reason="vqfast._C_cuda_host is not built")
HOST = cuda_host.IMPLEMENTATIONS
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
TOLERANCE = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}  # float32 arithmetic in another order, then rounded


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = F32, layout: bool = False):
    """Same dtype and shape (and strides, for outputs laid out like an input); values within the dtype's
    tolerance relative to the largest finite expected magnitude; NaN where the reference has NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if layout:
        assert actual.stride() == expected.stride()
    finite = expected[expected.isfinite()]
    scale = max(float(finite.abs().max()), 1.0) if finite.numel() else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, equal_nan=True)


@contextlib.contextmanager
def deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def host_module():
    """The loaded vqfast._C_cuda_host (the one VQFAST_CUDA_HOST_LIBRARY names, when set)."""
    path = os.environ.get("VQFAST_CUDA_HOST_LIBRARY")
    if not path:
        from vqfast import _C_cuda_host
        return _C_cuda_host
    loader = importlib.machinery.ExtensionFileLoader("vqfast._C_cuda_host", path)
    return importlib.util.module_from_spec(importlib.util.spec_from_file_location("vqfast._C_cuda_host", path,
                                                                                   loader=loader))


@contextlib.contextmanager
def wide_indices():
    """Every launch takes the kernels' int64_t index path: the largest index of their int32_t path
    (INT32_MAX, common.cuh's index32_limit) lowered to 0, as a tensor past 2**31 elements would."""
    previous = host_module().set_index32_limit(0)
    try:
        yield
    finally:
        host_module().set_index32_limit(previous)


def near_codes(seed, rows_shape, k, d, dtype, noise=0.05):
    """(rows (*rows_shape, d), each near a random code; codebook (k, d)): the nearest codes are clear."""
    g = _gen(seed)
    codebook = torch.randn(k, d, generator=g) * 2
    picks = torch.randint(k, rows_shape, generator=g)
    rows = codebook[picks] + noise * torch.randn(*rows_shape, d, generator=g)
    return rows.to(dtype), codebook.to(dtype)


# z from rows (*rows_shape, D) with the code dimension at dim: rows_shape, make, dim.
SEARCH_LAYOUTS = {
    "nchw": ((2, 5, 7), lambda r: r.permute(0, 3, 1, 2).contiguous(), 1),
    "channels_last": ((2, 5, 7), lambda r: r.permute(0, 3, 1, 2), 1),
    "rows": ((37,), lambda r: r, 1),
    "rows_transposed": ((37,), lambda r: r.t().contiguous().t(), 1),
    "sliced": ((3, 9), lambda r: torch.cat([r, r], -1)[..., ::2], 2),
}


def search_case(layout, dtype, d=4, k=45, seed=1):
    rows_shape, make, dim = SEARCH_LAYOUTS[layout]
    rows, codebook = near_codes(seed, rows_shape, k, d, dtype)
    return make(rows), codebook, dim


def run_nearest(z, codebook, dim):
    assert HOST["nearest_code"].unsupported(NearestInputs(z, codebook, dim)) == ""
    return HOST["nearest_code"].forward(z, codebook, dim), REFERENCE["nearest_code"].forward(z, codebook, dim)


# ------------------------------------------------------------------------------------- nearest_code


@pytest.mark.parametrize("d", [4, 6])  # the kernel's compile-time D and its run-time D
@pytest.mark.parametrize("layout", SEARCH_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_code(dtype, layout, d):
    actual, expected = run_nearest(*search_case(layout, dtype, d))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("d", [4, 5])
def test_nearest_code_split_codebook_keeps_first_tie(d):
    """K = 1100 over 300 rows: 14 blocks share each row block's codes, merged in order; duplicated codes in
    different splits (k and k + 550) must give the first."""
    rows, codebook = near_codes(2, (300,), 550, d, F32)
    codebook = torch.cat([codebook, codebook])
    actual, expected = run_nearest(rows, codebook, 1)
    assert torch.equal(actual, expected) and int(actual.max()) < 550


def test_nearest_code_several_tiles_per_split():
    """2000 rows, K = 600: 3 splits of 200 codes, each two 128-code tiles; D = 20: a full 16-element d chunk
    and a tail. Codes k and k + 300 are equal: the first wins across tiles and splits."""
    rows, codebook = near_codes(15, (2000,), 300, 20, F32)
    assert host_module().nearest_code_grid(2000, 600)[1:] == (3, 200)
    actual, expected = run_nearest(rows, torch.cat([codebook, codebook]), 1)
    assert torch.equal(actual, expected) and int(actual.max()) < 300


def test_nearest_code_equidistant_and_duplicates():
    """z = 0 against +-e_i (every distance exactly 1: index 0), and rows equal to duplicated codes."""
    z = torch.zeros(5, 8)
    actual, expected = run_nearest(z, torch.cat([torch.eye(8), -torch.eye(8)]), 1)
    assert torch.equal(actual, expected) and not actual.any()
    codebook = torch.randn(20, 8, generator=_gen(3)).repeat(3, 1)
    actual, expected = run_nearest(codebook[:20].clone(), codebook, 1)
    assert torch.equal(actual, expected) and torch.equal(actual, torch.arange(20))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [40, 1100])  # one block per row block, and the split codebook
def test_nearest_code_non_finite(dtype, k):
    z, codebook = near_codes(4, (12,), k, 6, F32)
    z[0, 1], z[1, 2], z[2, 0], z[3] = float("nan"), float("inf"), float("-inf"), float("inf")
    codebook[5, 0], codebook[k - 3, 3] = float("nan"), float("-inf")
    actual, expected = run_nearest(z.to(dtype), codebook.to(dtype), 1)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("rows,k", [(256, 1024), (256, 8192), (1024, 16384), (4096, 8192), (4096, 16384),
                                    (65536, 16384), (8192, 16384)])
def test_search_grid_fills_two_waves(rows, k):
    """The issue's shapes ((1,256,16,16) with K = 1024 had 2 blocks) on the emulated 132 SMs: at least two
    waves of blocks, splits of equal spans that cover K with none empty."""
    row_blocks, splits, span = host_module().nearest_code_grid(rows, k)
    assert row_blocks * splits >= 2 * 132
    assert (splits - 1) * span < k <= splits * span and span >= 32


def test_search_grid_small_work():
    """Where the work is too small for two waves, each split still keeps a code per lane."""
    assert host_module().nearest_code_grid(16, 64) == (1, 2, 32)
    assert host_module().nearest_code_grid(37, 45) == (3, 1, 45)


def test_vector_quantize_forward_blocks():
    """One thread per element in 128-thread blocks: (256, D = 64) latents make 128 blocks (1 before)."""
    assert host_module().vector_quantize_blocks(256, 64) == 128
    assert host_module().vector_quantize_blocks(0, 64) == 0


def test_nearest_code_empty():
    z, codebook = torch.zeros(0, 4, 3, 3), torch.randn(16, 4)
    actual, expected = run_nearest(z, codebook, 1)
    assert actual.shape == expected.shape == (0, 3, 3)


# ---------------------------------------------------------------------------------- vector_quantize


def run_quantize(z, codebook, dim, dtype, seed=5):
    """Forward and backward on the host and the reference, compared; indices equal. With statistics
    (the atomic or the sorted sums, as the deterministic mode says): the same first three outputs, the
    reference's counts exactly and its sums within float32's tolerance."""
    assert HOST["vector_quantize"].unsupported(QuantizeInputs(z, codebook, 1.0, 0.25, dim)) == ""
    host = HOST["vector_quantize"].forward(z, codebook, 1.0, 0.25, dim)
    ref = REFERENCE["vector_quantize"].forward(z, codebook, 1.0, 0.25, dim)
    assert_matches(host[0], ref[0], dtype, layout=True)
    assert_matches(host[1], ref[1], dtype)
    assert torch.equal(host[2], ref[2])
    with_stats = HOST["vector_quantize_stats"].forward(z, codebook, 1.0, 0.25, dim)
    for actual, expected in zip(with_stats[:3], host):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    counts, sums = code_stats(z, ref[2], codebook.shape[0], dim)
    assert torch.equal(with_stats[3], counts)
    assert_matches(with_stats[4], sums)
    g = _gen(seed)
    grad_z_q = torch.randn(z.shape, generator=g).to(dtype).contiguous(memory_format=memory_format(z))
    grad_loss = torch.tensor(1.5, dtype=dtype)
    args = (grad_z_q, grad_loss, z, codebook, ref[2], 1.0, 0.25, dim)
    for actual, expected in zip(HOST["vector_quantize"].backward(*args), REFERENCE["vector_quantize"].backward(*args)):
        assert_matches(actual, expected, dtype, layout=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows_transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_quantize(dtype, layout):
    with deterministic(False):  # the atomic scatter
        run_quantize(*search_case(layout, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_quantize_deterministic_is_reproducible(dtype):
    """The sorted scatter (many rows per code) and more rows than one block; twice, bit for bit."""
    z, codebook = near_codes(6, (700,), 9, 4, dtype)
    with deterministic(True):
        run_quantize(z, codebook, 1, dtype)
        grads = [HOST["vector_quantize"].backward(z, torch.tensor(1.0, dtype=dtype), z, codebook,
                                                  torch.zeros(700, dtype=torch.long), 1.0, 0.25, 1)[1]
                 for _ in range(2)]
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_quantize_stats_deterministic_is_reproducible(dtype):
    """The sorted sums of the statistics, all 700 rows in one code (segments across many chunks) and
    spread over codes: twice, bit for bit."""
    for k in (1, 9):
        z, codebook = near_codes(7, (700,), k, 4, dtype)
        with deterministic(True):
            first, second = (HOST["vector_quantize_stats"].forward(z, codebook, 1.0, 0.25, 1) for _ in range(2))
        assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])
        assert first[3].sum() == 700


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_vector_quantize_rounds_as_torch(dtype):
    """z_q = z + (q - z) rounded after each operation equals torch's value bit for bit: the host's
    float -> half / bfloat16 conversions (csrc/host/include/) round to nearest even as the device's do,
    subnormals, ties and overflow to inf included."""
    g = _gen(14)
    magnitudes = 10.0 ** (torch.rand(4000, 3, generator=g) * 12 - 8)
    z = (torch.randn(4000, 3, generator=g) * magnitudes).to(dtype)
    codebook = (torch.randn(64, 3, generator=g) * 10.0 ** (torch.rand(64, 3, generator=g) * 9 - 4)).to(dtype)
    z_q = HOST["vector_quantize"].forward(z, codebook, 1.0, 0.25, 1)[0]
    torch.testing.assert_close(z_q, REFERENCE["vector_quantize"].forward(z, codebook, 1.0, 0.25, 1)[0],
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_vector_quantize_wide_indices(layout):
    """The int64_t kernels (forward, grad_z, both scatters) give what the int32_t ones give."""
    for on in (False, True):
        with wide_indices(), deterministic(on):
            run_quantize(*search_case(layout, F32), F32)


def test_vector_quantize_backward_checks_indices(capfd):
    """grad_z reads the code each index names: an index outside [0, K) stops the kernel."""
    z, codebook = search_case("rows", F32)[:2]
    indices = torch.zeros(z.shape[0], dtype=torch.long)
    indices[5] = codebook.shape[0]
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        HOST["vector_quantize"].backward(z, torch.tensor(1.0), z, codebook, indices, 1.0, 0.25, 1)
    assert "Assertion `k >= 0 && k < p.cb.K` failed" in capfd.readouterr().err


def test_vector_quantize_empty():
    z, codebook = torch.zeros(0, 4, 2, 2), torch.randn(8, 4)
    z_q, loss, indices = HOST["vector_quantize"].forward(z, codebook, 1.0, 0.25, 1)
    assert z_q.shape == z.shape and indices.shape == (0,) and loss.isnan()
    run_quantize(z, codebook, 1, F32)


# ----------------------------------------------------------------------------------- group_norm_act


def norm_case(shape, dtype, channels_last=False, affine=True, spatial=False, seed=7):
    """group_norm_act's lowered arguments on x (N, C, *spatial), and a gradient laid out as x."""
    g = _gen(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, generator=g) if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    scale = shift = source = None
    if spatial:
        small = (shape[0], c, *(max(1, s // 3) for s in shape[2:]))
        scale, shift = torch.randn(small, generator=g), torch.randn(small, generator=g)
        source = nearest_source(tuple(shape[2:]), small[2:], x.device)
    grad = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format(x))
    return (x, 2, weight, bias, scale, shift, source), grad


def run_norm(args, grad, dtype, silu):
    inputs = NormInputs(*args, 1e-6, silu)
    assert HOST["group_norm_act"].unsupported(inputs) == ""
    host = HOST["group_norm_act"].forward(*inputs)
    ref = REFERENCE["group_norm_act"].forward(*inputs)
    assert_matches(host[0], ref[0], dtype, layout=True)
    for actual, expected in zip(host[1:], ref[1:]):
        assert_matches(actual, expected)  # the statistics, float32
    x, _, weight, bias, scale, shift, source = args
    bwd = (grad, x, weight, bias, scale, shift, source, ref[1], ref[2], silu)
    host_grads = HOST["group_norm_act"].backward(*bwd)
    ref_grads = REFERENCE["group_norm_act"].backward(*bwd)
    assert_matches(host_grads[0], ref_grads[0], dtype, layout=True)
    for actual, expected in zip(host_grads[1:], ref_grads[1:]):  # sums over many elements rounded in dtype
        assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("spatial", [False, True], ids=["plain", "spatial"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act(dtype, channels_last, spatial):
    run_norm(*norm_case((2, 6, 5, 7), dtype, channels_last, spatial=spatial), dtype, silu=True)


@pytest.mark.parametrize("affine,silu", [(False, False), (False, True), (True, False)])
def test_group_norm_act_options(affine, silu):
    run_norm(*norm_case((3, 4, 3, 5), F32, affine=affine, spatial=not affine), F32, silu)


@pytest.mark.parametrize(
    "shape,channels_last,grid",
    [((1, 2, 96, 96), False, (1, 3, 3072)),  # each channel's 9216 positions in 3 blocks
     ((1, 4, 48, 48), True, (32, 18, 128)),  # one tile of 32 lanes, 4 of them channels
     ((1, 40, 24, 24), True, (32, 5, 120))],  # two tiles (the second 8 channels), groups across tiles
    ids=["nchw", "channels_last", "channels_last_two_tiles"],
)
def test_group_norm_act_split_reduction(shape, channels_last, grid):
    """The per-(n, c) reductions split over blocks (grid = (channels per block, splits, positions per
    split) on 132 SMs), merged in order, then over each group's channels."""
    n, c, *spatial = shape
    assert host_module().group_norm_grid(n, c, math.prod(spatial), 2, channels_last) == grid
    run_norm(*norm_case(shape, F32, channels_last, spatial=True), F32, silu=True)


@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (1, 128, 256, 256)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_grid_fills_the_gpu(shape, channels_last):
    """Batch-1 shapes the reductions used to run on 32 groups' splits (forward and backward statistics) or
    C blocks (channel gradients, channels last walking channel c at stride C): about four blocks per SM on
    132 SMs now, every split covering positions, none empty; 32 channels per block when channels last."""
    n, c, h, w = shape
    tile, splits, chunk = host_module().group_norm_grid(n, c, h * w, 32, channels_last)
    assert tile == (32 if channels_last else 1)
    assert n * (c // tile) * splits >= 3 * 132
    assert (splits - 1) * chunk < h * w <= splits * chunk and chunk % (256 // tile) == 0


def norm_vector_width(x, groups=2):
    """Elements per thread of group norm's elementwise passes on x (and outputs allocated like it)."""
    strides = (x.stride(0), x.stride(1) if x.shape[1] > 1 else 1, x.stride(-1) if x.dim() > 2 else 1)
    return host_module().group_norm_vector_width(x.element_size(), x.shape[0], x.shape[1], math.prod(x.shape[2:]),
                                                 groups, strides[2] != 1, [(x.data_ptr(), *strides)])


def misaligned(t):
    """t's values at t's strides, one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].as_strided(t.shape, t.stride())
    return out.copy_(t)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act_vectorized(dtype, channels_last):
    """Elementwise passes take 16 bytes per thread where the inner dimension (positions; channels when
    channels last) is a multiple of 16 bytes' worth and every operand is aligned, else one element: the same
    values one element off alignment take the scalar path and give the same bits."""
    args, grad = norm_case((2, 8, 4, 6), dtype, channels_last, spatial=True)
    x = args[0]
    assert norm_vector_width(x) == 16 // x.element_size()
    run_norm(args, grad, dtype, silu=True)
    shifted, shifted_grad = misaligned(x), misaligned(grad)
    assert norm_vector_width(shifted) == 1
    ours = HOST["group_norm_act"].forward(*NormInputs(*args, 1e-6, True))
    scalar = HOST["group_norm_act"].forward(*NormInputs(shifted, *args[1:], 1e-6, True))
    assert all(torch.equal(a, b) for a, b in zip(ours, scalar))
    _, _, weight, bias, scale, shift, source = args
    ours = HOST["group_norm_act"].backward(grad, x, weight, bias, scale, shift, source, *ours[1:], True)
    scalar = HOST["group_norm_act"].backward(shifted_grad, shifted, weight, bias, scale, shift, source, *scalar[1:],
                                             True)
    assert all(torch.equal(a, b) for a, b in zip(ours, scalar))


def test_group_norm_act_vector_width():
    """The scalar fallback where the inner dimension is not a multiple of 16 bytes' worth (misaligned bases:
    test_group_norm_act_vectorized), and the vector path on channels sliced out of a wider tensor."""
    assert norm_vector_width(torch.zeros(2, 6, 5, 7)) == 1  # 35 positions
    assert norm_vector_width(torch.zeros(2, 12, 4, 6).to(memory_format=torch.channels_last)) == 4
    assert norm_vector_width(torch.zeros(2, 12, 4, 6, dtype=F16).to(memory_format=torch.channels_last)) == 1
    g = _gen(16)
    sliced = torch.randn(2, 10, 4, 6, generator=g)[:, 2:8]  # channel stride 24, sample stride 240, base 48
    assert norm_vector_width(sliced) == 4
    run_norm((sliced, 2, None, None, None, None, None), torch.randn(sliced.shape, generator=g), F32, silu=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 8, 4, 6)], ids=["scalar", "vectorized"])
def test_group_norm_act_wide_indices(shape, channels_last):
    """The int64_t kernels (reductions, elementwise scalar and vectorized, spatial sums) give what the
    int32_t ones give."""
    with wide_indices():
        run_norm(*norm_case(shape, F32, channels_last, spatial=True), F32, silu=True)


@pytest.mark.parametrize("shape", [(2, 4), (1, 4, 1, 1), (2, 4, 3, 2, 2)], ids=["no_spatial", "one", "3d"])
def test_group_norm_act_ranks(shape):
    run_norm(*norm_case(shape, F32), F32, silu=True)


def test_group_norm_act_empty():
    args, grad = norm_case((0, 4, 3, 3), F32, spatial=True)
    run_norm(args, grad, F32, silu=True)


# ---------------------------------------------------------------------------------- codebook_gather


def run_gather(indices, codebook, dim, dtype):
    assert HOST["codebook_gather"].unsupported(GatherInputs(indices, codebook, dim)) == ""
    actual = HOST["codebook_gather"].forward(indices, codebook, dim)
    expected = REFERENCE["codebook_gather"].forward(indices, codebook, dim)
    assert torch.equal(actual, expected) and actual.is_contiguous()
    grad = torch.randn(expected.shape, generator=_gen(8)).to(dtype)
    k = codebook.shape[0]
    for on in (False, True):
        with deterministic(on):
            assert_matches(HOST["codebook_gather"].backward(grad, indices, k, dim),
                           REFERENCE["codebook_gather"].backward(grad, indices, k, dim), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make,dim",
    [(lambda g: torch.randint(30, (2, 5, 7), generator=g), 1),
     (lambda g: torch.randint(30, (2, 5, 7), generator=g), 3),
     (lambda g: torch.randint(30, (7, 5), generator=g).t(), 0),  # transposed
     (lambda g: torch.randint(30, (1, 6), generator=g).expand(4, 6), 2),  # zero stride
     (lambda g: torch.tensor(17), 0)],  # 0-d
    ids=["nchw", "last", "transposed", "expanded", "scalar"],
)
def test_codebook_gather(dtype, make, dim):
    codebook = torch.randn(30, 5, generator=_gen(9)).to(dtype)
    run_gather(make(_gen(10)), codebook, dim, dtype)


def test_codebook_gather_sliced_codebook():
    codebook = torch.randn(30, 10, generator=_gen(11))[:, ::2]
    run_gather(torch.randint(30, (3, 4), generator=_gen(12)), codebook, 2, F32)


def test_codebook_gather_empty():
    """Regression: an empty sort's order had no data pointer, so the deterministic backward took the
    atomic form into an unzeroed buffer (garbage gradients)."""
    run_gather(torch.zeros(0, 4, dtype=torch.long), torch.randn(30, 5), 1, F32)


def gather_vector_width(indices, codebook, dim):
    """Elements per thread of codebook_gather (its output a fresh, aligned allocation)."""
    inner = math.prod(indices.shape[dim:])
    return host_module().codebook_gather_vector_width(codebook.element_size(), *codebook.shape, *codebook.stride(),
                                                      codebook.data_ptr(), 0, inner)


@pytest.mark.parametrize("dtype", DTYPES)
def test_codebook_gather_vectorized(dtype):
    """Codes as rows of the output (dim last), codebook rows contiguous and 16 bytes' multiples: a thread
    copies 16 bytes; forward exact, backward (both scatters) as the reference."""
    codebook = torch.randn(30, 16, generator=_gen(19)).to(dtype)
    indices = torch.randint(30, (3, 7), generator=_gen(20))
    assert gather_vector_width(indices, codebook, 2) == 16 // codebook.element_size()
    run_gather(indices, codebook, 2, dtype)


def test_codebook_gather_vector_width():
    """The scalar fallback: codes not along the output's last dimension, codebook rows strided, of a length
    or at an offset off 16 bytes."""
    codebook = torch.randn(30, 8, generator=_gen(21))
    indices = torch.randint(30, (3, 7), generator=_gen(22))
    assert gather_vector_width(indices, codebook, 2) == 4
    assert gather_vector_width(indices, codebook, 1) == 1
    assert gather_vector_width(indices, codebook.to(F16), 2) == 8
    assert gather_vector_width(indices, torch.randn(30, 6), 2) == 1
    assert gather_vector_width(indices, torch.randn(30, 16)[:, ::2], 2) == 1
    assert gather_vector_width(indices, torch.randn(30, 10)[:, :8], 2) == 1  # rows 10 apart
    shifted = misaligned(codebook)
    assert gather_vector_width(indices, shifted, 2) == 1
    run_gather(indices, shifted, 2, F32)


@pytest.mark.parametrize("dim", [1, 2], ids=["scalar", "vectorized"])
def test_codebook_gather_wide_indices(dim):
    codebook = torch.randn(30, 8, generator=_gen(23))
    with wide_indices():
        run_gather(torch.randint(30, (3, 7), generator=_gen(24)), codebook, dim, F32)


def skewed_codes(counts, k, seed):
    """Shuffled int64 codes, code c * 3 taking counts[c] rows (codes between them empty)."""
    codes = torch.cat([torch.full((n,), 3 * c, dtype=torch.long) for c, n in enumerate(counts)])
    assert int(codes.max()) < k
    return codes[torch.randperm(codes.numel(), generator=_gen(seed))]


@pytest.mark.parametrize(
    "counts",
    [[700], [1, 31, 32, 33, 64, 65, 74], [300, 1, 1, 2]],
    ids=["one_code", "runs_across_chunks", "one_code_most_rows"],
)
def test_deterministic_scatter_chunks(counts):
    """The deterministic scatter over 32-row chunks of the sorted rows: one code holding every row (22
    chunks, merged by combine_kernel), runs that start, end or fit inside chunks, codes without rows; equal
    to the reference, twice the same bits, and the same bits whatever the index width."""
    indices = skewed_codes(counts, 24, seed=25)
    codebook = torch.randn(24, 6, generator=_gen(26))
    run_gather(indices, codebook, 1, F32)
    grad = torch.randn(indices.numel(), 6, generator=_gen(27))
    with deterministic(True):
        first = HOST["codebook_gather"].backward(grad, indices, 24, 1)
        assert torch.equal(first, HOST["codebook_gather"].backward(grad, indices, 24, 1))
        with wide_indices():
            assert torch.equal(first, HOST["codebook_gather"].backward(grad, indices, 24, 1))


def test_deterministic_scatter_checks_codes(capfd):
    """The chunk kernel reads every sorted row's code: one outside [0, K) stops it."""
    indices = skewed_codes([40, 10], 24, seed=28)
    indices[3] = 24
    with deterministic(True), pytest.raises(RuntimeError, match="device-side assert triggered"):
        HOST["codebook_gather"].backward(torch.randn(50, 6), indices, 24, 1)
    assert "Assertion `k >= 0 && k < p.K` failed" in capfd.readouterr().err


@pytest.mark.parametrize("n", [256, 4096])
@pytest.mark.parametrize("k", [1024, 16384])
@pytest.mark.parametrize("d", [4, 256])
def test_scatter_grid(n, k, d):
    """One thread per (32-row chunk, d), then per (code, d); a code holding all n rows is summed by n / 32
    threads per d (one before)."""
    assert host_module().scatter_grid(n, k, d) == (math.ceil(n // 32 * d / 256), k * d // 256, n * d // 256)


@pytest.mark.parametrize("bad", [30, -1])
def test_out_of_range_index_stops_the_kernel(bad, capfd):
    """The kernel's assertion fails (as a device-side assert would), the launch reports it, and the
    next launch runs again."""
    codebook = torch.randn(30, 5)
    indices = torch.randint(30, (4, 100), generator=_gen(13))
    indices[3, 77] = bad
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        HOST["codebook_gather"].forward(indices, codebook, 1)
    assert "Assertion `k >= 0 && k < p.cb.K` failed" in capfd.readouterr().err
    indices[3, 77] = 0
    run_gather(indices, codebook, 1, F32)


def test_unsupported():
    z, codebook = torch.randn(4, 5), torch.randn(7, 5)
    assert "float64" in HOST["nearest_code"].unsupported(NearestInputs(z.double(), codebook.double(), 1))
    assert "CPU" in HOST["nearest_code"].unsupported(NearestInputs(z.to("meta"), codebook.to("meta"), 1))
    wide = torch.randn(2, 8192)
    assert "D <=" in HOST["vector_quantize"].unsupported(QuantizeInputs(wide, wide, 1.0, 0.25, 1))
