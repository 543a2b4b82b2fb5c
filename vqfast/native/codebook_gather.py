"""Native ``codebook_gather``: ``torch.ops.vqfast_C.codebook_gather[_backward]`` (csrc/cpu/codebook_gather.cpp)."""

import torch

from vqfast import _C  # noqa: F401  (registers torch.ops.vqfast_C)


def forward(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.ops.vqfast_C.codebook_gather(indices, codebook, dim)


def backward(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
    return torch.ops.vqfast_C.codebook_gather_backward(grad, indices, num_codes, dim)
