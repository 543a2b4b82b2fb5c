"""``group_norm_act`` forward and backward: ``act((group_norm(x) * weight + bias) [* up(scale) +
up(shift)])``, the bracket for MoVQ's spatial variant, with ``up`` F.interpolate's nearest upsampling,
its source index computed per element from the sizes (the full-size maps never exist, and the lowering's
``source`` table holds the same indices: it is not read, which saves a global load per element).

A group that fits on chip (``FUSED_MAX`` elements) is read once by one program. A larger one is split
over several programs along its spatial extent, so that a batch of one still fills the GPU: a first
kernel writes per-chunk statistics, a second combines them and writes its chunk (two reads of x, one
write). Tensors are read and written in their own strides (NCHW, channels_last or any layout whose
spatial dims merge into two: :func:`vqfast.layout.norm_layout`), statistics are float32, and the
backward recomputes the activation from x, mean and rstd rather than saving anything.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vqfast import layout
from vqfast.triton._common import activate, activation_grad, unsupported_tensor

FUSED_MAX = 4096  # elements of a group (padded to powers of two) that one program holds
TILE = 2048  # elements per tile when a group is streamed in chunks
MIN_RUN = 128  # contiguous positions per channel row of an NCHW tile, at least: whole 512-byte runs


class NormShape(NamedTuple):
    """The sizes every group-norm kernel reads."""

    groups: int  # groups per sample
    group_channels: int  # channels per group
    positions: int  # spatial positions per channel
    inner: int  # size of the inner merged spatial dim (layout.norm_layout): positions when SIMPLE


class Upsampled(NamedTuple):
    """The spatial variant's maps: float32 (N, C, *small) contiguous, read through nearest upsampling."""

    scale: Tensor
    shift: Tensor
    big: tuple[int, ...]  # x's spatial sizes
    small: tuple[int, ...]  # the maps' spatial sizes
    ratio: tuple[float, ...]  # float32 small / big per dim, as F.interpolate computes its scale

    @classmethod
    def of(cls, x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Upsampled | None:
        if scale is None:
            return None
        big, small = tuple(x.shape[2:]), tuple(scale.shape[2:])
        ratio = torch.tensor(small, dtype=torch.float32) / torch.tensor(big, dtype=torch.float32)
        return cls(scale, shift, big, small, tuple(ratio.tolist()))


class UpsampledGrads(NamedTuple):
    """float32 zeros like the :class:`Upsampled` maps, into which the backward adds their gradients."""

    scale: Tensor
    shift: Tensor


def _target_programs(device: torch.device) -> int:
    """How many programs a split launch aims for: a few waves of the GPU."""
    if device.type != "cuda":
        return 8  # the interpreter runs programs one by one
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _chunk(chunk_size, shape):
    """``(group, chunk, sample, start, end)`` of split program (group, chunk): positions [start, end)."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    return group, chunk, group // shape.groups, start, tl.minimum(start + chunk_size, shape.positions)


@triton.jit
def _channels(group, c0, shape, BLOCK_C: tl.constexpr):
    """``(c, c_mask)``: the group's channels c0 to c0 + BLOCK_C, and which of them exist."""
    offsets = c0 + tl.arange(0, BLOCK_C)
    return (group % shape.groups) * shape.group_channels + offsets, offsets < shape.group_channels


@triton.jit
def _partials(partial_ptr, group, BLOCK_SPLIT: tl.constexpr):
    """The two float32 partial sums of the group from every chunk of a split launch (0 past the last):
    ``(first, second, parts, part_mask)``."""
    split = tl.num_programs(1)
    parts = tl.arange(0, BLOCK_SPLIT)
    part_mask = parts < split
    sums = partial_ptr + (group * split + parts) * 2
    return tl.load(sums, mask=part_mask, other=0.0), tl.load(sums + 1, mask=part_mask, other=0.0), parts, part_mask


@triton.jit
def _offsets(n, c, s, shape, strides, SIMPLE: tl.constexpr):
    """Offsets of the (channel, spatial) tile ``c`` x ``s`` of sample n in a tensor of ``strides``
    (layout.NormStrides)."""
    if SIMPLE:  # one spatial dim: keeps contiguity visible to the compiler
        sp = s.to(tl.int64) * strides.inner
    else:
        sp = (s // shape.inner).to(tl.int64) * strides.outer + (s % shape.inner).to(tl.int64) * strides.inner
    return n.to(tl.int64) * strides.n + c.to(tl.int64)[:, None] * strides.c + sp[None, :]


@triton.jit
def _up_offsets(n, c, s, shape, up):
    """Offsets into the small maps of the positions that nearest upsampling copies to ``s``: per spatial
    dim, F.interpolate's source index ``min(floor(i * (small / big)), small - 1)`` in float32."""
    source = tl.zeros_like(s)
    rest = s
    stride = 1
    for i in tl.static_range(len(up.big) - 1, -1, -1):  # innermost dim first
        near = tl.floor((rest % up.big[i]).to(tl.float32) * up.ratio[i]).to(tl.int32)
        source += tl.minimum(near, up.small[i] - 1) * stride
        rest = rest // up.big[i]
        stride = stride * up.small[i]
    channel = n.to(tl.int64) * (shape.groups * shape.group_channels) + c.to(tl.int64)
    return channel[:, None] * stride + source[None, :]


@triton.jit
def _channel_vector(ptr, c, c_mask, default: tl.constexpr):
    """A per-channel parameter as a column, or ``default`` where there is none (ptr None)."""
    if ptr is not None:
        v = tl.load(ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        v = tl.full(c.shape, default, tl.float32)
    return v[:, None]


@triton.jit
def _write_output(
    x_hat, n, c, s, c_mask, s_mask, y_ptr, y_strides, weight_ptr, bias_ptr, shape, up,
    SILU: tl.constexpr, SIMPLE: tl.constexpr,
):  # fmt: skip
    mask = c_mask[:, None] & s_mask[None, :]
    y = x_hat * _channel_vector(weight_ptr, c, c_mask, 1.0) + _channel_vector(bias_ptr, c, c_mask, 0.0)
    if up is not None:
        up_off = _up_offsets(n, c, s, shape, up)
        y = y * tl.load(up.scale + up_off, mask=mask, other=0.0) + tl.load(up.shift + up_off, mask=mask, other=0.0)
    y = activate(y, SILU)
    tl.store(y_ptr + _offsets(n, c, s, shape, y_strides, SIMPLE), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_terms(
    x, g, mask, mean, rstd, n, c, s, c_mask, weight_ptr, bias_ptr, shape, up, up_grads, SILU: tl.constexpr,
):  # fmt: skip
    """``(x_hat, g_affine, g_hat)``: the normalized input and the gradients at the affine's output and
    input, the activation recomputed; with ``up_grads`` (not None) the spatial variant's map gradients
    are added there too."""
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    w = _channel_vector(weight_ptr, c, c_mask, 1.0)
    norm = x_hat * w + _channel_vector(bias_ptr, c, c_mask, 0.0)
    if up is not None:
        up_off = _up_offsets(n, c, s, shape, up)
        up_scale = tl.load(up.scale + up_off, mask=mask, other=0.0)
        g_pre = activation_grad(g, norm * up_scale + tl.load(up.shift + up_off, mask=mask, other=0.0), SILU)
        if up_grads is not None:  # many positions share a small-map source: atomics, in no fixed order
            tl.atomic_add(up_grads.scale + up_off, g_pre * norm, mask=mask, sem="relaxed")
            tl.atomic_add(up_grads.shift + up_off, g_pre, mask=mask, sem="relaxed")
        g_affine = g_pre * up_scale
    else:
        g_affine = activation_grad(g, norm, SILU)
    g_affine = tl.where(mask, g_affine, 0.0)
    return x_hat, g_affine, g_affine * w


@triton.jit
def _forward_fused_kernel(
    x_ptr,
    y_ptr,
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None
    mean_ptr,  # float32 (N, G) out
    rstd_ptr,  # float32 (N, G) out
    eps,
    shape,  # NormShape
    x_strides,  # layout.NormStrides of x
    y_strides,  # layout.NormStrides of y
    up,  # Upsampled, or None
    SILU: tl.constexpr,
    SIMPLE: tl.constexpr,  # one merged spatial dim
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (sample, group), the whole group in registers: one read, one write."""
    group = tl.program_id(0)
    n = group // shape.groups
    c, c_mask = _channels(group, 0, shape, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < shape.positions
    mask = c_mask[:, None] & s_mask[None, :]
    x = tl.load(x_ptr + _offsets(n, c, s, shape, x_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
    count = shape.group_channels * shape.positions
    mean = tl.sum(tl.sum(x, 1), 0) / count
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(tl.sum(centered * centered, 1), 0) / count + eps)
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)
    x_hat = centered * rstd
    _write_output(x_hat, n, c, s, c_mask, s_mask, y_ptr, y_strides, weight_ptr, bias_ptr, shape, up, SILU, SIMPLE)


@triton.jit
def _forward_stats_kernel(
    x_ptr,
    partial_ptr,  # float32 (N * G, split, 2) out: each chunk's mean and sum of squared deviations
    chunk_size,  # spatial positions per chunk
    shape,  # NormShape
    x_strides,  # layout.NormStrides of x
    SIMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (group, chunk): mean and sum of squared deviations of the chunk's positions of the
    group, tiles merged with Chan's formula (no cancellation whatever the mean)."""
    group, chunk, n, start, end = _chunk(chunk_size, shape)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, shape.group_channels, BLOCK_C):
        c, c_mask = _channels(group, c0, shape, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < end)[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, shape, x_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
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
    x_ptr,
    y_ptr,
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None
    mean_ptr,  # float32 (N, G) out
    rstd_ptr,  # float32 (N, G) out
    partial_ptr,  # float32 (N * G, split, 2): _forward_stats_kernel's
    chunk_size,  # spatial positions per chunk
    eps,
    shape,  # NormShape
    x_strides,  # layout.NormStrides of x
    y_strides,  # layout.NormStrides of y
    up,  # Upsampled, or None
    SILU: tl.constexpr,
    SIMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,  # chunks per group, padded to a power of two
):
    """Program (group, chunk): the group's statistics from all chunks' partials, then its chunk's output."""
    group, chunk, n, start, end = _chunk(chunk_size, shape)
    part_mean, part_m2, parts, part_mask = _partials(partial_ptr, group, BLOCK_SPLIT)
    part_positions = tl.minimum((parts + 1) * chunk_size, shape.positions) - parts * chunk_size
    part_count = tl.where(part_mask, part_positions.to(tl.float32) * shape.group_channels, 0.0)
    count = tl.sum(part_count, 0)
    mean = tl.sum(part_count * part_mean, 0) / count
    delta = part_mean - mean
    rstd = tl.rsqrt((tl.sum(part_m2, 0) + tl.sum(part_count * delta * delta, 0)) / count + eps)
    if chunk == 0:
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)
    for c0 in range(0, shape.group_channels, BLOCK_C):
        c, c_mask = _channels(group, c0, shape, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            x_off = _offsets(n, c, s, shape, x_strides, SIMPLE)
            x = tl.load(x_ptr + x_off, mask=c_mask[:, None] & s_mask[None, :], other=0.0).to(tl.float32)
            x_hat = (x - mean) * rstd
            _write_output(
                x_hat, n, c, s, c_mask, s_mask, y_ptr, y_strides, weight_ptr, bias_ptr, shape, up, SILU, SIMPLE
            )


@triton.jit
def _backward_fused_kernel(
    g_ptr,  # the output's gradient
    x_ptr,
    dx_ptr,  # out: x's gradient
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None
    mean_ptr,  # float32 (N, G)
    rstd_ptr,  # float32 (N, G)
    channel_ptr,  # float32 (N, 1, 2, C) out: per-sample weight and bias gradient sums
    shape,  # NormShape
    g_strides,  # layout.NormStrides of the output's gradient
    x_strides,  # layout.NormStrides of x
    dx_strides,  # layout.NormStrides of x's gradient
    up,  # Upsampled, or None
    up_grads,  # UpsampledGrads (with up), or None
    SILU: tl.constexpr,
    SIMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (sample, group), x and the gradient read once; the weight and bias gradient
    sums go per sample to ``channel`` for a deterministic sum over the batch."""
    group = tl.program_id(0)
    n = group // shape.groups
    c, c_mask = _channels(group, 0, shape, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < shape.positions
    mask = c_mask[:, None] & s_mask[None, :]
    x = tl.load(x_ptr + _offsets(n, c, s, shape, x_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + _offsets(n, c, s, shape, g_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + group)
    x_hat, g_affine, g_hat = _backward_terms(
        x, g, mask, tl.load(mean_ptr + group), rstd, n, c, s, c_mask, weight_ptr, bias_ptr, shape, up,
        up_grads, SILU,
    )  # fmt: skip
    count = shape.group_channels * shape.positions
    mean_g = tl.sum(tl.sum(g_hat, 1), 0) / count
    mean_gx = tl.sum(tl.sum(g_hat * x_hat, 1), 0) / count
    dx = (g_hat - mean_g - x_hat * mean_gx) * rstd
    tl.store(dx_ptr + _offsets(n, c, s, shape, dx_strides, SIMPLE), dx.to(dx_ptr.dtype.element_ty), mask=mask)
    channels = shape.groups * shape.group_channels
    channel = channel_ptr + n.to(tl.int64) * 2 * channels + c
    tl.store(channel, tl.sum(g_affine * x_hat, 1), mask=c_mask)
    tl.store(channel + channels, tl.sum(g_affine, 1), mask=c_mask)


@triton.jit
def _backward_stats_kernel(
    g_ptr,  # the output's gradient
    x_ptr,
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None
    mean_ptr,  # float32 (N, G)
    rstd_ptr,  # float32 (N, G)
    partial_ptr,  # float32 (N * G, split, 2) out: the chunk's sums of g_hat and g_hat * x_hat
    channel_ptr,  # float32 (N, split, 2, C) out: the chunk's weight and bias gradient sums
    chunk_size,  # spatial positions per chunk
    shape,  # NormShape
    g_strides,  # layout.NormStrides of the output's gradient
    x_strides,  # layout.NormStrides of x
    up,  # Upsampled, or None
    up_grads,  # UpsampledGrads (with up), or None
    SILU: tl.constexpr,
    SIMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (group, chunk): the chunk's sums for the input gradient and the parameters' gradients."""
    group, chunk, n, start, end = _chunk(chunk_size, shape)
    split = tl.num_programs(1)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    sum_g = 0.0
    sum_gx = 0.0
    channels = shape.groups * shape.group_channels
    channel = channel_ptr + (n.to(tl.int64) * split + chunk) * 2 * channels
    for c0 in range(0, shape.group_channels, BLOCK_C):
        c, c_mask = _channels(group, c0, shape, BLOCK_C)
        channel_gx = tl.zeros((BLOCK_C,), tl.float32)
        channel_g = tl.zeros((BLOCK_C,), tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            mask = c_mask[:, None] & s_mask[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, shape, x_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offsets(n, c, s, shape, g_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
            x_hat, g_affine, _ = _backward_terms(
                x, g, mask, mean, rstd, n, c, s, c_mask, weight_ptr, bias_ptr, shape, up, up_grads, SILU
            )
            channel_gx += tl.sum(g_affine * x_hat, 1)
            channel_g += tl.sum(g_affine, 1)
        tl.store(channel + c, channel_gx, mask=c_mask)
        tl.store(channel + channels + c, channel_g, mask=c_mask)
        # g_hat = g_affine * weight: its sums are the channel sums weighted (no whole-tile sums per tile)
        w = _channel_vector(weight_ptr, c, c_mask, 1.0)
        sum_g += tl.sum(tl.sum(channel_g[:, None] * w, 1), 0)
        sum_gx += tl.sum(tl.sum(channel_gx[:, None] * w, 1), 0)
    out = partial_ptr + (group * split + chunk) * 2
    tl.store(out, sum_g)
    tl.store(out + 1, sum_gx)


@triton.jit
def _backward_apply_kernel(
    g_ptr,  # the output's gradient
    x_ptr,
    dx_ptr,  # out: x's gradient
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None
    mean_ptr,  # float32 (N, G)
    rstd_ptr,  # float32 (N, G)
    partial_ptr,  # float32 (N * G, split, 2): _backward_stats_kernel's
    chunk_size,  # spatial positions per chunk
    shape,  # NormShape
    g_strides,  # layout.NormStrides of the output's gradient
    x_strides,  # layout.NormStrides of x
    dx_strides,  # layout.NormStrides of x's gradient
    up,  # Upsampled, or None
    SILU: tl.constexpr,
    SIMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,  # chunks per group, padded to a power of two
):
    """Program (group, chunk): the input gradient of its chunk from the group's sums over all chunks."""
    group, chunk, n, start, end = _chunk(chunk_size, shape)
    sums = _partials(partial_ptr, group, BLOCK_SPLIT)  # of g_hat and of g_hat * x_hat
    count = shape.group_channels * shape.positions
    mean_g = tl.sum(sums[0], 0) / count
    mean_gx = tl.sum(sums[1], 0) / count
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    for c0 in range(0, shape.group_channels, BLOCK_C):
        c, c_mask = _channels(group, c0, shape, BLOCK_C)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < end
            mask = c_mask[:, None] & s_mask[None, :]
            x = tl.load(x_ptr + _offsets(n, c, s, shape, x_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + _offsets(n, c, s, shape, g_strides, SIMPLE), mask=mask, other=0.0).to(tl.float32)
            # The stats kernel added the map gradients (up_grads None here).
            x_hat, _, g_hat = _backward_terms(
                x, g, mask, mean, rstd, n, c, s, c_mask, weight_ptr, bias_ptr, shape, up, None, SILU
            )
            dx = (g_hat - mean_g - x_hat * mean_gx) * rstd
            tl.store(dx_ptr + _offsets(n, c, s, shape, dx_strides, SIMPLE), dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _Plan:
    """How a launch covers the groups: one program per group holding it whole (fused), or ``split``
    programs per group over chunks of ``chunk`` spatial positions, in tiles of BLOCK_C x BLOCK_S, 16
    elements per thread. The spatial variant's tiles and fused groups are half as large, 8 elements
    per thread: with its map offsets, gathers and atomics, 16 took its backward to 254-255 registers."""

    def __init__(self, x: Tensor, x_strides: layout.NormStrides, num_groups: int, spatial: bool):
        n, c = x.shape[:2]
        cpg, hw = c // num_groups, math.prod(x.shape[2:])
        whole_c, whole_s = triton.next_power_of_2(cpg), triton.next_power_of_2(hw)
        per_thread = 8 if spatial else 16
        tile = TILE * per_thread // 16
        self.fused = whole_c * whole_s <= FUSED_MAX * per_thread // 16
        wanted = triton.cdiv(_target_programs(x.device), n * num_groups)  # chunks per group
        if self.fused:
            self.block_c, self.block_s = whole_c, whole_s
        elif x_strides.c < abs(x_strides.inner):  # channels nearer in memory (channels_last): whole channel runs
            self.block_c = min(whole_c, 64)
            self.block_s = min(whole_s, tile // self.block_c)
        else:  # runs along a channel, short enough for each group to split into `wanted` chunks
            per_chunk = triton.cdiv(hw, wanted)
            self.block_s = min(whole_s, tile, max(MIN_RUN, 1 << (per_chunk.bit_length() - 1)))
            self.block_c = min(whole_c, tile // self.block_s)
        self.num_warps = min(8, max(1, self.block_c * self.block_s // (32 * per_thread)))
        split = min(wanted, triton.cdiv(hw, self.block_s))
        self.chunk = triton.cdiv(triton.cdiv(hw, max(split, 1)), self.block_s) * self.block_s
        self.split = 1 if self.fused else triton.cdiv(hw, self.chunk)
        self.meta = dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, num_warps=self.num_warps)


def _shape(x: Tensor, num_groups: int, inner: int) -> NormShape:
    return NormShape(num_groups, x.shape[1] // num_groups, math.prod(x.shape[2:]), inner)


def unsupported(inputs) -> str:
    x = inputs.x
    named = [("x", x)] + [(name, getattr(inputs, name)) for name in ("weight", "bias", "scale", "shift")]
    for name, t in named:
        if t is not None and (reason := unsupported_tensor(name, t)):
            return reason
    # y and x's gradient are made like x (empty_like, layout.memory_format): they merge where x does.
    if x.numel() and layout.norm_layout(x) is None:
        return "x's spatial dims do not merge into two in memory (it would need a copy)"
    return ""


def forward(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    source: Tensor | None,
    eps: float,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[0]
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:  # the reference's statistics of empty groups
        return y, mean.zero_(), rstd.fill_(float("nan"))
    inner, (x_strides, y_strides) = layout.norm_layout(x, y)
    shape = _shape(x, num_groups, inner)
    plan = _Plan(x, x_strides, num_groups, scale is not None)
    flags = dict(SILU=silu, SIMPLE=inner == shape.positions)
    up = Upsampled.of(x, scale, shift)
    groups = n * num_groups
    if plan.fused:
        _forward_fused_kernel[(groups,)](
            x, y, weight, bias, mean, rstd, eps, shape, x_strides, y_strides, up, **flags, **plan.meta
        )
        return y, mean, rstd
    partial = torch.empty((groups, plan.split, 2), dtype=torch.float32, device=x.device)
    grid = (groups, plan.split)
    _forward_stats_kernel[grid](x, partial, plan.chunk, shape, x_strides, SIMPLE=flags["SIMPLE"], **plan.meta)
    _forward_apply_kernel[grid](
        x, y, weight, bias, mean, rstd, partial, plan.chunk, eps, shape, x_strides, y_strides, up,
        **flags, **plan.meta, BLOCK_SPLIT=triton.next_power_of_2(plan.split),
    )  # fmt: skip
    return y, mean, rstd


def backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    source: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias, grad_scale, grad_shift)``; the map gradients are summed with
    float32 atomics, in no fixed order."""
    n, c = x.shape[:2]
    num_groups = mean.shape[1]
    grad_x = torch.empty_like(x)
    if scale is None:
        up_grads, grad_maps = None, [mean.new_empty(0), mean.new_empty(0)]
    else:
        up_grads = UpsampledGrads(torch.zeros_like(scale), torch.zeros_like(shift))
        grad_maps = list(up_grads)
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=torch.float32, device=x.device)
        return grad_x, zeros, zeros.clone(), *grad_maps
    inner, (g_strides, x_strides, dx_strides) = layout.norm_layout(grad, x, grad_x)
    shape = _shape(x, num_groups, inner)
    plan = _Plan(x, x_strides, num_groups, scale is not None)
    flags = dict(SILU=silu, SIMPLE=inner == shape.positions)
    up = Upsampled.of(x, scale, shift)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    groups = n * num_groups
    channel = torch.empty((n, plan.split, 2, c), dtype=torch.float32, device=x.device)
    if plan.fused:
        _backward_fused_kernel[(groups,)](
            grad, x, grad_x, weight, bias, mean, rstd, channel, shape, g_strides, x_strides, dx_strides, up,
            up_grads, **flags, **plan.meta,
        )  # fmt: skip
    else:
        partial = torch.empty((groups, plan.split, 2), dtype=torch.float32, device=x.device)
        grid = (groups, plan.split)
        _backward_stats_kernel[grid](
            grad, x, weight, bias, mean, rstd, partial, channel, plan.chunk, shape, g_strides, x_strides, up,
            up_grads, **flags, **plan.meta,
        )  # fmt: skip
        _backward_apply_kernel[grid](
            grad, x, grad_x, weight, bias, mean, rstd, partial, plan.chunk, shape, g_strides, x_strides,
            dx_strides, up, **flags, **plan.meta, BLOCK_SPLIT=triton.next_power_of_2(plan.split),
        )  # fmt: skip
    # In a fixed order (deterministic), and into two tensors: a custom op's outputs may not alias.
    grad_weight, grad_bias = (channel[:, :, i].sum((0, 1)) for i in range(2))
    return grad_x, grad_weight, grad_bias, *grad_maps
