"""Shared fixtures: the public VQModel configurations and pairs of diffusers/vqfast models with equal weights."""

import json
from pathlib import Path

import diffusers
import pytest
import torch

import vqfast

# The real public configurations (shared/configs/*.json; keys starting with "_" are comments).
# They live beside the repository (../shared/configs), where CI has them too.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "shared" / "configs"

# Too heavy for CPU CI at full width (kandinsky-3's 256..1024 channels: ~270M parameters, 4x kandinsky-2's):
# the same architecture with blocks a quarter as wide (the test id says "narrow").
NARROWED = {"kandinsky-3-movq": [64, 128, 128, 256]}

# A small group-norm configuration with attention in encoder, decoder and mid block.
TINY_GROUP = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "num_vq_embeddings": 64,
}


def load_config(name: str) -> dict:
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    if name in NARROWED:
        config["block_out_channels"] = NARROWED[name]
    return config


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``config_name``: every file of the configuration directory."""
    if "config_name" in metafunc.fixturenames:
        if not CONFIG_DIR.is_dir():
            raise FileNotFoundError(f"no VQModel configurations at {CONFIG_DIR}")
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        ids = [f"{n}-narrow" if n in NARROWED else n for n in names]
        # Module scope: pytest runs a configuration's tests together, so ``pair`` is built once for them.
        metafunc.parametrize("config_name", names, ids=ids, scope="module")


@pytest.fixture
def config(config_name: str) -> dict:
    return load_config(config_name)


@pytest.fixture
def public_config():
    """``public_config(name)``: the configuration of ``<name>.json`` (narrowed where NARROWED says)."""
    return load_config


@pytest.fixture
def tiny_configs() -> dict[str, dict]:
    """Small configurations with attention everywhere: GroupNorm, and SpatialNorm (MoVQ)."""
    return {"group": dict(TINY_GROUP), "spatial": load_config("tiny-random-kandinsky-v22-decoder-movq")}


@pytest.fixture(params=["group", "spatial"])
def tiny_config(request: pytest.FixtureRequest, tiny_configs: dict[str, dict]) -> dict:
    return tiny_configs[request.param]


def randomize(model: diffusers.VQModel, latent_std: float = 1.0) -> diffusers.VQModel:
    """Give the norms non-trivial affine parameters and the codebook the latents' spread, so that both
    matter and the nearest-code search has clear winners (diffusers' uniform(-1/K, 1/K) codebook makes
    every code nearly equidistant from a latent)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
        model.quantize.embedding.weight.normal_(std=latent_std)
    return model


def build_pair(config: dict, seed: int = 0) -> tuple[diffusers.VQModel, vqfast.VQModel]:
    """A diffusers VQModel with random weights (see ``randomize``) and a vqfast one with the same."""
    torch.manual_seed(seed)
    ref = diffusers.VQModel(**config)
    with torch.no_grad():
        probe = ref.encode(torch.randn(1, config.get("in_channels", 3), 32, 32)).latents
    randomize(ref, latent_std=probe.std().item())
    return ref, vqfast.VQModel.from_diffusers(ref)


@pytest.fixture
def make_pair():
    """``make_pair(config, seed=0) -> (diffusers VQModel, vqfast VQModel)`` with the same random weights."""
    return build_pair


@pytest.fixture(scope="module")
def pair(config_name: str) -> tuple[diffusers.VQModel, vqfast.VQModel]:
    """``build_pair`` of the public configuration ``config_name``, shared by its tests: leave it as found."""
    return build_pair(load_config(config_name))


@pytest.fixture
def assert_matches():
    """The contract's float32 bound: within ``rtol`` (1e-5) of the reference, relative to ``scale``
    (by default the reference's largest absolute value)."""

    def check(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, msg: str = "", scale=None) -> None:
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, msg
        atol = rtol * (ref.abs().max().item() if scale is None else scale)
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")

    return check
