"""Swap the diffusers VQModels of a pipeline for vqfast ones."""

import diffusers

from vqfast.models.vq_model import VQModel


def patch_pipeline(pipe: diffusers.DiffusionPipeline) -> diffusers.DiffusionPipeline:
    """Replace, in place, every ``diffusers.VQModel`` component of ``pipe`` (LDM and VQ-Diffusion ``vqvae``,
    Kandinsky ``movq``, aMUSEd ``vqvae``) by a vqfast ``VQModel`` with the same config, weights, device and
    dtype. Returns ``pipe``."""
    for name, component in pipe.components.items():
        if isinstance(component, diffusers.VQModel):
            setattr(pipe, name, VQModel.from_diffusers(component))
    return pipe
