"""Reference ``nearest_code`` (the rule is :func:`vqfast.ops.nearest_code`'s), chunked over rows."""

import torch

# Rows per chunk are chosen so that one chunk's distance block holds at most this many elements
# (64 MiB of float32), which keeps memory O(N + K) whatever N is.
CHUNK_ELEMENTS = 1 << 24


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``|c_k|^2 - 2 <z_n, c_k>`` for rows ``z`` (n, D), in float32 (float64 for float64 input)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    codebook = codebook.to(acc)
    return torch.addmm(codebook.square().sum(1), z.to(acc), codebook.t(), alpha=-2)


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    rows = z.movedim(dim, -1).reshape(-1, codebook.shape[1])
    out = torch.empty(rows.shape[0], dtype=torch.long, device=z.device)
    step = max(1, CHUNK_ELEMENTS // codebook.shape[0])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = squared_distances(rows[start : start + step], codebook).argmin(1)
    return out.view(z.movedim(dim, -1).shape[:-1])
