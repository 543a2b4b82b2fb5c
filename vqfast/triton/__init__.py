"""The ``triton`` backend: Triton kernels for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
(set before triton is imported). Shared helpers live in :mod:`vqfast.triton._common`."""

from vqfast.backend import Implementation
from vqfast.triton import codebook_gather, group_norm_act, nearest_code, vector_quantize

IMPLEMENTATIONS = {
    "nearest_code": Implementation(nearest_code.forward, None, nearest_code.unsupported),
    "group_norm_act": Implementation(group_norm_act.forward, group_norm_act.backward, group_norm_act.unsupported),
    "vector_quantize": Implementation(vector_quantize.forward, vector_quantize.backward, vector_quantize.unsupported),
    "vector_quantize_stats": Implementation(
        vector_quantize.forward_stats, vector_quantize.backward, vector_quantize.stats_unsupported
    ),
    "codebook_gather": Implementation(codebook_gather.forward, codebook_gather.backward, codebook_gather.unsupported),
}
