"""Layout and index helpers shared by the ops and their Python backends: memory formats, the
nearest-upsampling table of MoVQ's SpatialNorm, and the stride mergers that let kernels read tensors
in their own strides."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format kernels get gradients in: t's own when it is channels_last, else contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# (big, small, device) -> nearest_source's table: a model meets a handful of sizes, so they are kept.
# A plain dict rather than functools.lru_cache, which torch.compile warns it cannot honour.
_SOURCES: dict[tuple, torch.Tensor] = {}


def nearest_source(big: tuple[int, ...], small: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 (prod(big),): for each row-major spatial position of a ``big`` grid, the row-major position
    in the ``small`` grid that nearest upsampling copies from, exactly as ``F.interpolate`` picks it."""
    key = (big, small, device)
    if key not in _SOURCES:
        if len(_SOURCES) >= 64:
            _SOURCES.clear()
        _SOURCES[key] = _nearest_source(big, small).to(device)
    return _SOURCES[key]


def _nearest_source(big: tuple[int, ...], small: tuple[int, ...]) -> torch.Tensor:
    if math.prod(big) == 0:
        return torch.empty(0, dtype=torch.long)
    flat = torch.zeros((), dtype=torch.long)
    for high, low in zip(big, small):
        source = F.interpolate(torch.arange(low, dtype=torch.float32)[None, None], size=high, mode="nearest")
        flat = flat[..., None] * low + source.view(-1).long()
    return flat.reshape(math.prod(big))


# --- stride mergers: tensors' dims as few (size, stride) pairs as memory allows, no copies ---------


def merge_dims(sizes: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, tuple[int, ...]]]:
    """Dims of same-shaped tensors (``strides[i]``: tensor i's strides), outer to inner, as
    ``[(size, (stride in each tensor))]`` with size-1 dims dropped and each dim merged into the one
    before it wherever every tensor allows (outer stride = size * inner stride): positions enumerate
    in row-major order either way."""
    merged: list[tuple[int, tuple[int, ...]]] = []
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        inner = tuple(s[i] for s in strides)
        if merged and all(outer == size * s for outer, s in zip(merged[-1][1], inner)):
            merged[-1] = (merged[-1][0] * size, inner)
        else:
            merged.append((size, inner))
    return merged


class RowShape(NamedTuple):
    """Flat rows over three (merged) batch dims: row r sits at ``(r // (middle * inner), r // inner %
    middle, r % inner)``; the outer dim's size follows from the row count."""

    middle: int  # size of the middle batch dim
    inner: int  # size of the inner batch dim


class RowStrides(NamedTuple):
    """One tensor's strides for the rows of a :class:`RowShape`."""

    outer: int  # per step of the outer batch dim
    middle: int  # per step of the middle batch dim
    inner: int  # per step of the inner batch dim
    vector: int  # per element along the row's vector (0 for tensors without one, such as indices)


def row_layout(
    sizes: Sequence[int], strides: Sequence[Sequence[int]], vector_strides: Sequence[int]
) -> tuple[RowShape, list[RowStrides]] | None:
    """Batch dims ``sizes`` of tensors with batch strides ``strides[i]`` and vector stride
    ``vector_strides[i]`` as flat rows; None when more than three batch dims remain after merging."""
    merged = merge_dims(sizes, strides)
    if len(merged) > 3:
        return None
    merged = [(1, (0,) * len(strides))] * (3 - len(merged)) + merged
    per_tensor = zip(*(dim_strides for _, dim_strides in merged), vector_strides)
    return RowShape(merged[1][0], merged[2][0]), [RowStrides(*s) for s in per_tensor]


def rows_along(dim: int, *tensors: torch.Tensor) -> tuple[RowShape, list[RowStrides]] | None:
    """The vectors along ``dim`` of same-shaped tensors as flat rows, in the order of
    ``t.movedim(dim, -1)``: see :func:`row_layout`."""
    batch = [i for i in range(tensors[0].dim()) if i != dim]
    strides = [[t.stride(i) for i in batch] for t in tensors]
    return row_layout([tensors[0].shape[i] for i in batch], strides, [t.stride(dim) for t in tensors])


class NormStrides(NamedTuple):
    """One (N, C, *spatial) tensor's strides with its spatial dims merged into two: flat spatial
    position s sits at ``(s // inner_size, s % inner_size)``."""

    n: int  # per sample
    c: int  # per channel
    outer: int  # per step of the outer spatial dim
    inner: int  # per step of the inner spatial dim


def norm_layout(*tensors: torch.Tensor) -> tuple[int, list[NormStrides]] | None:
    """``(inner_size, strides of each tensor)`` for same-shaped (N, C, *spatial) tensors; None when
    their spatial dims do not merge into two."""
    merged = merge_dims(tensors[0].shape[2:], [t.stride()[2:] for t in tensors])
    if len(merged) > 2:
        return None
    merged = [(1, (0,) * len(tensors))] * (2 - len(merged)) + merged
    per_tensor = zip(*(dim_strides for _, dim_strides in merged))
    return merged[1][0], [NormStrides(t.stride(0), t.stride(1), *s) for t, s in zip(tensors, per_tensor)]
