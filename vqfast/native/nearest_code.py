"""Native ``nearest_code``: ``torch.ops.vqfast_C.nearest_code`` (csrc/cpu/nearest_code.cpp)."""

import torch

from vqfast import _C  # noqa: F401  (registers torch.ops.vqfast_C)


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.ops.vqfast_C.nearest_code(z, codebook, dim)
