"""``codebook_gather``: codebook rows for given indices, laid out with the code dimension at ``dim``."""

from typing import NamedTuple

import torch

from vqfast import backend
from vqfast.ops import _checks, _library


class Inputs(NamedTuple):
    """The lowered arguments every backend's ``codebook_gather`` receives (and its ``unsupported`` sees)."""

    indices: torch.Tensor  # int64, any shape (0-d included) and strides (expanded included)
    codebook: torch.Tensor  # (K, D)
    dim: int  # where the result holds the code dimension, in [0, indices.dim()]


def _kernel(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return backend.forward("codebook_gather", Inputs(indices, codebook, dim))


def _fake(indices, codebook, dim):
    shape = list(indices.shape)
    shape.insert(dim, codebook.shape[1])
    return codebook.new_empty(shape)


def _backward_kernel(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int, backend_name: str):
    return backend.backward("codebook_gather", backend_name, grad, indices, num_codes, dim)


def _backward_fake(grad, indices, num_codes, dim, backend_name):
    return grad.new_empty(num_codes, grad.shape[dim])


_codebook_gather = _library.define(
    "codebook_gather(Tensor indices, Tensor codebook, int dim) -> Tensor", _kernel, _fake
)
_codebook_gather_backward = _library.define(
    "codebook_gather_backward(Tensor grad, Tensor indices, SymInt num_codes, int dim, str backend_name) -> Tensor",
    _backward_kernel,
    _backward_fake,
)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.num_codes, ctx.dim = inputs[1].shape[0], inputs[2]
    ctx.backend = backend.choose("codebook_gather", Inputs(*inputs), inputs[1].device)


def _backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    grad_codebook = _codebook_gather_backward(grad, indices, ctx.num_codes, ctx.dim, ctx.backend)
    return None, grad_codebook, None


_library.differentiable(_codebook_gather, _backward, _setup_context)


def codebook_gather(indices: torch.Tensor, codebook: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``codebook[indices]`` with the code dimension placed at ``dim`` of the (contiguous) result:
    ``dim=-1`` gives (*indices.shape, D), ``dim=1`` on (B, H, W) indices gives NCHW (B, D, H, W).
    Differentiable in ``codebook``. Indices outside [0, K) raise an error from the kernel (an
    IndexError on the CPU, a device-side assertion on CUDA): the host never waits to check them."""
    _checks.tensor("indices", indices, floating=False)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    _checks.tensor("codebook", codebook)
    _checks.rank("codebook", codebook, exactly=2)
    _checks.same_device("indices", indices, "codebook", codebook)
    dim = _checks.dim_index("dim", dim, indices.dim() + 1)
    return _codebook_gather(indices.long(), codebook, dim)
