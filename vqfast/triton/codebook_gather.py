"""Codebook rows for given indices with the code dimension at ``dim`` (forward), and the scatter-add of
gradient rows into codes (backward): float32 atomics, or, when
``torch.are_deterministic_algorithms_enabled()``, a sorted segment sum in a fixed order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.triton.nearest_code import input_rows, row_layout, row_offsets

BLOCK_N = 64
BLOCK_D = 32


@triton.jit
def _gather_kernel(
    idx_ptr, cb_ptr, out_ptr, N, D, size1, size2, stride0, stride1, stride2, stride_od, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (ds < D)[None, :]
    index = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    q = tl.load(cb_ptr + index[:, None] * stride_ck + ds[None, :] * stride_cd, mask=mask)
    out_off = row_offsets(rows, size1, size2, stride0, stride1, stride2)
    tl.store(out_ptr + out_off[:, None] + ds[None, :] * stride_od, q, mask=mask)


@triton.jit
def _scatter_add_kernel(
    src_ptr, idx_ptr, out_ptr, N, D, size1, size2, stride0, stride1, stride2, stride_d,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[idx[r]] += src[r]`` for every row r, into a float32 (K, D) ``out``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (ds < D)[None, :]
    src_off = row_offsets(rows, size1, size2, stride0, stride1, stride2)
    src = tl.load(src_ptr + src_off[:, None] + ds[None, :] * stride_d, mask=mask).to(tl.float32)
    index = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    tl.atomic_add(out_ptr + index[:, None] * D + ds[None, :], src, mask=mask)


@triton.jit
def _segment_sum_kernel(
    src_ptr, order_ptr, starts_ptr, cb_ptr, scale_ptr, out_ptr, D, size1, size2, stride0, stride1, stride2,
    stride_d, stride_ck, stride_cd, SUBTRACT_CODE: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (code k, D block): ``out[k] = scale * sum(src[r] - (codebook[k] if SUBTRACT_CODE))`` over
    the rows r with code k, taken in the sorted ``order`` from ``starts[k]`` to ``starts[k + 1]``: the
    same order and the same sum every run."""
    k = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    start = tl.load(starts_ptr + k)
    end = tl.load(starts_ptr + k + 1)
    if SUBTRACT_CODE:
        code = tl.load(cb_ptr + k * stride_ck + ds * stride_cd, mask=d_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        r_mask = r < end
        mask = r_mask[:, None] & d_mask[None, :]
        rows = tl.load(order_ptr + r, mask=r_mask, other=0)
        src_off = row_offsets(rows, size1, size2, stride0, stride1, stride2)
        src = tl.load(src_ptr + src_off[:, None] + ds[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        if SUBTRACT_CODE:
            src = tl.where(mask, src - code[None, :], 0.0)
        acc += src
    total = tl.sum(acc, 0)
    if SCALED:
        total = total * tl.load(scale_ptr)
    tl.store(out_ptr + k * D + ds, total, mask=d_mask)


def segment_sum(
    src: torch.Tensor,
    dim: int,
    indices: torch.Tensor,
    num_codes: int,
    codebook: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic float32 (K, D): per code, ``scale * sum(src_row - codebook[code])`` over src's rows
    along ``dim`` (``codebook`` and ``scale`` optional)."""
    d = src.shape[dim]
    out = torch.empty((num_codes, d), dtype=torch.float32, device=src.device)
    if d == 0 or num_codes == 0:
        return out
    sorted_indices, order = torch.sort(indices.reshape(-1), stable=True)
    starts = torch.searchsorted(sorted_indices, torch.arange(num_codes + 1, device=src.device))
    src, layout = input_rows(src, dim)
    cb_args = [src, 0, 0] if codebook is None else [codebook, *codebook.stride()]
    _segment_sum_kernel[(num_codes, triton.cdiv(d, BLOCK_D))](
        src, order, starts, cb_args[0], src if scale is None else scale, out, d, *layout, *cb_args[1:],
        SUBTRACT_CODE=codebook is not None, SCALED=scale is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def forward(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(indices.shape)
    shape.insert(dim, codebook.shape[1])
    out = codebook.new_empty(shape)
    n, d = indices.numel(), codebook.shape[1]
    if out.numel() == 0:
        return out
    idx = indices.reshape(-1)  # a copy only for strided indices, 1/D of the output
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d, BLOCK_D))
    _gather_kernel[grid](
        idx, codebook, out, n, d, *row_layout(dim, out), *codebook.stride(),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def backward(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
    d = grad.shape[dim]
    if torch.are_deterministic_algorithms_enabled():
        out = segment_sum(grad, dim, indices, num_codes)
        return out.to(grad.dtype)
    out = torch.zeros((num_codes, d), dtype=torch.float32, device=grad.device)
    n = indices.numel()
    if n and d:
        grad, layout = input_rows(grad, dim)
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d, BLOCK_D))
        _scatter_add_kernel[grid](
            grad, indices.reshape(-1), out, n, d, *layout,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out.to(grad.dtype)
