"""vqfast's ops: one contract each, several backends (see :mod:`vqfast.backend`). Torch alone suffices."""

from vqfast.ops.codebook_gather import codebook_gather
from vqfast.ops.group_norm_act import group_norm_act, spatial_norm_act
from vqfast.ops.nearest_code import nearest_code
from vqfast.ops.vector_quantize import vector_quantize

__all__ = ["codebook_gather", "group_norm_act", "nearest_code", "spatial_norm_act", "vector_quantize"]
