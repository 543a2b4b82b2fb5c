"""Tiled and sliced encode/decode of vqfast.VQModel (issue 14): AutoencoderKL's knobs and defaults, the
untouched default path, tiles stitched exactly as AutoencoderKL stitches them, quantization on the whole
latent, MoVQ's zq crops, lookup_from_codebook, and how often tiled encode's codes equal untiled ones."""

import diffusers
import pytest
import torch
from torch import nn

import vqfast
from vqfast.models.vq_model import _channels_last

TILE_PX = 32  # the tests' tile: 16 latent positions for the tiny configs (2x downsampling)


def tiny_model(make_pair, config: dict, seed: int = 0) -> vqfast.VQModel:
    model = make_pair(config, seed)[1].eval()
    model.tile_sample_min_size, model.tile_latent_min_size = TILE_PX, TILE_PX // 2
    return model


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def codes(model: vqfast.VQModel, latents: torch.Tensor) -> torch.Tensor:
    return vqfast.ops.nearest_code(latents, model.quantize.embedding.weight)


def test_knobs_are_autoencoder_kl_ones(tiny_config):
    """Off by default, and the tile knobs' values AutoencoderKL gives the same sample_size and depth."""
    ours = vqfast.VQModel(**(tiny_config | {"sample_size": 64}))
    kl = diffusers.AutoencoderKL(block_out_channels=tiny_config["block_out_channels"], sample_size=64)
    assert not ours.use_tiling and not ours.use_slicing
    for knob in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor"):
        assert getattr(ours, knob) == getattr(kl, knob), knob
    ours.enable_tiling()
    ours.enable_slicing()
    assert ours.use_tiling and ours.use_slicing
    ours.disable_tiling()
    ours.disable_slicing()
    assert not ours.use_tiling and not ours.use_slicing


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_off_is_the_plain_path(tiny_config, make_pair, channels_last):
    """With tiling and slicing off (or on, below a tile), every output is bit for bit the plain composition
    of the submodules that VQModel ran before tiling existed, in the input's memory format."""
    model = tiny_model(make_pair, tiny_config)
    x = images(2, TILE_PX, TILE_PX)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        h = model.quant_conv(model.encoder(_channels_last(x))).contiguous(memory_format=fmt)
        quant, loss, _ = model.quantize(_channels_last(h))
        spatial = quant if model.config.norm_type == "spatial" else None
        dec = model.decoder(model.post_quant_conv(quant), spatial).contiguous(memory_format=fmt)
        for tiling in (False, True):
            model.use_tiling = tiling
            out = model.decode(model.encode(x).latents)
            assert torch.equal(model.encode(x).latents, h) and torch.equal(out.sample, dec), tiling
            assert torch.equal(out.commit_loss, loss)
            assert out.sample.is_contiguous(memory_format=fmt)


def test_slicing(tiny_config, make_pair):
    """One sample at a time through encoder and decoder: the same images (float rounding of batched
    convolutions aside) and the same commit_loss, quantization running on the whole batch."""
    model = tiny_model(make_pair, tiny_config)
    x = images(3, 24, 40)
    with torch.no_grad():
        whole = model(x)
        latents = model.encode(x).latents
        model.enable_slicing()
        sliced = model(x)
        torch.testing.assert_close(model.encode(x).latents, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.sample, whole.sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.commit_loss, whole.commit_loss, rtol=1e-6, atol=0)


class _Call(nn.Module):
    """A callable as a module, for AutoencoderKL's encoder/decoder slots."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def autoencoder_kl_around(model: vqfast.VQModel) -> diffusers.AutoencoderKL:
    """diffusers' AutoencoderKL whose encoder is ``model``'s encoder + quant_conv and whose decoder is its
    post_quant_conv + decoder (conditioned on the tile, for MoVQ), with ``model``'s tile knobs: its tiled
    paths are then AutoencoderKL's own tiling and blending around our networks."""
    kl = diffusers.AutoencoderKL(block_out_channels=[8], norm_num_groups=8)
    kl.encoder, kl.quant_conv = _Call(model._encoder), nn.Identity()
    kl.decoder, kl.post_quant_conv = _Call(model._decoder), nn.Identity()
    for knob in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor"):
        setattr(kl, knob, getattr(model, knob))
    return kl


def test_tiles_are_stitched_as_autoencoder_kl_does(tiny_config, make_pair):
    """Same tiles, same blends of the seams, same crops as AutoencoderKL (at knobs where its pixel and
    latent grids agree: 32-pixel tiles, overlap 0.25), for encode and decode, with partial tiles at the
    edges (equal up to float rounding: AutoencoderKL weighs with Python floats)."""
    model = tiny_model(make_pair, tiny_config)
    kl = autoencoder_kl_around(model)
    x = images(2, 64, 80)
    with torch.no_grad():
        latents = model.tiled_encode(x).latents
        torch.testing.assert_close(latents, kl._tiled_encode(x), rtol=1e-5, atol=1e-5)
        quant = model.quantize(latents)[0]
        ours = model.tiled_decode(quant, force_not_quantize=True).sample
        torch.testing.assert_close(ours, kl.tiled_decode(quant).sample, rtol=1e-5, atol=1e-5)
    assert latents.shape == model.encode(x).latents.shape and ours.shape == x.shape


def test_tiled_decode_quantizes_the_whole_latent(tiny_config, make_pair):
    """commit_loss is the untiled one exactly; odd, non-square sizes come out whole, in the input's format;
    the tiled image is near the untiled one (seams blended, norms' statistics per tile)."""
    model = tiny_model(make_pair, tiny_config)
    with torch.no_grad():
        h = model.encode(images(2, 88, 56)).latents  # 44 x 28 latents: 3 x 2 tiles, the last ones partial
        untiled = model.decode(h)
        model.enable_tiling()
        tiled = model.decode(h)
        tiled_cl = model.decode(h.contiguous(memory_format=torch.channels_last))
    assert torch.equal(tiled.commit_loss, untiled.commit_loss)
    assert tiled.sample.shape == untiled.sample.shape == (2, 3, 88, 56) and tiled.sample.is_contiguous()
    assert tiled_cl.sample.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tiled_cl.sample, tiled.sample, rtol=1e-5, atol=1e-5)
    error = torch.linalg.vector_norm(tiled.sample - untiled.sample) / torch.linalg.vector_norm(untiled.sample)
    assert 0 < error < 0.5


def test_movq_decoder_tiles_get_their_zq_crop(tiny_configs, make_pair):
    """Each decoder call of a tiled MoVQ decode is conditioned on the very latent tile it decodes."""
    model = tiny_model(make_pair, tiny_configs["spatial"])
    calls = []

    def check(module, args):
        sample, zq = args
        calls.append(zq.shape[2:])
        assert torch.equal(model.post_quant_conv(zq), sample)

    model.decoder.register_forward_pre_hook(check)
    with torch.no_grad():
        model.tiled_decode(torch.randn(1, 4, 40, 24), force_not_quantize=True)
    assert calls == [(16, 16), (16, 12), (16, 16), (16, 12), (16, 16), (16, 12), (4, 16), (4, 12)]


def test_lookup_from_codebook_tiled(tiny_configs, make_pair):
    """aMUSEd's decode(indices, force_not_quantize=True, shape) tiles the looked-up latent."""
    model = tiny_model(make_pair, tiny_configs["group"])
    indices = torch.randint(0, model.config.num_vq_embeddings, (2, 40 * 24))
    latent = model.quantize.get_codebook_entry(indices, (2, 40, 24, 4))
    model.enable_tiling()
    with torch.no_grad():
        expected = model.decode(latent, force_not_quantize=True).sample
        model.register_to_config(lookup_from_codebook=True)
        out = model.decode(indices, force_not_quantize=True, shape=(2, 40, 24, 4))
    assert torch.equal(out.sample, expected) and out.sample.shape == (2, 3, 80, 48)
    assert torch.equal(out.commit_loss, torch.zeros(2))


def test_tiled_backward(tiny_configs, make_pair):
    """Training through the tiles: the in-place seam blends keep autograd's graph intact."""
    model = tiny_model(make_pair, tiny_configs["spatial"]).train()
    model.enable_tiling()
    x = images(1, 48, 48).requires_grad_()
    out = model(x)
    (out.sample.square().mean() + out.commit_loss.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "knobs,name",
    [
        ({"tile_sample_min_size": 48}, "tile_sample_min_size"),
        ({"tile_latent_min_size": 0}, "tile_latent_min_size"),
        ({"tile_overlap_factor": 1.0}, "tile_overlap_factor"),
    ],
)
def test_bad_knobs(tiny_configs, knobs, name):
    model = vqfast.VQModel(**tiny_configs["group"])
    model.enable_tiling()
    for knob, value in knobs.items():
        setattr(model, knob, value)
    with pytest.raises(ValueError, match=name):
        model.tiled_encode(images(1, 64, 64))


# Share of latent positions whose code from tiled encode equals untiled encode's, at the tiles above (16
# latent positions) on 96x96 images, measured with seeds 0-2 (GroupNorm statistics and attention span the
# whole tile, so no overlap makes every code equal; more overlap makes more of them equal):
#   group:   overlap 0: 0.60-0.72, 0.25: 0.72-0.82, 0.5: 0.78-0.85, 0.75: 0.78-0.86
#   spatial: overlap 0: 0.82-0.91, 0.25: 0.89-0.93, 0.5: 0.92-0.95, 0.75: 0.92-0.95
# The bounds hold seed 0's figures (group 0.72 / 0.85, spatial 0.91 / 0.95) with a margin.
EQUAL_CODES = {"group": (0.80, 0.08), "spatial": (0.90, 0.025)}  # (share at overlap 0.5, gain over overlap 0)


@pytest.mark.parametrize("norm", ["group", "spatial"])
def test_tiled_encode_codes(tiny_configs, make_pair, norm):
    model = tiny_model(make_pair, tiny_configs[norm])
    x = images(1, 96, 96, seed=10)
    share = {}
    with torch.no_grad():
        untiled = codes(model, model.encode(x).latents)
        for overlap in (0.0, 0.5):
            model.tile_overlap_factor = overlap
            share[overlap] = (codes(model, model.tiled_encode(x).latents) == untiled).double().mean().item()
    least, gain = EQUAL_CODES[norm]
    assert share[0.5] >= least and share[0.5] - share[0.0] >= gain, share
