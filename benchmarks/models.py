"""The whole model: ``vqfast.VQModel`` against ``diffusers.VQModel`` with the same weights, on the
public configurations (copied from shared/configs into benchmarks/configs; keys starting with "_" are
comments), timing ``encode``, ``decode`` (which quantizes) and ``forward`` on random images.

Implementations: ``eager`` and ``compile`` are diffusers' VQModel as is and under ``torch.compile``;
``vqfast[auto]`` (and ``+compile``) is vqfast's VQModel as a user gets it, ``auto`` choosing each op's
backend; ``vqfast[<backend>]`` puts that backend on every op it can run on the device (the others on
auto). Each output is checked against eager diffusers'.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

import vqfast
from benchmarks.cases import backend_name, backend_reason
from vqfast import backend

CONFIG_DIR = Path(__file__).with_name("configs")
MODELS = ("ldm-celebahq-256", "kandinsky-2-2-decoder-movq", "amused-256")
TASKS = ("encode", "decode", "forward")
MATCH_RTOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}  # of the reference's largest |value|


def load_config(name: str, narrow: bool = False) -> dict[str, Any]:
    """The configuration ``name``; ``narrow``: a quarter of the channels (the same architecture, for
    ``--quick``; the widths stay multiples of the 32 norm groups)."""
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    config = {key: value for key, value in raw.items() if not key.startswith("_")}
    if narrow:
        config["block_out_channels"] = [c // 4 for c in config["block_out_channels"]]
    return config


def forward(model: torch.nn.Module, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    return model(images).sample


def encode(model: torch.nn.Module, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    return model.encode(images).latents


def decode(model: torch.nn.Module, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    return model.decode(latents).sample


TASK_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"forward": forward, "encode": encode, "decode": decode}


def model_plan(baselines: list[str], backends: list[str], compile_: bool) -> tuple[list[str], dict[str, str]]:
    """The model implementations to run: diffusers' among ``baselines`` (``eager``, ``compile``) and
    vqfast's with each of ``backends`` (``auto`` or a vqfast backend), compiled too when ``compile_``;
    and for each one left out, why. A named backend runs when it has a kernel for an op here."""
    compiled = compile_ and "compile" in baselines
    impls, skipped = ["eager"] * ("eager" in baselines) + ["compile"] * compiled, {}
    try:
        import vqfast.models  # needs diffusers
    except ImportError as exc:
        return impls, {f"vqfast[{name}]": f"vqfast.VQModel cannot be imported: {exc}" for name in backends}
    for name in backends:
        if name != "auto" and not backend_ops(name):
            skipped[f"vqfast[{name}]"] = vqfast.backends()[name].reason or "no kernel for any op"
            continue
        impls += [f"vqfast[{name}]"] + [f"vqfast[{name}]+compile"] * compiled
    return impls, skipped


def backend_ops(name: str) -> dict[str, str]:
    """``{op: name}`` for every op the vqfast backend ``name`` implements (and loads here)."""
    return {op: name for op in backend.OPS if not backend_reason(op, name)}


@dataclass(frozen=True)
class ModelCase:
    model: str
    resolution: int
    batch: int
    dtype: str
    narrow: bool = False  # a quarter of the channels (--quick)

    @property
    def input(self) -> str:
        return f"{self.batch}x3x{self.resolution}x{self.resolution}"

    @property
    def label(self) -> str:
        return " ".join([self.model, self.input, self.dtype, *["narrow"] * self.narrow])


@dataclass
class ModelBench:
    reference: torch.nn.Module  # diffusers.VQModel
    images: torch.Tensor
    latents: torch.Tensor  # the reference's encoding of the images: decode's input
    vqfast_model: torch.nn.Module | None = None

    def function(self, impl: str, task: str) -> Callable[[], torch.Tensor]:
        """A no-argument, no-autograd call of ``task`` by ``impl`` (a name from :func:`model_plan`)."""
        fn = TASK_FUNCTIONS[task]
        if impl.endswith("compile"):
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        model, spec = self.reference, {}
        if impl.startswith("vqfast"):
            name = backend_name(impl)
            model = self.vqfast_model
            spec = {} if name == "auto" else backend_ops(name)

        @torch.no_grad()
        def call() -> torch.Tensor:
            with backend.use_backend(**spec):
                return fn(model, self.images, self.latents)

        return call


def build_model(case: ModelCase, device: torch.device, with_vqfast: bool) -> ModelBench:
    """diffusers' VQModel with random weights (seeded; the codebook given the latents' spread, so that
    the nearest code is clear, as a trained codebook's is), random images, and vqfast's VQModel with
    the same weights when asked. Each model has encoded the images once, so that one-time costs (for
    vqfast's custom ops, torch importing torch._dynamo on a process's first call: about a second on
    the CPU) stay out of the timed calls."""
    torch.manual_seed(0)
    config = load_config(case.model, case.narrow)
    dtype = getattr(torch, case.dtype)
    reference = diffusers.VQModel(**config).to(device=device, dtype=dtype).eval()
    images = torch.randn(
        case.batch, config["in_channels"], case.resolution, case.resolution, device=device, dtype=dtype
    )
    with torch.no_grad():
        latents = reference.encode(images).latents
        reference.quantize.embedding.weight.normal_(std=latents.float().std().item())
    bench = ModelBench(reference, images, latents)
    if with_vqfast:
        bench.vqfast_model = vqfast.VQModel.from_diffusers(reference).to(device=device, dtype=dtype).eval()
        with torch.no_grad():
            bench.vqfast_model.encode(images)
    return bench


def check(output: torch.Tensor, expected: torch.Tensor, dtype: str) -> tuple[float, bool]:
    """``max|output - expected| / max|expected|`` and whether it is within the dtype's tolerance."""
    error = ((output.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    return error, error <= MATCH_RTOL[dtype]
