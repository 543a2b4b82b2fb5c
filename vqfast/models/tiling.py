"""Tiled encode/decode, as diffusers' AutoencoderKL does it: overlapping tiles through the encoder or the
decoder one at a time, each output tile blended linearly into the one above it and the one on its left,
then cropped to its share of the result. Peak memory follows the tile, not the image.

Unlike AutoencoderKL, the grid is laid out in latent positions first (see :func:`tile_grid`), so image
tiles always start on the encoder's downsampling grid and every tile's share fits its neighbours'
exactly, whatever the overlap factor.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch


class TileGrid(NamedTuple):
    """Square tiles over a latent grid; ``scale`` image pixels per latent position along each side."""

    tile: int  # a tile's side, in latent positions
    stride: int  # latent positions from one tile's start to the next: what each tile keeps
    scale: int

    @property
    def overlap(self) -> int:
        """Latent positions shared by neighbouring tiles."""
        return self.tile - self.stride


def tile_grid(tile_sample_size: int, tile_latent_size: int, overlap_factor: float, scale: int) -> TileGrid:
    """The grid of ``tile_latent_size`` tiles overlapping by about ``overlap_factor`` of a tile.

    The stride is AutoencoderKL's decode stride, ``int(tile_latent_size * (1 - overlap_factor))`` (at least
    1); the image side of a tile must be ``tile_latent_size * scale``, as it is with AutoencoderKL's defaults
    (a mismatch would misplace every tile, so it is an error here).
    """
    if not isinstance(tile_latent_size, int) or tile_latent_size < 1:
        raise ValueError(f"tile_latent_min_size must be a positive int, got {tile_latent_size!r}")
    if tile_sample_size != tile_latent_size * scale:
        raise ValueError(
            f"tile_sample_min_size must be tile_latent_min_size * {scale} (the model's downsampling factor), got "
            f"tile_sample_min_size={tile_sample_size!r} and tile_latent_min_size={tile_latent_size}"
        )
    if not 0 <= overlap_factor < 1:
        raise ValueError(f"tile_overlap_factor must be in [0, 1), got {overlap_factor!r}")
    return TileGrid(tile_latent_size, max(1, int(tile_latent_size * (1 - overlap_factor))), scale)


def blend_v(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """``b`` with its first ``blend_extent`` rows faded in from ``a``'s last ones (AutoencoderKL's weights:
    row y takes ``1 - y / extent`` of ``a``), in place; returns ``b``."""
    extent = min(a.shape[2], b.shape[2], blend_extent)
    if extent:
        weight = _ramp(extent, b).view(extent, 1)
        b[:, :, :extent].copy_(a[:, :, -extent:] * (1 - weight) + b[:, :, :extent] * weight)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """``b`` with its first ``blend_extent`` columns faded in from ``a``'s last ones, in place; returns ``b``."""
    extent = min(a.shape[3], b.shape[3], blend_extent)
    if extent:
        weight = _ramp(extent, b)
        b[:, :, :, :extent].copy_(a[:, :, :, -extent:] * (1 - weight) + b[:, :, :, :extent] * weight)
    return b


def _ramp(extent: int, like: torch.Tensor) -> torch.Tensor:
    """``y / extent`` for y < extent, in at least float32 (half-precision steps would be uneven)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.arange(extent, device=like.device, dtype=dtype) / extent


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int, keep: int, blend: int
) -> torch.Tensor:
    """``fn`` over the ``tile`` x ``tile`` tiles of NCHW ``x`` that start every ``stride`` positions, stitched:
    each output tile is blended over ``blend`` rows into the tile above and over ``blend`` columns into the
    one on its left (both already blended, in AutoencoderKL's order), and its first ``keep`` rows and
    columns are kept. Only two rows of output tiles are alive at a time."""
    rows, above = [], None
    for i in range(0, x.shape[2], stride):
        current: list[torch.Tensor] = []
        for j in range(0, x.shape[3], stride):
            out = fn(x[:, :, i : i + tile, j : j + tile])
            if above is not None:
                out = blend_v(above[len(current)], out, blend)
            if current:
                out = blend_h(current[-1], out, blend)
            current.append(out)
        rows.append(torch.cat([out[:, :, :keep, :keep] for out in current], dim=3))
        above = current
    return torch.cat(rows, dim=2)


def sliced(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` over the batch of ``x`` one sample at a time, concatenated."""
    return torch.cat([fn(sample) for sample in x.split(1)])
