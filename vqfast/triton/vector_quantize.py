"""diffusers' straight-through VectorQuantizer in one kernel: the nearest-code search of
:mod:`vqfast.triton.nearest_code`, then, for the same rows, the gather, ``z_q = z + (q - z)`` rounded
in z's dtype as PyTorch rounds it, written in z's layout, and the loss's partial sums. The backward
writes the input gradient and adds the codebook gradient with float32 atomics, or, when
``torch.are_deterministic_algorithms_enabled()``, with a sorted segment sum.

``forward_stats`` (vector_quantize_stats) also counts each code's rows in the same kernel with int32
atomics (exact and order-free, so deterministic) and sums them with float32 atomics; when
``torch.are_deterministic_algorithms_enabled()`` the sums come from the sorted segment sum instead (the
codebook gradient's: a fixed order, the same bits every run)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqfast import layout
from vqfast.triton._common import Codes, autotune, round_to, row_offsets, row_tile
from vqfast.triton.codebook_gather import ROW_WARPS, segment_sum, tile
from vqfast.triton.nearest_code import (
    SEARCH_CONFIGS,
    codebook_splits,
    nearest_rows,
    search,
    search_args,
    unsupported_rows,
)


@autotune(SEARCH_CONFIGS, key=["K", "D", "PRECISION", "SEARCH"], reset_to_zero=["counts_ptr", "sums_ptr"])
@triton.jit
def _forward_kernel(
    z_ptr,
    zq_ptr,
    idx_ptr,  # int64 (N,): the nearest code of each row, out with SEARCH
    partial_ptr,  # float32 out: sum of (q - z)^2 over each program's rows
    counts_ptr,  # int32 (K,) zeroed, to count each code's rows into; or None
    sums_ptr,  # float32 (K, D) contiguous zeroed, to sum each code's rows into; or None
    N,  # rows
    K,  # codes
    rows,  # layout.RowShape of z's rows (z_q's are the same)
    z_strides,  # layout.RowStrides of z
    zq_strides,  # layout.RowStrides of z_q
    codebook,  # nearest_code.Codebook
    D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    SEARCH: tl.constexpr,  # search here; else read the codes (a split search found them)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows of z: nearest code, z_q and the sum of (q - z)^2 over the block; each code's rows counted
    and summed with atomics where counts_ptr and sums_ptr are given."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < N
    z_off = row_offsets(row, rows, z_strides)
    if SEARCH:
        _, index = search(
            z_ptr, z_off, row_mask, z_strides.vector, codebook, 0, K,
            D, PRECISION, INTERPRET, BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        index = index.to(tl.int64)
        tl.store(idx_ptr + row, index, mask=row_mask)
    else:
        index = tl.load(idx_ptr + row, mask=row_mask, other=0)
    if counts_ptr is not None:
        tl.atomic_add(counts_ptr + index, tl.full((BLOCK_N,), 1, tl.int32), mask=row_mask)
    zq_off = row_offsets(row, rows, zq_strides)
    squares = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):  # z's rows come back from L1/L2, just read by the search
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < D)[None, :]
        z = tl.load(z_ptr + z_off[:, None] + ds[None, :] * z_strides.vector, mask=mask, other=0.0).to(tl.float32)
        q_off = index[:, None] * codebook.stride_k + ds[None, :] * codebook.stride_d
        q = tl.load(codebook.codes + q_off, mask=mask, other=0.0).to(tl.float32)
        # PyTorch rounds q - z to z's dtype, then z + (q - z).
        step = round_to(q - z, zq_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        z_q = round_to(z + step, zq_ptr.dtype.element_ty, INTERPRET)
        tl.store(zq_ptr + zq_off[:, None] + ds[None, :] * zq_strides.vector, z_q, mask=mask)
        squares += (q - z) * (q - z)
        if sums_ptr is not None:
            tl.atomic_add(sums_ptr + index[:, None] * D + ds[None, :], z, mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(squares, 1), 0))


@triton.jit
def _backward_kernel(
    gzq_ptr,
    z_ptr,
    gz_ptr,  # out: grad_z
    idx_ptr,  # int64 (N,): each row's code
    coef_ptr,  # float32 scalar: 2 * grad_loss / z.numel()
    gcb_ptr,  # float32 (K, D) contiguous to add the codebook gradient into, or None
    N,  # rows
    D,  # elements per row
    w_z,  # loss weight of the z term
    w_q,  # loss weight of the codebook term
    rows,  # layout.RowShape of the rows (of all three tensors)
    gzq_strides,  # layout.RowStrides of grad_z_q
    z_strides,  # layout.RowStrides of z
    gz_strides,  # layout.RowStrides of grad_z
    codes,  # Codes
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``grad_z = grad_z_q + w_z * coef * (z - q)``; ``grad_cb[k] += -w_q * coef * (z - q)`` with atomics."""
    row, ds, row_mask, mask = row_tile(N, D, BLOCK_N, BLOCK_D)
    index = tl.load(idx_ptr + row, mask=row_mask, other=0)
    z_off = row_offsets(row, rows, z_strides)
    z = tl.load(z_ptr + z_off[:, None] + ds[None, :] * z_strides.vector, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(codes.ptr + index[:, None] * codes.stride_k + ds[None, :] * codes.stride_d, mask=mask, other=0.0)
    diff = (z - q.to(tl.float32)) * tl.load(coef_ptr)
    gzq_off = row_offsets(row, rows, gzq_strides)
    gzq = tl.load(gzq_ptr + gzq_off[:, None] + ds[None, :] * gzq_strides.vector, mask=mask, other=0.0)
    gz_off = row_offsets(row, rows, gz_strides)
    gz = gzq.to(tl.float32) + w_z * diff
    tl.store(gz_ptr + gz_off[:, None] + ds[None, :] * gz_strides.vector, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if gcb_ptr is not None:
        tl.atomic_add(gcb_ptr + index[:, None] * D + ds[None, :], -w_q * diff, mask=mask)


def unsupported(inputs) -> str:
    return unsupported_rows(inputs.z, inputs.codebook, inputs.dim)


def stats_unsupported(inputs) -> str:
    if inputs.z.numel() // max(inputs.z.shape[inputs.dim], 1) >= 2**31:
        return "the code counts are int32: fewer than 2**31 vectors"
    return unsupported(inputs)


def forward(z: Tensor, codebook: Tensor, w_z: float, w_q: float, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize(z, codebook, w_z, w_q, dim, None, None)


def forward_stats(
    z: Tensor, codebook: Tensor, w_z: float, w_q: float, dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    k, d = codebook.shape
    counts = torch.zeros(k, dtype=torch.int32, device=z.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    sums = torch.zeros((k, d), dtype=torch.float32, device=z.device)
    z_q, loss, indices = _quantize(z, codebook, w_z, w_q, dim, counts, None if deterministic else sums)
    if deterministic and indices.numel():
        sums = segment_sum(z, dim, indices, k)
    return z_q, loss, indices, counts.float(), sums


def _quantize(
    z: Tensor, codebook: Tensor, w_z: float, w_q: float, dim: int, counts: Tensor | None, sums: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """z_q, loss and indices; each code's rows counted into ``counts`` and summed into ``sums`` (zeroed)
    where they are given."""
    z_q = torch.empty_like(z)
    n = z.movedim(dim, -1).shape[:-1].numel()
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    # One partial sum per program; the block size is the autotuner's, so room for the smallest.
    programs = triton.cdiv(n, min(config.kwargs["BLOCK_N"] for config in SEARCH_CONFIGS))
    partial = torch.zeros(programs, dtype=torch.float32, device=z.device)
    if n:
        rows, (z_strides, zq_strides) = layout.rows_along(dim, z, z_q)
        codebook_args, meta = search_args(z, codebook)
        search_here = codebook_splits(n, codebook.shape[0], z.device)[0] == 1
        if not search_here:  # too few rows to fill the GPU: a split search first
            nearest_rows(z, codebook, dim, indices)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _forward_kernel[grid](
            z, z_q, indices, partial, counts, sums, n, codebook.shape[0], rows, z_strides, zq_strides, codebook_args,
            **meta, SEARCH=search_here,
        )  # fmt: skip
    mse = partial.sum() / z.numel()  # NaN for an empty z, as torch.mean
    return z_q, (w_z * mse + w_q * mse).to(z.dtype), indices


def backward(
    grad_z_q: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebook: Tensor,
    indices: Tensor,
    w_z: float,
    w_q: float,
    dim: int,
) -> tuple[Tensor, Tensor]:
    grad_z = torch.empty_like(z)
    coef = 2 * grad_loss.float() / z.numel()  # d mean((q - z)^2) / dz = 2 (z - q) / numel
    deterministic = torch.are_deterministic_algorithms_enabled()
    k, d = codebook.shape
    grad_codebook = torch.zeros((k, d), dtype=torch.float32, device=z.device)
    n = indices.numel()
    if n and d:
        rows, strides = layout.rows_along(dim, grad_z_q, z, grad_z)
        block_n, block_d = tile(d)
        grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
        _backward_kernel[grid](
            grad_z_q, z, grad_z, indices, coef, None if deterministic else grad_codebook, n, d, w_z, w_q, rows,
            *strides, Codes.of(codebook), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=ROW_WARPS,
        )  # fmt: skip
        if deterministic:
            grad_codebook = segment_sum(z, dim, indices, k, codebook, -w_q * coef)
    return grad_z, grad_codebook.to(codebook.dtype)
