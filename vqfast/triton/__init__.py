"""Triton kernels for vqfast's ops: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

import importlib.util
import os

import torch

import triton  # (ImportError here marks the backend unavailable)
from triton.runtime.interpreter import InterpretedFunction


def interpreting() -> bool:
    """Whether ``@triton.jit`` builds interpreted kernels (read when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _library_interpreted() -> bool:
    """Whether triton's own ``@jit`` library (tl.zeros, tl.sum, ...) was built for the interpreter:
    decided once, by TRITON_INTERPRET when triton was first imported."""
    return isinstance(triton.language.zeros, InterpretedFunction)


def supports(op: str, device: torch.device) -> str:
    """Empty when this backend can run ``op`` on ``device``, else why not."""
    if importlib.util.find_spec(f"{__name__}.{op}") is None:
        return f"no Triton kernel for {op} yet"
    if device.type == "cuda":
        return ""
    if device.type != "cpu" or not interpreting():
        return f"Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), not {device.type}"
    if not _library_interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported: set it before, for CPU tensors"
    return ""


def autotune(configs: list[triton.Config], key: list[str]):
    """``triton.autotune``, except under the interpreter, which would time every config in numpy:
    there the first config runs. Only for kernels that may safely run more than once per call."""
    return triton.autotune(configs[:1] if interpreting() else configs, key=key)
