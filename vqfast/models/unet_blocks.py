"""The encoder's down blocks, the decoder's up blocks and the mid block of diffusers' VQModel.

Submodules are registered in diffusers' order, so state_dict keys come in the same order too.
"""

import torch
from torch import nn

from vqfast.models.attention import Attention
from vqfast.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

# The block types VQModel's encoder and decoder accept, and whether each has attention.
DOWN_BLOCK_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_BLOCK_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def has_attention(block_type: str, types: dict[str, bool]) -> bool:
    if block_type not in types:
        raise ValueError(f"{block_type} is not supported by vqfast's VQModel; use one of {', '.join(types)}")
    return types[block_type]


class DownEncoderBlock2D(nn.Module):
    """diffusers' DownEncoderBlock2D, or AttnDownEncoderBlock2D when ``add_attention``: resnets (each
    followed by attention), then an optional downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        num_groups: int,
        act_fn: str,
        add_downsample: bool,
        add_attention: bool,
    ):
        super().__init__()
        self.attentions = (
            nn.ModuleList(Attention(out_channels, num_groups) for _ in range(num_layers)) if add_attention else None
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, num_groups, act_fn)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers' UpDecoderBlock2D, or AttnUpDecoderBlock2D when ``add_attention``: resnets (each followed
    by attention), then an optional upsampler; norms are SpatialNorms when ``zq_channels`` is given."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        num_groups: int,
        act_fn: str,
        add_upsample: bool,
        add_attention: bool,
        zq_channels: int | None = None,
    ):
        super().__init__()
        self.attentions = (
            nn.ModuleList(Attention(out_channels, num_groups, zq_channels) for _ in range(num_layers))
            if add_attention
            else None
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, num_groups, act_fn, zq_channels)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """diffusers' UNetMidBlock2D as VQModel builds it: resnet, attention (optional), resnet."""

    def __init__(
        self, channels: int, num_groups: int, act_fn: str, add_attention: bool, zq_channels: int | None = None
    ):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, num_groups, zq_channels)]) if add_attention else None
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, num_groups, act_fn, zq_channels) for _ in range(2)
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        if self.attentions is not None:
            x = self.attentions[0](x, zq)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self.resnets[1], x, zq)
        return self.resnets[1](x, zq)
