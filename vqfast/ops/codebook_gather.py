"""``codebook_gather``: codebook rows for given indices, laid out with the code dimension at ``dim``."""

import torch

from vqfast import backend
from vqfast.ops import _checks


@torch.library.custom_op("vqfast::codebook_gather", mutates_args=())
def _codebook_gather(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return backend.kernel("codebook_gather", "forward", codebook.device)(indices, codebook, dim)


@_codebook_gather.register_fake
def _(indices, codebook, dim):
    shape = list(indices.shape)
    shape.insert(dim, codebook.shape[1])
    return codebook.new_empty(shape)


@torch.library.custom_op("vqfast::codebook_gather_backward", mutates_args=())
def _codebook_gather_backward(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
    return backend.kernel("codebook_gather", "backward", grad.device)(grad, indices, num_codes, dim)


@_codebook_gather_backward.register_fake
def _(grad, indices, num_codes, dim):
    return grad.new_empty(num_codes, grad.shape[dim])


def _setup_context(ctx, inputs, output):
    indices, codebook, dim = inputs
    ctx.save_for_backward(indices)
    ctx.num_codes, ctx.dim = codebook.shape[0], dim


def _backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return None, _codebook_gather_backward(grad, indices, ctx.num_codes, ctx.dim), None


_codebook_gather.register_autograd(_backward, setup_context=_setup_context)


def codebook_gather(indices: torch.Tensor, codebook: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``codebook[indices]`` with the code dimension placed at ``dim`` of the (contiguous) result:
    ``dim=-1`` gives (*indices.shape, D), ``dim=1`` on (B, H, W) indices gives NCHW (B, D, H, W).
    Differentiable in ``codebook``; indices outside [0, K) raise an IndexError."""
    _checks.tensor("indices", indices, floating=False)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    _checks.tensor("codebook", codebook)
    _checks.rank("codebook", codebook, exactly=2)
    _checks.same_device("indices", indices, "codebook", codebook)
    dim = _checks.dim_index("dim", dim, indices.dim() + 1)
    if indices.numel() and not torch.compiler.is_compiling():
        low, high = indices.min().item(), indices.max().item()
        if low < 0 or high >= codebook.shape[0]:
            raise IndexError(f"indices must lie in [0, {codebook.shape[0]}), got values in [{low}, {high}]")
    return _codebook_gather(indices.long(), codebook, dim)
