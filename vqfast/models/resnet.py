"""The resnet block and the resampling layers of diffusers' VQModel encoder and decoder."""

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.models.conv import conv2d_add, upsample2x_conv3x3
from vqfast.models.norms import norm_act


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` or, given ``zq_channels``, ``ResnetBlockCondNorm2D`` (SpatialNorm), as
    VQModel builds them: no time embedding, dropout 0 and output_scale_factor 1, so neither is applied."""

    def __init__(
        self, in_channels: int, out_channels: int, num_groups: int, act_fn: str, zq_channels: int | None = None
    ):
        super().__init__()
        self.norm1 = norm_act(in_channels, num_groups, act_fn, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm_act(out_channels, num_groups, act_fn, zq_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        # One name rebound step by step, so each intermediate is freed as soon as the next exists
        # (conv1's output must not live through conv2: at 512x512 that was 128 MiB more than diffusers).
        h = self.norm1(x, zq)
        h = self.conv1(h)
        h = self.norm2(h, zq)
        # The residual add rides on the last convolution; the shortcut runs after conv2, as in diffusers,
        # so that norm2's output is freed before the shortcut's is made.
        if self.conv_shortcut is None:
            return conv2d_add(self.conv2, h, x)
        h = self.conv2(h)
        return conv2d_add(self.conv_shortcut, x, h)


class Downsample2D(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 convolution (diffusers' Downsample2D, padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution (diffusers' Upsample2D with use_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The upsampled tensor is never made (nor torch's channels_last nearest kernel run, which has failed
        # on large batches: diffusers#984, pytorch#141831).
        return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias)
