"""GroupNorm and MoVQ's SpatialNorm with the activation that follows them fused into one op."""

import torch
import torch.nn.functional as F
from diffusers.models.activations import get_activation
from torch import nn

from vqfast.ops import group_norm_act, spatial_norm_act

# Every norm of diffusers' VQModel (resnets, attention, SpatialNorm, conv_norm_out) uses this eps.
EPS = 1e-6


def split_activation(act_fn: str | None) -> tuple[str | None, nn.Module | None]:
    """``(fused, separate)``: the ops fuse SiLU; any other ``act_fn`` runs after them as diffusers' module."""
    if act_fn is None:
        return None, None
    if act_fn in ("silu", "swish"):
        return "silu", None
    return None, get_activation(act_fn)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, init and checkpoint keys) followed by ``act_fn``, in one op.

    ``zq`` is accepted and ignored so that a GroupNorm and a SpatialNorm are called alike.
    """

    def __init__(self, num_groups: int, num_channels: int, act_fn: str | None = None, eps: float = EPS):
        super().__init__(num_groups, num_channels, eps=eps)
        self.fused_act, self.act = split_activation(act_fn)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.fused_act)
        return x if self.act is None else self.act(x)


class SpatialNorm(nn.Module):
    """diffusers' SpatialNorm (``group_norm(f) * conv_y(zq) + conv_b(zq)``, zq upsampled to f's size)
    followed by ``act_fn``. The 1x1 convolutions commute with nearest upsampling, so they run on the
    small latent and the op upsamples their output on the fly."""

    def __init__(self, f_channels: int, zq_channels: int, act_fn: str | None = None):
        super().__init__()
        # Holds the GroupNorm's parameters under diffusers' keys; its forward is never called.
        # diffusers hard-codes 32 groups here, whatever the model's norm_num_groups.
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=32, eps=EPS)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1)
        self.fused_act, self.act = split_activation(act_fn)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        norm = self.norm_layer
        scale, shift = pointwise_conv(self.conv_y, zq), pointwise_conv(self.conv_b, zq)
        f = spatial_norm_act(f, scale, shift, norm.num_groups, norm.weight, norm.bias, norm.eps, self.fused_act)
        return f if self.act is None else self.act(f)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as one matrix product per image, ``weight @ pixels``, giving a contiguous (NCHW)
    map whatever x's memory format: the layout spatial_norm_act reads scale and shift in, so neither is
    transposed on the way (and on a channels_last x with a few channels, MoVQ's 4-channel latent, torch's
    convolution takes a slow path that costs more than the norm it feeds)."""
    weight = conv.weight.view(conv.out_channels, conv.in_channels)
    out = torch.matmul(weight, x.flatten(2))
    out = out if conv.bias is None else out + conv.bias[:, None].to(out.dtype)
    return out.view(x.shape[0], conv.out_channels, *x.shape[2:])


def norm_act(channels: int, num_groups: int, act_fn: str | None, zq_channels: int | None) -> nn.Module:
    """The decoder of ``norm_type="spatial"`` conditions its norms on the quantized latent (zq_channels)."""
    if zq_channels is None:
        return GroupNorm(num_groups, channels, act_fn)
    return SpatialNorm(channels, zq_channels, act_fn)
