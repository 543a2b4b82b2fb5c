"""Kernel backends: what is available here, which one each op uses, and how to choose.

Every op in :mod:`vqfast.ops` has one contract and several implementations, one module per
op under a package per backend (``vqfast.reference``, ``vqfast.triton``, ``vqfast.native``),
each exposing the same functions (``forward`` and, where the op has one, ``backward``).

Selection comes from ``VQFAST_BACKEND`` (read at import), :func:`set_backend` or
:func:`use_backend`: a default for all ops (``auto``, ``torch``, ``triton`` or ``native``),
optionally followed by per-op overrides: ``"auto,group_norm_act=triton,nearest_code=native"``.
A backend asked for by name that cannot run raises; ``auto`` quietly falls back to ``torch``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

OPS = ("nearest_code", "group_norm_act", "spatial_norm_act", "vector_quantize", "codebook_gather")
BACKENDS = ("torch", "triton", "native")
_PACKAGES = {"torch": "vqfast.reference", "triton": "vqfast.triton", "native": "vqfast.native"}

# What `auto` tries, in order, per device type; `torch` when none can run the op. A backend is
# listed for a device only once benchmarks/ has measured it faster than eager there: native on
# the CPU (benchmarks/results/); nothing yet on CUDA, where no kernel has run on a GPU.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("torch",), "cpu": ("native",)}


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is unavailable; empty when available


@functools.cache
def _status(backend: str) -> BackendStatus:
    if backend == "torch":
        return BackendStatus(True, "")
    try:
        importlib.import_module(_PACKAGES[backend])
    except ImportError as exc:
        return BackendStatus(False, f"{_PACKAGES[backend]} could not be imported: {exc}")
    return BackendStatus(True, "")


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, for those unavailable, why."""
    return {name: _status(name) for name in BACKENDS}


class _Selection(NamedTuple):
    default: str
    per_op: dict[str, str]


def _parse(spec: str | None = None, **per_op: str) -> _Selection:
    default, overrides = "auto", {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        if "=" in part:
            op, _, name = part.partition("=")
            overrides[op.strip()] = name.strip()
        else:
            default = part
    overrides.update(per_op)
    for op, name in [("default", default), *overrides.items()]:
        if op != "default" and op not in OPS:
            raise ValueError(f"unknown op {op!r} in backend selection; ops are {', '.join(OPS)}")
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} for {op}; choose auto, {', '.join(BACKENDS)}")
    return _Selection(default, overrides)


_selection = _parse(os.environ.get("VQFAST_BACKEND"))


def set_backend(spec: str | None = None, **per_op: str) -> None:
    """Choose backends: ``set_backend("triton")``, ``set_backend("auto", nearest_code="native")``
    or ``set_backend("auto,nearest_code=native")``. Ops not named keep the default."""
    global _selection
    _selection = _parse(spec, **per_op)


@contextlib.contextmanager
def use_backend(spec: str | None = None, **per_op: str) -> Iterator[None]:
    """Like :func:`set_backend`, for the duration of a ``with`` block."""
    global _selection
    previous = _selection
    set_backend(spec, **per_op)
    try:
        yield
    finally:
        _selection = previous


def selected(op: str) -> str:
    """The backend name chosen for ``op`` (possibly ``auto``)."""
    return _selection.per_op.get(op, _selection.default)


def _supports(backend: str, op: str, device: torch.device) -> str:
    """Empty when ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    status = _status(backend)
    if not status.available:
        return status.reason
    if backend == "torch":
        return ""
    module = importlib.import_module(_PACKAGES[backend])
    return module.supports(op, device)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``."""
    name = selected(op)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()):
            if not _supports(candidate, op, device):
                return candidate
        return "torch"
    reason = _supports(name, op, device)
    if reason:
        raise RuntimeError(f"vqfast backend {name!r} cannot run {op} on {device.type}: {reason}")
    return name


def kernel(op: str, function: str, device: torch.device) -> Callable:
    """The ``function`` (``forward`` or ``backward``) of ``op`` in the backend chosen for ``device``."""
    module = importlib.import_module(f"{_PACKAGES[resolve(op, device)]}.{op}")
    return getattr(module, function)
