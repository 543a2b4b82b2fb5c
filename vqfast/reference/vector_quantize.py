"""Reference straight-through vector quantization, diffusers' ``VectorQuantizer.forward`` in one op."""

import torch

from vqfast.reference import codebook_gather, nearest_code


def _loss_weights(beta: float, legacy: bool) -> tuple[float, float]:
    """Weights of the (z-term, codebook-term) of the loss: legacy puts beta on the codebook term."""
    return (1.0, beta) if legacy else (beta, 1.0)


def forward(z, codebook, beta, legacy, dim):
    indices = nearest_code.forward(z, codebook, dim)
    q = codebook_gather.forward(indices, codebook, dim % z.dim())
    # Diffusers' value bit for bit: z + (q - z) in z's dtype, not q itself.
    z_q = torch.empty_like(z).copy_(z + (q - z))
    mse = (q.float() - z.float()).square().mean()  # NaN for an empty batch, as diffusers' torch.mean
    w_z, w_q = _loss_weights(beta, legacy)
    loss = (w_z * mse + w_q * mse).to(z.dtype)
    return z_q, loss, indices.reshape(-1)


def backward(grad_z_q, grad_loss, z, codebook, indices, beta, legacy, dim):
    dim = dim % z.dim()
    q = codebook_gather.forward(indices.view(z.movedim(dim, -1).shape[:-1]), codebook, dim)
    w_z, w_q = _loss_weights(beta, legacy)
    # d mean((q - z)^2) / dz = 2 (z - q) / numel
    diff = (z.float() - q.float()) * (2 * grad_loss.float() / z.numel())
    grad_z = torch.empty_like(z).copy_(grad_z_q.float() + w_z * diff)
    grad_codebook = codebook_gather.backward(-w_q * diff, indices, codebook.shape[0], dim).to(codebook.dtype)
    return grad_z, grad_codebook
