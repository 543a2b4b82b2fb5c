"""Reference ``group_norm_act``, the plain group norm and MoVQ's spatial variant: statistics in the
statistics dtype (float32, float64 for float64 x), output in x's dtype and layout."""

import math

import torch
import torch.nn.functional as F


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *spatial) -> (N, groups, C // groups * prod(spatial)); explicit sizes so N = 0 works."""
    return t.reshape(t.shape[0], groups, t.shape[1] // groups * math.prod(t.shape[2:]))


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *[1] * (like.dim() - 2))


def _affine(x_hat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        x_hat = x_hat * _per_channel(weight, x_hat)
    if bias is not None:
        x_hat = x_hat + _per_channel(bias, x_hat)
    return x_hat


def _up(t: torch.Tensor, source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling of (N, C, *small) ``t`` to like's spatial size by the ``source`` table."""
    return t.flatten(2)[:, :, source].view(*t.shape[:2], *like.shape[2:])


def _down_sum(t: torch.Tensor, source: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``_up``: each position of ``small`` gets the sum of the positions copied from it."""
    flat = t.new_zeros(small.shape).flatten(2)
    return flat.index_add_(2, source, t.flatten(2)).view(small.shape)


def _pre_activation(x_hat, weight, bias, scale, shift, source):
    norm = _affine(x_hat, weight, bias)
    if scale is None:
        return norm, norm
    return norm, norm * _up(scale, source, x_hat) + _up(shift, source, x_hat)


def _silu_grad(grad: torch.Tensor, y: torch.Tensor, silu: bool) -> torch.Tensor:
    """``grad * silu'(y)``: the activation recomputed from its input rather than saved."""
    if not silu:
        return grad
    s = torch.sigmoid(y)
    return grad * s * (1 + y * (1 - s))


def _sum_but_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def forward(x, num_groups, weight, bias, scale, shift, source, eps, silu):
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if not (xf.is_contiguous() or xf.is_contiguous(memory_format=torch.channels_last)):
        xf = xf.contiguous()  # native_group_norm takes NCHW or channels_last: the reference may copy
    y, mean, rstd = torch.native_group_norm(xf, None, None, n, c, math.prod(x.shape[2:]), num_groups, eps)
    # In place on the fresh normalized tensor, so the reference holds no more activations than diffusers.
    if weight is not None:
        y.mul_(_per_channel(weight, y))
    if bias is not None:
        y.add_(_per_channel(bias, y))
    if scale is not None:
        y.mul_(_up(scale, source, y)).add_(_up(shift, source, y))
    if silu:
        F.silu(y, inplace=True)
    if y.dtype == x.dtype and y.stride() == x.stride():
        return y, mean, rstd
    return torch.empty_like(x).copy_(y), mean, rstd


def backward(grad, x, weight, bias, scale, shift, source, mean, rstd, silu):
    groups = mean.shape[1]
    x_hat = ((_grouped(x.to(mean.dtype), groups) - mean[..., None]) * rstd[..., None]).view(x.shape)
    norm, y = _pre_activation(x_hat, weight, bias, scale, shift, source)
    g_pre = _silu_grad(grad.to(mean.dtype), y, silu)
    if scale is None:
        grad_scale, grad_shift = mean.new_empty(0), mean.new_empty(0)
        g_norm = g_pre
    else:
        grad_scale, grad_shift = _down_sum(g_pre * norm, source, scale), _down_sum(g_pre, source, shift)
        g_norm = g_pre * _up(scale, source, x_hat)
    grad_weight, grad_bias = _sum_but_channels(g_norm * x_hat), _sum_but_channels(g_norm)
    g_hat = g_norm if weight is None else g_norm * _per_channel(weight, g_norm)
    # d loss / d x = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per group
    g, xh = _grouped(g_hat, groups), _grouped(x_hat, groups)
    dx = (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True)) * rstd[..., None]
    grad_x = torch.empty_like(x).copy_(dx.view(x.shape))
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift
