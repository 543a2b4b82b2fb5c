"""``vector_quantize``: diffusers' straight-through VectorQuantizer (search, gather, loss) as one op."""

from typing import NamedTuple

import torch

from vqfast import backend, layout
from vqfast.ops import _checks, _library


class Inputs(NamedTuple):
    """The lowered arguments every backend's ``vector_quantize`` receives (and its ``unsupported`` sees)."""

    z: torch.Tensor  # any strides
    codebook: torch.Tensor  # (K, D), z's dtype and device
    w_z: float  # weight of the loss term whose gradient goes to z
    w_q: float  # weight of the loss term whose gradient goes to the codebook
    dim: int  # in [0, z.dim())


def loss_weights(beta: float, legacy: bool) -> tuple[float, float]:
    """``(w_z, w_q)``: diffusers' legacy loss puts beta on the codebook term, the other form on z's."""
    return (1.0, beta) if legacy else (beta, 1.0)


def _kernel(z: torch.Tensor, codebook: torch.Tensor, w_z: float, w_q: float, dim: int):
    return backend.forward("vector_quantize", Inputs(z, codebook, w_z, w_q, dim))


def _fake(z, codebook, w_z, w_q, dim):
    n = z.numel() // z.shape[dim]
    return torch.empty_like(z), z.new_empty(()), z.new_empty((n,), dtype=torch.long)


def _backward_kernel(grad_z_q, grad_loss, z, codebook, indices, w_z: float, w_q: float, dim: int, backend_name: str):
    args = (grad_z_q, grad_loss, z, codebook, indices, w_z, w_q, dim)
    return backend.backward("vector_quantize", backend_name, *args)


def _backward_fake(grad_z_q, grad_loss, z, codebook, indices, w_z, w_q, dim, backend_name):
    return torch.empty_like(z), torch.empty_like(codebook)


_vector_quantize = _library.define(
    "vector_quantize(Tensor z, Tensor codebook, float w_z, float w_q, int dim) -> (Tensor, Tensor, Tensor)",
    _kernel,
    _fake,
)
_vector_quantize_backward = _library.define(
    "vector_quantize_backward(Tensor grad_z_q, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices,"
    " float w_z, float w_q, int dim, str backend_name) -> (Tensor, Tensor)",
    _backward_kernel,
    _backward_fake,
)


def _setup_context(ctx, inputs, output):
    lowered = Inputs(*inputs)
    ctx.save_for_backward(lowered.z, lowered.codebook, output[2])
    ctx.w_z, ctx.w_q, ctx.dim = lowered.w_z, lowered.w_q, lowered.dim
    ctx.backend = backend.choose("vector_quantize", lowered, lowered.z.device)


def _backward(ctx, grad_z_q, grad_loss, _grad_indices):
    z, codebook, indices = ctx.saved_tensors
    grad_z_q = grad_z_q.contiguous(memory_format=layout.memory_format(z))
    grad_z, grad_codebook = _vector_quantize_backward(
        grad_z_q, grad_loss, z, codebook, indices, ctx.w_z, ctx.w_q, ctx.dim, ctx.backend
    )
    return grad_z, grad_codebook, None, None, None


_library.differentiable(_vector_quantize, _backward, _setup_context)


def vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, legacy: bool = True, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize every vector of ``z`` along ``dim`` to its nearest ``codebook`` row
    (:func:`~vqfast.ops.nearest_code`), as diffusers' ``VectorQuantizer.forward``: returns
    ``(z_q, loss, indices)``.

    ``z_q = z + (q - z)`` computed in z's dtype and layout (the straight-through value, bit for bit
    diffusers'); ``loss = w_z * mse(q, z) + w_q * mse(q, z)`` with mse in float32 (float64 for float64
    z), the first term's gradient going to z and the second's to the codebook, and
    ``(w_z, w_q) = loss_weights(beta, legacy)``; ``indices`` are flat int64 in z's order with ``dim``
    removed. The backward scatters into the codebook gradient, deterministically when
    ``torch.are_deterministic_algorithms_enabled()``.
    """
    _checks.tensor("z", z)
    _checks.rank("z", z, at_least=2)
    dim = _checks.dim_index("dim", dim, z.dim())
    _checks.codebook(codebook, z, "z", dim)
    w_z, w_q = loss_weights(_checks.real("beta", beta), bool(legacy))
    return _vector_quantize(z, codebook, w_z, w_q, dim)
