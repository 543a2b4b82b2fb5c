"""Bad input gets a clear error naming the argument, before any kernel runs."""

import pytest
import torch

from vqfast import ops

z = torch.randn(2, 4, 3, 3)
cb = torch.randn(8, 4)
x = torch.randn(2, 6, 4, 4)
w = torch.ones(6)

CASES = [
    # (call, exception, words the message must contain)
    (lambda: ops.nearest_code(z.numpy(), cb), TypeError, "z must be a torch.Tensor"),
    (lambda: ops.nearest_code(z.long(), cb), TypeError, "z must be float32"),
    # Issue 11: a float dim gave "tuple indices must be integers or slices".
    (lambda: ops.nearest_code(z, cb, dim=1.0), TypeError, "dim must be an int"),
    (lambda: ops.vector_quantize(z, cb, dim=1.0), TypeError, "dim must be an int"),
    (lambda: ops.codebook_gather(torch.tensor([0, 1]), cb, dim=0.0), TypeError, "dim must be an int"),
    (lambda: ops.nearest_code(z, cb.double()), TypeError, "codebook has dtype torch.float64"),
    (lambda: ops.nearest_code(z, cb[0]), ValueError, "codebook must have 2 dimensions"),
    (lambda: ops.nearest_code(z, torch.randn(8, 5)), ValueError, "codebook has vectors of size 5"),
    (lambda: ops.nearest_code(z, cb, dim=4), ValueError, "dim=4 is out of range"),
    (lambda: ops.nearest_code(z, cb.half()), TypeError, "codebook has dtype torch.float16"),
    (lambda: ops.nearest_code(z, cb.to("meta")), ValueError, "codebook is on meta"),
    (lambda: ops.nearest_code(z, cb[:0]), ValueError, "codebook must have at least one code"),
    (lambda: ops.vector_quantize(z[:, :0], cb[:, :0]), ValueError, "codebook must have at least one code"),
    (lambda: ops.vector_quantize(z[0, 0, 0], cb), ValueError, "z must have at least 2 dimensions"),
    (lambda: ops.vector_quantize(z, torch.randn(8, 3)), ValueError, "codebook has vectors of size 3"),
    (lambda: ops.group_norm_act(x[0, 0, 0], 2), ValueError, "x must have at least 2 dimensions"),
    (lambda: ops.group_norm_act(x, 4), ValueError, "num_groups=4 does not divide the 6 channels"),
    (lambda: ops.group_norm_act(x, 0), ValueError, "num_groups must be a positive int"),
    (lambda: ops.group_norm_act(x, 3.0), TypeError, "num_groups must be an int"),
    (lambda: ops.group_norm_act(x, 3, torch.ones(5)), ValueError, "weight must have shape (6,)"),
    (lambda: ops.group_norm_act(x, 3, w, torch.zeros(6, 1)), ValueError, "bias must have shape (6,)"),
    (lambda: ops.group_norm_act(x, 3, w.to("meta")), ValueError, "weight is on meta"),
    (lambda: ops.group_norm_act(x, 3, activation="gelu"), ValueError, "activation must be one of"),
    (lambda: ops.group_norm_act(x, 3, eps=0.0), ValueError, "eps must be positive"),
    (lambda: ops.spatial_norm_act(x, x[:, :, :1, :1], x[:, :3], 3), ValueError, "shift must have f's batch and channels"),
    (lambda: ops.spatial_norm_act(x, x[0], x, 3), ValueError, "scale must have 4 dimensions"),
    (lambda: ops.spatial_norm_act(x, x[:, :, :1, :1], x[:, :, :2, :2], 3), ValueError, "scale and shift must have the same shape"),
    (lambda: ops.spatial_norm_act(x, x[:, :, :0], x[:, :, :0], 3), ValueError, "scale is empty but f is not"),
    (lambda: ops.codebook_gather(torch.tensor([0.0]), cb), TypeError, "indices must be int64 or int32"),
    (lambda: ops.vector_quantize(z, cb, beta="0.25"), TypeError, "beta must be a float"),
]


@pytest.mark.parametrize("call,error,words", CASES, ids=[c[2] for c in CASES])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error, match=__import__("re").escape(words)):
        call()


# Out-of-range codebook_gather indices raise from the kernels, without a host sync in the op:
# tests/test_conformance.py (test_codebook_gather_out_of_range_raises) checks every backend.


def test_non_finite_input_is_not_an_error():
    # DESIGN 2: non-finite input gets the reference's defined answer, not an exception.
    y = ops.group_norm_act(torch.full((1, 2, 2, 2), float("nan")), 1)
    assert torch.isnan(y).all()
    assert ops.nearest_code(torch.full((1, 4), float("inf")), cb, dim=-1).shape == (1,)
