"""The whole model: ``vqfast.VQModel`` against ``diffusers.VQModel`` with the same weights, on the
public configurations (copied from shared/configs into benchmarks/configs; keys starting with "_" are
comments), timing ``encode``, ``decode`` (which quantizes) and ``forward`` on random images.

Implementations (names as in the results):
- ``eager``: diffusers' VQModel as is, NCHW input; the ratios' base;
- ``eager+channels_last``: diffusers on a copy of the model in channels_last, channels_last input;
- ``compile``: ``torch.compile`` of diffusers as is;
- ``vqfast[auto]`` (and ``+compile``): vqfast's VQModel as a user gets it, ``auto`` choosing each op's
  backend; ``vqfast[<backend>]`` puts that backend on every op it can run here (the others on auto);
- ``vqfast[auto] convs``: the limit, only the convolutions vqfast[auto] runs in the task, recorded from
  one of its calls (:class:`ConvRecorder`) and replayed on random tensors of the same shapes, strides
  and dtypes;
- ``vqfast[auto]+graph`` (CUDA, decode): vqfast[auto]'s decode captured once in a CUDA graph, replayed.

Precisions (a case's ``dtype``): ``float32``, ``float16``, ``bfloat16`` (the model and its inputs in
that dtype), ``autocast-bfloat16``, ``autocast-float16`` (float32 weights and inputs, every call inside
``torch.autocast``). Every output is checked against diffusers' float32 output on the same inputs by
relative L2 error (DESIGN.md section 1): float32 within 5e-5, reduced precision within 1.25 times the
error of diffusers' eager under the same precision.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import vqfast
from benchmarks.cases import backend_name, backend_reason
from benchmarks.report import AUTO, CHANNELS_LAST, COMPILE, CONVS, EAGER
from vqfast import backend

CONFIG_DIR = Path(__file__).with_name("configs")
MODELS = ("ldm-celebahq-256", "kandinsky-2-2-decoder-movq", "amused-256")
TASKS = ("encode", "decode", "forward")
MODEL_DTYPES = ("float32", "float16", "bfloat16", "autocast-bfloat16", "autocast-float16")
AUTOCAST_PREFIX = "autocast-"
PEERS = (CHANNELS_LAST, COMPILE)  # diffusers' implementations beside eager, which always runs
GRAPH = f"{AUTO}+graph"
GRAPH_TASKS = ("decode",)  # CUDA graphs at a fixed shape: what a decoding service replays
LARGE_DECODE_IMPLS = (EAGER, CHANNELS_LAST, AUTO)  # the extra large decode rows: few, each call is long
FLOAT32_MAX_ERROR = 5e-5  # relative L2 to diffusers' float32 output (the contract's bound)
REDUCED_PRECISION_SLACK = 1.25  # times diffusers eager's own error under the same precision
# Arguments of the convolution ops holding activations (the rest are weights and biases): replayed convolutions
# share one random tensor per argument, shape, strides and dtype (a model's activations are fresh, often still in
# cache), while each gets weights of its own, as each layer has.
ACTIVATION_ARGUMENTS = frozenset({"input", "self", "X", "other"})


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


# --- precisions ------------------------------------------------------------------------------------------------


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a precision's calls in; None when it is a plain dtype."""
    return getattr(torch, precision.removeprefix(AUTOCAST_PREFIX)) if precision.startswith(AUTOCAST_PREFIX) else None


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights and inputs: float32 under autocast, else the precision's own."""
    return torch.float32 if autocast_dtype(precision) else getattr(torch, precision)


def precision_context(precision: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for an autocast precision, else nothing. ``cache=False`` for CUDA graph capture (the
    autocast cache's casts must not outlive the capture, torch.cuda.graph's documentation says)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||``, in float64."""
    reference = reference.double()
    return (torch.linalg.vector_norm(output.double() - reference) / torch.linalg.vector_norm(reference)).item()


def error_bound(precision: str, eager_error: float | None) -> float | None:
    """The largest relative L2 error to diffusers' float32 output that passes: 5e-5 in float32; in reduced
    precision 1.25 times diffusers eager's error under the same precision (None when that is unknown)."""
    if precision == "float32":
        return FLOAT32_MAX_ERROR
    return None if eager_error is None else REDUCED_PRECISION_SLACK * eager_error


# --- what runs -------------------------------------------------------------------------------------------------


def model_plan(
    peers: list[str],
    backends: list[str],
    compile_vqfast: bool,
    device: torch.device,
    convs: bool = True,
    cuda_graphs: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The model implementations to run, in the order they take turns: diffusers' eager and the ``peers`` asked
    for (of :data:`PEERS`), vqfast's with each of ``backends`` (``auto`` or a vqfast backend; compiled too when
    ``compile_vqfast``), with ``convs`` the limit row beside vqfast[auto], with ``cuda_graphs`` its CUDA graph;
    and for each one left out, why. A named backend runs when it has a kernel for an op here."""
    impls, skipped = [EAGER, *(p for p in PEERS if p in peers)], {}
    try:
        import vqfast.models  # noqa: F401  needs diffusers
    except ImportError as exc:
        return impls, {f"vqfast[{name}]": f"vqfast.VQModel cannot be imported: {exc}" for name in backends}
    for name in backends:
        if name != "auto" and not backend_ops(name):
            skipped[f"vqfast[{name}]"] = vqfast.backends()[name].reason or "no kernel for any op"
            continue
        impls += [f"vqfast[{name}]"] + [CONVS] * (convs and name == "auto") + [f"vqfast[{name}]+compile"] * compile_vqfast
    if cuda_graphs and AUTO in impls:
        if device.type == "cuda":
            impls.append(GRAPH)
        else:
            skipped[GRAPH] = "--cuda-graphs: CUDA graphs need a CUDA device"
    return impls, skipped


def runs_task(impl: str, task: str) -> bool:
    """Whether ``impl`` takes part in ``task`` (the CUDA graph replays decode only)."""
    return impl != GRAPH or task in GRAPH_TASKS


def backend_ops(name: str) -> dict[str, str]:
    """``{op: name}`` for every op the vqfast backend ``name`` implements (and loads here)."""
    return {op: name for op in backend.OPS if not backend_reason(op, name)}


@dataclass(frozen=True)
class ModelCase:
    model: str
    resolution: int
    batch: int
    dtype: str  # a precision of MODEL_DTYPES
    narrow: bool = False  # a quarter of the channels (--quick)
    tasks: tuple[str, ...] = TASKS

    @property
    def input(self) -> str:
        return f"{self.batch}x3x{self.resolution}x{self.resolution}"

    @property
    def label(self) -> str:
        return " ".join([self.model, self.input, self.dtype, *["narrow"] * self.narrow])


# --- the limit: vqfast's convolutions alone --------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """What a replayed convolution needs of a tensor: no data."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    def random(self) -> torch.Tensor:
        """Random values in these shape and strides (over a dense buffer, so overlapping strides work too)."""
        span = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride)) if all(self.shape) else 0
        return torch.randn(span, dtype=self.dtype, device=self.device).as_strided(self.shape, self.stride)


@dataclass(frozen=True)
class RecordedConv:
    op: torch._ops.OpOverload
    args: tuple[Any, ...]  # a TensorSpec for each tensor, the other arguments as given
    kwargs: dict[str, Any]


def is_convolution(op: torch._ops.OpOverload) -> bool:
    """aten.convolution and every convolution op of other namespaces (oneDNN's fused
    mkldnn._convolution_pointwise.*, mkldnn_convolution, cudnn_convolution, ...), forward only."""
    name = op._schema.name.partition("::")[2]
    return "convolution" in name and "backward" not in name


class ConvRecorder(TorchDispatchMode):
    """Records every convolution dispatched while it is active: op, tensors' shapes, strides and dtypes as the
    op sees them (after autocast's casts), and the other arguments. It holds no tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.convs: list[RecordedConv] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204  torch's signature
        kwargs = kwargs or {}
        if is_convolution(func):
            spec = lambda x: TensorSpec.of(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.convs.append(RecordedConv(func, tree_map(spec, args), tree_map(spec, kwargs)))
        return func(*args, **kwargs)


def record_convolutions(call: Callable[[], Any]) -> list[RecordedConv]:
    """The convolutions one call of ``call`` runs, in order."""
    with ConvRecorder() as recorder:
        call()
    return recorder.convs


def replay_convolutions(convs: list[RecordedConv]) -> Callable[[], torch.Tensor | None]:
    """A call running exactly ``convs`` on random tensors (made here, once), returning the last output.
    Activations are shared by argument, shape, strides and dtype; weights and biases are each convolution's own."""
    activations: dict[tuple[str, TensorSpec], torch.Tensor] = {}

    def materialize(conv: RecordedConv) -> tuple[tuple[Any, ...], dict[str, Any]]:
        names = [argument.name for argument in conv.op._schema.arguments]

        def tensor(value: Any, name: str) -> Any:
            if not isinstance(value, TensorSpec):
                return value
            if name in ACTIVATION_ARGUMENTS:
                key = (name, value)
                if key not in activations:
                    activations[key] = value.random()
                return activations[key]
            return value.random()

        args = tuple(tree_map(functools.partial(tensor, name=name), a) for a, name in zip(conv.args, names))
        kwargs = {name: tree_map(functools.partial(tensor, name=name), a) for name, a in conv.kwargs.items()}
        return args, kwargs

    calls = [(conv.op, *materialize(conv)) for conv in convs]

    def replay() -> torch.Tensor | None:
        out = None
        for op, args, kwargs in calls:
            out = op(*args, **kwargs)
        return out

    return replay


# --- CUDA graphs -----------------------------------------------------------------------------------------------


def cuda_graphed(call: Callable[[], torch.Tensor], warmup: int = 3) -> Callable[[], torch.Tensor]:
    """``call`` captured once in a CUDA graph and replayed: the usual recipe, warmup calls on a side stream (so
    that lazy initialisation, cuDNN's algorithm search and the allocator's first blocks happen outside the
    capture), then one capture. ``call`` must read its inputs from tensors that stay put (the bench's); each
    replay overwrites the one output tensor it returns."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


# --- the models ------------------------------------------------------------------------------------------------


@dataclass
class ModelBench:
    case: ModelCase
    reference: torch.nn.Module  # diffusers.VQModel, weights in the case's weight dtype
    images: torch.Tensor  # NCHW, in the weight dtype
    latents: torch.Tensor  # the float32 model's encoding of the images (decode's input), in the weight dtype
    float32_model: torch.nn.Module  # the same diffusers model in float32 (the reference itself under autocast)
    channels_last: torch.nn.Module | None = None  # a channels_last copy of reference
    vqfast_model: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.images.device

    @torch.no_grad()
    def float32_output(self, task: str) -> torch.Tensor:
        """diffusers' float32 output for ``task`` on the same inputs: what every implementation is checked
        against in other precisions."""
        return TASK_FUNCTIONS[task](self.float32_model, self.images.float(), self.latents.float())

    def function(self, impl: str, task: str) -> Callable[[], torch.Tensor]:
        """A no-argument, no-autograd call of ``task`` by ``impl`` (a name from :func:`model_plan`), under the
        case's precision. The limit row records vqfast[auto]'s convolutions here, in one call of it."""
        if impl == CONVS:
            convs = record_convolutions(self.function(AUTO, task))
            replay = replay_convolutions(convs)
            return self._wrap(lambda: replay())
        if impl == GRAPH:
            return cuda_graphed(self._wrap(self._task_call(AUTO, task), cache=False))
        return self._wrap(self._task_call(impl, task))

    def _task_call(self, impl: str, task: str) -> Callable[[], torch.Tensor]:
        fn = TASK_FUNCTIONS[task]
        if impl.endswith("+compile") or impl == COMPILE:
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        model, images, latents, spec = self.reference, self.images, self.latents, {}
        if impl == CHANNELS_LAST:
            model = self.channels_last
            images, latents = (t.contiguous(memory_format=torch.channels_last) for t in (images, latents))
        elif impl.startswith("vqfast"):
            name = backend_name(impl)
            model = self.vqfast_model
            spec = {} if name == "auto" else backend_ops(name)

        def call() -> torch.Tensor:
            with backend.use_backend(**spec):
                return fn(model, images, latents)

        return call

    def _wrap(self, call: Callable[[], Any], cache: bool = True) -> Callable[[], Any]:
        precision, device = self.case.dtype, self.device

        def wrapped() -> Any:
            with torch.no_grad(), precision_context(precision, device, cache):
                return call()

        return wrapped


def build_model(case: ModelCase, device: torch.device, impls: list[str]) -> ModelBench:
    """diffusers' VQModel with random weights (seeded; the codebook given the latents' spread, so that the
    nearest code is clear, as a trained codebook's is), random images and their float32 encoding, and the
    copies ``impls`` need: the model in the case's weight dtype, in channels_last, vqfast's VQModel."""
    torch.manual_seed(0)
    config = load_config(case.model, case.narrow)
    float32_model = diffusers.VQModel(**config).to(device=device).eval()
    images = torch.randn(case.batch, config["in_channels"], case.resolution, case.resolution, device=device)
    with torch.no_grad():
        latents = float32_model.encode(images).latents
        float32_model.quantize.embedding.weight.normal_(std=latents.std().item())
    dtype = weight_dtype(case.dtype)
    reference = float32_model if dtype == torch.float32 else copy.deepcopy(float32_model).to(dtype=dtype)
    bench = ModelBench(case, reference, images.to(dtype), latents.to(dtype), float32_model)
    if CHANNELS_LAST in impls:
        bench.channels_last = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    if any(impl.startswith("vqfast") for impl in impls):
        bench.vqfast_model = vqfast.VQModel.from_diffusers(reference).to(device=device, dtype=dtype).eval()
    return bench
