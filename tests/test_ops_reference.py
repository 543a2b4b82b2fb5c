"""The torch backend (the reference the conformance suite trusts) against independent computations:
F.group_norm, F.interpolate, F.embedding and diffusers' VectorQuantizer, the tie and non-finite rules
spelled out; plus torch.compile of the public ops. Layouts, dtypes, edge cases and the other backends:
tests/test_conformance.py."""

import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast import ops
from vqfast.reference import nearest_code as nearest_code_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def torch_backend():
    with vqfast.use_backend("torch"):
        yield


# ---- nearest_code -------------------------------------------------------------------------


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


# ---- group_norm_act -----------------------------------------------------------------------


def eager_group_norm_act(x, groups, weight, bias, eps, activation):
    """F.group_norm in the statistics dtype (float32, float64 for float64 x)."""
    stats = torch.promote_types(x.dtype, torch.float32)
    weight, bias = (None if t is None else t.to(stats) for t in (weight, bias))
    y = F.group_norm(x.to(stats), groups, weight, bias, eps)
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

    stats = torch.promote_types(dtype, torch.float32)
    ref_leaves = [t.detach().to(stats).requires_grad_() for t in (x, weight, bias) if t is not None]
    ref = eager_group_norm_act(ref_leaves[0], groups, *(ref_leaves[1:] or [None, None]), 1e-6, activation)
    ref.backward(grad.to(stats))

    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(y.to(stats), ref.to(dtype).to(stats), rtol=tol, atol=tol)
    for ours, theirs in zip(leaves, ref_leaves):
        scale = theirs.grad.abs().max().item()
        expected = theirs.grad.to(ours.dtype).to(stats)
        torch.testing.assert_close(ours.grad.to(stats), expected, rtol=tol, atol=tol * scale)


def test_group_norm_act_keeps_half_input_under_autocast():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.group_norm_act(x, 4, torch.ones(8), torch.zeros(8))
    assert y.dtype == torch.bfloat16


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


# ---- compile (the registrations themselves: tests/test_ops_library.py) -------------------------


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
