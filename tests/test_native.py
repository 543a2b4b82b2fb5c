"""What is specific to the native backend (vqfast._C); values across backends are tests/test_conformance.py's.

Here: the registry entries are the torch.ops.vqfast_C functions and their schemas the lowered
signatures; ``unsupported`` declines what the kernels cannot run in place; the CPU kernels' own paths
(the sorted codebook search, the shifted statistics, the fast SiLU, strided views) and the defects of
issue 11, at the torch.ops level. CUDA cases skip without a GPU."""

import collections

import pytest
import torch

from vqfast import layout
from vqfast.ops.codebook_gather import Inputs as GatherInputs
from vqfast.ops.group_norm_act import Inputs as NormInputs
from vqfast.ops.nearest_code import Inputs as NearestInputs
from vqfast.ops.vector_quantize import Inputs as QuantizeInputs
from vqfast.reference import group_norm_act as ref_gn
from vqfast.reference import nearest_code as ref_nc
from vqfast.reference.vector_quantize_stats import code_stats

native = pytest.importorskip("vqfast.native", reason="vqfast._C is not built")
ops = torch.ops.vqfast_C
INPUTS = {"nearest_code": NearestInputs, "group_norm_act": NormInputs, "vector_quantize": QuantizeInputs,
          "vector_quantize_stats": QuantizeInputs, "codebook_gather": GatherInputs}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _norm_inputs(x, scale=None, shift=None, source=None, num_groups=2):
    return NormInputs(x, num_groups, None, None, scale, shift, source, 1e-6, True)


# ---------------------------------------------------------------- registry and unsupported


@pytest.mark.parametrize("op", INPUTS)
def test_implementations_are_the_ops_with_the_lowered_schemas(op):
    impl = native.IMPLEMENTATIONS[op]
    assert impl.forward is getattr(ops, op)
    if op != "nearest_code":
        assert impl.backward is getattr(ops, f"{op.removesuffix('_stats')}_backward")
    assert native.ARGUMENTS[op] == INPUTS[op]._fields


def test_unsupported_declines_what_the_kernels_cannot_run():
    z, cb = torch.randn(2, 4, 3, 3), torch.randn(10, 4)
    assert native.nearest_code_unsupported(NearestInputs(z, cb, 1)) == ""
    assert "float64" in native.nearest_code_unsupported(NearestInputs(z.double(), cb.double(), 1))
    assert "meta" in native.nearest_code_unsupported(NearestInputs(z.to("meta"), cb.to("meta"), 1))
    assert "int64" in native.codebook_gather_unsupported(GatherInputs(torch.zeros(3, dtype=torch.int32), cb, 1))
    # A build whose schema is not the lowering's (here: fields the ops do not have) is stale.
    stale = collections.namedtuple("Inputs", "z codebook beta legacy dim")(z, cb, 0.25, True, 1)
    assert "rebuild" in native.vector_quantize_unsupported(stale)
    # z whose rows keep more than MAX_DIMS dimensions: rows are never copied.
    ragged = torch.randn([3] * 9)[(slice(None, 2),) * 9]
    assert "dimensions" in native.nearest_code_unsupported(NearestInputs(ragged, torch.randn(5, 2), 0))


def test_unsupported_cuda_without_cuda_build():
    from vqfast import _C

    if _C.has_cuda():
        pytest.skip("vqfast._C was built with CUDA")
    # The device is judged by its type alone: a stand-in tensor on "cuda" is enough without a GPU.
    z = type("Tensor", (), {"device": torch.device("cuda"), "dtype": torch.float32})()
    assert "without CUDA" in native._runs("nearest_code", NearestInputs(z, z, 1), z)


@pytest.mark.parametrize(
    "make,ok",
    [(lambda x: x, True), (lambda x: x.contiguous(memory_format=torch.channels_last), True),
     (lambda x: torch.cat([x, x], 1)[:, ::2], True),  # channels a step apart: channels-first runs
     (lambda x: torch.cat([x, x])[::2], True),  # batch sliced
     (lambda x: torch.cat([x, x], 3)[..., ::2], False),  # positions a step apart
     (lambda x: torch.cat([x, x]).contiguous(memory_format=torch.channels_last)[::2], False),  # grad contiguous
     (lambda x: x[:, :, :, :1].expand(x.shape), False)],  # expanded positions
)
def test_group_norm_layouts_read_in_place_or_declined(make, ok):
    x = make(torch.randn(2, 8, 5, 6, generator=_gen(1)))
    reason = native.group_norm_act_unsupported(_norm_inputs(x))
    assert (reason == "") == ok, reason
    if ok:
        y, mean, rstd = ops.group_norm_act(x, 2, None, None, None, None, None, 1e-6, True)
        ry, rmean, rrstd = ref_gn.forward(x, 2, None, None, None, None, None, 1e-6, True)
        assert y.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(y, ry, rtol=2e-5, atol=2e-5)
        grad = torch.randn(x.shape, generator=_gen(2)).contiguous(memory_format=layout.memory_format(x))
        got = ops.group_norm_act_backward(grad, x, None, None, None, None, None, rmean, rrstd, True)
        want = ref_gn.backward(grad, x, None, None, None, None, None, rmean, rrstd, True)
        for a, e in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CPU kernels' own paths


def _check_by_distance(z, cb, got):
    d = torch.cdist(z.double(), cb.double()) ** 2
    chosen = d.gather(1, got.reshape(-1, 1)).squeeze(1)
    scale = z.double().square().sum(1) + cb.double().square().sum(1).max()
    assert torch.all(chosen - d.min(1).values <= 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("D", [1, 3, 4, 8])
@pytest.mark.parametrize("codebook", ["gaussian", "elongated", "flat", "lattice"])
def test_nearest_code_sorted_search(D, codebook):
    """Small D with >= 1024 rows searches a codebook sorted along its principal axis and skips tiles by
    projection: the answer must stay the exhaustive one, ties to the lowest index included."""
    g = _gen(5 + D)
    cb = torch.randn(700, D, generator=g)
    if codebook == "elongated":
        cb[:, 0] *= 30
    elif codebook == "flat":  # every code projects to the same value along the principal axis
        cb[:, 0] = 2.0
        cb[:, 1:] = 0.0 if D == 1 else cb[:, 1:]
    elif codebook == "lattice":  # coarse grid values: many exactly equal distances
        cb = torch.round(cb * 2) / 2
    cb = torch.cat([cb, cb[torch.randperm(700, generator=g)[:300]]])  # duplicates at higher indices
    z = torch.randn(1500, D, generator=g) * 2
    if codebook == "lattice":
        z = torch.round(z * 2) / 2
    got = ops.nearest_code(z, cb, 1)
    _check_by_distance(z, cb, got)
    assert torch.all(got < 700)  # a duplicate never beats its first copy
    # Below 1024 rows the codebook is searched exhaustively: the same distances, the same answer.
    assert torch.equal(torch.cat([ops.nearest_code(part, cb, 1) for part in z.split(500)]), got)


def test_nearest_code_non_finite_rows_among_sorted_ones():
    g = _gen(3)
    cb = torch.randn(40, 6, generator=g)
    z = torch.randn(1212, 6, generator=g)
    z[0, 1], z[1, 2], z[2, 0], z[4, 5] = float("nan"), float("inf"), -float("inf"), 1e30
    cb_inf = cb.clone()
    cb_inf[5, 0] = float("inf")
    for c in (cb, cb_inf):
        assert torch.equal(ops.nearest_code(z, c, 1), ref_nc.forward(z, c, 1))


def test_group_norm_act_large_mean_is_stable():
    x = torch.randn(2, 8, 32, 32, generator=_gen(4)) * 0.01 + 1000.0
    y, mean, rstd = ops.group_norm_act(x, 4, None, None, None, None, None, 1e-6, False)
    xg = x.double().view(2, 4, -1)
    true_rstd = (xg.var(-1, unbiased=False) + 1e-6).rsqrt()
    ry = ((xg - xg.mean(-1, keepdim=True)) * true_rstd[..., None]).view_as(x)
    torch.testing.assert_close(rstd.double(), true_rstd, rtol=1e-3, atol=0)
    torch.testing.assert_close(y.double(), ry, rtol=0, atol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_act_silu_extreme_pre_activations(channels_last):
    """SiLU where exp(-y) overflows float32 (y < -88.7) is -0, and of +-inf what torch gives."""
    x = torch.randn(1, 16, 5, 5, generator=_gen(6))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.tensor([300.0] * 4 + [1e4] * 4 + [0.0] * 8)  # one group per case
    b = torch.tensor([0.0] * 8 + [float("inf")] * 4 + [-float("inf")] * 4)
    y, mean, rstd = ops.group_norm_act(x, 4, w, b, None, None, None, 1e-6, True)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, 1e-6))
    torch.testing.assert_close(y, want, rtol=2e-5, atol=1e-6, equal_nan=True)
    grad = torch.randn(x.shape, generator=_gen(7)).contiguous(memory_format=layout.memory_format(x))
    gx = ops.group_norm_act_backward(grad, x, w, b, None, None, None, mean, rstd, True)[0]
    assert not torch.isnan(gx[:, :8]).any()  # finite pre-activations, however negative


def test_codebook_grad_is_deterministic_whatever_the_threads():
    g = _gen(7)
    z, cb = torch.randn(4, 8, 33, 31, generator=g), torch.randn(6, 8, generator=g)  # many rows per code
    _, _, idx = ops.vector_quantize(z, cb, 1.0, 0.25, 1)
    grad = torch.randn(z.shape, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            runs.append(ops.vector_quantize_backward(grad, torch.tensor(1.0), z, cb, idx, 1.0, 0.25, 1)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_code_stats_are_deterministic_whatever_the_threads():
    """Counts and sums of many rows over a few codes (several parts of rows, each summed by one
    thread): the same bits at any thread count, and the reference's counts and sums."""
    g = _gen(8)
    z, cb = torch.randn(2, 8, 70, 64, generator=g), torch.randn(5, 8, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            runs.append(ops.vector_quantize_stats(z, cb, 1.0, 0.25, 1))
    finally:
        torch.set_num_threads(threads)
    for run in runs:
        assert torch.equal(run[3], runs[0][3]) and torch.equal(run[4], runs[0][4])
    counts, sums = code_stats(z, runs[0][2], cb.shape[0], 1)
    assert torch.equal(runs[0][3], counts)
    torch.testing.assert_close(runs[0][4], sums, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- issue 11 defects at the torch.ops level


def test_spatial_norm_of_an_empty_batch_is_empty():
    x, small = torch.randn(0, 8, 4, 4), torch.randn(0, 8, 2, 2)
    source = layout.nearest_source((4, 4), (2, 2), torch.device("cpu"))
    y, mean, rstd = ops.group_norm_act(x, 4, None, None, small, small, source, 1e-6, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 4)
    grads = ops.group_norm_act_backward(x, x, None, None, small, small, source, mean, rstd, True)
    assert [t.shape for t in grads] == [x.shape, (8,), (8,), small.shape, small.shape]
    # Without scale, grad_scale and grad_shift are empty (0,) float32 tensors.
    grads = ops.group_norm_act_backward(x, x, None, None, None, None, None, mean, rstd, True)
    assert grads[3].shape == grads[4].shape == (0,) and grads[3].dtype == torch.float32


@pytest.mark.parametrize(
    "indices,dim",
    [(torch.tensor(3), 0), (torch.tensor([3]).expand(6), 1), (torch.tensor([[1], [4]]).expand(2, 5), 1),
     (torch.arange(10).flip(0)[::2], 0)],
)
def test_codebook_gather_reads_any_index_layout(indices, dim):
    cb = torch.randn(10, 4, generator=_gen(8))
    got = ops.codebook_gather(indices, cb, dim)
    assert got.is_contiguous() and torch.equal(got, cb[indices].movedim(-1, dim))
    grad = torch.ones(()).expand(got.shape)  # what sum().backward() sends: every stride 0
    want = torch.zeros(10, 4).index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), 4))
    torch.testing.assert_close(ops.codebook_gather_backward(grad, indices, 10, dim), want)


@pytest.mark.parametrize("bad", [torch.tensor([0, 10]), torch.tensor(-1), torch.tensor([11]).expand(3)])
def test_codebook_gather_out_of_range_raises_index_error(bad):
    with pytest.raises(IndexError, match="out of bounds"):
        ops.codebook_gather(bad, torch.randn(10, 4), 0)


# ---------------------------------------------------------------- CUDA


def _cuda():
    from vqfast import _C

    if not torch.cuda.is_available() or not _C.has_cuda():
        pytest.skip("needs a CUDA GPU and vqfast._C built with CUDA")
    return torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dim,K", [((2, 4, 64, 64), 1, 16384), ((4096, 8), 1, 3000), ((33, 256), 1, 50)])
def test_cuda_search_does_the_cpu_kernels_arithmetic(shape, dim, K):
    dev = _cuda()
    g = _gen(9)
    z, cb = torch.randn(shape, generator=g), torch.randn(K, shape[dim], generator=g)
    assert torch.equal(ops.nearest_code(z.to(dev), cb.to(dev), dim).cpu(), ops.nearest_code(z, cb, dim))


@pytest.mark.cuda
def test_cuda_nearest_code_declines_long_codes():
    dev = _cuda()
    z = torch.randn(2, native.CUDA_MAX_D + 1, device=dev)
    assert "D <=" in native.nearest_code_unsupported(NearestInputs(z, z, 1))
    assert native.nearest_code_unsupported(NearestInputs(z[:, :-1], z[:, :-1], 1)) == ""


@pytest.mark.cuda
def test_cuda_backwards_are_deterministic_and_strided_norms_read_in_place():
    dev = _cuda()
    g = _gen(10)
    x = torch.cat([torch.randn(2, 64, 16, 16, generator=g)] * 2, 1)[:, ::2].to(dev)  # channels a step apart
    y, mean, rstd = ops.group_norm_act(x, 32, None, None, None, None, None, 1e-6, True)
    ry = ops.group_norm_act(x.cpu(), 32, None, None, None, None, None, 1e-6, True)[0]
    torch.testing.assert_close(y.cpu(), ry, rtol=1e-4, atol=1e-4)
    grad = torch.randn(x.shape, generator=g).to(dev)
    first = ops.group_norm_act_backward(grad, x, None, None, None, None, None, mean, rstd, True)
    again = ops.group_norm_act_backward(grad, x, None, None, None, None, None, mean, rstd, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
