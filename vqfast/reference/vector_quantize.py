"""Reference ``vector_quantize``: diffusers' ``VectorQuantizer.forward`` in one op."""

import torch

from vqfast.reference import codebook_gather, nearest_code


def forward(z, codebook, w_z, w_q, dim):
    indices = nearest_code.forward(z, codebook, dim)
    q = codebook_gather.forward(indices, codebook, dim)
    # Diffusers' value bit for bit: z + (q - z) in z's dtype, not q itself.
    z_q = torch.empty_like(z).copy_(z + (q - z))
    acc = torch.promote_types(z.dtype, torch.float32)
    mse = (q.to(acc) - z.to(acc)).square().mean()  # NaN for an empty batch, as diffusers' torch.mean
    return z_q, (w_z * mse + w_q * mse).to(z.dtype), indices.reshape(-1)


def backward(grad_z_q, grad_loss, z, codebook, indices, w_z, w_q, dim):
    q = codebook_gather.forward(indices.view(z.movedim(dim, -1).shape[:-1]), codebook, dim)
    acc = torch.promote_types(z.dtype, torch.float32)
    # d mean((q - z)^2) / dz = 2 (z - q) / numel
    diff = (z.to(acc) - q.to(acc)) * (2 * grad_loss.to(acc) / z.numel())
    grad_z = torch.empty_like(z).copy_(grad_z_q.to(acc) + w_z * diff)
    grad_codebook = codebook_gather.backward(-w_q * diff, indices, codebook.shape[0], dim).to(codebook.dtype)
    return grad_z, grad_codebook
