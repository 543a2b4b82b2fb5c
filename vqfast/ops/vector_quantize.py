"""``vector_quantize``: diffusers' straight-through VectorQuantizer (search, gather, loss) as one op."""

import torch

from vqfast import backend
from vqfast.ops import _checks
from vqfast.ops.group_norm_act import memory_format


@torch.library.custom_op("vqfast::vector_quantize", mutates_args=())
def _vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float, legacy: bool, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend.kernel("vector_quantize", "forward", z.device)(z, codebook, beta, legacy, dim)


@_vector_quantize.register_fake
def _(z, codebook, beta, legacy, dim):
    n = z.numel() // z.shape[dim]
    return torch.empty_like(z), z.new_empty(()), z.new_empty((n,), dtype=torch.long)


@torch.library.custom_op("vqfast::vector_quantize_backward", mutates_args=())
def _vector_quantize_backward(
    grad_z_q: torch.Tensor,
    grad_loss: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    beta: float,
    legacy: bool,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = backend.kernel("vector_quantize", "backward", z.device)
    return fn(grad_z_q, grad_loss, z, codebook, indices, beta, legacy, dim)


@_vector_quantize_backward.register_fake
def _(grad_z_q, grad_loss, z, codebook, indices, beta, legacy, dim):
    return torch.empty_like(z), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output):
    z, codebook, beta, legacy, dim = inputs
    ctx.save_for_backward(z, codebook, output[2])
    ctx.beta, ctx.legacy, ctx.dim = beta, legacy, dim


def _backward(ctx, grad_z_q, grad_loss, _grad_indices):
    z, codebook, indices = ctx.saved_tensors
    grad_z, grad_codebook = _vector_quantize_backward(
        grad_z_q.contiguous(memory_format=memory_format(z)), grad_loss, z, codebook, indices, ctx.beta, ctx.legacy, ctx.dim
    )
    return grad_z, grad_codebook, None, None, None


_vector_quantize.register_autograd(_backward, setup_context=_setup_context)


def vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, legacy: bool = True, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize every vector of ``z`` along ``dim`` to its nearest ``codebook`` row, as diffusers'
    ``VectorQuantizer.forward``: returns ``(z_q, loss, indices)``.

    ``z_q = z + (q - z)`` in z's dtype and layout (the straight-through value: its gradient flows to
    z unchanged); ``loss = mse(q, z) + beta * mse(q, z)`` with the gradient of the first term going to
    z and of the second to the codebook (``legacy=False`` swaps where beta stands); ``indices`` are
    flat int64 in z's order with ``dim`` removed. The backward scatters into the codebook gradient,
    deterministically when ``torch.are_deterministic_algorithms_enabled()``.
    """
    _checks.tensor("z", z)
    _checks.rank("z", z, at_least=2)
    dim = _checks.dim_index("dim", dim, z.dim())
    _checks.codebook(codebook, z, "z", dim)
    return _vector_quantize(z, codebook, float(beta), bool(legacy), dim)
