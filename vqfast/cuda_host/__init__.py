"""The ``cuda_host`` backend: the CUDA kernels of csrc/cuda/ built a second time with the host compiler
(csrc/host/, ``vqfast._C_cuda_host``), each launch's blocks run in turn and each block's threads as host
threads, on CPU tensors. It exists so that CPU-only CI runs the CUDA kernels' indexing, tiling, split
merges, tie and NaN rules against the reference, under sanitizers too; it is slow, so ``auto`` never
picks it: ask for it by name.

Its operators are ``torch.ops.vqfast_cuda_host.<op>``, with the schemas of ``torch.ops.vqfast_C`` (the
lowered signatures, copied here so they are stated once, in csrc/ops.cpp), implemented by the CUDA
launchers themselves. ``unsupported`` is the native backend's, for CPU tensors and the CUDA kernels' limits.

``VQFAST_CUDA_HOST_LIBRARY=/path/to/_C_cuda_host.so`` loads that build instead of the installed one (the
Makefile's sanitizer targets build one with ``VQFAST_CUDA_HOST_SANITIZE``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import torch

from vqfast import native
from vqfast.backend import Implementation


def _load_extension() -> None:
    """Imports the kernels' module, which registers them under the vqfast_cuda_host namespace."""
    path = os.environ.get("VQFAST_CUDA_HOST_LIBRARY")
    if not path:
        from vqfast import _C_cuda_host  # noqa: F401
        return
    loader = importlib.machinery.ExtensionFileLoader("vqfast._C_cuda_host", path)
    spec = importlib.util.spec_from_file_location("vqfast._C_cuda_host", path, loader=loader)
    if spec is None:
        raise ImportError(f"VQFAST_CUDA_HOST_LIBRARY={path} is not an extension module")
    loader.exec_module(importlib.util.module_from_spec(spec))


_load_extension()  # first: a failed import leaves no half-defined library behind

NAMES = ("nearest_code", "group_norm_act", "group_norm_act_backward", "vector_quantize", "vector_quantize_stats",
         "vector_quantize_backward", "codebook_gather", "codebook_gather_backward")
_missing = [name for name in NAMES if not hasattr(torch.ops.vqfast_C, name)]
if _missing:  # a build older than the sources: the backend is unavailable, with the reason, not a crash
    raise ImportError(f"vqfast._C lacks {', '.join(_missing)}: rebuild it: pip install --no-build-isolation -e .")
_LIBRARY = torch.library.Library("vqfast_cuda_host", "DEF")
for _name in NAMES:
    _LIBRARY.define(str(getattr(torch.ops.vqfast_C, _name).default._schema).removeprefix("vqfast_C::"))
ops = torch.ops.vqfast_cuda_host


def _on_cpu(native_unsupported):
    """native_unsupported (what the kernels and their launchers cannot run), for CPU tensors only."""

    def unsupported(inputs) -> str:
        if inputs[0].device.type != "cpu":
            return "it runs CPU tensors only (the CUDA kernels emulated on the host)"
        return native_unsupported(inputs)

    return unsupported


def _search_unsupported(native_unsupported):
    """The CUDA search's stated bounds on D and K hold on the host too."""

    def unsupported(inputs) -> str:
        if inputs.codebook.shape[1] > native.CUDA_MAX_D or inputs.codebook.shape[0] > native.CUDA_MAX_K:
            return f"CUDA nearest_code takes D <= {native.CUDA_MAX_D} and K <= 2**30, got a {tuple(inputs.codebook.shape)} codebook"
        return native_unsupported(inputs)

    return _on_cpu(unsupported)


IMPLEMENTATIONS = {
    "nearest_code": Implementation(ops.nearest_code, None, _search_unsupported(native.nearest_code_unsupported)),
    "group_norm_act": Implementation(
        ops.group_norm_act, ops.group_norm_act_backward, _on_cpu(native.group_norm_act_unsupported)
    ),
    "vector_quantize": Implementation(
        ops.vector_quantize, ops.vector_quantize_backward, _search_unsupported(native.vector_quantize_unsupported)
    ),
    "vector_quantize_stats": Implementation(
        ops.vector_quantize_stats,
        ops.vector_quantize_backward,
        _search_unsupported(native.vector_quantize_stats_unsupported),
    ),
    "codebook_gather": Implementation(
        ops.codebook_gather, ops.codebook_gather_backward, _on_cpu(native.codebook_gather_unsupported)
    ),
}
