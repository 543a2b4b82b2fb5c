"""The torch backend of every op against independent PyTorch computations (and diffusers' quantizer)."""

import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast import ops
from vqfast.reference import nearest_code as nearest_code_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def torch_backend():
    with vqfast.use_backend("torch"):
        yield


def exact_distances(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows.double(), codebook.double()).square()


def assert_nearest(indices, rows, codebook, atol):
    """The chosen code's exact distance is within ``atol`` of the true minimum."""
    d = exact_distances(rows, codebook)
    chosen = d.gather(1, indices.reshape(-1, 1)).squeeze(1)
    assert (chosen - d.min(1).values).max().item() <= atol


# ---- nearest_code -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((2, 3, 5, 7), 13), ((1, 4, 1, 1), 1), ((3, 64, 3, 5), 37)])
def test_nearest_code_nchw_matches_float64(shape, k, dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g).to(dtype)
    codebook = torch.randn(k, shape[1], generator=g).to(dtype)
    idx = ops.nearest_code(z, codebook)
    assert idx.dtype == torch.long and idx.shape == (shape[0], *shape[2:])
    rows = z.movedim(1, -1).reshape(-1, shape[1])
    # float32 accumulation of exactly representable inputs: error of a few ulps of |z|^2 + |c|^2
    scale = (rows.double().square().sum(1).max() + codebook.double().square().sum(1).max()).item()
    assert_nearest(idx, rows, codebook, atol=1e-5 * scale)


def test_nearest_code_well_separated_equals_float64_argmin():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(50, 8, generator=g) * 10
    pick = torch.randint(0, 50, (400,), generator=g)
    rows = codebook[pick] + 0.01 * torch.randn(400, 8, generator=g)
    assert torch.equal(ops.nearest_code(rows, codebook, dim=-1), pick)
    assert torch.equal(ops.nearest_code(rows, codebook, dim=-1), exact_distances(rows, codebook).argmin(1))


def test_nearest_code_layouts_agree():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 6, 9, 11, generator=g)
    codebook = torch.randn(17, 6, generator=g)
    expected = ops.nearest_code(z, codebook)
    assert torch.equal(ops.nearest_code(z.to(memory_format=torch.channels_last), codebook), expected)
    assert torch.equal(ops.nearest_code(z.movedim(1, -1), codebook, dim=-1), expected)
    wide = torch.randn(2, 6, 9, 22, generator=g)
    wide[..., ::2] = z
    assert torch.equal(ops.nearest_code(wide[..., ::2], codebook), expected)  # strided view


def test_nearest_code_ties_go_to_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert ops.nearest_code(rows, codebook, dim=-1).tolist() == [0, 1, 0]


def test_nearest_code_chunked_path_equals_single_pass(monkeypatch):
    g = torch.Generator().manual_seed(3)
    rows, codebook = torch.randn(1000, 5, generator=g), torch.randn(30, 5, generator=g)
    whole = ops.nearest_code(rows, codebook, dim=-1)
    monkeypatch.setattr(nearest_code_ref, "CHUNK_ELEMENTS", 30 * 7)  # chunks of 7 rows
    assert torch.equal(ops.nearest_code(rows, codebook, dim=-1), whole)


def test_nearest_code_non_finite_follows_argmin_rule():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [float("nan"), 0.0]])
    rows = torch.tensor([[float("nan"), 0.0], [0.9, 0.9], [float("inf"), 1.0]])
    # row 0: every distance NaN -> index 0; row 1: code 2's NaN distance counts as the minimum;
    # row 2: <z, c> is NaN (inf * 0) for code 0, the first NaN
    assert ops.nearest_code(rows, codebook, dim=-1).tolist() == [0, 2, 0]
    # an infinite row against codes without zeros: -2<z, c> is -inf for code 1, +inf for code 0
    codebook = torch.tensor([[-1.0, 1.0], [1.0, 1.0]])
    assert ops.nearest_code(rows[2:], codebook, dim=-1).tolist() == [1]


def test_nearest_code_empty_batch():
    idx = ops.nearest_code(torch.empty(0, 4, 3, 3), torch.randn(5, 4))
    assert idx.shape == (0, 3, 3) and idx.dtype == torch.long


# ---- group_norm_act -----------------------------------------------------------------------


def eager_group_norm_act(x, groups, weight, bias, eps, activation):
    y = F.group_norm(x.float(), groups, None if weight is None else weight.float(), None if bias is None else bias.float(), eps)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,groups,affine,activation,channels_last",
    [
        ((2, 12, 5, 7), 3, True, "silu", False),
        ((2, 12, 5, 7), 4, True, "silu", True),
        ((1, 6, 9), 2, False, None, False),
        ((2, 10, 3, 4, 5), 5, True, None, False),
    ],
)
def test_group_norm_act_forward_backward(shape, groups, affine, activation, channels_last, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=g) if affine else None
    bias = torch.randn(shape[1], generator=g) if affine else None
    grad = torch.randn(shape, generator=g).to(dtype)

    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = ops.group_norm_act(leaves[0], groups, *(leaves[1:] or [None, None]), eps=1e-6, activation=activation)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y.backward(grad)

    ref_leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref = eager_group_norm_act(ref_leaves[0], groups, *(ref_leaves[1:] or [None, None]), 1e-6, activation)
    ref.backward(grad.float())

    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=tol, atol=tol)
    for ours, theirs in zip(leaves, ref_leaves):
        scale = theirs.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.float(), theirs.grad.to(ours.dtype).float(), rtol=tol, atol=tol * scale)


def test_group_norm_act_strided_input():
    x = torch.randn(2, 8, 6, 10)[..., ::2]  # neither contiguous nor channels_last
    expected = eager_group_norm_act(x.contiguous(), 4, None, None, 1e-6, "silu")
    torch.testing.assert_close(ops.group_norm_act(x, 4), expected)


def test_group_norm_act_keeps_half_input_under_autocast():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.group_norm_act(x, 4, torch.ones(8), torch.zeros(8))
    assert y.dtype == torch.bfloat16


def test_group_norm_act_empty_batch():
    x = torch.empty(0, 8, 3, 3, requires_grad=True)
    y = ops.group_norm_act(x, 4, torch.ones(8), torch.zeros(8))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


# ---- spatial_norm_act ---------------------------------------------------------------------


def eager_spatial_norm_act(f, scale, shift, groups, weight, bias, eps, activation):
    """Diffusers' SpatialNorm with its convolutions' outputs given: interpolate, then affine."""
    size = f.shape[2:]
    y = F.group_norm(f, groups, weight, bias, eps) * F.interpolate(scale, size=size) + F.interpolate(shift, size=size)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("size,low", [((8, 12), (2, 3)), ((7, 9), (3, 4)), ((4, 4), (4, 4))])
def test_spatial_norm_act_forward_backward(size, low, activation):
    g = torch.Generator().manual_seed(5)
    c, groups = 6, 3
    f = torch.randn(2, c, *size, generator=g)
    scale, shift = torch.randn(2, c, *low, generator=g), torch.randn(2, c, *low, generator=g)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    grad = torch.randn(2, c, *size, generator=g)

    ours = [t.clone().requires_grad_() for t in (f, scale, shift, weight, bias)]
    y = ops.spatial_norm_act(ours[0], ours[1], ours[2], groups, ours[3], ours[4], 1e-6, activation)
    y.backward(grad)
    theirs = [t.clone().requires_grad_() for t in (f, scale, shift, weight, bias)]
    ref = eager_spatial_norm_act(theirs[0], theirs[1], theirs[2], groups, theirs[3], theirs[4], 1e-6, activation)
    ref.backward(grad)

    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item())


# ---- vector_quantize and codebook_gather ---------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vector_quantize_matches_diffusers(legacy, channels_last):
    from diffusers.models.autoencoders.vae import VectorQuantizer

    torch.manual_seed(6)
    vq = VectorQuantizer(40, 5, beta=0.25, legacy=legacy)
    vq.embedding.weight.data.normal_()
    z = torch.randn(3, 5, 6, 7)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)

    z_ref = z.clone().requires_grad_()
    zq_ref, loss_ref, (_, _, idx_ref) = vq(z_ref)
    (zq_ref.square().sum() + 3 * loss_ref).backward()

    codebook = vq.embedding.weight.detach().clone().requires_grad_()
    z_ours = z.clone().requires_grad_()
    zq, loss, idx = ops.vector_quantize(z_ours, codebook, beta=0.25, legacy=legacy)
    (zq.square().sum() + 3 * loss).backward()

    assert torch.equal(idx, idx_ref.reshape(-1))
    assert torch.equal(zq, zq_ref)  # z + (q - z) in z's dtype, bit for bit
    assert zq.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(codebook.grad, vq.embedding.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_quantize_dtypes_and_rows(dtype):
    g = torch.Generator().manual_seed(7)
    z, codebook = torch.randn(20, 3, generator=g).to(dtype), torch.randn(9, 3, generator=g).to(dtype)
    zq, loss, idx = ops.vector_quantize(z, codebook, dim=-1)
    assert zq.dtype == dtype and loss.dtype == dtype and loss.shape == ()
    assert torch.equal(idx, ops.nearest_code(z, codebook, dim=-1))
    assert torch.equal(zq, z + (codebook[idx] - z))


def test_vector_quantize_deterministic_codebook_grad():
    g = torch.Generator().manual_seed(8)
    z, codebook = torch.randn(4, 3, 8, 8, generator=g), torch.randn(5, 3, generator=g).requires_grad_()
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            codebook.grad = None
            ops.vector_quantize(z, codebook)[1].backward()
            grads.append(codebook.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


def test_vector_quantize_empty_batch():
    z = torch.empty(0, 3, 4, 4, requires_grad=True)
    codebook = torch.randn(5, 3, requires_grad=True)
    zq, loss, idx = ops.vector_quantize(z, codebook)
    assert zq.shape == z.shape and idx.shape == (0,) and torch.isnan(loss)  # mean of nothing, as torch.mean
    (zq.sum() + loss).backward()
    assert torch.equal(codebook.grad, torch.zeros_like(codebook))


@pytest.mark.parametrize("dim", [1, -1])
def test_codebook_gather(dim):
    g = torch.Generator().manual_seed(9)
    codebook = torch.randn(7, 4, generator=g, requires_grad=True)
    indices = torch.randint(0, 7, (2, 3, 5), generator=g)
    out = ops.codebook_gather(indices, codebook, dim=dim)
    expected = F.embedding(indices, codebook).movedim(-1, dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.is_contiguous()
    grad = torch.randn_like(out)
    out.backward(grad)
    (ref_grad,) = torch.autograd.grad(expected, codebook, grad)
    torch.testing.assert_close(codebook.grad, ref_grad)


# ---- registration: schemas, fake tensors, autograd, compile ---------------------------------


def test_opcheck_every_custom_op():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    cb = torch.randn(6, 3, generator=g, requires_grad=True)
    x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    low = torch.randn(2, 4, 1, 1, generator=g, requires_grad=True)
    cases = [
        (torch.ops.vqfast.nearest_code.default, (z, cb, 1)),
        (torch.ops.vqfast.codebook_gather.default, (torch.randint(0, 6, (2, 4)), cb, 1)),
        (torch.ops.vqfast.group_norm_act.default, (x, 2, w, b, 1e-6, "silu")),
        (torch.ops.vqfast.spatial_norm_act.default, (x, low, low.detach().clone().requires_grad_(), 2, w, b, 1e-6, None)),
        (torch.ops.vqfast.vector_quantize.default, (z, cb, 0.25, True, 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ops_compile_fullgraph():
    def step(x, z, codebook, weight, bias, low):
        h = ops.group_norm_act(x, 2, weight, bias)
        h = ops.spatial_norm_act(h, low, low, 2, weight, bias)
        z_q, loss, idx = ops.vector_quantize(z, codebook)
        return h, z_q, loss, idx, ops.nearest_code(z, codebook), ops.codebook_gather(idx.view(2, 4, 5), codebook, dim=1)

    g = torch.Generator().manual_seed(11)
    args = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 3, 4, 5, generator=g),
        torch.randn(6, 3, generator=g),
        torch.randn(4, generator=g),
        torch.randn(4, generator=g),
        torch.randn(2, 4, 2, 2, generator=g),
    )
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(ours, ref)
