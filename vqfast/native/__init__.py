"""The compiled extension ``vqfast._C`` (csrc/): C++ kernels for CPU tensors, CUDA kernels for CUDA tensors."""

import torch

from vqfast import _C  # noqa: F401  (ImportError here marks the backend unavailable)


def supports(op: str, device: torch.device) -> str:
    """Empty when this backend can run ``op`` on ``device``, else why not."""
    # Asks the loaded library, not the source tree: a stale build may lack an op.
    if not hasattr(torch.ops.vqfast_C, op):
        return f"the built vqfast._C has no {op} kernel (rebuild: pip install --no-build-isolation -e .)"
    if device.type == "cpu" or (device.type == "cuda" and _C.has_cuda()):
        return ""
    return f"vqfast._C has no kernels for {device.type} tensors (built without CUDA?)"
