"""What the Triton kernels share: the run mode (compiled for CUDA, or interpreted on the CPU), the
device and dtype checks of every ``unsupported``, and the jit helpers for row offsets, rounding,
float32-accumulated dots and the activation."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left to the other backends


def interpreting() -> bool:
    """Whether ``@triton.jit`` builds interpreted kernels (read when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _library_interpreted() -> bool:
    """Whether triton's own ``@jit`` library (tl.zeros, tl.sum, ...) was built for the interpreter:
    decided once, by TRITON_INTERPRET when triton was first imported."""
    return isinstance(tl.zeros, InterpretedFunction)


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors, which launch grids aim to fill (4 for the interpreter,
    so that the CPU tests take the split paths)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def unsupported_tensor(name: str, t: torch.Tensor) -> str:
    """Why the kernels cannot take ``t`` (the op's argument ``name``) on its device and dtype, or ""."""
    if t.device.type == "cpu":
        if not interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if not _library_interpreted():
            return "TRITON_INTERPRET=1 was set after triton was imported: set it before, for CPU tensors"
    elif t.device.type != "cuda":
        return f"Triton runs CUDA tensors (CPU tensors under TRITON_INTERPRET=1), not {t.device.type}"
    if t.is_floating_point() and t.dtype not in DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16 {name}, not {t.dtype}"
    return ""


def autotune(configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None):
    """``triton.autotune``, except under the interpreter, which would time every config in numpy:
    there the first config runs. Only for kernels that may safely run more than once per call, once
    the outputs they accumulate into (``reset_to_zero``, which may be None) are zeroed again. The
    tuner's ``compiled_configs`` are all of them, as compiled for a GPU (benchmarks/resources.py)."""

    def decorate(fn):
        tuner = triton.autotune(configs[:1] if interpreting() else configs, key=key, reset_to_zero=reset_to_zero)(fn)
        tuner.compiled_configs = configs
        return tuner

    return decorate


@triton.jit
def row_offsets(rows, shape, strides):
    """Memory offsets of flat row indices: ``shape`` a :class:`vqfast.layout.RowShape`, ``strides`` a
    tensor's :class:`vqfast.layout.RowStrides`."""
    rest = rows // shape.inner
    outer = (rest // shape.middle) * strides.outer
    return outer + (rest % shape.middle) * strides.middle + (rows % shape.inner) * strides.inner


@triton.jit
def row_tile(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, D block)'s tile of N rows of D elements: ``(rows, ds, row_mask, mask)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    return rows, ds, row_mask, row_mask[:, None] & (ds < D)[None, :]


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 x rounded to ``dtype``, to nearest even as on the GPU (the interpreter truncates to
    bfloat16: there the rounding is done on the bits)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` accumulated in float32; PRECISION as :data:`vqfast.triton.nearest_code.PRECISIONS`
    or "native" (16-bit operands: exact products)."""
    if PRECISION == "bf16":
        a = round_to(a, tl.bfloat16, INTERPRET)
        b = round_to(b, tl.bfloat16, INTERPRET)
    if INTERPRET:
        # The interpreter multiplies bfloat16 as raw integers and ignores input_precision: multiply the
        # operands' exact values in float32, truncated to TF32 as the tensor cores may do.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if PRECISION == "tf32":
            a = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            b = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:  # TF32 for float32 operands; exact products for 16-bit ones
        out = tl.dot(a, b, acc, input_precision="tf32")
    return out


@triton.jit
def activate(y, SILU: tl.constexpr):
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def activation_grad(g, y, SILU: tl.constexpr):
    """``g * act'(y)``."""
    if SILU:
        sig = tl.sigmoid(y)
        g = g * sig * (1.0 + y * (1.0 - sig))
    return g


class Codes(NamedTuple):
    """A (K, D) codebook in its own strides, as kernels read its rows."""

    ptr: torch.Tensor
    stride_k: int  # per code
    stride_d: int  # per element of a code

    @classmethod
    def of(cls, codebook: torch.Tensor) -> Codes:
        return cls(codebook, *codebook.stride())
