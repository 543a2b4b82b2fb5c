"""Codebook rows for given indices with the code dimension at ``dim`` (forward), and the scatter-add of
gradient rows into codes (backward): float32 atomics, or, when
``torch.are_deterministic_algorithms_enabled()``, a sorted segment sum in a fixed order.

Out-of-range indices: on CUDA the gather kernel's ``tl.device_assert`` fails (a device-side assertion,
as in torch's own indexing; the host never waits to check). The interpreter ignores device assertions,
so there the launcher checks the indices, which are CPU tensors then. Either way no load reads outside
the codebook."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast import layout
from vqfast.triton._common import Codes, interpreting, row_offsets, row_tile, unsupported_tensor

TILE = 2048  # elements per program of the row kernels
ROW_WARPS = 8  # 8 elements per thread: at 16, strided rows' 64-bit offsets took the vq backward to 254 registers
SEGMENT_ROWS = 64  # rows of one code summed per step by the segment sum


def tile(d: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_D)`` for rows of d elements: D whole up to 32 (no masked lanes for short codes),
    as many rows as fill the tile."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 32)
    return TILE // block_d, block_d


@triton.jit(debug=True)  # keeps the device assertion
def _gather_kernel(
    idx_ptr,
    out_ptr,
    N,  # rows: indices
    K,  # codes
    D,  # elements per code
    rows,  # layout.RowShape of the indices
    idx_strides,  # layout.RowStrides of the indices
    out_strides,  # layout.RowStrides of the output, its vector along dim
    codes,  # Codes
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, ds, row_mask, mask = row_tile(N, D, BLOCK_N, BLOCK_D)
    index = tl.load(idx_ptr + row_offsets(row, rows, idx_strides), mask=row_mask, other=0)
    valid = (index >= 0) & (index < K)
    tl.device_assert(valid | ~row_mask, "codebook_gather: indices out of range [0, num_codes)")
    mask = mask & valid[:, None]
    q = tl.load(codes.ptr + index[:, None] * codes.stride_k + ds[None, :] * codes.stride_d, mask=mask)
    out_off = row_offsets(row, rows, out_strides)
    tl.store(out_ptr + out_off[:, None] + ds[None, :] * out_strides.vector, q, mask=mask)


@triton.jit
def _scatter_add_kernel(
    src_ptr,
    idx_ptr,
    out_ptr,  # float32 (K, D) contiguous
    N,  # rows
    D,  # elements per row
    rows,  # layout.RowShape of the rows
    src_strides,  # layout.RowStrides of the source rows
    idx_strides,  # layout.RowStrides of their indices
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[idx[r]] += src[r]`` for every row r."""
    row, ds, row_mask, mask = row_tile(N, D, BLOCK_N, BLOCK_D)
    src_off = row_offsets(row, rows, src_strides)
    src = tl.load(src_ptr + src_off[:, None] + ds[None, :] * src_strides.vector, mask=mask).to(tl.float32)
    index = tl.load(idx_ptr + row_offsets(row, rows, idx_strides), mask=row_mask, other=0)
    tl.atomic_add(out_ptr + index[:, None] * D + ds[None, :], src, mask=mask)


@triton.jit
def _segment_sum_kernel(
    src_ptr,
    order_ptr,  # int64 row numbers sorted by code
    starts_ptr,  # int64 (K + 1,): code k's rows are order[starts[k]:starts[k + 1]]
    out_ptr,  # float32 (K, D) contiguous
    D,  # elements per row
    rows,  # layout.RowShape of the rows
    src_strides,  # layout.RowStrides of the source rows
    codes,  # Codes subtracted from each row, or None
    scale_ptr,  # float32 scalar multiplying each sum, or None
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (code k, D block): ``out[k] = scale * sum(src[r] - codes[k])`` over the rows r with
    code k, in the sorted order: the same order and the same sum every run."""
    k = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    start = tl.load(starts_ptr + k)
    end = tl.load(starts_ptr + k + 1)
    if codes is not None:
        code = tl.load(codes.ptr + k * codes.stride_k + ds * codes.stride_d, mask=d_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        r_mask = r < end
        mask = r_mask[:, None] & d_mask[None, :]
        row = tl.load(order_ptr + r, mask=r_mask, other=0)
        src_off = row_offsets(row, rows, src_strides)
        src = tl.load(src_ptr + src_off[:, None] + ds[None, :] * src_strides.vector, mask=mask, other=0.0)
        src = src.to(tl.float32)
        if codes is not None:
            src = tl.where(mask, src - code[None, :], 0.0)
        acc += src
    total = tl.sum(acc, 0)
    if scale_ptr is not None:
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
    """Deterministic float32 (K, D): per code, ``scale * sum(src_row - codebook[code])`` over the
    rows of src along ``dim`` with that code (``codebook`` and ``scale`` optional)."""
    d = src.shape[dim]
    out = torch.empty((num_codes, d), dtype=torch.float32, device=src.device)
    if d == 0 or num_codes == 0:
        return out
    sorted_indices, order = torch.sort(indices.reshape(-1), stable=True)
    starts = torch.searchsorted(sorted_indices, torch.arange(num_codes + 1, device=src.device))
    src, rows, (src_strides,) = _grad_rows(src, dim)
    block_d = tile(d)[1]
    _segment_sum_kernel[(num_codes, triton.cdiv(d, block_d))](
        src, order, starts, out, d, rows, src_strides, None if codebook is None else Codes.of(codebook), scale,
        BLOCK_N=SEGMENT_ROWS, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def _grad_rows(grad: torch.Tensor, dim: int, *others: torch.Tensor) -> tuple:
    """``(grad, RowShape, [RowStrides of grad, then of each of others])`` for a gradient along ``dim``
    whose rows are those of the same-shaped ``others`` (indices). Autograd picks the gradient's layout
    after ``unsupported`` had its say: one whose batch dims do not merge into three is read from a copy."""
    batch = [i for i in range(grad.dim()) if i != dim]
    sizes = [grad.shape[i] for i in batch]
    found = layout.row_layout(
        sizes, [[grad.stride(i) for i in batch], *(t.stride() for t in others)], [grad.stride(dim)] + [0] * len(others)
    )
    if found is None and not grad.is_contiguous():
        return _grad_rows(grad.contiguous(), dim, *others)
    if found is None:
        raise ValueError("indices whose dims do not merge into three reached the Triton kernels")
    return grad, *found


def _rows(indices: torch.Tensor, out: torch.Tensor, dim: int) -> tuple | None:
    """The indices and the output's vectors as flat rows (see :func:`vqfast.layout.row_layout`)."""
    out_batch = [out.stride(i) for i in range(out.dim()) if i != dim]
    return layout.row_layout(indices.shape, [indices.stride(), out_batch], [0, out.stride(dim)])


def unsupported(inputs) -> str:
    reason = unsupported_tensor("indices", inputs.indices) or unsupported_tensor("codebook", inputs.codebook)
    shape = list(inputs.indices.shape)
    shape.insert(inputs.dim, inputs.codebook.shape[1])
    if not reason and _rows(inputs.indices, torch.empty(shape, device="meta"), inputs.dim) is None:
        reason = "the indices' dims do not merge into three in memory (they would need a copy)"
    return reason


def forward(indices: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(indices.shape)
    shape.insert(dim, codebook.shape[1])
    out = codebook.new_empty(shape)
    n, (k, d) = indices.numel(), codebook.shape
    if out.numel() == 0:
        return out
    if interpreting() and not bool(((indices >= 0) & (indices < k)).all()):
        raise IndexError(f"indices must lie in [0, {k}) (the codebook's rows)")
    rows, (idx_strides, out_strides) = _rows(indices, out, dim)
    block_n, block_d = tile(d)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _gather_kernel[grid](
        indices, out, n, k, d, rows, idx_strides, out_strides, Codes.of(codebook), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=ROW_WARPS,
    )
    return out


def backward(grad: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
    d = grad.shape[dim]
    if torch.are_deterministic_algorithms_enabled():
        return segment_sum(grad, dim, indices, num_codes).to(grad.dtype)
    out = torch.zeros((num_codes, d), dtype=torch.float32, device=grad.device)
    n = indices.numel()
    if n and d:
        grad, rows, (grad_strides, idx_strides) = _grad_rows(grad, dim, indices)
        block_n, block_d = tile(d)
        grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
        _scatter_add_kernel[grid](
            grad, indices, out, n, d, rows, grad_strides, idx_strides, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=ROW_WARPS,
        )
    return out.to(grad.dtype)
