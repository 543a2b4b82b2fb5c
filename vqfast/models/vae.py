"""VQModel's encoder (image -> latent) and decoder (latent -> image), as diffusers' Encoder/Decoder."""

import torch
from torch import nn

from vqfast.models.norms import GroupNorm, norm_act
from vqfast.models.unet_blocks import (
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
    has_attention,
)


class Encoder(nn.Module):
    """diffusers' ``Encoder`` with ``double_z=False``, as VQModel builds it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            block_in, channels = channels, block_out_channels[i]
            self.down_blocks.append(
                DownEncoderBlock2D(
                    block_in,
                    channels,
                    num_layers=layers_per_block,
                    num_groups=norm_num_groups,
                    act_fn=act_fn,
                    add_downsample=i != len(block_out_channels) - 1,
                    add_attention=has_attention(block_type, DOWN_BLOCK_TYPES),
                )
            )
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], norm_num_groups, act_fn, mid_block_add_attention)
        # diffusers' conv_act here is SiLU whatever act_fn is.
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], act_fn="silu")
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(sample)
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        for block in [*self.down_blocks, self.mid_block]:
            x = self._gradient_checkpointing_func(block, x) if checkpoint else block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """diffusers' ``Decoder``; with ``norm_type="spatial"`` (MoVQ) every norm is a SpatialNorm conditioned
    on the quantized latent passed to ``forward`` as ``zq``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        up_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        norm_type: str,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        if norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial', got {norm_type!r}")
        zq_channels = in_channels if norm_type == "spatial" else None
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1], norm_num_groups, act_fn, mid_block_add_attention, zq_channels
        )
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            block_in, channels = channels, reversed_channels[i]
            self.up_blocks.append(
                UpDecoderBlock2D(
                    block_in,
                    channels,
                    num_layers=layers_per_block + 1,
                    num_groups=norm_num_groups,
                    act_fn=act_fn,
                    add_upsample=i != len(block_out_channels) - 1,
                    add_attention=has_attention(block_type, UP_BLOCK_TYPES),
                    zq_channels=zq_channels,
                )
            )
        # diffusers' conv_act here is SiLU whatever act_fn is.
        self.conv_norm_out = norm_act(block_out_channels[0], norm_num_groups, "silu", zq_channels)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv_in(sample)
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        for block in [self.mid_block, *self.up_blocks]:
            x = self._gradient_checkpointing_func(block, x, zq) if checkpoint else block(x, zq)
        return self.conv_out(self.conv_norm_out(x, zq))
