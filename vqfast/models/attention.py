"""Single-head self-attention over the pixels of a feature map, as the VQModel blocks use it."""

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.models.norms import GroupNorm, SpatialNorm

# Key names of the attention block before diffusers moved it onto `Attention`.
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: old checkpoints' query/key/value/proj_attn load as to_q/to_k/to_v/to_out.0."""
    for old, new in _DEPRECATED_NAMES.items():
        for tensor_name in ("weight", "bias"):
            old_key = f"{prefix}{old}.{tensor_name}"
            if old_key in state_dict:
                state_dict[f"{prefix}{new}.{tensor_name}"] = state_dict.pop(old_key)


class Attention(nn.Module):
    """diffusers' ``Attention`` with ``AttnProcessor2_0`` as VQModel builds it: residual, one head (the
    blocks set attention_head_dim to the channel count), a GroupNorm or, given ``zq_channels``, a
    SpatialNorm in front, no dropout and rescale_output_factor 1."""

    # diffusers' from_pretrained renames the deprecated keys of modules that carry this flag.
    _from_deprecated_attn_block = True

    def __init__(self, channels: int, num_groups: int, zq_channels: int | None = None):
        super().__init__()
        self.group_norm = GroupNorm(num_groups, channels) if zq_channels is None else None
        self.spatial_norm = SpatialNorm(channels, zq_channels) if zq_channels is not None else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is Dropout(0.0)
        self.register_load_state_dict_pre_hook(_rename_deprecated_keys)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        norm = self.group_norm if self.spatial_norm is None else self.spatial_norm
        batch, channels, height, width = x.shape
        # (B, HW, C) tokens: free for channels_last input; otherwise one copy serves q, k and v.
        tokens = norm(x, zq).flatten(2).transpose(1, 2).contiguous()
        # q, k and v in one matrix product (one read of the tokens), split as views.
        projections = (self.to_q, self.to_k, self.to_v)
        weight = torch.cat([proj.weight for proj in projections])
        bias = torch.cat([proj.bias for proj in projections])
        q, k, v = F.linear(tokens, weight, bias).unsqueeze(1).chunk(3, dim=-1)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        # Residual first, so the result keeps the input's memory format (diffusers adds it second, which
        # turns an NCHW model into channels_last from its first attention on; the values are the same).
        return x + out.transpose(1, 2).reshape(batch, channels, height, width)
