"""``nearest_code``: index of the nearest codebook row for every vector, without the N x K matrix."""

from typing import NamedTuple

import torch

from vqfast import backend
from vqfast.ops import _checks, _library


class Inputs(NamedTuple):
    """The lowered arguments every backend's ``nearest_code`` receives (and its ``unsupported`` sees)."""

    z: torch.Tensor  # any strides; float32, float16, bfloat16 or float64
    codebook: torch.Tensor  # (K, D), z's dtype and device
    dim: int  # the dimension of z holding the D elements of each vector, in [0, z.dim())


def _kernel(z: torch.Tensor, codebook: torch.Tensor, dim: int) -> torch.Tensor:
    return backend.forward("nearest_code", Inputs(z, codebook, dim))


def _fake(z, codebook, dim):
    return z.new_empty(z.movedim(dim, -1).shape[:-1], dtype=torch.long)


_nearest_code = _library.define("nearest_code(Tensor z, Tensor codebook, int dim) -> Tensor", _kernel, _fake)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index (int64) of the nearest row of ``codebook`` (K, D) in squared L2 for every vector of ``z``
    along ``dim`` (1 for NCHW latents, -1 for (N, D) rows). The result has z's shape without ``dim``.

    This is the contract every backend follows: distances ``|c|^2 - 2 z.c`` (|z|^2 does not move the
    argmin) accumulate in float32 at least whatever the input dtype; ties go to the lowest index; a
    vector whose distances are NaN gets the first NaN's index, as ``torch.argmin``. Memory is O(N + K).
    """
    _checks.tensor("z", z)
    _checks.rank("z", z, at_least=1)
    dim = _checks.dim_index("dim", dim, z.dim())
    _checks.codebook(codebook, z, "z", dim)
    return _nearest_code(z, codebook, dim)
