"""``spatial_norm_act``: MoVQ's SpatialNorm (plus activation) with the latent upsampling fused in."""

from typing import Optional  # custom_op schema inference warns on "torch.Tensor | None"

import torch

from vqfast import backend
from vqfast.ops import _checks
from vqfast.ops.group_norm_act import cast_like, memory_format


@torch.library.custom_op("vqfast::spatial_norm_act", mutates_args=())
def _spatial_norm_act(
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = backend.kernel("spatial_norm_act", "forward", f.device)
    return fn(f, scale, shift, num_groups, weight, bias, eps, activation)


@_spatial_norm_act.register_fake
def _(f, scale, shift, num_groups, weight, bias, eps, activation):
    stats = f.new_empty((f.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(f), stats, torch.empty_like(stats)


@torch.library.custom_op("vqfast::spatial_norm_act_backward", mutates_args=())
def _spatial_norm_act_backward(
    grad: torch.Tensor,
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_f, grad_scale, grad_shift, grad_weight, grad_bias)``; the last two are float32
    per-channel sums, computed whether or not the op had a weight and bias."""
    fn = backend.kernel("spatial_norm_act", "backward", f.device)
    return fn(grad, f, scale, shift, weight, bias, mean, rstd, activation)


@_spatial_norm_act_backward.register_fake
def _(grad, f, scale, shift, weight, bias, mean, rstd, activation):
    channel_sum = f.new_empty(f.shape[1], dtype=torch.float32)
    return torch.empty_like(f), torch.empty_like(scale), torch.empty_like(shift), channel_sum, torch.empty_like(channel_sum)


def _setup_context(ctx, inputs, output):
    f, scale, shift, _, weight, bias, _, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(f, scale, shift, weight, bias, mean, rstd)
    ctx.activation = activation


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    f, scale, shift, weight, bias, mean, rstd = ctx.saved_tensors
    grads = _spatial_norm_act_backward(
        grad.contiguous(memory_format=memory_format(f)), f, scale, shift, weight, bias, mean, rstd, ctx.activation
    )
    grad_f, grad_scale, grad_shift, grad_weight, grad_bias = grads
    return grad_f, grad_scale, grad_shift, None, cast_like(grad_weight, weight), cast_like(grad_bias, bias), None, None


_spatial_norm_act.register_autograd(_backward, setup_context=_setup_context)


def spatial_norm_act(
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    num_groups: int = 32,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``act((group_norm(f) * weight + bias) * up(scale) + up(shift))``: diffusers' SpatialNorm
    (``scale = conv_y(zq)``, ``shift = conv_b(zq)``) followed by the activation.

    ``scale`` and ``shift`` (N, C, h, w) may be taken at the latent's resolution: ``up`` is the
    nearest upsampling to f's spatial size, done inside the op, so the full-size maps never exist.
    Statistics in float32; the result has f's dtype and memory format.
    """
    _checks.group_norm(f, "f", num_groups, weight, bias, eps)
    for name, t in (("scale", scale), ("shift", shift)):
        _checks.tensor(name, t)
        _checks.rank(name, t, exactly=f.dim())
        _checks.same_device(name, t, "f", f)
        if t.shape[:2] != f.shape[:2]:
            raise ValueError(f"{name} must have f's batch and channels {tuple(f.shape[:2])}, got {tuple(t.shape)}")
        if f.numel() and not t.numel():
            raise ValueError(f"{name} is empty but f is not: nothing to upsample from, shape {tuple(t.shape)}")
    if scale.shape != shift.shape:
        raise ValueError(f"scale and shift must have the same shape, got {tuple(scale.shape)} and {tuple(shift.shape)}")
    act = _checks.activation(activation)
    return _spatial_norm_act(f, scale, shift, num_groups, weight, bias, float(eps), act)[0]
