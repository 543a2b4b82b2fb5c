"""Reference ``codebook_gather``: ``codebook[indices]`` with the code dimension placed at ``dim``."""

import torch


def forward(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    # index_select always copies (a 0-d index into codebook[...] would give a view of the codebook) and
    # raises on indices out of range itself, on the device, without a host sync.
    rows = codebook.index_select(0, indices.reshape(-1)).view(*indices.shape, codebook.shape[1])
    return rows.movedim(-1, dim).contiguous()


def backward(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
    rows = grad.movedim(dim, -1).reshape(-1, grad.shape[dim])
    out = rows.new_zeros(num_codes, rows.shape[1])
    # index_put_ with accumulate is deterministic under torch.use_deterministic_algorithms.
    return out.index_put_((indices.reshape(-1),), rows, accumulate=True)
