"""The ``native`` backend: the compiled extension ``vqfast._C`` (csrc/), C++ kernels for CPU tensors and
CUDA kernels for CUDA tensors.

Each ``torch.ops.vqfast_C`` schema is its op's lowered signature (vqfast.ops), so the implementations
are those functions themselves. ``unsupported`` declines what the kernels cannot run: float64, devices
other than the CPU and CUDA (CUDA only when built with it), a stale build whose schemas differ from the
lowering, and layouts the kernels could only read through a copy.
"""

from __future__ import annotations

import torch

from vqfast import _C, layout
from vqfast.backend import Implementation

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIMS = 6  # csrc/common/layout.h kMaxDims: dimensions a tensor may keep once merged
CUDA_MAX_D = 8191  # csrc/cuda/nearest_code.h kNearestCodeMaxD: the longest code the CUDA search is stated for
CUDA_MAX_K = 1 << 30  # the CUDA search keeps code indices in 32 bits
_REBUILD = "rebuild it: pip install --no-build-isolation -e ."


# The backward each op's autograd calls (vector_quantize_stats shares vector_quantize's); None: no backward.
BACKWARD = {"nearest_code": None, "vector_quantize_stats": "vector_quantize_backward"}


def _arguments(op: str) -> tuple[str, ...] | None:
    """The argument names of the built op and of its backward (None when the build lacks either)."""
    names = []
    backward = BACKWARD.get(op, f"{op}_backward")
    for name in (op, backward) if backward else (op,):
        if not hasattr(torch.ops.vqfast_C, name):
            return None
        names.append(tuple(a.name for a in getattr(torch.ops.vqfast_C, name).default._schema.arguments))
    return names[0]


def _runs(op: str, inputs, t: torch.Tensor) -> str:
    """Why the build cannot run op on inputs, whose main tensor is t, judged by build, device and dtype."""
    if ARGUMENTS[op] != inputs._fields:
        return f"the built vqfast._C's {op} differs from vqfast.ops ({_REBUILD})"
    if t.device.type == "cuda" and not _C.has_cuda():
        return "vqfast._C was built without CUDA"
    if t.device.type not in ("cpu", "cuda"):
        return f"no kernels for {t.device.type} tensors"
    if t.dtype not in KERNEL_DTYPES:
        return f"no {t.dtype} kernels"
    return ""


def _rows(name: str, t: torch.Tensor, dim: int) -> str:
    """Why the rows of t along dim cannot be read in place."""
    rest = [i for i in range(t.dim()) if i != dim]
    if len(layout.merge_dims([t.shape[i] for i in rest], [[t.stride(i) for i in rest]])) > MAX_DIMS:
        return f"{name}'s layout keeps more than {MAX_DIMS} dimensions once merged"
    return ""


def _search_unsupported(op: str, inputs) -> str:
    """nearest_code's, and vector_quantize's, which searches with it."""
    z, codebook = inputs.z, inputs.codebook
    if reason := _runs(op, inputs, z) or _rows("z", z, inputs.dim):
        return reason
    if z.device.type == "cuda" and (codebook.shape[1] > CUDA_MAX_D or codebook.shape[0] > CUDA_MAX_K):
        return f"CUDA nearest_code takes D <= {CUDA_MAX_D} and K <= 2**30, got a {tuple(codebook.shape)} codebook"
    return ""


def nearest_code_unsupported(inputs) -> str:
    return _search_unsupported("nearest_code", inputs)


def vector_quantize_unsupported(inputs) -> str:
    return _search_unsupported("vector_quantize", inputs)


def vector_quantize_stats_unsupported(inputs) -> str:
    return _search_unsupported("vector_quantize_stats", inputs)


def codebook_gather_unsupported(inputs) -> str:
    indices = inputs.indices
    if reason := _runs("codebook_gather", inputs, inputs.codebook):
        return reason
    if indices.dtype != torch.int64:
        return "indices must be int64"
    if len(layout.merge_dims(indices.shape, [indices.stride()])) > MAX_DIMS:
        return f"indices' layout keeps more than {MAX_DIMS} dimensions once merged"
    return ""


def group_norm_act_unsupported(inputs) -> str:
    x = inputs.x
    if reason := _runs("group_norm_act", inputs, x):
        return reason
    # x, its output (torch.empty_like) and its gradient (layout.memory_format) must all be read as runs
    # along the spatial positions (channels-first) or all along the channels (channels-last). Contiguous
    # and channels_last x are; so is any x whose spatial dimensions merge into one run, since its output
    # and gradient are then channels-first too.
    if x.is_contiguous() or layout.memory_format(x) != torch.contiguous_format:
        return ""
    spatial = layout.merge_dims(x.shape[2:], [x.stride()[2:]])
    if not spatial or (len(spatial) == 1 and spatial[0][1] == (1,)):
        return ""
    return f"x's strides {x.stride()} are neither channels-first runs nor channels_last"


ARGUMENTS = {
    op: _arguments(op)
    for op in ("nearest_code", "group_norm_act", "vector_quantize", "vector_quantize_stats", "codebook_gather")
}


def _op(name: str):
    """torch.ops.vqfast_C.<name>, or, in a stale build without it, a stand-in that says so (never called:
    ``unsupported`` declines every input first)."""
    if hasattr(torch.ops.vqfast_C, name):
        return getattr(torch.ops.vqfast_C, name)

    def missing(*args, **kwargs):
        raise RuntimeError(f"the built vqfast._C has no {name} ({_REBUILD})")

    return missing


IMPLEMENTATIONS = {
    "nearest_code": Implementation(_op("nearest_code"), None, nearest_code_unsupported),
    "group_norm_act": Implementation(
        _op("group_norm_act"), _op("group_norm_act_backward"), group_norm_act_unsupported
    ),
    "vector_quantize": Implementation(
        _op("vector_quantize"), _op("vector_quantize_backward"), vector_quantize_unsupported
    ),
    "vector_quantize_stats": Implementation(
        _op("vector_quantize_stats"), _op("vector_quantize_backward"), vector_quantize_stats_unsupported
    ),
    "codebook_gather": Implementation(
        _op("codebook_gather"), _op("codebook_gather_backward"), codebook_gather_unsupported
    ),
}
