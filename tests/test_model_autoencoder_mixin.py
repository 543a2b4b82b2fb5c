"""diffusers' AutoencoderTesterMixin (its tiling and slicing tests, tests/models/autoencoders/testing_utils.py
in the diffusers repository, mixed into the AutoencoderKL and VQModel testers there) restated, on
vqfast.VQModel.

That file comes with neither diffusers' wheel nor its sdist (the 0.42.1 sdist carries tests/testing_utils.py
only), and CI reaches PyPI alone, so it cannot be fetched at setup time; vendoring it would copy diffusers'
code. Its three tests are restated here with the same inputs, calls and assertions (the stricter
``torch.allclose`` of its newer revision for the disabled-again outputs), on its testers' configurations:
AutoencoderKL's, as a control that the restatement passes where diffusers' own does, and VQModel's with
vqfast's model. At those configurations a 32x32 input is no larger than a tile (sample_size 32), so, as
for AutoencoderKL, the tiling test runs the untiled path (tests/test_model_tiling.py runs real tiles; at
16-pixel tiles this test's 0.5 bound fails: 1.33, GroupNorm statistics of 8x8-latent tiles).
"""

import inspect

import diffusers
import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.utils.torch_utils import randn_tensor

import vqfast

DEVICE = "cpu"


def first_output(output) -> torch.Tensor:
    """The mixin's ``model(**inputs)[0]``, unwrapped when it is a DecoderOutput (Mochi's case there)."""
    output = output[0]
    return output.sample if isinstance(output, DecoderOutput) else output


class AutoencoderTests:
    """The mixin's tests; a tester supplies ``model_class`` and ``prepare_init_args_and_inputs_for_common``."""

    model_class: type

    def init_dict(self) -> dict:
        raise NotImplementedError

    def prepare_init_args_and_inputs_for_common(self) -> tuple[dict, dict]:
        generator = torch.Generator("cpu").manual_seed(0)
        image = randn_tensor((4, 3, 32, 32), generator=generator, device=torch.device(DEVICE))
        return self.init_dict(), {"sample": image}

    @staticmethod
    def _accepts_generator(model) -> bool:
        return "generator" in inspect.signature(model.forward).parameters

    @staticmethod
    def _accepts_norm_num_groups(model_class) -> bool:
        return "norm_num_groups" in inspect.signature(model_class.__init__).parameters

    def test_forward_with_norm_groups(self):
        if not self._accepts_norm_num_groups(self.model_class):
            pytest.skip(f"Test not supported for {self.model_class.__name__}")
        init_dict, inputs_dict = self.prepare_init_args_and_inputs_for_common()
        init_dict["norm_num_groups"] = 16
        init_dict["block_out_channels"] = (16, 32)
        model = self.model_class(**init_dict).to(DEVICE).eval()
        with torch.no_grad():
            output = model(**inputs_dict)
            if isinstance(output, dict):
                output = output.to_tuple()[0]
        assert output is not None
        assert output.shape == inputs_dict["sample"].shape, "Input and output shapes do not match"

    def _enable_disable(self, feature: str) -> None:
        """The mixin's test_enable_disable_tiling / _slicing: on, the output moves by less than 0.5; off
        again, it is the first output."""
        if not hasattr(self.model_class, f"enable_{feature}"):
            pytest.skip(f"Skipping test as {self.model_class.__name__} doesn't support {feature}.")
        init_dict, inputs_dict = self.prepare_init_args_and_inputs_for_common()
        torch.manual_seed(0)
        model = self.model_class(**init_dict).to(DEVICE)
        if not hasattr(model, f"use_{feature}"):
            pytest.skip(f"Skipping test as {self.model_class.__name__} doesn't support {feature}.")
        inputs_dict.update({"return_dict": False})
        inputs_dict.pop("generator", None)
        accepts_generator = self._accepts_generator(model)

        def run() -> torch.Tensor:
            torch.manual_seed(0)
            if accepts_generator:
                inputs_dict["generator"] = torch.manual_seed(0)
            return first_output(model(**inputs_dict))

        with torch.no_grad():
            without = run()
            getattr(model, f"enable_{feature}")()
            with_feature = run()
            assert (without.cpu() - with_feature.cpu()).max() < 0.5, f"VAE {feature} should not affect the results"
            getattr(model, f"disable_{feature}")()
            assert torch.allclose(without.cpu(), run().cpu()), f"Outputs with {feature} disabled again should match"

    def test_enable_disable_tiling(self):
        self._enable_disable("tiling")

    def test_enable_disable_slicing(self):
        self._enable_disable("slicing")


class TestAutoencoderKL(AutoencoderTests):
    """Control: diffusers' AutoencoderKL tester configuration."""

    model_class = diffusers.AutoencoderKL

    def init_dict(self) -> dict:
        return {
            "block_out_channels": [2, 4],
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4,
            "norm_num_groups": 2,
        }


class TestVQModel(AutoencoderTests):
    """diffusers' VQModel tester configuration, on vqfast's VQModel."""

    model_class = vqfast.VQModel

    def init_dict(self) -> dict:
        return {
            "block_out_channels": [8, 16],
            "norm_num_groups": 8,
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 3,
        }

