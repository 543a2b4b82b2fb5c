"""The native backend (vqfast._C) against the torch reference: randomized shapes, strides, dtypes,
empty batches, ties and non-finite input; forward and backward. CUDA cases skip without a GPU."""

import pytest
import torch

import vqfast
from vqfast import backend
from vqfast.reference import group_norm_act as ref_gn
from vqfast.reference import nearest_code as ref_nc
from vqfast.reference import spatial_norm_act as ref_sn

native = pytest.importorskip("vqfast.native", reason="vqfast._C is not built")
from vqfast.native import group_norm_act as nat_gn  # noqa: E402
from vqfast.native import nearest_code as nat_nc  # noqa: E402
from vqfast.native import spatial_norm_act as nat_sn  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # a non-contiguous view: every other element of a wider last dimension
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


# ---------------------------------------------------------------- backend plumbing


def test_extension_and_backend_status():
    from vqfast import _C

    assert isinstance(_C.has_cuda(), bool)
    assert vqfast.backends()["native"].available
    for op in ("nearest_code", "group_norm_act", "spatial_norm_act"):
        assert native.supports(op, CPU) == ""
    assert "no native kernel" in native.supports("codebook_gather", CPU)
    if not _C.has_cuda():
        assert "without CUDA" in native.supports("nearest_code", torch.device("cuda"))


def test_ops_dispatch_to_native():
    z, cb = torch.randn(2, 4, 3, 3), torch.randn(10, 4)
    with vqfast.use_backend("native"):
        assert backend.resolve("nearest_code", CPU) == "native"
        got = vqfast.ops.nearest_code(z, cb)
    torch.testing.assert_close(got, ref_nc.forward(z, cb, 1), rtol=0, atol=0)


# ---------------------------------------------------------------- nearest_code


def _check_by_distance(z, cb, dim, got):
    """The chosen code's float64 distance is within tolerance of the true minimum."""
    rows = z.movedim(dim, -1).reshape(-1, cb.shape[1]).double()
    c = cb.double()
    d = torch.cdist(rows, c) ** 2 if rows.shape[0] else rows.new_zeros(0, c.shape[0])
    best = d.min(1).values
    chosen = d.gather(1, got.reshape(-1, 1)).squeeze(1)
    scale = rows.square().sum(1) + c.square().sum(1).max()
    assert torch.all(chosen - best <= 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim,K",
    [((2, 4, 5, 7), 1, 37), ((100, 3), -1, 1000), ((3, 64, 5, 5), 1, 100), ((1, 300, 2), 1, 7),
     ((0, 8, 3, 3), 1, 16), ((5, 0, 4), 2, 3), ((7, 1), -1, 65), ((2, 3, 4, 9), 3, 129), ((33, 256), 1, 200)],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_nearest_code_matches_reference(dtype, shape, dim, K, layout):
    g = _gen(hash((shape, K)) % 1000)
    z = _strided(torch.randn(shape, generator=g).to(dtype), layout)
    cb = torch.randn(K, shape[dim], generator=g).to(dtype)
    got = nat_nc.forward(z, cb, dim)
    want = ref_nc.forward(z, cb, dim)
    assert got.dtype == torch.int64 and got.shape == want.shape
    _check_by_distance(z.float(), cb.float(), dim, got)
    # On random data the best and second best are far apart: indices agree almost everywhere.
    if want.numel():
        assert (got == want).float().mean() > 0.99


def test_nearest_code_well_separated_indices_equal_float64_argmin():
    g = _gen(1)
    cb = torch.randn(500, 16, generator=g) * 10
    truth = torch.randint(0, 500, (4000,), generator=g)
    z = cb[truth] + 0.01 * torch.randn(4000, 16, generator=g)
    assert torch.equal(nat_nc.forward(z, cb, -1), truth)
    zt = z.view(40, 100, 16).permute(0, 2, 1)  # (B, D, P): dim=1, read in place
    assert torch.equal(nat_nc.forward(zt, cb, 1), truth.view(40, 100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_code_ties_go_to_first_index(dtype):
    g = _gen(2)
    base = torch.randn(20, 8, generator=g)
    cb = torch.cat([base, base, base]).to(dtype)  # every code three times
    z = torch.randn(50, 8, generator=g).to(dtype)
    got = nat_nc.forward(z, cb, -1)
    assert torch.all(got < 20)
    torch.testing.assert_close(got, ref_nc.forward(z, cb, -1), rtol=0, atol=0)
    # Exactly equidistant codes: z = 0 against +-e_i: all distances 1, the first wins.
    cb2 = torch.cat([torch.eye(8), -torch.eye(8)]).to(dtype)
    assert torch.equal(nat_nc.forward(torch.zeros(3, 8, dtype=dtype), cb2, -1), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_code_non_finite_as_reference(dtype):
    g = _gen(3)
    cb = torch.randn(40, 6, generator=g)
    z = torch.randn(12, 6, generator=g)
    z[0, 1] = float("nan")
    z[1, 2] = float("inf")
    z[2, 0] = -float("inf")
    z[3] = float("inf")
    z[4, 5] = 1e30  # finite but past the fast path's bound
    cases = [(z, cb)]
    cb_nan = cb.clone()
    cb_nan[17, 3] = float("nan")
    cb_inf = cb.clone()
    cb_inf[5, 0] = float("inf")
    cb_inf[30, 2] = -float("inf")
    cases += [(z, cb_nan), (z, cb_inf), (z[5:], cb_nan)]
    for zz, cc in cases:
        zz, cc = zz.to(dtype), cc.to(dtype)
        torch.testing.assert_close(nat_nc.forward(zz, cc, -1), ref_nc.forward(zz, cc, -1), rtol=0, atol=0)


@pytest.mark.slow
def test_nearest_code_large_codebook():
    g = _gen(4)
    z, cb = torch.randn(2, 4, 64, 64, generator=g), torch.randn(16384, 4, generator=g)
    got = nat_nc.forward(z, cb, 1)
    _check_by_distance(z, cb, 1, got)
    assert (got == ref_nc.forward(z, cb, 1)).float().mean() > 0.999


# ---------------------------------------------------------------- group_norm_act / spatial_norm_act


def _tol(dtype):
    return {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]


def _close(got, want, dtype, scale=1.0):
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol * scale, atol=atol * scale)


GN_CASES = [((2, 8, 5, 7), 4), ((3, 64, 9, 9), 32), ((2, 6, 11), 3), ((1, 40, 3, 3), 8), ((2, 96, 4, 4, 3), 32),
            ((1, 3, 17, 1), 1), ((0, 8, 4, 4), 2), ((2, 4, 0, 3), 2), ((2, 50, 33, 2), 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", GN_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_act_matches_reference(dtype, shape, G, layout, activation, affine):
    g = _gen(hash((shape, G, layout)) % 1000)
    x = _strided((torch.randn(shape, generator=g) * 2 + 0.5).to(dtype), layout)
    w = torch.randn(shape[1], generator=g) if affine else None
    b = torch.randn(shape[1], generator=g) if affine else None
    # The reference's torch.native_group_norm rejects non-contiguous float32 input: give it a copy.
    xr = x.contiguous() if layout == "sliced" else x
    y, mean, rstd = nat_gn.forward(x, G, w, b, 1e-6, activation)
    ry, rmean, rrstd = ref_gn.forward(xr, G, w, b, 1e-6, activation)
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()
    assert mean.dtype == rstd.dtype == torch.float32
    _close(y, ry, dtype)
    torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(rstd, rrstd, rtol=1e-5, atol=1e-5, equal_nan=True)
    if x.numel() == 0:
        return
    grad = torch.randn(shape, generator=g).to(dtype)
    grad = grad.contiguous(memory_format=vqfast.ops.group_norm_act.__globals__["memory_format"](x))
    got = nat_gn.backward(grad, x, w, b, rmean, rrstd, activation)
    want = ref_gn.backward(grad, xr, w, b, rmean, rrstd, activation)
    assert got[0].dtype == x.dtype and got[1].dtype == got[2].dtype == torch.float32
    scale = 1.0 if dtype == torch.float32 else 4.0
    _close(got[0], want[0], dtype, scale)
    sums = max(1.0, want[1].abs().max().item(), want[2].abs().max().item())
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4 * sums)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4 * sums)


def test_group_norm_act_large_mean_is_stable():
    x = torch.randn(2, 8, 32, 32) * 0.01 + 1000.0
    y, mean, rstd = nat_gn.forward(x, 4, None, None, 1e-6, None)
    xg = x.double().view(2, 4, -1)
    true_rstd = (xg.var(-1, unbiased=False) + 1e-6).rsqrt()
    ry = ((xg - xg.mean(-1, keepdim=True)) * true_rstd[..., None]).view_as(x)
    torch.testing.assert_close(rstd.double(), true_rstd, rtol=1e-3, atol=0)
    torch.testing.assert_close(y.double(), ry, rtol=0, atol=2e-2)


def test_group_norm_act_autograd_through_op():
    g = _gen(5)
    x = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(16, generator=g).requires_grad_()
    b = torch.randn(16, generator=g).requires_grad_()
    grads = {}
    for name in ("torch", "native"):
        with vqfast.use_backend(name):
            out = vqfast.ops.group_norm_act(x, 4, w, b)
            grads[name] = torch.autograd.grad((out * out).sum(), (x, w, b))
    for got, want in zip(grads["native"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


SN_CASES = [((2, 8, 6, 6), (3, 3), 4), ((1, 64, 10, 7), (4, 3), 32), ((2, 6, 11), (5,), 3),
            ((1, 32, 8, 8), (8, 8), 8), ((2, 40, 7, 9), (3, 5), 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,small,G", SN_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_spatial_norm_act_matches_reference(dtype, shape, small, G, layout, activation):
    g = _gen(hash((shape, small)) % 1000)
    f = _strided((torch.randn(shape, generator=g) * 2 + 0.5).to(dtype), layout)
    scale = torch.randn(*shape[:2], *small, generator=g).to(dtype)
    shift = torch.randn(*shape[:2], *small, generator=g).to(dtype)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    y, mean, rstd = nat_sn.forward(f, scale, shift, G, w, b, 1e-6, activation)
    ry, rmean, rrstd = ref_sn.forward(f, scale, shift, G, w, b, 1e-6, activation)
    assert y.stride() == ry.stride()
    _close(y, ry, dtype, 2.0)
    torch.testing.assert_close(rstd, rrstd, rtol=1e-5, atol=1e-5)
    grad = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.preserve_format)
    if layout == "channels_last" and f.dim() == 4:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = nat_sn.backward(grad, f, scale, shift, w, b, rmean, rrstd, activation)
    want = ref_sn.backward(grad, f, scale, shift, w, b, rmean, rrstd, activation)
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        mag = max(1.0, e.float().abs().max().item())
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol * 4, atol=atol * 4 * mag)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reported():
    from vqfast import _C

    if not _C.has_cuda():
        assert "without CUDA" in native.supports("nearest_code", torch.device("cuda"))
