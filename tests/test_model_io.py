"""Checkpoints and conversions: state_dict both ways (old attention key names too), save_pretrained /
from_pretrained with diffusers in both directions, from_diffusers / to_diffusers, constructor errors."""

import json

import diffusers
import pytest
import safetensors.torch
import torch

import vqfast
from vqfast.models.quantizer import VectorQuantizer

# diffusers' attention parameters before and after it renamed them.
DEPRECATED = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def deprecated_state_dict(state_dict: dict) -> dict:
    """``state_dict`` with the attention keys of old checkpoints: query, key, value, proj_attn."""
    renamed = {}
    for key, value in state_dict.items():
        for new, old in DEPRECATED.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def public(config) -> dict:
    """A model config without the bookkeeping keys (_name_or_path, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key, value in sd_a.items():
        assert torch.equal(value, sd_b[key]), key


def test_state_dict_loads_both_ways(tiny_config, make_pair):
    ref, ours = make_pair(tiny_config)
    fresh_ours = vqfast.VQModel(**tiny_config)
    fresh_ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_weights(fresh_ours, ref)
    fresh_ref = diffusers.VQModel(**tiny_config)
    fresh_ref.load_state_dict(ours.state_dict(), strict=True)
    assert_same_weights(fresh_ref, ours)


def conv_weights_channels_last(model: torch.nn.Module) -> bool:
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_weights_channels_last_inside_contiguous_in_checkpoints(tiny_config, make_pair, tmp_path):
    """Convolution weights live in channels_last however the model was made or loaded; state_dict and the
    files hold diffusers' contiguous layout (safetensors refuses anything else)."""
    ref, ours = make_pair(tiny_config)
    assert conv_weights_channels_last(vqfast.VQModel(**tiny_config)) and conv_weights_channels_last(ours)
    assert all(value.is_contiguous() for value in ours.state_dict().values())
    safetensors.torch.save_file(ours.state_dict(), tmp_path / "direct.safetensors")
    ours.save_pretrained(tmp_path / "ours")
    loaded = vqfast.VQModel.from_pretrained(tmp_path / "ours")
    assert conv_weights_channels_last(loaded)
    assert_same_weights(loaded, ref)
    assert not conv_weights_channels_last(ours.to_diffusers())  # diffusers' own layout
    reloaded = vqfast.VQModel(**tiny_config)
    reloaded.load_state_dict(ref.state_dict(), assign=True)
    assert conv_weights_channels_last(reloaded)


def test_deprecated_attention_keys_load(tiny_config, make_pair, tmp_path):
    ref, _ = make_pair(tiny_config)
    old = deprecated_state_dict(ref.state_dict())
    assert any(".proj_attn." in key for key in old)

    model = vqfast.VQModel(**tiny_config)
    # from_pretrained's renaming, which finds the attention blocks by their _from_deprecated_attn_block
    assert model._fix_state_dict_keys_on_load(dict(old)).keys() == ref.state_dict().keys()
    model.load_state_dict(old, strict=True)  # the attention blocks' load_state_dict pre-hook
    assert_same_weights(model, ref)

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel", **tiny_config}))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in old.items()}, tmp_path / "diffusion_pytorch_model.safetensors"
    )
    assert_same_weights(vqfast.VQModel.from_pretrained(tmp_path), ref)


@torch.no_grad()
def test_save_pretrained_round_trip_with_diffusers(tiny_config, make_pair, assert_matches, tmp_path):
    _, ours = make_pair(tiny_config)
    x = torch.randn(2, 3, 32, 32)
    ours.save_pretrained(tmp_path / "vqfast")
    assert {p.name for p in (tmp_path / "vqfast").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded_ref = diffusers.VQModel.from_pretrained(tmp_path / "vqfast")
    assert_same_weights(loaded_ref, ours)
    assert_matches(ours(x).sample, loaded_ref(x).sample)

    loaded_ref.save_pretrained(tmp_path / "diffusers", safe_serialization=False)  # .bin through torch.load
    loaded = vqfast.VQModel.from_pretrained(tmp_path / "diffusers")
    assert type(loaded) is vqfast.VQModel and public(loaded.config) == public(ours.config)
    assert_same_weights(loaded, ours)
    assert torch.equal(loaded(x).sample, ours(x).sample)

    half = vqfast.VQModel.from_pretrained(tmp_path / "vqfast", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_from_diffusers_and_back(tiny_config, make_pair):
    ref, _ = make_pair(tiny_config)
    ref = ref.to(torch.bfloat16).train()
    ref.encoder.requires_grad_(False)
    ours = vqfast.VQModel.from_diffusers(ref)
    assert type(ours) is vqfast.VQModel and public(ours.config) == public(ref.config)
    assert ours.dtype == torch.bfloat16 and ours.device == ref.device and ours.training
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in ref.parameters()]
    assert_same_weights(ours, ref)
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).sample.dtype == torch.bfloat16
        ours.quant_conv.weight.add_(1)  # a copy, not shared storage
    assert not torch.equal(ours.quant_conv.weight, ref.quant_conv.weight)

    back = ours.eval().to_diffusers()
    assert type(back) is diffusers.VQModel and public(back.config) == public(ref.config) and not back.training
    assert_same_weights(back, ours)


def test_unsupported_arguments_raise():
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer(8, 4, beta=0.25, remap="used_codes.npy")
    with pytest.raises(ValueError, match="DownBlock2D"):
        vqfast.VQModel(down_block_types=("DownBlock2D",))
    with pytest.raises(ValueError, match="norm_type"):
        vqfast.VQModel(norm_type="ada_group")
