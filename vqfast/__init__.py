"""vqfast: a faster drop-in for diffusers' VQModel.

``from vqfast import VQModel`` instead of ``from diffusers import VQModel``; the kernels behind it
are chosen with ``VQFAST_BACKEND`` or :func:`set_backend` (see :mod:`vqfast.backend`).
:mod:`vqfast.ops` needs only torch; the model classes need diffusers and are imported on first use.
"""

from vqfast import ops
from vqfast.backend import backends, set_backend, use_backend

__all__ = ["VQModel", "backends", "ops", "patch_pipeline", "set_backend", "use_backend"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("VQModel", "patch_pipeline"):
        from vqfast import models

        return getattr(models, name)
    raise AttributeError(f"module 'vqfast' has no attribute {name!r}")
