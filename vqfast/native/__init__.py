"""The compiled extension ``vqfast._C`` (csrc/): C++ kernels for CPU tensors, CUDA kernels for CUDA tensors."""

import importlib.util

import torch

from vqfast import _C  # noqa: F401  (ImportError here marks the backend unavailable)


def supports(op: str, device: torch.device) -> str:
    """Empty when this backend can run ``op`` on ``device``, else why not."""
    if importlib.util.find_spec(f"{__name__}.{op}") is None:
        return f"no native kernel for {op} yet"
    if device.type == "cpu" or (device.type == "cuda" and _C.has_cuda()):
        return ""
    return f"vqfast._C has no kernels for {device.type} tensors (built without CUDA?)"
