"""``act(group_norm(x) * weight + bias)``, and MoVQ's SpatialNorm variant
``act((group_norm(f) * weight + bias) * up(scale) + up(shift))``, forward and backward.

A group that fits on chip (``FUSED_MAX`` elements) is read once by one program. A larger one is split
over several programs along its spatial extent, so that a batch of one still fills the GPU: a first
kernel writes per-chunk statistics, a second combines them and writes its chunk (two reads of x, one
write). Tensors are read and written in their own strides (NCHW, channels_last or any other: spatial
dims are merged where memory allows), statistics are float32, and the backward recomputes the
activation from x, mean and rstd rather than saving anything. ``up`` is nearest upsampling by source
tables built with ``F.interpolate`` itself, so it picks exactly PyTorch's source pixels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FUSED_MAX = 4096  # elements of a group (padded to powers of two) that one program holds
TILE = 2048  # elements per tile when a group is streamed in chunks
Tensor = torch.Tensor


def _target_programs(device: torch.device) -> int:
    """How many programs a split launch aims for: a few waves of the GPU."""
    if device.type != "cuda":
        return 8  # the interpreter runs programs one by one
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _layout(t: Tensor) -> list[int] | None:
    """``[stride_n, stride_c, size2, stride1, stride2]`` for (N, C, *spatial) t: spatial index s lies at
    ``(s // size2) * stride1 + (s % size2) * stride2``; None when the spatial dims do not merge into two."""
    merged: list[list[int]] = []
    for size, stride in zip(t.shape[2:], t.stride()[2:]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    merged = [[1, 0]] * (2 - len(merged)) + merged
    return [t.stride(0), t.stride(1), merged[1][0], merged[0][1], merged[1][1]]


def _strides5(t: Tensor) -> list[int]:
    """``[stride_n, stride_c, stride0, stride1, stride2]`` with the spatial dims padded to three."""
    return [t.stride(0), t.stride(1), *[0] * (5 - t.dim()), *t.stride()[2:]]


@functools.lru_cache(maxsize=64)
def _sources(small: tuple[int, ...], big: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For each of three spatial dims, the index along ``small`` that nearest upsampling to ``big``
    copies from, concatenated (int32): a model meets a handful of sizes, so they are kept."""
    tables = []
    for low, high in zip(small, big):
        source = torch.arange(low, dtype=torch.float32, device=device)[None, None]
        tables.append(F.interpolate(source, size=high, mode="nearest").view(-1))
    return torch.cat(tables).to(torch.int32)


def _spatial_args(f: Tensor, scale: Tensor | None, shift: Tensor | None) -> tuple[list, list[int]]:
    """The SpatialNorm arguments of the kernels (placeholders for the plain group norm): scale, the
    source table and shift (of scale's shape) with their strides; and f's three (padded) spatial sizes."""
    if scale is None:
        return [f, f, 0, 0, 0, 0, 0, f, 0, 0, 0, 0, 0], [1, 1, 1]
    if f.dim() > 5:
        raise NotImplementedError(f"spatial_norm_act takes at most 3 spatial dims, got f of shape {tuple(f.shape)}")
    pad = [1] * (5 - f.dim())
    sizes = pad + list(f.shape[2:])
    table = _sources(tuple(pad + list(scale.shape[2:])), tuple(sizes), f.device)
    return [scale, table, *_strides5(scale), shift, *_strides5(shift)], sizes


@triton.jit
def _offsets(n, c, s, stride_n, stride_c, size2, stride1, stride2, SIMPLE: tl.constexpr):
    """Offsets of the (channel, spatial) tile ``c`` x ``s`` of sample n."""
    if SIMPLE:  # one spatial dim: keeps contiguity visible to the compiler
        sp = s.to(tl.int64) * stride2
    else:
        sp = (s // size2).to(tl.int64) * stride1 + (s % size2).to(tl.int64) * stride2
    return n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + sp[None, :]


@triton.jit
def _up_offsets(n, c, s, s_mask, src, stride_n, stride_c, stride0, stride1, stride2, F0, F1, F2):
    """Offsets into a low-resolution map of the pixels that nearest upsampling copies to ``s``."""
    i2 = s % F2
    rest = s // F2
    j0 = tl.load(src + rest // F1, mask=s_mask, other=0).to(tl.int64)
    j1 = tl.load(src + F0 + rest % F1, mask=s_mask, other=0).to(tl.int64)
    j2 = tl.load(src + F0 + F1 + i2, mask=s_mask, other=0).to(tl.int64)
    sp = j0 * stride0 + j1 * stride1 + j2 * stride2
    return n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + sp[None, :]


@triton.jit
def _channel_vector(ptr, c, c_mask, HAS: tl.constexpr, default: tl.constexpr):
    if HAS:
        v = tl.load(ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        v = tl.full(c.shape, default, tl.float32)
    return v[:, None]


@triton.jit
def _activate(y, SILU: tl.constexpr):
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _activation_grad(g, y, SILU: tl.constexpr):
    """``g * act'(y)``."""
    if SILU:
        sig = tl.sigmoid(y)
        g = g * sig * (1.0 + y * (1.0 - sig))
    return g


@triton.jit
def _write_output(
    x_hat, n, c, s, c_mask, s_mask, y_ptr, y_sn, y_sc, y_s2, y_st1, y_st2, w_ptr, b_ptr,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr,
):  # fmt: skip
    mask = c_mask[:, None] & s_mask[None, :]
    y = x_hat * _channel_vector(w_ptr, c, c_mask, HAS_W, 1.0) + _channel_vector(b_ptr, c, c_mask, HAS_B, 0.0)
    if SPATIAL:
        sc_off = _up_offsets(n, c, s, s_mask, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, F0, F1, F2)
        sh_off = _up_offsets(n, c, s, s_mask, up_src, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2, F0, F1, F2)
        y = y * tl.load(sc_ptr + sc_off, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.load(sh_ptr + sh_off, mask=mask, other=0.0).to(tl.float32)
    y = _activate(y, SILU)
    y_off = _offsets(n, c, s, y_sn, y_sc, y_s2, y_st1, y_st2, SIMPLE)
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_terms(
    x, g, mask, mean, rstd, n, c, s, c_mask, s_mask, w_ptr, b_ptr,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    gsc_ptr, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, gsh_ptr, gsh_sn, gsh_sc, gsh_s0, gsh_s1, gsh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    ADD_UP_GRADS: tl.constexpr,
):  # fmt: skip
    """``(x_hat, g_affine, g_hat)``: the normalized input and the gradients at the affine's output and
    input, the activation recomputed; with ADD_UP_GRADS the SpatialNorm variant also adds into the
    scale and shift gradients."""
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    w = _channel_vector(w_ptr, c, c_mask, HAS_W, 1.0)
    norm = x_hat * w + _channel_vector(b_ptr, c, c_mask, HAS_B, 0.0)
    if SPATIAL:
        sc_off = _up_offsets(n, c, s, s_mask, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, F0, F1, F2)
        sh_off = _up_offsets(n, c, s, s_mask, up_src, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2, F0, F1, F2)
        up_scale = tl.load(sc_ptr + sc_off, mask=mask, other=0.0).to(tl.float32)
        g_pre = _activation_grad(g, norm * up_scale + tl.load(sh_ptr + sh_off, mask=mask, other=0.0), SILU)
        if ADD_UP_GRADS:  # many pixels share a low-resolution source: atomics, in no fixed order
            gsc_off = _up_offsets(n, c, s, s_mask, up_src, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, F0, F1, F2)
            gsh_off = _up_offsets(n, c, s, s_mask, up_src, gsh_sn, gsh_sc, gsh_s0, gsh_s1, gsh_s2, F0, F1, F2)
            tl.atomic_add(gsc_ptr + gsc_off, g_pre * norm, mask=mask)
            tl.atomic_add(gsh_ptr + gsh_off, g_pre, mask=mask)
        g_affine = g_pre * up_scale
    else:
        g_affine = _activation_grad(g, norm, SILU)
    g_affine = tl.where(mask, g_affine, 0.0)
    return x_hat, g_affine, g_affine * w


@triton.jit
def _forward_fused_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, G, CPG, HW, eps,
    x_sn, x_sc, x_s2, x_st1, x_st2, y_sn, y_sc, y_s2, y_st1, y_st2,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per (sample, group), the whole group in registers: one read, one write."""
    group = tl.program_id(0)
    n = group // G
    c = (group % G) * CPG + tl.arange(0, BLOCK_C)
    c_mask = tl.arange(0, BLOCK_C) < CPG
    s = tl.arange(0, BLOCK_S)
    s_mask = s < HW
    mask = c_mask[:, None] & s_mask[None, :]
    x_off = _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    count = CPG * HW
    mean = tl.sum(tl.sum(x, 1), 0) / count
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(tl.sum(centered * centered, 1), 0) / count + eps)
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)
    _write_output(
        centered * rstd, n, c, s, c_mask, s_mask, y_ptr, y_sn, y_sc, y_s2, y_st1, y_st2, w_ptr, b_ptr,
        sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
        F0, F1, F2, HAS_W, HAS_B, SPATIAL, SILU, SIMPLE,
    )  # fmt: skip


@triton.jit
def _forward_stats_kernel(
    x_ptr, partial_ptr, G, CPG, HW, CHUNK, x_sn, x_sc, x_s2, x_st1, x_st2,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Program (group, chunk): mean and sum of squared deviations of CHUNK spatial positions of the
    group, tiles merged with Chan's formula (no cancellation whatever the mean)."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    n = group // G
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        c_mask = c0 + tl.arange(0, BLOCK_C) < CPG
        c = (group % G) * CPG + c0 + tl.arange(0, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < end)[None, :]
            x_off = _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE)
            x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            tile_count = tl.sum(tl.sum(mask.to(tl.float32), 1), 0)
            tile_mean = tl.sum(tl.sum(x, 1), 0) / tile_count
            dev = tl.where(mask, x - tile_mean, 0.0)
            tile_m2 = tl.sum(tl.sum(dev * dev, 1), 0)
            total = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / total)
            m2 += tile_m2 + delta * delta * (count * tile_count / total)
            count = total
    out = partial_ptr + (group * tl.num_programs(1) + chunk) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _forward_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, partial_ptr, G, CPG, HW, CHUNK, eps,
    x_sn, x_sc, x_s2, x_st1, x_st2, y_sn, y_sc, y_s2, y_st1, y_st2,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (group, chunk): the group's statistics from all chunks' partials, then its chunk's output."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.num_programs(1)
    n = group // G
    parts = tl.arange(0, BLOCK_SPLIT)
    part_mask = parts < split
    part_mean = tl.load(partial_ptr + (group * split + parts) * 2, mask=part_mask, other=0.0)
    part_m2 = tl.load(partial_ptr + (group * split + parts) * 2 + 1, mask=part_mask, other=0.0)
    part_count = (tl.minimum((parts + 1) * CHUNK, HW) - parts * CHUNK).to(tl.float32) * CPG
    part_count = tl.where(part_mask, part_count, 0.0)
    count = tl.sum(part_count, 0)
    mean = tl.sum(part_count * part_mean, 0) / count
    delta = part_mean - mean
    rstd = tl.rsqrt((tl.sum(part_m2, 0) + tl.sum(part_count * delta * delta, 0)) / count + eps)
    if chunk == 0:
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for c0 in range(0, CPG, BLOCK_C):
        c_mask = c0 + tl.arange(0, BLOCK_C) < CPG
        c = (group % G) * CPG + c0 + tl.arange(0, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            x_off = _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE)
            x = tl.load(x_ptr + x_off, mask=c_mask[:, None] & s_mask[None, :], other=0.0).to(tl.float32)
            _write_output(
                (x - mean) * rstd, n, c, s, c_mask, s_mask, y_ptr, y_sn, y_sc, y_s2, y_st1, y_st2, w_ptr, b_ptr,
                sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1,
                sh_s2, F0, F1, F2, HAS_W, HAS_B, SPATIAL, SILU, SIMPLE,
            )  # fmt: skip


@triton.jit
def _backward_fused_kernel(
    g_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, channel_ptr, C, G, CPG, HW,
    g_sn, g_sc, g_s2, g_st1, g_st2, x_sn, x_sc, x_s2, x_st1, x_st2, dx_sn, dx_sc, dx_s2, dx_st1, dx_st2,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    gsc_ptr, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, gsh_ptr, gsh_sn, gsh_sc, gsh_s0, gsh_s1, gsh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per (sample, group), x and the gradient read once; per-channel sums of the weight and
    bias gradients go to ``channel`` (N, 1, 2, C) for a deterministic sum over the batch."""
    group = tl.program_id(0)
    n = group // G
    c = (group % G) * CPG + tl.arange(0, BLOCK_C)
    c_mask = tl.arange(0, BLOCK_C) < CPG
    s = tl.arange(0, BLOCK_S)
    s_mask = s < HW
    mask = c_mask[:, None] & s_mask[None, :]
    x = tl.load(x_ptr + _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE), mask=mask, other=0.0)
    g = tl.load(g_ptr + _offsets(n, c, s, g_sn, g_sc, g_s2, g_st1, g_st2, SIMPLE), mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + group)
    x_hat, g_affine, g_hat = _backward_terms(
        x.to(tl.float32), g.to(tl.float32), mask, tl.load(mean_ptr + group), rstd, n, c, s, c_mask, s_mask,
        w_ptr, b_ptr, sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0,
        sh_s1, sh_s2, gsc_ptr, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, gsh_ptr, gsh_sn, gsh_sc, gsh_s0, gsh_s1,
        gsh_s2, F0, F1, F2, HAS_W, HAS_B, SPATIAL, SILU, True,
    )  # fmt: skip
    count = CPG * HW
    mean_g = tl.sum(tl.sum(g_hat, 1), 0) / count
    mean_gx = tl.sum(tl.sum(g_hat * x_hat, 1), 0) / count
    dx = (g_hat - mean_g - x_hat * mean_gx) * rstd
    dx_off = _offsets(n, c, s, dx_sn, dx_sc, dx_s2, dx_st1, dx_st2, SIMPLE)
    tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    channel = channel_ptr + n.to(tl.int64) * 2 * C + c
    tl.store(channel, tl.sum(g_affine * x_hat, 1), mask=c_mask)
    tl.store(channel + C, tl.sum(g_affine, 1), mask=c_mask)


@triton.jit
def _backward_stats_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, partial_ptr, channel_ptr, C, G, CPG, HW, CHUNK,
    g_sn, g_sc, g_s2, g_st1, g_st2, x_sn, x_sc, x_s2, x_st1, x_st2,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    gsc_ptr, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, gsh_ptr, gsh_sn, gsh_sc, gsh_s0, gsh_s1, gsh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Program (group, chunk): the chunk's sums of g_hat and g_hat * x_hat to ``partial`` (G*N, split, 2),
    its per-channel weight and bias gradient sums to ``channel`` (N, split, 2, C)."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.num_programs(1)
    n = group // G
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    sum_g = 0.0
    sum_gx = 0.0
    channel = channel_ptr + (n.to(tl.int64) * split + chunk) * 2 * C
    for c0 in range(0, CPG, BLOCK_C):
        c_mask = c0 + tl.arange(0, BLOCK_C) < CPG
        c = (group % G) * CPG + c0 + tl.arange(0, BLOCK_C)
        channel_gx = tl.zeros((BLOCK_C,), tl.float32)
        channel_g = tl.zeros((BLOCK_C,), tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            mask = c_mask[:, None] & s_mask[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE), mask=mask, other=0.0)
            g = tl.load(g_ptr + _offsets(n, c, s, g_sn, g_sc, g_s2, g_st1, g_st2, SIMPLE), mask=mask, other=0.0)
            x_hat, g_affine, g_hat = _backward_terms(
                x.to(tl.float32), g.to(tl.float32), mask, mean, rstd, n, c, s, c_mask, s_mask, w_ptr, b_ptr,
                sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1,
                sh_s2, gsc_ptr, gsc_sn, gsc_sc, gsc_s0, gsc_s1, gsc_s2, gsh_ptr, gsh_sn, gsh_sc, gsh_s0,
                gsh_s1, gsh_s2, F0, F1, F2, HAS_W, HAS_B, SPATIAL, SILU, True,
            )  # fmt: skip
            sum_g += tl.sum(tl.sum(g_hat, 1), 0)
            sum_gx += tl.sum(tl.sum(g_hat * x_hat, 1), 0)
            channel_gx += tl.sum(g_affine * x_hat, 1)
            channel_g += tl.sum(g_affine, 1)
        tl.store(channel + c, channel_gx, mask=c_mask)
        tl.store(channel + C + c, channel_g, mask=c_mask)
    out = partial_ptr + (group * split + chunk) * 2
    tl.store(out, sum_g)
    tl.store(out + 1, sum_gx)


@triton.jit
def _backward_apply_kernel(
    g_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, partial_ptr, G, CPG, HW, CHUNK,
    g_sn, g_sc, g_s2, g_st1, g_st2, x_sn, x_sc, x_s2, x_st1, x_st2, dx_sn, dx_sc, dx_s2, dx_st1, dx_st2,
    sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1, sh_s2,
    F0, F1, F2, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPATIAL: tl.constexpr, SILU: tl.constexpr,
    SIMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (group, chunk): the input gradient of its chunk from the group's sums over all chunks."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.num_programs(1)
    n = group // G
    parts = tl.arange(0, BLOCK_SPLIT)
    part_mask = parts < split
    count = CPG * HW
    mean_g = tl.sum(tl.load(partial_ptr + (group * split + parts) * 2, mask=part_mask, other=0.0), 0) / count
    mean_gx = tl.sum(tl.load(partial_ptr + (group * split + parts) * 2 + 1, mask=part_mask, other=0.0), 0) / count
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for c0 in range(0, CPG, BLOCK_C):
        c_mask = c0 + tl.arange(0, BLOCK_C) < CPG
        c = (group % G) * CPG + c0 + tl.arange(0, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            mask = c_mask[:, None] & s_mask[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, x_sn, x_sc, x_s2, x_st1, x_st2, SIMPLE), mask=mask, other=0.0)
            g = tl.load(g_ptr + _offsets(n, c, s, g_sn, g_sc, g_s2, g_st1, g_st2, SIMPLE), mask=mask, other=0.0)
            # The stats kernel took the scale and shift gradients.
            x_hat, g_affine, g_hat = _backward_terms(
                x.to(tl.float32), g.to(tl.float32), mask, mean, rstd, n, c, s, c_mask, s_mask, w_ptr, b_ptr,
                sc_ptr, up_src, sc_sn, sc_sc, sc_s0, sc_s1, sc_s2, sh_ptr, sh_sn, sh_sc, sh_s0, sh_s1,
                sh_s2, sc_ptr, 0, 0, 0, 0, 0, sh_ptr, 0, 0, 0, 0, 0, F0, F1, F2, HAS_W, HAS_B, SPATIAL, SILU, False,
            )  # fmt: skip
            dx = (g_hat - mean_g - x_hat * mean_gx) * rstd
            dx_off = _offsets(n, c, s, dx_sn, dx_sc, dx_s2, dx_st1, dx_st2, SIMPLE)
            tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _Plan:
    """How a launch covers the groups: one program per group holding it whole (fused), or ``split``
    programs per group over chunks of ``chunk`` spatial positions, in tiles of BLOCK_C x BLOCK_S."""

    def __init__(self, x: torch.Tensor, layout: list[int], num_groups: int):
        n, c = x.shape[:2]
        cpg, hw = c // num_groups, math.prod(x.shape[2:])
        whole_c, whole_s = triton.next_power_of_2(cpg), triton.next_power_of_2(hw)
        self.fused = whole_c * whole_s <= FUSED_MAX
        if self.fused:
            self.block_c, self.block_s = whole_c, whole_s
        elif layout[1] < abs(layout[4]):  # channels nearer in memory (channels_last): whole channel runs
            self.block_c = min(whole_c, 64)
            self.block_s = min(whole_s, TILE // self.block_c)
        else:
            self.block_s = min(whole_s, TILE)
            self.block_c = min(whole_c, TILE // self.block_s)
        self.num_warps = min(8, max(1, self.block_c * self.block_s // 512))
        split = min(triton.cdiv(_target_programs(x.device), n * num_groups), triton.cdiv(hw, self.block_s))
        self.chunk = triton.cdiv(triton.cdiv(hw, max(split, 1)), self.block_s) * self.block_s
        self.split = 1 if self.fused else triton.cdiv(hw, self.chunk)
        self.meta = dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, num_warps=self.num_warps)


def run_forward(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)`` of ``group_norm_act`` (scale and shift None) or of ``spatial_norm_act``."""
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:  # the reference's statistics of empty groups
        return y, mean.zero_(), rstd.fill_(float("nan"))
    x_layout, y_layout = _layout(x), _layout(y)
    if x_layout is None or y_layout is None:  # 3+ spatial dims that do not merge: through a copy
        y_contiguous, mean, rstd = run_forward(x.contiguous(), num_groups, weight, bias, eps, activation, scale, shift)
        return y.copy_(y_contiguous), mean, rstd
    hw = math.prod(x.shape[2:])
    plan = _Plan(x, x_layout, num_groups)
    up, sizes = _spatial_args(x, scale, shift)
    flags = dict(
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        SPATIAL=scale is not None,
        SILU=activation == "silu",
        SIMPLE=x_layout[2] == hw and y_layout[2] == hw,
    )
    w = x if weight is None else weight
    b = x if bias is None else bias
    groups, cpg = n * num_groups, c // num_groups
    if plan.fused:
        _forward_fused_kernel[(groups,)](
            x, y, w, b, mean, rstd, num_groups, cpg, hw, eps, *x_layout, *y_layout, *up, *sizes, **flags, **plan.meta
        )
        return y, mean, rstd
    partial = torch.empty((groups, plan.split, 2), dtype=torch.float32, device=x.device)
    grid = (groups, plan.split)
    _forward_stats_kernel[grid](
        x, partial, num_groups, cpg, hw, plan.chunk, *x_layout, SIMPLE=flags["SIMPLE"], **plan.meta
    )
    _forward_apply_kernel[grid](
        x, y, w, b, mean, rstd, partial, num_groups, cpg, hw, plan.chunk, eps, *x_layout, *y_layout, *up, *sizes,
        **flags, **plan.meta, BLOCK_SPLIT=triton.next_power_of_2(plan.split),
    )  # fmt: skip
    return y, mean, rstd


def run_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    activation: str | None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Backward of ``group_norm_act``: ``(grad_x, grad_weight, grad_bias)``, the last two float32
    per-channel sums; for ``spatial_norm_act`` also ``grad_scale, grad_shift`` (after grad_x)."""
    n, c = x.shape[:2]
    num_groups = mean.shape[1]
    grad_x = torch.empty_like(x)
    x_layout, g_layout, dx_layout = _layout(x), _layout(grad), _layout(grad_x)
    if x.numel() and None in (x_layout, g_layout, dx_layout):  # 3+ spatial dims that do not merge: copies
        grads = run_backward(grad.contiguous(), x.contiguous(), weight, bias, mean, rstd, activation, scale, shift)
        return grad_x.copy_(grads[0]), *grads[1:]
    up_grads = [] if scale is None else [torch.zeros_like(t, dtype=torch.float32) for t in (scale, shift)]
    channel_sums = [torch.zeros(c, dtype=torch.float32, device=x.device) for _ in range(2)]
    if x.numel():
        hw = math.prod(x.shape[2:])
        plan = _Plan(x, x_layout, num_groups)
        up, sizes = _spatial_args(x, scale, shift)
        if up_grads:
            up_grad_args = [up_grads[0], *_strides5(up_grads[0]), up_grads[1], *_strides5(up_grads[1])]
        else:
            up_grad_args = [x, 0, 0, 0, 0, 0, x, 0, 0, 0, 0, 0]
        flags = dict(
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            SPATIAL=scale is not None,
            SILU=activation == "silu",
            SIMPLE=x_layout[2] == hw and g_layout[2] == hw and dx_layout[2] == hw,
        )
        w = x if weight is None else weight
        b = x if bias is None else bias
        mean, rstd = mean.contiguous(), rstd.contiguous()
        groups, cpg = n * num_groups, c // num_groups
        channel = torch.empty((n, plan.split, 2, c), dtype=torch.float32, device=x.device)
        if plan.fused:
            _backward_fused_kernel[(groups,)](
                grad, x, grad_x, w, b, mean, rstd, channel, c, num_groups, cpg, hw, *g_layout, *x_layout,
                *dx_layout, *up, *up_grad_args, *sizes, **flags, **plan.meta,
            )  # fmt: skip
        else:
            partial = torch.empty((groups, plan.split, 2), dtype=torch.float32, device=x.device)
            grid = (groups, plan.split)
            _backward_stats_kernel[grid](
                grad, x, w, b, mean, rstd, partial, channel, c, num_groups, cpg, hw, plan.chunk, *g_layout,
                *x_layout, *up, *up_grad_args, *sizes, **flags, **plan.meta,
            )  # fmt: skip
            _backward_apply_kernel[grid](
                grad, x, grad_x, w, b, mean, rstd, partial, num_groups, cpg, hw, plan.chunk, *g_layout, *x_layout,
                *dx_layout, *up, *sizes, **flags, **plan.meta, BLOCK_SPLIT=triton.next_power_of_2(plan.split),
            )  # fmt: skip
        # In a fixed order (deterministic), and into two tensors: a custom op's outputs may not alias.
        channel_sums = [channel[:, :, i].sum((0, 1)) for i in range(2)]
    grad_up = [t.to(s.dtype) for t, s in zip(up_grads, (scale, shift))]
    return grad_x, *grad_up, *channel_sums


def forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, activation: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    return run_forward(x, num_groups, weight, bias, eps, activation)


def backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return run_backward(grad, x, weight, bias, mean, rstd, activation)
