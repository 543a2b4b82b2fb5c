"""``nearest_code``: index of the nearest codebook row for every vector, without the N x K matrix."""

import torch

from vqfast import backend
from vqfast.ops import _checks


@torch.library.custom_op("vqfast::nearest_code", mutates_args=())
def _nearest_code(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return backend.kernel("nearest_code", "forward", z.device)(z, codebook, dim)


@_nearest_code.register_fake
def _(z, codebook, dim):
    return z.new_empty(z.movedim(dim, -1).shape[:-1], dtype=torch.long)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index (int64) of the nearest row of ``codebook`` (K, D) in squared L2 for every vector of ``z``
    along ``dim`` (1 for NCHW latents, -1 for (N, D) rows). The result has z's shape without ``dim``.

    Distances accumulate in float32 whatever the input dtype; ties go to the lowest index; a vector
    whose distances are NaN gets the first NaN's index, as ``torch.argmin``. Memory is O(N + K).
    """
    _checks.tensor("z", z)
    _checks.rank("z", z, at_least=1)
    dim = _checks.dim_index("dim", dim, z.dim())
    _checks.codebook(codebook, z, "z", dim)
    return _nearest_code(z, codebook, dim)
