"""Native ``spatial_norm_act``: ``torch.ops.vqfast_C.spatial_norm_act[_backward]`` (csrc/cpu/spatial_norm_act.cpp).

The nearest upsampling of scale/shift happens inside the kernel; this wrapper only builds the map from
each spatial position of f to the position of scale/shift it reads, exactly as ``F.interpolate`` picks it.
"""

import torch
import torch.nn.functional as F

from vqfast import _C  # noqa: F401  (registers torch.ops.vqfast_C)


def _source(f: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """int64 (prod(f.shape[2:]),): row-major position in ``small``'s spatial grid read by each position of f."""
    flat = torch.zeros((), dtype=torch.long, device=f.device)
    for big, little in zip(f.shape[2:], small.shape[2:]):
        src = F.interpolate(torch.arange(little, dtype=torch.float32, device=f.device)[None, None], size=big)
        flat = flat[..., None] * little + src.view(-1).long()
    return flat.reshape(-1).contiguous()


def forward(f, scale, shift, num_groups, weight, bias, eps, activation):
    return torch.ops.vqfast_C.spatial_norm_act(
        f, scale, shift, _source(f, scale), num_groups, weight, bias, eps, activation == "silu"
    )


def backward(grad, f, scale, shift, weight, bias, mean, rstd, activation):
    return torch.ops.vqfast_C.spatial_norm_act_backward(
        grad, f, scale, shift, _source(f, scale), weight, bias, mean, rstd, activation == "silu"
    )
