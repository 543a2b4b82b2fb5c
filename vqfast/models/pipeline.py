"""Swap the diffusers VQModels of a pipeline for vqfast ones."""

import diffusers

from vqfast.models.vq_model import VQModel


def patch_pipeline(pipe: diffusers.DiffusionPipeline) -> diffusers.DiffusionPipeline:
    """Replace, in place, every ``diffusers.VQModel`` component of ``pipe`` (LDM and VQ-Diffusion ``vqvae``,
    Kandinsky ``movq``, aMUSEd ``vqvae``) by a vqfast ``VQModel`` with the same config, weights, device and
    dtype. Returns ``pipe``.

    The pipeline's config (its model_index.json once saved) keeps naming diffusers' VQModel, also for a
    vqfast component the pipeline was built with: vqfast saves diffusers' files, so a saved pipeline loads
    with diffusers alone, and patch_pipeline after loading brings vqfast back."""
    for name, component in pipe.components.items():
        if isinstance(component, diffusers.VQModel):
            component = VQModel.from_diffusers(component)
            setattr(pipe, name, component)  # records ("vqfast.models.vq_model", "VQModel") in the config
        if isinstance(component, VQModel):
            pipe.register_to_config(**{name: ("diffusers", "VQModel")})
    return pipe
