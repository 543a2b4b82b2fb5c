"""Nearest codebook row for every vector of z: one pass over z in its own layout (NCHW, channels_last,
(N, D) or any strides), the codebook streamed in tiles, a running (min, argmin) per row in registers,
never the N x K distance matrix.

Distances are ``||c||^2 - 2 <z, c>`` accumulated in float32, ties and NaN as :mod:`vqfast.ops.nearest_code`
states. Vectors of up
to ``SMALL_D`` elements go through FMAs on the CUDA cores; longer ones through ``tl.dot``, whose float32
accumulation of float16/bfloat16 products is exact in the products; float32 input uses IEEE float32
unless a tensor-core mode is chosen with :func:`set_search_precision`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vqfast import layout
from vqfast.triton._common import autotune, dot, interpreting, row_offsets, unsupported_tensor

SMALL_D = 16  # tl.dot needs an inner size of 16; below that FMAs waste no lanes on padding

# Search precisions for float32 vectors longer than SMALL_D, and the relative error u to which each
# rounds the operands of the products. Each distance is then off by at most 2 (2u + u^2) sum_i |z_i c_i|
# (plus float32 rounding), so the chosen code's exact distance exceeds the true minimum by at most the
# sum of that bound over the chosen and the nearest code; for unit-norm z and codes that is < 8u + 4u^2.
#   "ieee": float32 FMAs, the reference's arithmetic (the default);
#   "tf32": tensor cores on TF32 operands, 10 explicit mantissa bits (the hardware may truncate, hence
#           u = 2**-10 rather than 2**-11), about 7x the float32 FMA rate of an H100;
#   "bf16": tensor cores on bfloat16 operands, 7 explicit mantissa bits, about 15x.
PRECISIONS = {"ieee": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8}
_precision = "ieee"


def set_search_precision(precision: str) -> None:
    """Choose the search arithmetic for float32 input (see ``PRECISIONS``); ``"ieee"`` is exact float32."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    _precision = precision


@contextlib.contextmanager
def search_precision(precision: str) -> Iterator[None]:
    """:func:`set_search_precision` for the duration of a ``with`` block."""
    previous = _precision
    set_search_precision(precision)
    try:
        yield
    finally:
        set_search_precision(previous)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr of :func:`search` for vectors of ``dtype``."""
    return _precision if dtype == torch.float32 else "native"


class Codebook(NamedTuple):
    """The codebook as :func:`search` reads it."""

    codes: torch.Tensor  # (K, D), the op's codebook in its own strides and dtype (read by tl.dot)
    transposed: torch.Tensor  # float32 (D, K) contiguous, read by the FMA path (SMALL); else the norms
    norms: torch.Tensor  # float32 (K,): squared norms, the reference's expression bit for bit
    stride_k: int  # of codes, per code
    stride_d: int  # of codes, per element


@triton.jit
def search(
    z_ptr,
    z_off,
    row_mask,
    stride_zd,
    codebook,
    K,
    D: tl.constexpr,
    SMALL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Index (int32) of the nearest code of a :class:`Codebook` for the BLOCK_N rows of z at offsets
    ``z_off``: with SMALL, FMAs over the transposed codebook; else ``tl.dot`` over D in chunks of BLOCK_D."""
    cols = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    # Per (row, lane) minimum over the codes lane, lane + BLOCK_K, ...: elementwise in the loop, one
    # cross-lane reduction at the end. Codes come in increasing order, so keeping the earlier code on
    # equality keeps the first index.
    best_d = tl.full((BLOCK_N, BLOCK_K), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
    if not SMALL:
        if D <= BLOCK_D:  # z's tile stays on chip for the whole codebook
            z_tile = tl.load(
                z_ptr + z_off[:, None] + ds[None, :] * stride_zd,
                mask=row_mask[:, None] & (ds[None, :] < D),
                other=0.0,
            )
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + cols
        k_mask = ks < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if SMALL:
            for d in tl.static_range(D):
                z_d = tl.load(z_ptr + z_off + d * stride_zd, mask=row_mask, other=0.0).to(tl.float32)
                c_d = tl.load(codebook.transposed + d * K + ks, mask=k_mask, other=0.0)
                acc += z_d[:, None] * c_d[None, :]
        elif D <= BLOCK_D:
            c_tile = tl.load(
                codebook.codes + ks[None, :] * codebook.stride_k + ds[:, None] * codebook.stride_d,
                mask=k_mask[None, :] & (ds[:, None] < D),
                other=0.0,
            )
            acc = dot(z_tile, c_tile, acc, PRECISION, INTERPRET)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + ds
                z_chunk = tl.load(
                    z_ptr + z_off[:, None] + dd[None, :] * stride_zd,
                    mask=row_mask[:, None] & (dd[None, :] < D),
                    other=0.0,
                )
                c_chunk = tl.load(
                    codebook.codes + ks[None, :] * codebook.stride_k + dd[:, None] * codebook.stride_d,
                    mask=k_mask[None, :] & (dd[:, None] < D),
                    other=0.0,
                )
                acc = dot(z_chunk, c_chunk, acc, PRECISION, INTERPRET)
        dist = tl.load(codebook.norms + ks, mask=k_mask, other=0.0)[None, :] - 2.0 * acc
        # Padding codes get +inf (not inf - 2 * (inf * 0) = NaN for a z holding inf): never below a
        # real code, and later in index on equality.
        dist = tl.where(k_mask[None, :], dist, float("inf"))
        take = (dist < best_d) | ((dist != dist) & (best_d == best_d))
        best_d = tl.where(take, dist, best_d)
        best_k = tl.where(take, ks[None, :], best_k)
    # Across lanes, torch.argmin's order: the first NaN, else the first minimum. Built-in min
    # reductions only (no NaN reaches them): a custom combine runs per element in the interpreter.
    nan = best_d != best_d
    no_code = 2147483647
    first_nan = tl.min(tl.where(nan, best_k, no_code), 1)
    best_d = tl.where(nan, float("inf"), best_d)
    least = tl.min(best_d, 1)
    first_least = tl.min(tl.where(best_d == least[:, None], best_k, no_code), 1)
    return tl.where(first_nan < no_code, first_nan, first_least)


# (BLOCK_N, BLOCK_K) tiles hold three float32/int32 values per element (distance, running minimum and
# its index): 16 to 32 elements per thread keep them in registers.
SEARCH_CONFIGS = [  # the first one also runs under the interpreter
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),  # batch-1 latents: more blocks
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@autotune(SEARCH_CONFIGS, key=["K", "D", "PRECISION"])
@triton.jit
def _nearest_code_kernel(
    z_ptr,
    out_ptr,
    N,  # rows
    K,  # codes
    rows,  # layout.RowShape of z's rows
    z_strides,  # layout.RowStrides of z
    codebook,  # Codebook
    D: tl.constexpr,
    SMALL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < N
    z_off = row_offsets(row, rows, z_strides)
    index = search(
        z_ptr, z_off, row_mask, z_strides.vector, codebook, K,
        D, SMALL, PRECISION, INTERPRET, BLOCK_N, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    tl.store(out_ptr + row, index.to(tl.int64), mask=row_mask)


def search_args(z: torch.Tensor, codebook: torch.Tensor) -> tuple[Codebook, dict]:
    """The :class:`Codebook` and the constexprs of the kernels that call :func:`search`."""
    d = codebook.shape[1]
    cb32 = codebook.float()
    norms = cb32.square().sum(1)  # the reference's expression: the same norms, bit for bit
    small = d <= SMALL_D
    transposed = cb32.t().contiguous() if small else norms  # FMAs read codes along K; tl.dot reads codes
    block_d = max(triton.next_power_of_2(d), 1) if small else min(max(triton.next_power_of_2(d), 16), 64)
    meta = dict(
        D=d,
        SMALL=small,
        PRECISION=dot_precision(z.dtype),
        INTERPRET=interpreting(),
        BLOCK_D=block_d,
    )
    return Codebook(codebook, transposed, norms, *codebook.stride()), meta


def unsupported_rows(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> str:
    """Why the search kernels cannot take z and codebook, or "" (also for vector_quantize). Checking z
    alone suffices: tensors made like z (``empty_like``, ``layout.memory_format``) merge where it does."""
    reason = unsupported_tensor("z", z) or unsupported_tensor("codebook", codebook)
    if not reason and z.numel() and layout.rows_along(dim, z) is None:
        reason = "z's dims other than dim do not merge into three in memory (it would need a copy)"
    return reason


def unsupported(inputs) -> str:
    return unsupported_rows(inputs.z, inputs.codebook, inputs.dim)


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    out = torch.empty(z.movedim(dim, -1).shape[:-1], dtype=torch.long, device=z.device)
    n = out.numel()
    if n == 0:
        return out
    rows, (z_strides,) = layout.rows_along(dim, z)
    codebook_args, meta = search_args(z, codebook)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _nearest_code_kernel[grid](z, out, n, codebook.shape[0], rows, z_strides, codebook_args, **meta)
    return out
