"""The inputs of the conformance suite (tests/test_conformance.py): memory layouts, and each op's cases.

A case names an op, what its inputs exercise, a dtype and a layout, and builds contiguous inputs from a
seed of its own. The suite lays out the case's ``laid_out`` inputs (and the output gradients) with
:func:`in_layout` for the backend under test and gives the reference contiguous copies of the same values.
The product is sparse but covering: every layout in float32, every dtype on contiguous inputs,
channels_last in bfloat16 (autocast models), and the edge cases in float32 (a few in half precision too).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16, F64)
LAYOUTS = ("contiguous", "channels_last", "sliced", "reversed", "expanded")
nan, inf = float("nan"), float("inf")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values (differentiably) in ``layout``:

    - ``channels_last``: channels_last (4-D) or channels_last_3d (5-D); other ranks stay as they are;
    - ``sliced``: every other element of a wider last dimension (a view that is not dense);
    - ``reversed``: dense, with the dimensions in reverse order in memory (transposed, for 2-D);
    - ``expanded``: zero strides: t's first entry along dims 0 and -1 repeated (so the values change;
      the reference gets the same values).
    """
    if layout == "contiguous" or t.dim() == 0:
        return t
    if layout == "channels_last":
        memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
        return t if memory_format is None else t.contiguous(memory_format=memory_format)
    if layout == "sliced":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if layout == "reversed":
        order = tuple(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    if layout == "expanded":
        if t.numel() == 0:
            return t
        return t.narrow(0, 0, 1).narrow(-1, 0, 1).expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


@dataclass(frozen=True)
class Case:
    op: str  # the public op, vqfast.ops.<op>
    name: str  # what the inputs exercise
    dtype: torch.dtype
    layout: str
    build: Callable[[torch.Generator, torch.dtype], dict[str, Any]] = field(repr=False)  # the op's arguments
    laid_out: tuple[str, ...] = ()  # the arguments given in ``layout`` (default: the op's main input)
    exact: bool = False  # nearest_code's indices must equal the reference's (ties, non-finite, exact arithmetic)
    backward: bool = True  # the contract defines no gradient for non-finite input
    condition: float = 1.0  # how much the input amplifies rounding (the tolerances scale by it)
    magnitude: float = 0.0  # errors are relative to max(this, |expected|): where the answer cancels to 0

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}-{self.layout}-{str(self.dtype).removeprefix('torch.')}"

    def inputs(self) -> dict[str, Any]:
        return self.build(torch.Generator().manual_seed(zlib.crc32(self.id.encode())), self.dtype)


MAIN_INPUT = {"nearest_code": "z", "vector_quantize": "z", "group_norm_act": "x", "spatial_norm_act": "f",
              "codebook_gather": "indices"}


def normal(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F64) * scale + shift


def vectors_near_codes(g, shape, dim, k, near=1.0, spread=0.05, grid=0.0):
    """(z of ``shape`` with vectors along ``dim``, codebook (k, D)) in float64: a share ``near`` of the
    vectors lies within ``spread`` of a random code (so its nearest code is clear), the rest anywhere.
    ``grid`` > 0 rounds everything to multiples of it (exact arithmetic: ties stay ties)."""
    d = shape[dim]
    codebook = normal(g, k, d, scale=2.0)
    rows_shape = [s for i, s in enumerate(shape) if i != dim % len(shape)]
    n = math.prod(rows_shape)
    rows = normal(g, n, d, scale=2.0)
    close = torch.rand(n, generator=g, dtype=F64) < near
    picks = torch.randint(k, (n,), generator=g)
    rows[close] = codebook[picks[close]] + normal(g, int(close.sum()), d, scale=spread)
    if grid:
        codebook, rows = (torch.round(t / grid) * grid for t in (codebook, rows))
    z = rows.reshape(*rows_shape, d).movedim(-1, dim % len(shape))
    return z.contiguous(), codebook


# --------------------------------------------------------------------------------------- nearest_code


def nearest(shape, dim, k, near=0.5, grid=0.0, edit=None):
    """Builds nearest_code's arguments; ``edit(z, codebook)`` (float64) plants special values."""

    def build(g, dtype):
        z, codebook = vectors_near_codes(g, shape, dim, k, near=near, grid=grid)
        if edit is not None:
            z, codebook = edit(z, codebook, g)
        return {"z": z.to(dtype), "codebook": codebook.to(dtype), "dim": dim}

    return build


def _duplicated(z, codebook, g):
    """Every code three times, some rows on a code: judged by distance, as a BLAS may round a code's
    copies differently (exact ties go to the first index: ``equidistant``, ``lattice_ties``)."""
    codebook = torch.cat([codebook] * 3)
    z.view(-1, z.shape[-1])[: codebook.shape[0] // 3] = codebook[: codebook.shape[0] // 3]
    return z, codebook


def _equidistant(z, codebook, g):
    """z = 0 against +-e_i: every distance is exactly 1 in any arithmetic; index 0 must win."""
    d = codebook.shape[1]
    return torch.zeros_like(z), torch.cat([torch.eye(d), -torch.eye(d)]).to(z)


def _near_ties(z, codebook, g):
    """Codes z + e and z - e: equidistant from z in exact arithmetic, apart only by rounding."""
    e = normal(g, *z.shape, scale=1e-3)
    return z, torch.cat([codebook, z + e, z - e])


def _elongated(z, codebook, g):
    """A codebook spread along one axis (what a sorted search along the principal axis exploits)."""
    stretch = torch.tensor([30.0] + [1.0] * (codebook.shape[1] - 1), dtype=F64)
    return z * stretch, codebook * stretch


def _non_finite_z(z, codebook, g):
    z = z.clone()
    z[0, 1], z[1, 2], z[2, 0], z[3] = nan, inf, -inf, inf
    return z, codebook


def _non_finite_codebook(z, codebook, g):
    codebook = codebook.clone()
    codebook[5, 0], codebook[17, 3], codebook[30, 2] = inf, nan, -inf
    return z, codebook


def _huge(z, codebook, g):
    """A finite component of 1e30 in some rows (its square overflows float32): the reference's rule."""
    z = z.clone()
    z[::5, 2] = 1e30
    return z, codebook


NEAREST_BASE = nearest((2, 6, 5, 7), 1, 37)
NEAREST_EDGES = [
    # (name, build, case options)
    ("rows", nearest((61, 3), -1, 130), {}),
    ("rows_transposed", nearest((45, 5), -1, 60), {"layout": "reversed"}),
    ("columns", nearest((5, 45), 0, 60), {}),
    ("wide_vectors", nearest((3, 40, 3, 5), 1, 100), {}),
    ("long_vectors", nearest((33, 256), -1, 200), {}),
    ("many_codes", nearest((100, 3), -1, 1000), {}),
    ("dim_last", nearest((2, 3, 4, 9), 3, 129), {}),
    ("one_vector", nearest((5,), 0, 20), {}),
    ("rank6", nearest((2, 1, 3, 4, 2, 3), 3, 20), {"layout": "reversed"}),
    ("batch0", nearest((0, 8, 3, 3), 1, 16), {}),
    ("empty_rows", nearest((5, 0, 4), 2, 3), {}),
    ("size1", nearest((1, 1, 1, 1), 1, 5), {}),
    ("d1", nearest((7, 1), -1, 65), {}),
    ("k1", nearest((2, 4, 3, 3), 1, 1), {"exact": True}),
    ("odd", nearest((3, 13, 7, 11), 1, 131), {}),
    ("duplicated_codes", nearest((50, 8), -1, 20, edit=_duplicated), {}),
    ("equidistant", nearest((3, 8), -1, 1, edit=_equidistant), {"exact": True}),
    ("near_ties", nearest((50, 6), -1, 20, edit=_near_ties), {}),
    ("lattice_ties", nearest((1536, 3), -1, 300, near=0.3, grid=0.5), {"exact": True}),
    ("elongated_codebook", nearest((1100, 4), -1, 700, edit=_elongated), {}),
    ("non_finite_z", nearest((12, 6), -1, 40, edit=_non_finite_z), {"exact": True}),
    ("non_finite_wide", nearest((12, 40), -1, 70, edit=_non_finite_z), {"exact": True}),
    ("non_finite_many_rows", nearest((1100, 4), -1, 40, edit=_non_finite_z), {"exact": True}),
    ("non_finite_codebook", nearest((12, 6), -1, 40, edit=_non_finite_codebook), {"exact": True}),
    ("huge", nearest((2, 4, 5, 5), 1, 30, edit=_huge), {"exact": True}),
]
NEAREST_HALF_EDGES = ("non_finite_z", "non_finite_codebook", "duplicated_codes")  # also in float16, bfloat16

# ------------------------------------------------------------------------------------ vector_quantize


def quantize(shape, dim, k, beta=0.25, legacy=True, grid=0.0, edit=None):
    """vector_quantize's arguments: vectors near their codes, so every backend's indices are the same."""

    def build(g, dtype):
        z, codebook = vectors_near_codes(g, shape, dim, k, near=1.0, grid=grid)
        if edit is not None:
            z, codebook = edit(z, codebook, g)
        return {"z": z.to(dtype), "codebook": codebook.to(dtype), "beta": beta, "legacy": legacy, "dim": dim}

    return build


def _lattice_duplicates(z, codebook, g):
    return z, torch.cat([codebook, codebook])


def _scaled(factor):
    return lambda z, codebook, g: (z * factor, codebook * factor)


QUANTIZE_BASE = quantize((2, 4, 5, 7), 1, 37)
QUANTIZE_EDGES = [
    ("not_legacy", quantize((2, 4, 5, 7), 1, 37, beta=0.3, legacy=False), {}),
    ("rows", quantize((33, 6), -1, 50), {}),
    ("rows_transposed", quantize((33, 6), -1, 50), {"layout": "reversed"}),
    ("long_vectors", quantize((33, 256), -1, 50), {}),
    ("dim_last", quantize((2, 3, 4, 9), 3, 29), {}),
    ("rank5", quantize((2, 5, 3, 3, 2), 1, 11), {"layout": "channels_last"}),
    ("batch0", quantize((0, 4, 3, 3), 1, 16), {}),
    ("size1", quantize((1, 1, 1, 1), 1, 5), {}),
    ("k1", quantize((2, 3, 3, 3), 1, 1), {}),
    ("odd", quantize((3, 13, 7, 11), 1, 131), {}),
    ("many_rows", quantize((2, 3, 40, 40), 1, 7), {}),  # the CPU statistics' parts of rows
    ("lattice_ties", quantize((2, 3, 8, 8), 1, 40, grid=0.5, edit=_lattice_duplicates), {}),
    ("non_finite_z", quantize((12, 6), -1, 40, edit=_non_finite_z), {"backward": False}),
    ("huge", quantize((2, 4, 5, 5), 1, 30, edit=_scaled(1e15)), {}),
    ("codebook_transposed", quantize((2, 4, 5, 7), 1, 37), {"layout": "reversed", "laid_out": ("codebook",)}),
]

# ----------------------------------------------------------------------- group_norm_act, spatial_norm_act


def norm(shape, groups, affine="both", activation="silu", params=F32, scale=2.0, shift=0.5, edit=None):
    """group_norm_act's arguments. ``params``: weight and bias dtype (None: x's, as in a half model)."""

    def build(g, dtype):
        c = shape[1]
        x = normal(g, *shape, scale=scale, shift=shift)
        weight, bias = normal(g, c), normal(g, c)
        if edit is not None:
            x, weight, bias = edit(x, weight, bias)
        p = params or dtype
        return {
            "x": x.to(dtype),
            "num_groups": groups,
            "weight": weight.to(p) if affine in ("both", "weight") else None,
            "bias": bias.to(p) if affine in ("both", "bias") else None,
            "eps": 1e-6,
            "activation": activation,
        }

    return build


def _constant_group(x, weight, bias):
    x = x.clone()
    x[:, :2] = 3.0  # group 0 has no spread: rstd = 1 / sqrt(eps)
    return x, weight, bias


def _non_finite_x(x, weight, bias):
    x = x.clone()
    x[0, 0, 1, 1], x[0, 2, 0, 0], x[1, 4, 2, 3] = nan, inf, -inf
    return x, weight, bias


def _infinite_bias(x, weight, bias):
    return x, weight, torch.tensor([0.0, 0.0, inf, inf, -inf, -inf, 1.0, 1.0], dtype=F64)


def _steep(x, weight, bias):
    """Pre-activations far below -88.7, where exp(-y) overflows float32 in a naive SiLU."""
    return x, torch.tensor([300.0, 300.0, 1e4, 1e4, -300.0, -300.0, 1.0, 1.0], dtype=F64), bias


NORM_BASE = norm((2, 8, 5, 7), 4)
NORM_EDGES = [
    ("no_affine", norm((2, 8, 5, 7), 4, affine="none"), {}),
    ("weight_only", norm((2, 8, 5, 7), 4, affine="weight"), {}),
    ("bias_only_identity", norm((2, 8, 5, 7), 4, affine="bias", activation=None), {}),
    ("rank2", norm((3, 8), 2), {}),
    ("rank3", norm((2, 6, 11), 3), {}),
    ("rank5", norm((2, 8, 3, 4, 5), 4), {"layout": "channels_last"}),
    ("rank6", norm((1, 4, 2, 3, 2, 3), 2), {}),
    ("batch0", norm((0, 8, 3, 3), 4), {}),
    ("empty_spatial", norm((2, 4, 0, 3), 2), {}),
    # One element per group: x's gradient is rstd * (g - g) = 0 up to rounding of rstd * g, rstd = 1e3.
    ("size1", norm((1, 4, 1, 1), 4), {"magnitude": 1e3}),
    ("one_group", norm((1, 3, 17, 1), 1), {}),
    ("odd", norm((3, 10, 7, 13), 5), {}),
    ("many_groups", norm((2, 64, 4, 4), 32), {}),
    ("constant_group", norm((2, 8, 3, 3), 4, edit=_constant_group), {}),
    # The float32 input holds 1e4 + x only to within 1e-3 (of a unit spread): rounding is amplified.
    ("large_mean", norm((2, 8, 5, 7), 4, scale=1.0, shift=1e4), {"condition": 200.0}),
    ("huge", norm((2, 8, 5, 7), 4, scale=1e15, shift=0.0), {}),
    ("steep_silu", norm((2, 8, 5, 7), 4, edit=_steep), {}),
    ("non_finite_x", norm((2, 8, 5, 7), 4, edit=_non_finite_x), {"backward": False}),
    ("infinite_bias", norm((2, 8, 5, 7), 4, edit=_infinite_bias), {"backward": False}),
]
NORM_EXTRA = [("half_params", norm((2, 8, 5, 7), 4, params=None), {"dtype": F16})]


def spatial(shape, small, groups, affine="both", activation="silu", edit=None):
    """spatial_norm_act's arguments: f, and scale and shift at the (smaller) latent size ``small``."""

    def build(g, dtype):
        n, c = shape[:2]
        f = normal(g, *shape, scale=2.0, shift=0.5)
        scale, shift = normal(g, n, c, *small), normal(g, n, c, *small)
        if edit is not None:
            f, _, _ = edit(f, None, None)
        return {
            "f": f.to(dtype),
            "scale": scale.to(dtype),
            "shift": shift.to(dtype),
            "num_groups": groups,
            "weight": normal(g, c).float() if affine == "both" else None,
            "bias": normal(g, c).float() if affine == "both" else None,
            "eps": 1e-6,
            "activation": activation,
        }

    return build


SPATIAL_BASE = spatial((2, 6, 7, 9), (3, 4), 3)
SPATIAL_EDGES = [
    ("even", spatial((1, 8, 8, 12), (2, 3), 4), {}),
    ("same_size", spatial((1, 4, 4, 4), (4, 4), 2), {}),
    ("shrink_one_dim", spatial((1, 4, 3, 5), (1, 7), 2), {"layout": "channels_last"}),
    ("rank3", spatial((2, 4, 9), (4,), 2), {}),
    ("rank5", spatial((1, 4, 3, 4, 5), (2, 2, 3), 2), {"layout": "reversed", "laid_out": ("f", "shift")}),
    ("batch0", spatial((0, 8, 4, 4), (2, 2), 4), {}),
    ("size1", spatial((1, 4, 1, 1), (1, 1), 1), {}),
    ("odd", spatial((3, 10, 7, 13), (3, 5), 5), {}),
    # Over 16 channels and 16 latent positions, neither a multiple of 16: the native kernel's tiled transposition.
    ("tiles", spatial((2, 40, 12, 10), (6, 5), 4), {"layout": "channels_last"}),
    ("no_affine_identity", spatial((2, 6, 7, 9), (3, 4), 3, affine="none", activation=None), {}),
    ("non_finite_f", spatial((2, 8, 5, 7), (2, 3), 4, edit=_non_finite_x), {"backward": False}),
]

# ------------------------------------------------------------------------------------ codebook_gather


def gather(index_shape, dim, k=11, d=6, index=None, edit=None, int32=False):
    """codebook_gather's arguments; ``index`` builds the indices itself (given k)."""

    def build(g, dtype):
        indices = torch.randint(k, index_shape, generator=g) if index is None else index(k)
        codebook = normal(g, k, d)
        if edit is not None:
            codebook = edit(codebook)
        return {"indices": indices.int() if int32 else indices, "codebook": codebook.to(dtype), "dim": dim}

    return build


def _non_finite_rows(codebook):
    codebook = codebook.clone()
    codebook[1, 2], codebook[3], codebook[4, 0] = nan, inf, -inf
    return codebook


GATHER_BASE = gather((2, 5, 7), 1)
GATHER_EDGES = [
    ("dim_last", gather((2, 5, 7), -1), {}),
    ("dim0", gather((3, 4), 0), {}),
    ("one_index", gather((13,), -1), {}),
    ("many_codes", gather((100,), -1, k=1000, d=3), {}),
    ("scalar_index", gather((), 0), {}),
    ("batch0", gather((0, 3, 3), 1), {}),
    ("k1", gather((4, 5), 1, k=1), {}),
    ("d1", gather((4, 5), -1, d=1), {}),
    ("int32", gather((2, 5, 7), 1, int32=True), {}),
    # Issue 11: Triton read idx.flip(0)[::2] (1-D, strided) wrong and segfaulted on an expanded index.
    ("flipped_strided", gather((), -1, index=lambda k: torch.arange(k).flip(0)[::2]), {}),
    ("expanded_index", gather((), -1, index=lambda k: torch.tensor([3]).expand(6)), {}),
    ("codebook_transposed", gather((2, 5, 7), 1), {"layout": "reversed", "laid_out": ("codebook",)}),
    ("non_finite", gather((4, 5), 1, edit=_non_finite_rows), {}),
    ("huge", gather((4, 5), 1, edit=lambda c: c * 1e37), {}),
]

# ------------------------------------------------------------------------------------------- all cases

OPS = {
    # op: (the base case's build, edge cases, dtypes of the edges also run in half precision)
    "nearest_code": (NEAREST_BASE, NEAREST_EDGES, NEAREST_HALF_EDGES),
    "vector_quantize": (QUANTIZE_BASE, QUANTIZE_EDGES, ("lattice_ties",)),
    "group_norm_act": (NORM_BASE, NORM_EDGES + NORM_EXTRA, ("steep_silu",)),
    "spatial_norm_act": (SPATIAL_BASE, SPATIAL_EDGES, ()),
    "codebook_gather": (GATHER_BASE, GATHER_EDGES, ("non_finite",)),
}


def _case(op: str, name: str, build, dtype=F32, layout="contiguous", laid_out=None, **options) -> Case:
    return Case(op, name, dtype, layout, build, laid_out or (MAIN_INPUT[op],), **options)


def cases(op: str) -> list[Case]:
    """``op``'s cases: its base inputs in every layout (float32) and every dtype (contiguous), in
    channels_last bfloat16, and its edge cases (float32; some in float16 and bfloat16 too)."""
    base, edges, half_edges = OPS[op]
    out = [_case(op, "base", base, layout=layout) for layout in LAYOUTS]
    out += [_case(op, "base", base, dtype=dtype) for dtype in DTYPES if dtype != F32]
    out.append(_case(op, "base", base, dtype=BF16, layout="channels_last"))
    for name, build, options in edges:
        out.append(_case(op, name, build, **options))
        if name in half_edges:
            out += [_case(op, name, build, **{**options, "dtype": dtype}) for dtype in (F16, BF16)]
    return out


ALL_CASES = [case for op in OPS for case in cases(op)]
