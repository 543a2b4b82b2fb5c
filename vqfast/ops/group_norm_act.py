"""``group_norm_act``: ``act(group_norm(x) * weight + bias)`` in one op, forward and backward."""

from typing import Optional  # custom_op schema inference warns on "torch.Tensor | None"

import torch

from vqfast import backend
from vqfast.ops import _checks


@torch.library.custom_op("vqfast::group_norm_act", mutates_args=())
def _group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend.kernel("group_norm_act", "forward", x.device)(x, num_groups, weight, bias, eps, activation)


@_group_norm_act.register_fake
def _(x, num_groups, weight, bias, eps, activation):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("vqfast::group_norm_act_backward", mutates_args=())
def _group_norm_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; the last two are float32 per-channel sums, computed
    whether or not the op had a weight and bias."""
    fn = backend.kernel("group_norm_act", "backward", x.device)
    return fn(grad, x, weight, bias, mean, rstd, activation)


@_group_norm_act_backward.register_fake
def _(grad, x, weight, bias, mean, rstd, activation):
    channel_sum = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), channel_sum, torch.empty_like(channel_sum)


def _setup_context(ctx, inputs, output):
    x, _, weight, bias, _, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.activation = activation


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _group_norm_act_backward(
        grad.contiguous(memory_format=memory_format(x)), x, weight, bias, mean, rstd, ctx.activation
    )
    return grad_x, None, cast_like(grad_weight, weight), cast_like(grad_bias, bias), None, None


_group_norm_act.register_autograd(_backward, setup_context=_setup_context)


def cast_like(grad: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else grad.to(param.dtype)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout kernels get gradients in: x's own, so no backend needs two code paths per input."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``act(group_norm(x, num_groups, weight, bias, eps))`` for x of shape (N, C, *spatial).

    Statistics in float32; the result has x's dtype and memory format. Under autocast the input is
    not upcast: float16/bfloat16 in, the same dtype out. ``activation`` is ``"silu"`` or ``None``.
    """
    _checks.group_norm(x, "x", num_groups, weight, bias, eps)
    return _group_norm_act(x, num_groups, weight, bias, float(eps), _checks.activation(activation))[0]
