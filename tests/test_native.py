"""The native backend (vqfast._C) against the torch reference: randomized shapes, strides, dtypes,
empty batches, ties and non-finite input; forward and backward. CUDA cases skip without a GPU."""

import contextlib

import pytest
import torch

import vqfast
from vqfast import backend
from vqfast.reference import codebook_gather as ref_cg
from vqfast.reference import group_norm_act as ref_gn
from vqfast.reference import nearest_code as ref_nc
from vqfast.reference import spatial_norm_act as ref_sn
from vqfast.reference import vector_quantize as ref_vq

native = pytest.importorskip("vqfast.native", reason="vqfast._C is not built")
from vqfast.native import codebook_gather as nat_cg  # noqa: E402
from vqfast.native import group_norm_act as nat_gn  # noqa: E402
from vqfast.native import nearest_code as nat_nc  # noqa: E402
from vqfast.native import spatial_norm_act as nat_sn  # noqa: E402
from vqfast.native import vector_quantize as nat_vq  # noqa: E402

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
    for op in backend.OPS:
        assert native.supports(op, CPU) == ""
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
    # Judged against the 20 distinct codes: a BLAS may round a code's copies differently.
    torch.testing.assert_close(got, ref_nc.forward(z, cb[:20], -1), rtol=0, atol=0)
    # Exactly equidistant codes: z = 0 against +-e_i: all distances 1, the first wins.
    cb2 = torch.cat([torch.eye(8), -torch.eye(8)]).to(dtype)
    assert torch.equal(nat_nc.forward(torch.zeros(3, 8, dtype=dtype), cb2, -1), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("D", [1, 3, 4, 8])
@pytest.mark.parametrize("codebook", ["gaussian", "elongated", "flat", "lattice"])
def test_nearest_code_sorted_search(D, codebook):
    """Small D searches a codebook sorted along its principal axis and skips tiles by projection:
    the answer must stay the exhaustive one, ties to the lowest index included."""
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
    got = nat_nc.forward(z, cb, -1)
    _check_by_distance(z, cb, -1, got)
    assert torch.all(got < 700)  # a duplicate never beats its first copy
    want = ref_nc.forward(z, cb[:700], -1)  # the distinct codes: a BLAS may round copies differently
    assert (got == want).float().mean() > 0.99
    # Below 1024 rows the codebook is searched exhaustively: the same distances, the same answer.
    assert torch.equal(torch.cat([nat_nc.forward(part, cb, -1) for part in z.split(500)]), got)
    # Exactly equal float32 distances go to the lowest index: z = 0 sees only the norms, which sign
    # flips leave bit for bit the same.
    signs = torch.tensor([(-1.0) ** d for d in range(D)])
    cb_eq = torch.cat([cb[:5], -cb[:5], cb[:5] * signs])
    assert torch.equal(nat_nc.forward(torch.zeros(4, D), cb_eq, -1), ref_nc.forward(torch.zeros(4, D), cb_eq, -1))


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
    # The same rows among enough others (>= 1024) for the sorted search.
    z_many = torch.cat([torch.randn(1200, 6, generator=g), z])[torch.randperm(1212, generator=g)]
    cases += [(z_many, cb), (z_many, cb_inf)]
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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_act_silu_extreme_pre_activations(layout):
    """SiLU where exp(-y) overflows float32 (y < -88.7) is -0, and of +-inf what torch gives."""
    x = _strided(torch.randn(1, 16, 5, 5, generator=_gen(6)), layout)
    w = torch.tensor([300.0] * 4 + [1e4] * 4 + [0.0] * 8)  # one group per case
    b = torch.tensor([0.0] * 8 + [float("inf")] * 4 + [-float("inf")] * 4)
    y, mean, rstd = nat_gn.forward(x, 4, w, b, 1e-6, "silu")
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, 1e-6))
    torch.testing.assert_close(y, want, rtol=2e-5, atol=1e-6, equal_nan=True)
    grad = torch.randn(x.shape, generator=_gen(7))
    gx, _, _ = nat_gn.backward(grad, x, w, b, mean, rstd, "silu")
    assert not torch.isnan(gx[:, :8]).any()  # finite pre-activations, however negative


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


# ---------------------------------------------------------------- vector_quantize / codebook_gather

VQ_CASES = [((2, 4, 5, 7), 1, 37), ((3, 9, 4, 6), 1, 100), ((100, 3), -1, 1000), ((1, 300, 2), 1, 7),
            ((0, 4, 3, 3), 1, 16), ((2, 5, 3, 3, 2), 1, 11), ((2, 3, 4, 9), 3, 129), ((33, 256), 1, 50)]


def _straight_through(z, cb, dim, indices):
    """diffusers' z + (q - z) in z's dtype for the given flat indices (the reference's value)."""
    q = ref_cg.forward(indices.view(z.movedim(dim, -1).shape[:-1]), cb, dim % z.dim())
    return z + (q - z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim,K", VQ_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantize_matches_reference(dtype, shape, dim, K, layout, legacy):
    g = _gen(hash((shape, K, layout)) % 1000)
    z = _strided(torch.randn(shape, generator=g).to(dtype), layout)
    cb = torch.randn(K, shape[dim], generator=g).to(dtype)
    z_q, loss, idx = nat_vq.forward(z, cb, 0.3, legacy, dim)
    rz_q, rloss, ridx = ref_vq.forward(z, cb, 0.3, legacy, dim)
    assert z_q.shape == rz_q.shape and z_q.dtype == dtype and z_q.stride() == rz_q.stride()
    assert loss.shape == () and loss.dtype == dtype and idx.dtype == torch.int64 and idx.shape == ridx.shape
    # The search is nearest_code's: the same indices; the value is diffusers' bit for bit.
    assert torch.equal(idx, nat_nc.forward(z, cb, dim).reshape(-1))
    assert torch.equal(z_q, _straight_through(z, cb, dim, idx))
    if idx.numel() == 0:
        assert loss.isnan()
        return
    assert (idx == ridx).float().mean() > 0.99
    q = ref_cg.forward(idx.view(z.movedim(dim, -1).shape[:-1]), cb, dim % z.dim())
    mse = (q.double() - z.double()).square().mean()
    want = (1.3 * mse).to(dtype)
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)

    grad = _strided(torch.randn(shape, generator=g).to(dtype), layout).contiguous(
        memory_format=vqfast.ops.group_norm_act.__globals__["memory_format"](z))
    grad_loss = torch.tensor(0.7, dtype=dtype)
    gz, gcb = nat_vq.backward(grad, grad_loss, z, cb, idx, 0.3, legacy, dim)
    rgz, rgcb = ref_vq.backward(grad, grad_loss, z, cb, idx, 0.3, legacy, dim)
    assert gz.dtype == dtype and gz.stride() == rgz.stride() and gcb.dtype == dtype and gcb.shape == cb.shape
    _close(gz, rgz, dtype)
    mag = max(1e-6, rgcb.float().abs().max().item())
    _close(gcb, rgcb, dtype, mag)


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantize_equals_diffusers(legacy):
    from diffusers.models.autoencoders.vae import VectorQuantizer

    g = _gen(6)
    vq = VectorQuantizer(64, 4, beta=0.25, legacy=legacy)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(64, 4, generator=g) * 3)  # well-separated codes
    truth = torch.randint(0, 64, (2, 9, 11), generator=g)
    z0 = vq.embedding.weight[truth] + 0.1 * torch.randn(2, 9, 11, 4, generator=g)
    z0 = z0.permute(0, 3, 1, 2).detach().contiguous()
    for layout in ("contiguous", "channels_last"):
        z = _strided(z0, layout).clone().requires_grad_()
        want_q, want_loss, (_, _, want_idx) = vq(z)
        (want_q.square().sum() + 3 * want_loss).backward()
        want_grads = z.grad, vq.embedding.weight.grad
        z.grad, vq.embedding.weight.grad = None, None
        cb = vq.embedding.weight.detach().clone().requires_grad_()
        with vqfast.use_backend("native"):
            got_q, got_loss, got_idx = vqfast.ops.vector_quantize(z, cb, 0.25, legacy)
            (got_q.square().sum() + 3 * got_loss).backward()
        assert torch.equal(got_q, want_q) and torch.equal(got_idx, want_idx.reshape(-1))
        assert torch.equal(got_idx.view(2, 9, 11), truth)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(z.grad, want_grads[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cb.grad, want_grads[1], rtol=1e-5, atol=1e-6)


def test_vector_quantize_codebook_grad_is_deterministic():
    g = _gen(7)
    z, cb = torch.randn(4, 8, 33, 31, generator=g), torch.randn(6, 8, generator=g)  # many rows per code
    _, _, idx = nat_vq.forward(z, cb, 0.25, True, 1)
    grad = torch.randn(z.shape, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            runs.append(nat_vq.backward(grad, torch.tensor(1.0), z, cb, idx, 0.25, True, 1)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim,K,D", [((2, 5, 7), 1, 37, 4), ((100,), -1, 1000, 3), ((3, 4), 0, 5, 9), ((0, 3, 3), 1, 16, 8),
                      ((2, 3, 4, 5), 2, 129, 6), ((1, 1), 2, 1, 1)],
)
@pytest.mark.parametrize("strided_codebook", [False, True])
def test_codebook_gather_matches_reference(dtype, shape, dim, K, D, strided_codebook):
    g = _gen(hash((shape, K, D)) % 1000)
    idx = torch.randint(0, K, shape, generator=g)
    cb = torch.randn(K, D, generator=g).to(dtype)
    if strided_codebook:
        cb = torch.randn(D, K, generator=g).to(dtype).t()
    got = nat_cg.forward(idx, cb, dim % (idx.dim() + 1))
    want = ref_cg.forward(idx, cb, dim % (idx.dim() + 1))
    assert got.is_contiguous() and got.shape == want.shape
    assert torch.equal(got, want)
    grad = _strided(torch.randn(want.shape, generator=g).to(dtype), "sliced")
    got = nat_cg.backward(grad, idx, K, dim % (idx.dim() + 1))
    want = ref_cg.backward(grad.double(), idx, K, dim % (idx.dim() + 1))
    assert got.dtype == dtype and got.shape == (K, D)
    _close(got, want.to(dtype), dtype, max(1.0, want.abs().max().item()))


def test_codebook_gather_through_op():
    g = _gen(8)
    cb = torch.randn(10, 4, generator=g, requires_grad=True)
    idx = torch.randint(0, 10, (2, 3, 5), generator=g, dtype=torch.int32)
    grads, outs = {}, {}
    for name in ("torch", "native"):
        with vqfast.use_backend(name):
            outs[name] = vqfast.ops.codebook_gather(idx, cb, dim=1)
            grads[name] = torch.autograd.grad(outs[name].square().sum(), cb)[0]
    assert torch.equal(outs["native"], outs["torch"])
    torch.testing.assert_close(grads["native"], grads["torch"])
    with pytest.raises(IndexError):
        nat_cg.forward(torch.tensor([0, 10]), cb.detach(), 1)


# ---------------------------------------------------------------- CUDA


def test_cuda_support_reported():
    from vqfast import _C

    for op in backend.OPS:
        reason = native.supports(op, torch.device("cuda"))
        assert reason == "" if _C.has_cuda() else "without CUDA" in reason


def _cuda_native():
    from vqfast import _C

    if not _C.has_cuda():
        pytest.skip("vqfast._C was built without CUDA")
    return torch.device("cuda")


@contextlib.contextmanager
def _deterministic(on: bool):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim,K", VQ_CASES + [((2, 4, 64, 64), 1, 16384), ((4096, 8), -1, 3000)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cuda_nearest_code_and_vector_quantize(dtype, shape, dim, K, layout):
    dev = _cuda_native()
    g = _gen(hash((shape, K, layout)) % 1000)
    z = _strided(torch.randn(shape, generator=g).to(dtype), layout).to(dev)
    cb = torch.randn(K, shape[dim], generator=g).to(dtype).to(dev)
    idx = nat_nc.forward(z, cb, dim)
    assert idx.device == z.device and idx.shape == ref_nc.forward(z, cb, dim).shape
    _check_by_distance(z.float().cpu(), cb.float().cpu(), dim, idx.cpu())
    # The CUDA search does the CPU kernel's float32 arithmetic.
    assert torch.equal(idx.cpu(), nat_nc.forward(z.cpu(), cb.cpu(), dim))
    for legacy in (True, False):
        z_q, loss, flat = nat_vq.forward(z, cb, 0.3, legacy, dim)
        rz_q, rloss, _ = ref_vq.forward(z, cb, 0.3, legacy, dim)
        assert torch.equal(flat, idx.reshape(-1)) and z_q.stride() == rz_q.stride()
        assert torch.equal(z_q, _straight_through(z, cb, dim, flat))
        cpu_loss = nat_vq.forward(z.cpu(), cb.cpu(), 0.3, legacy, dim)[1]
        torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0,
                                   equal_nan=True)
        if flat.numel() == 0:
            continue
        grad = torch.randn(z.shape, generator=g).to(dtype).to(dev).contiguous(
            memory_format=vqfast.ops.group_norm_act.__globals__["memory_format"](z))
        grad_loss = torch.tensor(0.7, dtype=dtype, device=dev)
        want = ref_vq.backward(grad, grad_loss, z, cb, flat, 0.3, legacy, dim)
        for deterministic in (False, True):
            with _deterministic(deterministic):
                gz, gcb = nat_vq.backward(grad, grad_loss, z, cb, flat, 0.3, legacy, dim)
            assert gz.stride() == want[0].stride() and gcb.dtype == dtype
            _close(gz, want[0], dtype)
            _close(gcb, want[1], dtype, max(1e-6, want[1].float().abs().max().item()))
        with _deterministic(True):
            again = nat_vq.backward(grad, grad_loss, z, cb, flat, 0.3, legacy, dim)[1]
        assert torch.equal(again, gcb)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim,K,D", [((2, 5, 7), 1, 37, 4), ((100,), -1, 1000, 3), ((0, 3, 3), 1, 16, 8),
                                           ((2, 3, 4, 5), 2, 129, 6), ((8, 64, 64), 1, 16384, 4)])
def test_cuda_codebook_gather(dtype, shape, dim, K, D):
    dev = _cuda_native()
    g = _gen(hash((shape, K, D)) % 1000)
    idx = torch.randint(0, K, shape, generator=g).to(dev)
    cb = torch.randn(D, K, generator=g).to(dtype).to(dev).t()  # strided codebook
    dim = dim % (idx.dim() + 1)
    got = nat_cg.forward(idx, cb, dim)
    assert got.is_contiguous() and torch.equal(got, ref_cg.forward(idx, cb, dim))
    grad = _strided(torch.randn(got.shape, generator=g).to(dtype), "sliced").to(dev)
    want = ref_cg.backward(grad.double(), idx, K, dim).to(dtype)
    for deterministic in (False, True):
        with _deterministic(deterministic):
            out = nat_cg.backward(grad, idx, K, dim)
        assert out.dtype == dtype and out.device == idx.device
        _close(out, want, dtype, max(1.0, want.float().abs().max().item()))



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", GN_CASES + [((1, 128, 256, 256), 32), ((1, 64, 3, 3), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_cuda_group_norm_act(dtype, shape, G, layout, activation):
    dev = _cuda_native()
    g = _gen(hash((shape, G, layout)) % 1000)
    x = _strided((torch.randn(shape, generator=g) * 2 + 0.5).to(dtype), layout).to(dev)
    w, b = torch.randn(shape[1], generator=g).to(dev), torch.randn(shape[1], generator=g).to(dev)
    xr = x.contiguous() if layout == "sliced" else x
    y, mean, rstd = nat_gn.forward(x, G, w, b, 1e-6, activation)
    ry, rmean, rrstd = ref_gn.forward(xr, G, w, b, 1e-6, activation)
    assert y.stride() == torch.empty_like(x).stride() and y.device == x.device
    _close(y, ry, dtype, 2.0)
    torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(rstd, rrstd, rtol=1e-4, atol=1e-5, equal_nan=True)
    if x.numel() == 0:
        return
    grad = torch.randn(shape, generator=g).to(dtype).to(dev)
    grad = grad.contiguous(memory_format=vqfast.ops.group_norm_act.__globals__["memory_format"](x))
    got = nat_gn.backward(grad, x, w, b, rmean, rrstd, activation)
    want = ref_gn.backward(grad, xr, w, b, rmean, rrstd, activation)
    _close(got[0], want[0], dtype, 4.0)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * max(1.0, e.abs().max().item()))
    again = nat_gn.backward(grad, x, w, b, rmean, rrstd, activation)
    assert all(torch.equal(p, q) for p, q in zip(got, again))  # deterministic


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,small,G", SN_CASES + [((1, 128, 128, 128), (32, 32), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_cuda_spatial_norm_act(dtype, shape, small, G, layout, activation):
    dev = _cuda_native()
    g = _gen(hash((shape, small)) % 1000)
    f = _strided((torch.randn(shape, generator=g) * 2 + 0.5).to(dtype), layout).to(dev)
    scale = torch.randn(*shape[:2], *small, generator=g).to(dtype).to(dev)
    shift = torch.randn(*shape[:2], *small, generator=g).to(dtype).to(dev)
    w, b = torch.randn(shape[1], generator=g).to(dev), torch.randn(shape[1], generator=g).to(dev)
    y, mean, rstd = nat_sn.forward(f, scale, shift, G, w, b, 1e-6, activation)
    ry, rmean, rrstd = ref_sn.forward(f, scale, shift, G, w, b, 1e-6, activation)
    assert y.stride() == ry.stride() and y.device == f.device
    _close(y, ry, dtype, 2.0)
    torch.testing.assert_close(rstd, rrstd, rtol=1e-4, atol=1e-5)
    grad = torch.randn(shape, generator=g).to(dtype).to(dev)
    if layout == "channels_last" and f.dim() == 4:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got = nat_sn.backward(grad, f, scale, shift, w, b, rmean, rrstd, activation)
    want = ref_sn.backward(grad, f, scale, shift, w, b, rmean, rrstd, activation)
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        rtol, atol = _tol(dtype)
        mag = max(1.0, e.float().abs().max().item())
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol * 4, atol=atol * 4 * mag)
    again = nat_sn.backward(grad, f, scale, shift, w, b, rmean, rrstd, activation)
    assert all(torch.equal(p, q) for p, q in zip(got, again))  # deterministic
