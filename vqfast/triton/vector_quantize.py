"""diffusers' straight-through VectorQuantizer in one kernel: the nearest-code search of
:mod:`vqfast.triton.nearest_code`, then, for the same rows, the gather, ``z_q = z + (q - z)`` rounded
in z's dtype as PyTorch rounds it, written in z's layout, and the loss's partial sums. The backward
writes the input gradient and adds the codebook gradient with float32 atomics, or, when
``torch.are_deterministic_algorithms_enabled()``, with a sorted segment sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqfast.triton import autotune
from vqfast.triton.codebook_gather import segment_sum
from vqfast.triton.nearest_code import SEARCH_CONFIGS, round_to, row_layout, row_offsets, search, search_args

BLOCK_N = 64  # backward tiles
BLOCK_D = 32


@autotune(SEARCH_CONFIGS, key=["K", "D", "PRECISION"])
@triton.jit
def _forward_kernel(
    z_ptr, zq_ptr, idx_ptr, partial_ptr, cb_ptr, cbt_ptr, cnorm_ptr, N, K, size1, size2, stride0, stride1, stride2,
    stride_zd, stride_ck, stride_cd, q_stride0, q_stride1, q_stride2, q_stride_d, D: tl.constexpr,
    SMALL: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows of z: nearest code, z_q and the sum of (q - z)^2 over the block to ``partial``."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z_off = row_offsets(rows, size1, size2, stride0, stride1, stride2)
    index = search(
        z_ptr, z_off, row_mask, stride_zd, cb_ptr, stride_ck, stride_cd, cbt_ptr, cnorm_ptr, K,
        D, SMALL, PRECISION, INTERPRET, BLOCK_N, BLOCK_K, BLOCK_D,
    ).to(tl.int64)  # fmt: skip
    tl.store(idx_ptr + rows, index, mask=row_mask)
    zq_off = row_offsets(rows, size1, size2, q_stride0, q_stride1, q_stride2)
    squares = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):  # z's rows come back from L1/L2, just read by the search
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < D)[None, :]
        z = tl.load(z_ptr + z_off[:, None] + ds[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(cb_ptr + index[:, None] * stride_ck + ds[None, :] * stride_cd, mask=mask, other=0.0)
        q = q.to(tl.float32)
        # PyTorch rounds q - z to z's dtype, then z + (q - z).
        step = round_to(q - z, zq_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        z_q = round_to(z + step, zq_ptr.dtype.element_ty, INTERPRET)
        tl.store(zq_ptr + zq_off[:, None] + ds[None, :] * q_stride_d, z_q, mask=mask)
        squares += (q - z) * (q - z)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(squares, 1), 0))


@triton.jit
def _backward_kernel(
    gzq_ptr, z_ptr, gz_ptr, cb_ptr, idx_ptr, coef_ptr, gcb_ptr, N, D, w_z, w_q, size1, size2,
    gzq_stride0, gzq_stride1, gzq_stride2, gzq_stride_d, z_stride0, z_stride1, z_stride2, z_stride_d,
    gz_stride0, gz_stride1, gz_stride2, gz_stride_d, stride_ck, stride_cd, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``grad_z = grad_z_q + w_z * coef * (z - q)``; with ATOMIC, ``grad_cb[k] += -w_q * coef * (z - q)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (ds < D)[None, :]
    index = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    z_off = row_offsets(rows, size1, size2, z_stride0, z_stride1, z_stride2)
    z = tl.load(z_ptr + z_off[:, None] + ds[None, :] * z_stride_d, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(cb_ptr + index[:, None] * stride_ck + ds[None, :] * stride_cd, mask=mask, other=0.0)
    diff = (z - q.to(tl.float32)) * tl.load(coef_ptr)
    gzq_off = row_offsets(rows, size1, size2, gzq_stride0, gzq_stride1, gzq_stride2)
    gzq = tl.load(gzq_ptr + gzq_off[:, None] + ds[None, :] * gzq_stride_d, mask=mask, other=0.0)
    gz_off = row_offsets(rows, size1, size2, gz_stride0, gz_stride1, gz_stride2)
    gz = gzq.to(tl.float32) + w_z * diff
    tl.store(gz_ptr + gz_off[:, None] + ds[None, :] * gz_stride_d, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if ATOMIC:
        tl.atomic_add(gcb_ptr + index[:, None] * D + ds[None, :], -w_q * diff, mask=mask)


def _loss_weights(beta: float, legacy: bool) -> tuple[float, float]:
    """Weights of the (z-term, codebook-term) of the loss: legacy puts beta on the codebook term."""
    return (1.0, beta) if legacy else (beta, 1.0)


def forward(z: Tensor, codebook: Tensor, beta: float, legacy: bool, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    z_q = torch.empty_like(z)
    layout = row_layout(dim, z, z_q)
    if layout is None:  # rank 5 or more with unmergeable strides: through a contiguous copy
        z_q_contiguous, loss, indices = forward(z.contiguous(), codebook, beta, legacy, dim)
        return z_q.copy_(z_q_contiguous), loss, indices
    n = z.movedim(dim, -1).shape[:-1].numel()
    indices = torch.empty(n, dtype=torch.long, device=z.device)
    # One partial sum per program; the block size is the autotuner's, so room for the smallest.
    programs = triton.cdiv(n, min(config.kwargs["BLOCK_N"] for config in SEARCH_CONFIGS))
    partial = torch.zeros(programs, dtype=torch.float32, device=z.device)
    if n:
        (cb, cbt, cnorm, k, stride_ck, stride_cd), meta = search_args(z, codebook)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _forward_kernel[grid](
            z, z_q, indices, partial, cb, cbt, cnorm, n, k, *layout[:6], stride_ck, stride_cd, *layout[6:], **meta
        )
    mse = partial.sum() / z.numel()  # NaN for an empty batch, as diffusers' torch.mean
    w_z, w_q = _loss_weights(beta, legacy)
    return z_q, (w_z * mse + w_q * mse).to(z.dtype), indices


def backward(
    grad_z_q: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebook: Tensor,
    indices: Tensor,
    beta: float,
    legacy: bool,
    dim: int,
) -> tuple[Tensor, Tensor]:
    grad_z = torch.empty_like(z)
    layout = row_layout(dim, grad_z_q, z, grad_z)
    if layout is None:  # rank 5 or more with unmergeable strides: through contiguous copies
        args = grad_z_q.contiguous(), grad_loss, z.contiguous(), codebook, indices, beta, legacy, dim
        grad_z_contiguous, grad_codebook = backward(*args)
        return grad_z.copy_(grad_z_contiguous), grad_codebook
    w_z, w_q = _loss_weights(beta, legacy)
    coef = 2 * grad_loss.float() / z.numel()  # d mean((q - z)^2) / dz = 2 (z - q) / numel
    deterministic = torch.are_deterministic_algorithms_enabled()
    k, d = codebook.shape
    grad_codebook = torch.zeros((k, d), dtype=torch.float32, device=z.device)
    n = indices.numel()
    if n and d:
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d, BLOCK_D))
        _backward_kernel[grid](
            grad_z_q, z, grad_z, codebook, indices, coef, grad_codebook, n, d, w_z, w_q, *layout,
            *codebook.stride(), ATOMIC=not deterministic, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )  # fmt: skip
        if deterministic:
            grad_codebook = segment_sum(z, dim % z.dim(), indices, k, codebook, -w_q * coef)
    return grad_z, grad_codebook.to(codebook.dtype)
