"""Nearest codebook row for every vector of z: one pass over z in its own layout (NCHW, channels_last,
(N, D) or any strides), the codebook streamed in tiles, a running (min, argmin) per row in registers,
never the N x K distance matrix.

Distances are ``||c||^2 - 2 <z, c>`` accumulated in float32 (the reference's rule, non-finite input
included): NaN counts as the minimum and ties go to the lowest index, as ``torch.argmin``. Vectors of up
to ``SMALL_D`` elements go through FMAs on the CUDA cores; longer ones through ``tl.dot``, whose float32
accumulation of float16/bfloat16 products is exact in the products; float32 input uses IEEE float32
unless a tensor-core mode is chosen with :func:`set_search_precision`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from vqfast.triton import autotune, interpreting

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


def row_layout(dim: int, *tensors: torch.Tensor) -> list[int] | None:
    """``[size1, size2]``, then per tensor ``[stride0, stride1, stride2, stride_d]``: the vectors along
    ``dim`` of same-shaped tensors as flat rows, in the order of ``t.movedim(dim, -1)``, for
    ``row_offsets``. The other dims are merged where every tensor's memory allows; None when more than
    three remain (a rank-5 or larger tensor with unmergeable strides)."""
    merged: list[list[int]] = []  # [size, stride in each tensor]
    for i, size in enumerate(tensors[0].shape):
        if i == dim or size == 1:
            continue
        strides = [t.stride(i) for t in tensors]
        if merged and all(outer == size * inner for outer, inner in zip(merged[-1][1:], strides)):
            merged[-1] = [merged[-1][0] * size, *strides]
        else:
            merged.append([size, *strides])
    if len(merged) > 3:
        return None
    merged = [[1] + [0] * len(tensors)] * (3 - len(merged)) + merged
    layout = [merged[1][0], merged[2][0]]
    for j, t in enumerate(tensors, start=1):
        layout += [merged[0][j], merged[1][j], merged[2][j], t.stride(dim)]
    return layout


def input_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, list[int]]:
    """An input tensor and its ``row_layout``: t itself, or a contiguous copy where it has none."""
    layout = row_layout(dim, t)
    if layout is None:
        t = t.contiguous()
        layout = row_layout(dim, t)
    return t, layout


@triton.jit
def row_offsets(rows, size1, size2, stride0, stride1, stride2):
    """Memory offsets of flat row indices over three batch dims of arbitrary strides."""
    rest = rows // size2
    return (rest // size1) * stride0 + (rest % size1) * stride1 + (rows % size2) * stride2


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
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` accumulated in float32."""
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
def search(
    z_ptr,
    z_off,
    row_mask,
    stride_zd,
    cb_ptr,
    stride_ck,
    stride_cd,
    cbt_ptr,
    cnorm_ptr,
    K,
    D: tl.constexpr,
    SMALL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Index (int32) of the nearest code for the BLOCK_N rows of z at offsets ``z_off``.

    SMALL: FMAs over the float32 transposed codebook ``cbt`` (D, K); else ``tl.dot`` over D in chunks
    of BLOCK_D on the codebook itself. ``cnorm`` holds the float32 squared norms of the codes."""
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
        dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if SMALL:
            for d in tl.static_range(D):
                z_d = tl.load(z_ptr + z_off + d * stride_zd, mask=row_mask, other=0.0).to(tl.float32)
                c_d = tl.load(cbt_ptr + d * K + ks, mask=k_mask, other=0.0)
                dot += z_d[:, None] * c_d[None, :]
        elif D <= BLOCK_D:
            c_tile = tl.load(
                cb_ptr + ks[None, :] * stride_ck + ds[:, None] * stride_cd,
                mask=k_mask[None, :] & (ds[:, None] < D),
                other=0.0,
            )
            dot = _dot(z_tile, c_tile, dot, PRECISION, INTERPRET)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + ds
                z_chunk = tl.load(
                    z_ptr + z_off[:, None] + dd[None, :] * stride_zd,
                    mask=row_mask[:, None] & (dd[None, :] < D),
                    other=0.0,
                )
                c_chunk = tl.load(
                    cb_ptr + ks[None, :] * stride_ck + dd[:, None] * stride_cd,
                    mask=k_mask[None, :] & (dd[:, None] < D),
                    other=0.0,
                )
                dot = _dot(z_chunk, c_chunk, dot, PRECISION, INTERPRET)
        dist = tl.load(cnorm_ptr + ks, mask=k_mask, other=0.0)[None, :] - 2.0 * dot
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
    cb_ptr,
    cbt_ptr,
    cnorm_ptr,
    out_ptr,
    N,
    K,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    stride_zd,
    stride_ck,
    stride_cd,
    D: tl.constexpr,
    SMALL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z_off = row_offsets(rows, size1, size2, stride0, stride1, stride2)
    index = search(
        z_ptr, z_off, row_mask, stride_zd, cb_ptr, stride_ck, stride_cd, cbt_ptr, cnorm_ptr, K,
        D, SMALL, PRECISION, INTERPRET, BLOCK_N, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    tl.store(out_ptr + rows, index.to(tl.int64), mask=row_mask)


def search_args(z: torch.Tensor, codebook: torch.Tensor) -> tuple[list, dict]:
    """Launch arguments shared by the kernels that call :func:`search`: ``[codebook, cbt, cnorm, K,
    stride_ck, stride_cd]`` and the constexprs."""
    k, d = codebook.shape
    cb32 = codebook.float()
    cnorm = cb32.square().sum(1)  # the reference's expression: the same norms, bit for bit
    small = d <= SMALL_D
    cbt = cb32.t().contiguous() if small else cnorm  # FMAs read codes along K; tl.dot reads codebook
    args = [codebook, cbt, cnorm, k, *codebook.stride()]
    block_d = max(triton.next_power_of_2(d), 1) if small else min(max(triton.next_power_of_2(d), 16), 64)
    meta = dict(
        D=d,
        SMALL=small,
        PRECISION=dot_precision(z.dtype),
        INTERPRET=interpreting(),
        BLOCK_D=block_d,
    )
    return args, meta


def forward(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    out = torch.empty(z.movedim(dim, -1).shape[:-1], dtype=torch.long, device=z.device)
    n = out.numel()
    if n == 0:
        return out
    z, layout = input_rows(z, dim)
    (cb, cbt, cnorm, k, stride_ck, stride_cd), meta = search_args(z, codebook)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _nearest_code_kernel[grid](z, cb, cbt, cnorm, out, n, k, *layout, stride_ck, stride_cd, **meta)
    return out
