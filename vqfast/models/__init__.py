"""vqfast's VQModel (a drop-in for diffusers') and the pipeline patcher; these need diffusers."""

from vqfast.models.pipeline import patch_pipeline
from vqfast.models.vq_model import VQModel

__all__ = ["VQModel", "patch_pipeline"]
