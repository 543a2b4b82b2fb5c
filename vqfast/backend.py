"""Kernel backends: the registry of every op's implementations, what runs here, and which one runs.

The registry is one table, op -> backend -> :class:`Implementation`. Each backend package's
``__init__`` lists its implementations (``IMPLEMENTATIONS``) by plain imports of its kernels:

- ``torch``: :mod:`vqfast.reference`, plain PyTorch, the answer tests trust;
- ``triton``: :mod:`vqfast.triton` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
- ``native``: :mod:`vqfast.native`, the compiled extension ``vqfast._C`` (csrc/);
- ``cuda_host``: :mod:`vqfast.cuda_host`, the CUDA kernels of csrc/cuda built for the host and run on CPU
  tensors by emulated blocks and threads (csrc/host/): for tests only, ``auto`` never picks it.

A package is imported when a backend is first needed, so ``import vqfast`` never imports triton.

Selection: a default for all ops (``auto``, ``torch``, ``triton`` or ``native``) and per-op overrides,
from ``VQFAST_BACKEND`` (read at import: ``"auto,group_norm_act=triton,nearest_code=native"``), from
:func:`set_backend` (the process default) and from :func:`use_backend` blocks. A block lives in a
:class:`contextvars.ContextVar`: it holds for its own thread and asyncio task only, nested blocks
compose op by op, and leaving one restores exactly what was there. A variant op (``VARIANT_OF``) follows
the selection of the op it varies unless named itself.

A backend asked for by name that cannot run the inputs raises with the reason. ``auto`` tries, per op
and device type, the order measured in ``benchmarks/results/`` (``vqfast/auto_order.json``, derived from
them by ``python -m benchmarks.auto_order``), skips each implementation that declares the inputs
unsupported, and ends at ``torch``, quietly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

OPS = ("nearest_code", "group_norm_act", "vector_quantize", "vector_quantize_stats", "codebook_gather")
# Ops that are variants of another (vector_quantize_stats: vector_quantize that also returns per-code
# counts and sums): selected as it unless named themselves, and tried by auto in its measured order.
VARIANT_OF = {"vector_quantize_stats": "vector_quantize"}
BACKENDS = ("torch", "triton", "native", "cuda_host")
EMULATED = ("cuda_host",)  # run GPU code on the CPU for tests: never picked by auto, never benchmarked


class Implementation(NamedTuple):
    """One backend's implementation of one op; each function takes the op's lowered arguments."""

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None  # None for ops without a backward (nearest_code)
    unsupported: Callable[[Any], str]  # the op's ``Inputs`` -> "" when it can run them, else why not


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is unavailable; empty when available


# --- the registry --------------------------------------------------------------------------------


def _torch() -> Mapping[str, Implementation]:
    from vqfast.reference import IMPLEMENTATIONS

    return IMPLEMENTATIONS


def _triton() -> Mapping[str, Implementation]:
    from vqfast.triton import IMPLEMENTATIONS

    return IMPLEMENTATIONS


def _native() -> Mapping[str, Implementation]:
    from vqfast.native import IMPLEMENTATIONS

    return IMPLEMENTATIONS


def _cuda_host() -> Mapping[str, Implementation]:
    from vqfast.cuda_host import IMPLEMENTATIONS

    return IMPLEMENTATIONS


_LOADERS: dict[str, Callable[[], Mapping[str, Implementation]]] = {
    "torch": _torch,
    "triton": _triton,
    "native": _native,
    "cuda_host": _cuda_host,
}


def _triton_precondition() -> str:
    """Why triton cannot load in this process, decided without importing it: it needs a CUDA GPU, or
    ``TRITON_INTERPRET=1`` for CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return ""
    return "Triton needs a CUDA GPU (CPU tensors run only under TRITON_INTERPRET=1, set before triton is imported)"


@functools.cache
def _load(backend: str) -> tuple[Mapping[str, Implementation], str]:
    """The backend's implementations, or an empty table and why it cannot be used here."""
    if backend == "triton" and (reason := _triton_precondition()):
        return {}, reason
    try:
        return _LOADERS[backend](), ""
    except ImportError as exc:
        return {}, f"its package could not be imported: {exc}"


def registry() -> dict[str, dict[str, Implementation]]:
    """op -> backend -> implementation, for the backends that load here."""
    return {op: {b: _load(b)[0][op] for b in BACKENDS if op in _load(b)[0]} for op in OPS}


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, for those unavailable, why."""
    return {name: BackendStatus(not _load(name)[1], _load(name)[1]) for name in BACKENDS}


# --- auto's order ----------------------------------------------------------------------------------

AUTO_ORDER_FILE = Path(__file__).with_name("auto_order.json")


@functools.cache
def auto_order() -> dict[str, dict[str, tuple[str, ...]]]:
    """device type -> op -> the backends ``auto`` tries first, fastest first, as measured in
    ``benchmarks/results/``; ``torch`` ends every order. Devices or ops absent there get ``torch`` only."""
    measured = json.loads(AUTO_ORDER_FILE.read_text())
    return {device: {op: tuple(order) for op, order in ops.items()} for device, ops in measured["order"].items()}


# --- selection -------------------------------------------------------------------------------------


class Selection(NamedTuple):
    """A backend name per op; ``default`` (None: inherit the enclosing one) for ops not in ``per_op``."""

    default: str | None
    per_op: Mapping[str, str]

    def over(self, outer: Selection) -> Selection:
        """This selection nested inside ``outer``: what it names wins, op by op; the rest is outer's."""
        if self.default is not None:
            return Selection(self.default, dict(self.per_op))
        return Selection(outer.default, {**outer.per_op, **self.per_op})

    def name(self, op: str) -> str:
        if op not in self.per_op and op in VARIANT_OF:
            return self.name(VARIANT_OF[op])
        return self.per_op.get(op, self.default or "auto")


def parse(spec: str | None = None, **per_op: str) -> Selection:
    """``"auto,group_norm_act=triton"`` plus keyword overrides -> a :class:`Selection`."""
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'native' or 'auto,nearest_code=native', got {type(spec).__name__}")
    default, overrides = None, {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        if "=" in part:
            op, _, name = part.partition("=")
            overrides[op.strip()] = name.strip()
        elif default is not None:
            raise ValueError(f"backend selection {spec!r} names two defaults ({default!r} and {part!r}): name one")
        else:
            default = part
    overrides.update(per_op)
    for op, name in [("default", default), *overrides.items()]:
        if not isinstance(name, str) and not (op == "default" and name is None):
            raise TypeError(f"the backend for {op} must be a str, got {type(name).__name__}")
        if op != "default" and op not in OPS:
            raise ValueError(f"unknown op {op!r} in backend selection; ops are {', '.join(OPS)}")
        if name is not None and name != "auto" and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} for {op}; choose auto, {', '.join(BACKENDS)}")
    return Selection(default, overrides)


_process_default = parse(os.environ.get("VQFAST_BACKEND")).over(Selection("auto", {}))
# The innermost use_backend block of this thread or task, already composed with the blocks around it.
_block: contextvars.ContextVar[Selection | None] = contextvars.ContextVar("vqfast_backend", default=None)


def current() -> Selection:
    """The selection in force here: the innermost ``use_backend`` block, else the process default."""
    return _block.get() or _process_default


def set_backend(spec: str | None = None, **per_op: str) -> None:
    """Set the process default: ``set_backend("triton")``, ``set_backend("auto", nearest_code="native")``
    or ``set_backend("auto,nearest_code=native")``; ops not named take ``auto`` (or the default named).
    ``use_backend`` blocks open in other threads or tasks keep their own choice."""
    global _process_default
    _process_default = parse(spec, **per_op).over(Selection("auto", {}))


@contextlib.contextmanager
def use_backend(spec: str | None = None, **per_op: str) -> Iterator[None]:
    """Like :func:`set_backend`, for a ``with`` block of this thread or asyncio task only. Nested
    blocks compose: ``use_backend(nearest_code="torch")`` inside ``use_backend("native")`` runs
    nearest_code on torch and every other op on native."""
    token = _block.set(parse(spec, **per_op).over(current()))
    try:
        yield
    finally:
        _block.reset(token)


def selected(op: str) -> str:
    """The backend name chosen for ``op`` here (possibly ``auto``)."""
    return current().name(op)


def _reason(backend: str, op: str, inputs: Any) -> str:
    """Empty when ``backend`` can run ``op`` on ``inputs``, else why not."""
    table, reason = _load(backend)
    if reason:
        return reason
    if op not in table:
        return f"it has no {op} implementation"
    return table[op].unsupported(inputs)


def choose(op: str, inputs: Any, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``inputs`` (whose tensors are on ``device``)."""
    name = selected(op)
    if name == "auto":
        for candidate in auto_order().get(device.type, {}).get(VARIANT_OF.get(op, op), ()):
            if not _reason(candidate, op, inputs):
                return candidate
        return "torch"
    reason = _reason(name, op, inputs)
    if reason:
        raise RuntimeError(f"vqfast backend {name!r} cannot run {op} on these {device.type} inputs: {reason}")
    return name


def forward(op: str, inputs: tuple) -> Any:
    """Run ``op``'s forward on its lowered ``inputs`` with the backend chosen for them."""
    return _load(choose(op, inputs, inputs[0].device))[0][op].forward(*inputs)


def backward(op: str, backend: str, *args: Any) -> Any:
    """Run ``op``'s backward on ``backend``, the one its forward chose (recorded by the autograd context,
    so that a backward run by the autograd engine's own threads keeps the forward's choice)."""
    return _load(backend)[0][op].backward(*args)
