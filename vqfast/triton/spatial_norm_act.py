"""MoVQ's SpatialNorm plus activation, ``act((group_norm(f) * weight + bias) * up(scale) + up(shift))``,
with the nearest upsampling of the latent-resolution ``scale`` and ``shift`` done inside the kernels
(the full-size maps never exist): the group-norm kernels of :mod:`vqfast.triton.group_norm_act`."""

from torch import Tensor

from vqfast.triton.group_norm_act import run_backward, run_forward


def forward(
    f: Tensor,
    scale: Tensor,
    shift: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return run_forward(f, num_groups, weight, bias, eps, activation, scale, shift)


def backward(
    grad: Tensor,
    f: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_f, grad_scale, grad_shift, grad_weight, grad_bias)``; scale and shift gradients are summed
    with float32 atomics, in no fixed order."""
    return run_backward(grad, f, weight, bias, mean, rstd, activation, scale, shift)
