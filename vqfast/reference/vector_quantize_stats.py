"""Reference ``vector_quantize_stats``: ``vector_quantize`` plus, per code, how many rows chose it and
their sum."""

import torch

from vqfast.reference import vector_quantize

backward = vector_quantize.backward  # the statistics have no gradient: vector_quantize's formula


def forward(z, codebook, w_z, w_q, dim):
    z_q, loss, indices = vector_quantize.forward(z, codebook, w_z, w_q, dim)
    counts, sums = code_stats(z, indices, codebook.shape[0], dim)
    return z_q, loss, indices, counts, sums


def code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 counts (K,) of the flat ``indices``, and the (K, D) sums of z's rows along ``dim`` that
    chose each code, in float32 (float64 for float64 z)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    rows = z.movedim(dim, -1).reshape(-1, z.shape[dim]).to(acc)
    counts = torch.bincount(indices, minlength=num_codes).to(torch.float32)
    # index_put_ with accumulate is deterministic under torch.use_deterministic_algorithms.
    sums = rows.new_zeros(num_codes, rows.shape[1]).index_put_((indices,), rows, accumulate=True)
    return counts, sums
