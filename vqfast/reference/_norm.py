"""Pieces the group-norm references share: float32 statistics, activations and their derivatives."""

import math

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_hat, mean, rstd)`` in float32; mean and rstd have shape (N, num_groups)."""
    n, c = x.shape[:2]
    x = x.float()
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # native_group_norm takes NCHW or channels_last, not other strides
    return torch.native_group_norm(x, None, None, n, c, math.prod(x.shape[2:]), num_groups, eps)


def grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *spatial) -> (N, groups, C // groups * prod(spatial)); explicit sizes so N = 0 works."""
    return t.reshape(t.shape[0], groups, t.shape[1] // groups * math.prod(t.shape[2:]))


def x_hat_from_stats(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return ((grouped(x.float(), mean.shape[1]) - mean[..., None]) * rstd[..., None]).view(x.shape)


def per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.float().view(-1, *[1] * (ndim - 2))


def affine(x_hat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        x_hat = x_hat * per_channel(weight, x_hat.dim())
    if bias is not None:
        x_hat = x_hat + per_channel(bias, x_hat.dim())
    return x_hat


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def activation_grad(grad: torch.Tensor, y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``grad * act'(y)``: the activation recomputed from its input rather than saved."""
    if activation != "silu":
        return grad
    s = torch.sigmoid(y)
    return grad * s * (1 + y * (1 - s))


def group_norm_input_grad(g_hat: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d loss / d x from d loss / d x_hat: ``rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` per group."""
    g, xh = grouped(g_hat, rstd.shape[1]), grouped(x_hat, rstd.shape[1])
    dx = (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True)) * rstd[..., None]
    return dx.view(g_hat.shape)


def sum_but_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def affine_grads(g_pre, x_hat, weight):
    """``(grad_x_hat, grad_weight, grad_bias)`` of ``affine`` given the gradient at its output; the
    per-channel sums come in float32 whether or not the op had a weight and bias."""
    g_hat = g_pre if weight is None else g_pre * per_channel(weight, g_pre.dim())
    return g_hat, sum_but_channels(g_pre * x_hat), sum_but_channels(g_pre)
