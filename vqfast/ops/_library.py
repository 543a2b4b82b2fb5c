"""The ``vqfast`` operator library: each op's schema, its kernel (the registry's choice of backend),
its fake (meta) implementation and its autograd formula.

Ops are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: custom_op wraps
every kernel in ``torch._disable_dynamo``, whose first call imports torch._dynamo (about 1.4 s), so a
process's first op call stalled. These ops trace under ``torch.compile`` the same way (fake kernels,
no graph breaks) and the first call costs what the kernel costs.
"""

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("vqfast", "DEF")


def define(schema: str, kernel: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``vqfast::<schema>`` with ``kernel`` for every device and ``fake`` for tracing. Kernels
    must return new tensors: never an input or a view of one (tests run torch.library.opcheck)."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"vqfast::{name}", fake, lib=LIBRARY)
    return getattr(torch.ops.vqfast, name).default


def differentiable(op: torch._ops.OpOverload, backward: Callable, setup_context: Callable) -> None:
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=LIBRARY)
