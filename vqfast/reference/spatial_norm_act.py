"""Reference MoVQ SpatialNorm: ``act((group_norm(f) * weight + bias) * up(scale) + up(shift))``.

``scale`` and ``shift`` are the SpatialNorm's 1x1 convolutions of the quantized latent, taken at
the latent's resolution; ``up`` is nearest upsampling to f's size, exactly diffusers' ``F.interpolate``.
"""

import torch
import torch.nn.functional as F

from vqfast.reference._norm import (
    activate,
    activation_grad,
    affine,
    affine_grads,
    group_norm_input_grad,
    normalize,
    x_hat_from_stats,
)


def _up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(t.float(), size=like.shape[2:], mode="nearest")


def _down_sum(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``_up``: each element of ``like`` gets the sum of the block it was copied to."""
    for axis, (small, big) in enumerate(zip(like.shape[2:], t.shape[2:]), start=2):
        # Where each of the `big` positions was copied from, exactly as F.interpolate picks it.
        source = F.interpolate(torch.arange(small, dtype=torch.float32, device=t.device)[None, None], size=big)
        shape = list(t.shape)
        shape[axis] = small
        t = t.new_zeros(shape).index_add_(axis, source.long().view(-1), t)
    return t


def forward(f, scale, shift, num_groups, weight, bias, eps, activation):
    x_hat, mean, rstd = normalize(f, num_groups, eps)
    y = activate(affine(x_hat, weight, bias) * _up(scale, f) + _up(shift, f), activation)
    return torch.empty_like(f).copy_(y), mean, rstd


def backward(grad, f, scale, shift, weight, bias, mean, rstd, activation):
    x_hat = x_hat_from_stats(f, mean, rstd)
    norm = affine(x_hat, weight, bias)
    g_pre = activation_grad(grad.float(), norm * _up(scale, f) + _up(shift, f), activation)
    grad_scale = torch.empty_like(scale).copy_(_down_sum(g_pre * norm, scale))
    grad_shift = torch.empty_like(shift).copy_(_down_sum(g_pre, shift))
    g_hat, grad_weight, grad_bias = affine_grads(g_pre * _up(scale, f), x_hat, weight)
    grad_f = torch.empty_like(f).copy_(group_norm_input_grad(g_hat, x_hat, rstd))
    return grad_f, grad_scale, grad_shift, grad_weight, grad_bias
