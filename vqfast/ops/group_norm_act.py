"""``group_norm_act`` and ``spatial_norm_act``: ``act(group_norm(x) * weight + bias)``, and MoVQ's
SpatialNorm ``act((group_norm(f) * weight + bias) * up(scale) + up(shift))``, as one op family.

Both lower to one custom op, ``vqfast::group_norm_act``, whose optional ``scale``, ``shift`` and
``source`` carry the spatial variant: every backend implements one kernel family.
"""

from typing import NamedTuple, Optional

import torch

from vqfast import backend, layout
from vqfast.ops import _checks, _library


class Inputs(NamedTuple):
    """The lowered arguments every backend's ``group_norm_act`` receives (and its ``unsupported`` sees)."""

    x: torch.Tensor  # (N, C, *spatial), any strides
    num_groups: int
    weight: Optional[torch.Tensor]  # (C,) or None
    bias: Optional[torch.Tensor]  # (C,) or None
    scale: Optional[torch.Tensor]  # spatial variant: (N, C, *small), statistics dtype, contiguous; else None
    shift: Optional[torch.Tensor]  # as scale
    source: Optional[torch.Tensor]  # int64 (prod(spatial),): layout.nearest_source; None with scale
    eps: float
    silu: bool  # the activation: SiLU, or none


def _kernel(x, num_groups: int, weight, bias, scale, shift, source, eps: float, silu: bool):
    return backend.forward("group_norm_act", Inputs(x, num_groups, weight, bias, scale, shift, source, eps, silu))


def _fake(x, num_groups, weight, bias, scale, shift, source, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_checks.statistics_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_kernel(grad, x, weight, bias, scale, shift, source, mean, rstd, silu: bool, backend_name: str):
    args = (grad, x, weight, bias, scale, shift, source, mean, rstd, silu)
    return backend.backward("group_norm_act", backend_name, *args)


def _backward_fake(grad, x, weight, bias, scale, shift, source, mean, rstd, silu, backend_name):
    channel_sum = x.new_empty(x.shape[1], dtype=mean.dtype)
    spatial = (scale, shift) if scale is not None else (mean.new_empty(0), mean.new_empty(0))
    return torch.empty_like(x), channel_sum, torch.empty_like(channel_sum), *map(torch.empty_like, spatial)


# (y, mean, rstd): y like x; mean and rstd (N, num_groups) in the statistics dtype.
_group_norm_act = _library.define(
    "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift,"
    " Tensor? source, float eps, bool silu) -> (Tensor, Tensor, Tensor)",
    _kernel,
    _fake,
)
# (grad_x, grad_weight, grad_bias, grad_scale, grad_shift): grad_weight and grad_bias are (C,) sums in the
# statistics dtype, computed whether or not the op had a weight and bias; grad_scale and grad_shift have
# scale's shape, or (0,) without one.
_group_norm_act_backward = _library.define(
    "group_norm_act_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift,"
    " Tensor? source, Tensor mean, Tensor rstd, bool silu, str backend_name)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _backward_kernel,
    _backward_fake,
)


def _setup_context(ctx, inputs, output):
    lowered = Inputs(*inputs)
    _, mean, rstd = output
    ctx.save_for_backward(lowered.x, lowered.weight, lowered.bias, lowered.scale, lowered.shift, lowered.source, mean, rstd)
    ctx.silu = lowered.silu
    ctx.backend = backend.choose("group_norm_act", lowered, lowered.x.device)


def _cast_like(grad: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else grad.to(param.dtype)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, scale, shift, source, mean, rstd = ctx.saved_tensors
    grad = grad.contiguous(memory_format=layout.memory_format(x))
    grad_x, grad_weight, grad_bias, grad_scale, grad_shift = _group_norm_act_backward(
        grad, x, weight, bias, scale, shift, source, mean, rstd, ctx.silu, ctx.backend
    )
    if scale is None:
        grad_scale = grad_shift = None
    return grad_x, None, _cast_like(grad_weight, weight), _cast_like(grad_bias, bias), grad_scale, grad_shift, None, None, None


_library.differentiable(_group_norm_act, _backward, _setup_context)


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``act(group_norm(x, num_groups, weight, bias, eps))`` for x of shape (N, C, *spatial).

    Statistics in float32 (float64 for float64 x); the result has x's dtype and memory format. Under
    autocast the input is not upcast: float16/bfloat16 in, the same dtype out. ``activation`` is
    ``"silu"`` or ``None``.
    """
    _checks.group_norm(x, "x", num_groups, weight, bias, eps)
    silu = _checks.silu(activation)
    return _group_norm_act(x, num_groups, weight, bias, None, None, None, float(eps), silu)[0]


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
    nearest upsampling to f's spatial size (exactly ``F.interpolate``'s), done inside the op, so the
    full-size maps never exist. Statistics as :func:`group_norm_act`; the result has f's dtype and
    memory format.
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
    silu = _checks.silu(activation)
    # Latent-sized maps: one cast to the statistics dtype here, so that no backend converts them.
    stats = _checks.statistics_dtype(f)
    scale, shift = (t.to(stats, memory_format=torch.contiguous_format) for t in (scale, shift))
    source = layout.nearest_source(tuple(f.shape[2:]), tuple(scale.shape[2:]), f.device)
    return _group_norm_act(f, num_groups, weight, bias, scale, shift, source, float(eps), silu)[0]
