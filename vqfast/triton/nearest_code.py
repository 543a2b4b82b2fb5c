"""Nearest codebook row for every vector of z: one pass over z in its own layout (NCHW, channels_last,
(N, D) or any strides), the codebook streamed in tiles, a running (min, argmin) per row in registers,
never the N x K distance matrix.

Distances are ``||c||^2 - 2 <z, c>`` accumulated in float32, ties and NaN as :mod:`vqfast.ops.nearest_code`
states. The products go through ``tl.dot`` for every D, padded to its inner size of 16: tensor cores for
float16/bfloat16 (float32 accumulation, exact in the products), and for float32 either IEEE float32 FMAs
with both operands staged in shared memory (the default) or a tensor-core mode chosen with
:func:`set_search_precision`. (FMA outer products over D in registers spilled: Triton spreads codes, not
rows, over a warp, so each thread held many rows' z.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vqfast import layout
from vqfast.triton._common import autotune, dot, interpreting, multiprocessors, row_offsets, unsupported_tensor

# Search precisions for float32 vectors, and the relative error u to which each
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

    codes: torch.Tensor  # (K, D), the op's codebook in its own strides and dtype
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
    k_start,
    k_end,
    D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(distance, index)`` (float32, int32) of the nearest of codes [k_start, k_end) of a :class:`Codebook`
    for the BLOCK_N rows of z at offsets ``z_off`` (distance NaN where a NaN wins), by ``tl.dot`` of
    (codes, D) and (D, rows) tiles, D in chunks of BLOCK_D."""
    codes = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    # A running (distance, index) per row, merged with each tile's nearest: codes come in increasing
    # order, so keeping the earlier code on equality keeps the first index. (A running best per element
    # of the tile held two more tiles in registers: 255 with FMA dots.)
    best_d = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_N,), tl.int32)
    if D <= BLOCK_D:  # z's tile stays on chip for the whole codebook
        z_tile = tl.load(
            z_ptr + z_off[None, :] + ds[:, None] * stride_zd, mask=(ds[:, None] < D) & row_mask[None, :], other=0.0
        )
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + codes
        k_mask = ks < k_end
        acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        if D <= BLOCK_D:
            c_tile = tl.load(
                codebook.codes + ks[:, None] * codebook.stride_k + ds[None, :] * codebook.stride_d,
                mask=k_mask[:, None] & (ds[None, :] < D),
                other=0.0,
            )
            acc = dot(c_tile, z_tile, acc, PRECISION, INTERPRET)
        else:
            for d0 in tl.range(0, D, BLOCK_D, num_stages=1):  # pipelined, chunks in flight took D=40 to 255
                dd = d0 + ds
                c_chunk = tl.load(
                    codebook.codes + ks[:, None] * codebook.stride_k + dd[None, :] * codebook.stride_d,
                    mask=k_mask[:, None] & (dd[None, :] < D),
                    other=0.0,
                )
                z_chunk = tl.load(
                    z_ptr + z_off[None, :] + dd[:, None] * stride_zd,
                    mask=(dd[:, None] < D) & row_mask[None, :],
                    other=0.0,
                )
                acc = dot(c_chunk, z_chunk, acc, PRECISION, INTERPRET)
        dist = tl.load(codebook.norms + ks, mask=k_mask, other=0.0)[:, None] - 2.0 * acc
        # Padding codes get +inf (not inf - 2 * (inf * 0) = NaN for a z holding inf): never below a
        # real code, and later in index on equality.
        dist = tl.where(k_mask[:, None], dist, float("inf"))
        tile_d, tile_k = first_nearest(dist, ks)
        best_d, best_k = take_nearest(best_d, best_k, tile_d, tile_k)
    return best_d, best_k


@triton.jit
def first_nearest(dist, ks):
    """Per row of a (codes, rows) tile of distances to codes ``ks``: ``(distance, index)`` of the first NaN,
    else of the first minimum (torch.argmin's order). Built-in min reductions only (no NaN reaches them):
    a custom combine runs per element in the interpreter."""
    nan = dist != dist
    no_code = 2147483647
    first_nan = tl.min(tl.where(nan, ks[:, None], no_code), 0)
    dist = tl.where(nan, float("inf"), dist)
    least = tl.min(dist, 0)
    first_least = tl.min(tl.where(dist == least[None, :], ks[:, None], no_code), 0)
    found_nan = first_nan < no_code
    return tl.where(found_nan, float("nan"), least), tl.where(found_nan, first_nan, first_least)


@triton.jit
def take_nearest(best_d, best_k, dist, index):
    """The running ``(distance, index)`` after codes ``index`` at ``dist``, all after best_k in code order:
    a smaller distance, or the first NaN (torch.argmin's order)."""
    take = (dist < best_d) | ((dist != dist) & (best_d == best_d))
    return tl.where(take, dist, best_d), tl.where(take, index, best_k)


@triton.jit
def split_range(K, codes_per_split):
    """Codes [start, end) of this program's codebook split (program axis 1)."""
    start = tl.program_id(1) * codes_per_split
    return start, tl.minimum(start + codes_per_split, K)


@triton.jit
def _merge_kernel(
    dist_ptr,  # float32 (splits, N): each split's nearest distance
    part_ptr,  # int32 (splits, N): each split's nearest code
    out_ptr,  # int64 (N,) out
    N,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each row's nearest code over the splits, merged in split order (deterministic, first index)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = row < N
    best_d = tl.load(dist_ptr + row, mask=mask, other=0.0)
    best_k = tl.load(part_ptr + row, mask=mask, other=0)
    for split in tl.static_range(1, SPLITS):
        dist = tl.load(dist_ptr + split * N + row, mask=mask, other=0.0)
        best_d, best_k = take_nearest(best_d, best_k, dist, tl.load(part_ptr + split * N + row, mask=mask, other=0))
    tl.store(out_ptr + row, best_k.to(tl.int64), mask=mask)


# (BLOCK_K, BLOCK_N) tiles of float32 distances, 16 or 32 per thread. 8192-element tiles (64 x 128 and
# 128 x 64 on 8 warps) spilled in vector_quantize's float32 FMA dots at D = 256, where ptxas holds
# 256-thread programs to 128 registers.
SEARCH_CONFIGS = [  # the first one also runs under the interpreter
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),  # batch-1 latents: more blocks
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@autotune(SEARCH_CONFIGS, key=["K", "D", "PRECISION", "SPLIT"])
@triton.jit
def _nearest_code_kernel(
    z_ptr,
    out_ptr,  # int64 (N,) out; with SPLIT, int32 (splits, N) out: each split's nearest code
    dist_ptr,  # with SPLIT, float32 (splits, N) out: each split's nearest distance
    N,  # rows
    K,  # codes
    codes_per_split,  # codes searched by each program along axis 1
    rows,  # layout.RowShape of z's rows
    z_strides,  # layout.RowStrides of z
    codebook,  # Codebook
    D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    SPLIT: tl.constexpr,  # more than one split along axis 1
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row block, codebook split): the block's nearest code within the split."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < N
    z_off = row_offsets(row, rows, z_strides)
    k_start, k_end = split_range(K, codes_per_split)
    dist, index = search(
        z_ptr, z_off, row_mask, z_strides.vector, codebook, k_start, k_end,
        D, PRECISION, INTERPRET, BLOCK_N, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    if SPLIT:
        part = tl.program_id(1) * N + row
        tl.store(out_ptr + part, index, mask=row_mask)
        tl.store(dist_ptr + part, dist, mask=row_mask)
    else:
        tl.store(out_ptr + row, index.to(tl.int64), mask=row_mask)


MERGE_BLOCK = 256
SPLIT_ROWS = 64  # rows per program that the codebook split assumes: the configs' largest BLOCK_N
SPLIT_CODES = 64  # codes per split, at least (and a multiple of)


def codebook_splits(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """``(splits, codes_per_split)``: the codebook split so that n rows make about two waves of programs
    (a batch-1 latent has only a few row blocks), each split at least SPLIT_CODES codes."""
    wanted = triton.cdiv(2 * multiprocessors(device), triton.cdiv(n, SPLIT_ROWS))
    splits = max(1, min(wanted, triton.cdiv(k, SPLIT_CODES)))
    per_split = triton.cdiv(triton.cdiv(k, splits), SPLIT_CODES) * SPLIT_CODES
    return triton.cdiv(k, per_split), per_split


def search_args(z: torch.Tensor, codebook: torch.Tensor) -> tuple[Codebook, dict]:
    """The :class:`Codebook` and the constexprs of the kernels that call :func:`search`."""
    d = codebook.shape[1]
    norms = codebook.float().square().sum(1)  # the reference's expression: the same norms, bit for bit
    precision = dot_precision(z.dtype)
    # IEEE float32 dots are FMAs over register tiles of both operands: chunks of 32 reached 255 registers
    widest = 16 if precision == "ieee" else 64
    block_d = min(max(triton.next_power_of_2(d), 16), widest)
    meta = dict(D=d, PRECISION=precision, INTERPRET=interpreting(), BLOCK_D=block_d)
    return Codebook(codebook, norms, *codebook.stride()), meta


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
    if out.numel():
        nearest_rows(z, codebook, dim, out.view(-1))
    return out


def nearest_rows(z: torch.Tensor, codebook: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """Write the nearest code of each of z's rows along ``dim`` into ``out``, int64 (N,) contiguous: one
    launch, or, when the codebook is split, a search per split and their merge."""
    n, k = out.numel(), codebook.shape[0]
    rows, (z_strides,) = layout.rows_along(dim, z)
    codebook_args, meta = search_args(z, codebook)
    splits, per_split = codebook_splits(n, k, z.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    if splits == 1:
        _nearest_code_kernel[grid](z, out, None, n, k, per_split, rows, z_strides, codebook_args, **meta, SPLIT=False)
        return
    dist = torch.empty((splits, n), dtype=torch.float32, device=z.device)
    part = torch.empty((splits, n), dtype=torch.int32, device=z.device)
    _nearest_code_kernel[grid](z, part, dist, n, k, per_split, rows, z_strides, codebook_args, **meta, SPLIT=True)
    _merge_kernel[(triton.cdiv(n, MERGE_BLOCK),)](dist, part, out, n, SPLITS=splits, BLOCK=MERGE_BLOCK)
