"""Native ``vector_quantize``: ``torch.ops.vqfast_C.vector_quantize[_backward]`` (csrc/cpu/vector_quantize.cpp)."""

import torch

from vqfast import _C  # noqa: F401  (registers torch.ops.vqfast_C)


def forward(z, codebook, beta, legacy, dim):
    return torch.ops.vqfast_C.vector_quantize(z, codebook, beta, legacy, dim)


def backward(grad_z_q, grad_loss, z, codebook, indices, beta, legacy, dim):
    return torch.ops.vqfast_C.vector_quantize_backward(grad_z_q, grad_loss, z, codebook, indices, beta, legacy, dim)
