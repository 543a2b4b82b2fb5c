"""Triton kernels for vqfast's ops: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

import importlib.util
import os

import torch

import triton  # noqa: F401  (ImportError here marks the backend unavailable)


def supports(op: str, device: torch.device) -> str:
    """Empty when this backend can run ``op`` on ``device``, else why not."""
    if importlib.util.find_spec(f"{__name__}.{op}") is None:
        return f"no Triton kernel for {op} yet"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return ""
    return f"Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), not {device.type}"
