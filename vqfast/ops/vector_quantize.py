"""``vector_quantize``: diffusers' straight-through VectorQuantizer (search, gather, loss) as one op.

Two custom ops share its lowering, backward and kernels: ``vqfast::vector_quantize`` and
``vqfast::vector_quantize_stats``, which also returns per-code counts and sums (for EMA codebook
updates), computed by each backend in the same pass as the quantization.
"""

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


def _stats_kernel(z: torch.Tensor, codebook: torch.Tensor, w_z: float, w_q: float, dim: int):
    return backend.forward("vector_quantize_stats", Inputs(z, codebook, w_z, w_q, dim))


def _stats_fake(z, codebook, w_z, w_q, dim):
    k, d = codebook.shape
    counts = z.new_empty((k,), dtype=torch.float32)
    return *_fake(z, codebook, w_z, w_q, dim), counts, z.new_empty((k, d), dtype=_checks.statistics_dtype(z))


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
# (z_q, loss, indices, counts, sums): vector_quantize's, then float32 (K,) counts and (K, D) sums of the
# rows that chose each code, in the statistics dtype.
_vector_quantize_stats = _library.define(
    "vector_quantize_stats(Tensor z, Tensor codebook, float w_z, float w_q, int dim)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _stats_kernel,
    _stats_fake,
)
_vector_quantize_backward = _library.define(
    "vector_quantize_backward(Tensor grad_z_q, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices,"
    " float w_z, float w_q, int dim, str backend_name) -> (Tensor, Tensor)",
    _backward_kernel,
    _backward_fake,
)


def _setup_context(ctx, inputs, output, op: str = "vector_quantize"):
    lowered = Inputs(*inputs)
    ctx.save_for_backward(lowered.z, lowered.codebook, output[2])
    ctx.w_z, ctx.w_q, ctx.dim = lowered.w_z, lowered.w_q, lowered.dim
    ctx.backend = backend.choose(op, lowered, lowered.z.device)


def _stats_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[3:])  # counts and sums are statistics, not functions to train
    _setup_context(ctx, inputs, output, "vector_quantize_stats")


def _backward(ctx, grad_z_q, grad_loss, *_grad_rest):
    z, codebook, indices = ctx.saved_tensors
    grad_z_q = grad_z_q.contiguous(memory_format=layout.memory_format(z))
    grad_z, grad_codebook = _vector_quantize_backward(
        grad_z_q, grad_loss, z, codebook, indices, ctx.w_z, ctx.w_q, ctx.dim, ctx.backend
    )
    return grad_z, grad_codebook, None, None, None


_library.differentiable(_vector_quantize, _backward, _setup_context)
_library.differentiable(_vector_quantize_stats, _backward, _stats_setup_context)


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    legacy: bool = True,
    dim: int = 1,
    *,
    return_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Quantize every vector of ``z`` along ``dim`` to its nearest ``codebook`` row
    (:func:`~vqfast.ops.nearest_code`), as diffusers' ``VectorQuantizer.forward``: returns
    ``(z_q, loss, indices)``.

    ``z_q = z + (q - z)`` computed in z's dtype and layout (the straight-through value, bit for bit
    diffusers'); ``loss = w_z * mse(q, z) + w_q * mse(q, z)`` with mse in float32 (float64 for float64
    z), the first term's gradient going to z and the second's to the codebook, and
    ``(w_z, w_q) = loss_weights(beta, legacy)``; ``indices`` are flat int64 in z's order with ``dim``
    removed. The backward scatters into the codebook gradient, deterministically when
    ``torch.are_deterministic_algorithms_enabled()``.

    ``return_stats=True`` returns ``(z_q, loss, indices, counts, sums)``: float32 ``counts`` (K,), how
    many vectors chose each code, and ``sums`` (K, D), their sum accumulated in float32 (float64 for
    float64 z), both without gradient, computed in the quantization's own pass; deterministic when
    ``torch.are_deterministic_algorithms_enabled()`` (the CPU kernels always are). z_q, loss, indices
    and the gradients are those of ``return_stats=False``.
    """
    _checks.tensor("z", z)
    _checks.rank("z", z, at_least=2)
    dim = _checks.dim_index("dim", dim, z.dim())
    _checks.codebook(codebook, z, "z", dim)
    w_z, w_q = loss_weights(_checks.real("beta", beta), bool(legacy))
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__} {return_stats!r}")
    if return_stats:
        return _vector_quantize_stats(z, codebook, w_z, w_q, dim)
    return _vector_quantize(z, codebook, w_z, w_q, dim)
