"""vqfast's VQModel inside diffusers pipelines, swapped in with ``vqfast.patch_pipeline``: tiny random
components (nothing from the hub), a fixed generator, the same images as with diffusers' own VQModel."""

import json
import sys

import diffusers
import numpy as np
import pytest
import torch

import vqfast


def run_twice(pipe: diffusers.DiffusionPipeline, component: str, **call) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's images with diffusers' VQModel, then with vqfast's after patch_pipeline."""
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    assert vqfast.patch_pipeline(pipe) is pipe
    assert type(getattr(pipe, component)) is vqfast.VQModel
    assert pipe.components[component] is getattr(pipe, component)
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    return images, expected


def assert_images_match(images: np.ndarray, expected: np.ndarray, assert_matches) -> None:
    assert images.shape == expected.shape
    assert_matches(torch.from_numpy(images), torch.from_numpy(expected))


def test_ldm_pipeline(make_pair, assert_matches):
    """LDMPipeline decodes through the quantizer: decode(latents / scaling_factor)."""
    vqvae, _ = make_pair(
        {
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 3,
        }
    )
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    pipe = diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=diffusers.DDIMScheduler())
    images, expected = run_twice(pipe, "vqvae", batch_size=2, num_inference_steps=2)
    assert images.shape == (2, 32, 32, 3)
    assert_images_match(images, expected, assert_matches)


def test_kandinsky_v22_pipeline(make_pair, public_config, assert_matches):
    """KandinskyV22Pipeline's movq (MoVQ, SpatialNorm): decode(latents, force_not_quantize=True)["sample"]."""
    movq, _ = make_pair(public_config("tiny-random-kandinsky-v22-decoder-movq"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    embeds = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    images, expected = run_twice(
        pipe,
        "movq",
        image_embeds=embeds[:1],
        negative_image_embeds=embeds[1:],
        height=64,
        width=64,
        num_inference_steps=2,
    )
    assert images.shape == (1, 64, 64, 3)
    assert_images_match(images, expected, assert_matches)


def test_amused_pipeline(make_pair, assert_matches):
    """AmusedPipeline decodes token ids: decode(ids, force_not_quantize=True, shape=(B, h, w, C)). The text
    encoder plays no part in that, so the prompt embeddings are given directly (no tokenizer, no hub)."""
    vqvae, _ = make_pair(
        {
            "block_out_channels": [8],
            "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"],
            "latent_channels": 8,
            "norm_num_groups": 8,
            "num_vq_embeddings": 8,
            "sample_size": 8,
            "mid_block_add_attention": False,
            "lookup_from_codebook": True,
        }
    )
    torch.manual_seed(0)
    transformer = diffusers.UVit2DModel(
        hidden_size=8,
        cond_embed_dim=8,
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,
        encoder_hidden_size=8,
        vocab_size=32,
        codebook_size=8,
        in_channels=8,
        block_out_channels=8,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    scheduler = diffusers.AmusedScheduler(mask_token_id=31)
    pipe = diffusers.AmusedPipeline(
        vqvae=vqvae, tokenizer=None, text_encoder=None, transformer=transformer, scheduler=scheduler
    )
    g = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(2, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 4, 8, generator=g),
        "negative_prompt_embeds": torch.randn(2, 8, generator=g),
        "negative_encoder_hidden_states": torch.randn(2, 4, 8, generator=g),
    }
    images, expected = run_twice(pipe, "vqvae", height=8, width=8, num_inference_steps=2, **embeds)
    assert images.shape == (2, 8, 8, 3)
    assert_images_match(images, expected, assert_matches)


@torch.no_grad()
def test_vq_diffusion_vqvae_calls(make_pair, public_config, assert_matches):
    """VQDiffusionPipeline's calls (its transformer needs a CLIP tokenizer from the hub): codebook
    entries for the sampled token ids, then decode(embeddings, force_not_quantize=True)."""
    ref, ours = make_pair(public_config("vq-diffusion-ithq"))
    batch, height, width = 2, 4, 4
    sample = torch.randint(0, ref.config.num_vq_embeddings, (batch, height * width), generator=torch.Generator())
    results = []
    for vqvae in (ours, ref):
        embeddings_shape = (batch, height, width, vqvae.config.vq_embed_dim)
        embeddings = vqvae.quantize.get_codebook_entry(sample, shape=embeddings_shape)
        results.append((embeddings, vqvae.decode(embeddings, force_not_quantize=True).sample))
    (embeddings, image), (ref_embeddings, ref_image) = results
    assert torch.equal(embeddings, ref_embeddings)
    assert_matches(image, ref_image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_pipeline_keeps_device_and_dtype(make_pair, dtype):
    vqvae, _ = make_pair({"block_out_channels": [32], "latent_channels": 3})
    pipe = diffusers.LDMPipeline(vqvae=vqvae.to(dtype), unet=None, scheduler=diffusers.DDIMScheduler())
    vqfast.patch_pipeline(pipe)
    assert type(pipe.vqvae) is vqfast.VQModel
    assert pipe.vqvae.dtype == dtype and pipe.vqvae.device == vqvae.device
    assert vqfast.patch_pipeline(pipe).vqvae is pipe.vqvae  # already vqfast: left alone


def test_saved_patched_pipeline_loads_with_diffusers_alone(make_pair, monkeypatch, tmp_path):
    """model_index.json of a patched pipeline names diffusers' VQModel (vqfast writes diffusers' files), so
    diffusers loads the pipeline with vqfast unimportable; patching it again brings vqfast back."""
    vqvae, _ = make_pair({"block_out_channels": [32], "latent_channels": 3})
    unet = diffusers.UNet2DModel(
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
    )
    pipe = vqfast.patch_pipeline(diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=diffusers.DDIMScheduler()))
    assert type(pipe.vqvae) is vqfast.VQModel
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vqvae"] == ["diffusers", "VQModel"]

    for name in [name for name in sys.modules if name.split(".")[0] == "vqfast"]:
        monkeypatch.setitem(sys.modules, name, None)  # import vqfast... now raises ImportError
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    monkeypatch.undo()
    assert type(loaded) is diffusers.LDMPipeline and type(loaded.vqvae) is diffusers.VQModel
    for key, value in pipe.vqvae.state_dict().items():
        assert torch.equal(loaded.vqvae.state_dict()[key], value), key
    assert type(vqfast.patch_pipeline(loaded).vqvae) is vqfast.VQModel
