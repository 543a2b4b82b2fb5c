"""The op cases, and what is compared on each.

Implementations, each called on the same inputs:
- ``vqfast[<backend>]``: the vqfast op under every backend that can run it on the device;
- ``eager``: PyTorch written the way diffusers writes it (below, per op);
- ``compile``: ``torch.compile`` of that eager code (compile time reported apart);
- ``faiss``: faiss-cpu's exact ``IndexFlatL2`` search (k=1), for ``nearest_code`` in float32 on the CPU,
  on its best BLAS kernels (:mod:`benchmarks.peers`).

What is compared, per op:
- ``nearest_code``: NCHW latents (1, D, h, w) with h*w = N and a (K, D) codebook. Eager is diffusers'
  ``VectorQuantizer`` search: permute to contiguous rows, ``argmin(cdist(rows, codebook))``. faiss
  gets the same permuted rows (its index holds the codebook, added once before timing).
- ``group_norm_act``: ``F.silu(F.group_norm(x, 32, weight, bias, 1e-6))``, NCHW or channels_last.
- ``spatial_norm_act``: MoVQ's decoder norm, diffusers' ``SpatialNorm(f, zq)`` (nearest-upsample the
  4-channel latent zq to f's size, two 1x1 convs, GroupNorm, ``norm * conv_y + conv_b``) then SiLU,
  against vqfast's ``spatial_norm_act`` fed with the two convs taken at the latent's resolution,
  which gives the same result. Both sides include the convs; zq is MoVQ's latent at 256x256: 32x32.
  vqfast lowers it to ``group_norm_act`` (scale and shift given): its backend is that op's.
- ``vector_quantize``: diffusers' ``VectorQuantizer`` module forward (beta 0.25, legacy) against
  ``vqfast.ops.vector_quantize``; ``vector_quantize+bwd`` times forward and backward: the gradients
  of ``(z_q, loss)`` into the latents and the codebook.
- ``codebook_gather``: diffusers' ``VectorQuantizer.get_codebook_entry(indices, shape)`` (embedding, then
  permute to NCHW; what a decoder fed with indices, as aMUSEd's, runs) against ``codebook_gather(indices,
  codebook, dim=1)`` on (1, h, w) indices.

Rates: each input read once and each output written once for GB/s (the norms, codebook_gather); 2*N*K*D
for the GFLOP/s of the searching ops (the search; forward+backward is rated on the same count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import vqfast
from benchmarks import peers
from benchmarks.auto_order import registry_op
from vqfast import backend, ops

OPS = (
    "nearest_code",
    "group_norm_act",
    "spatial_norm_act",
    "vector_quantize",
    "vector_quantize+bwd",
    "codebook_gather",
)
BASELINES = ("eager", "compile", "faiss")
LAYOUTS = ("nchw", "channels_last")
GROUPS, EPS, BETA = 32, 1e-6, 0.25
SPATIAL_LATENT = (4, 32)  # MoVQ's zq: channels, and size at 256x256 (capped at f's size)

# (N, C, H, W): the decoders' GroupNorm+SiLU sites at 256x256 (LDM celebahq, aMUSEd, MoVQ).
NORM_SHAPES = ((1, 128, 256, 256), (1, 256, 128, 128), (1, 512, 64, 64), (4, 512, 32, 32))
# MoVQ's SpatialNorm sites at the two ends of its decoder: the 32x32 latent upsampled 8x and 2x.
SPATIAL_NORM_SHAPES = ((1, 128, 256, 256), (1, 512, 64, 64))
# (N, K, D): N latent vectors, a codebook of K codes of size D.
NEAREST_CODE_SHAPES = ((4096, 8192, 3), (65536, 16384, 4), (8192, 16384, 256), (4096, 4096, 128))
# (N, K, D) of the quantizers at 256x256, batch 1: LDM celebahq and aMUSEd (Kandinsky's pipelines
# decode MoVQ latents with force_not_quantize=True: no quantizer); codebook_gather's too.
VECTOR_QUANTIZE_SHAPES = ((4096, 8192, 3), (256, 8192, 64))
QUICK_SHAPES = {"norm": ((2, 64, 16, 16),), "codebook": ((256, 512, 8),)}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]  # (N, C, H, W) for the norms, (N, K, D) for the codebook ops
    dtype: str
    layout: str = "nchw"  # the norms only

    @property
    def vqfast_op(self) -> str:
        """The registry op whose backend runs the case."""
        return registry_op(self.op)

    @property
    def label(self) -> str:
        layout = [self.layout] if self.layout != "nchw" else []
        return " ".join([self.op, "x".join(map(str, self.shape)), self.dtype, *layout])


def is_norm(op: str) -> bool:
    return op.endswith("norm_act")


def default_shapes(op: str, quick: bool) -> tuple[tuple[int, ...], ...]:
    if quick:
        return QUICK_SHAPES["norm" if is_norm(op) else "codebook"]
    return {
        "nearest_code": NEAREST_CODE_SHAPES,
        "group_norm_act": NORM_SHAPES,
        "spatial_norm_act": SPATIAL_NORM_SHAPES,
    }.get(op, VECTOR_QUANTIZE_SHAPES)


def default_layouts(op: str, quick: bool) -> tuple[str, ...]:
    """Both layouts for GroupNorm+SiLU, NCHW for the rest (MoVQ's decoder runs NCHW)."""
    return LAYOUTS if op == "group_norm_act" and not quick else ("nchw",)


def make_cases(
    ops_: list[str], shapes: list[tuple[int, ...]] | None, dtypes: list[str], layouts: list[str] | None, quick: bool
) -> list[Case]:
    """Every (op, shape, dtype, layout) asked for. ``shapes`` replaces the defaults: 4-tuples go to
    the norms, 3-tuples to the codebook ops; ``layouts`` (of the norms' inputs) too."""
    cases = []
    for op in ops_:
        rank = 4 if is_norm(op) else 3
        op_shapes = default_shapes(op, quick) if shapes is None else [s for s in shapes if len(s) == rank]
        op_layouts = ("nchw",) if not is_norm(op) else layouts or default_layouts(op, quick)
        for shape in op_shapes:
            for dtype in dtypes:
                for layout in op_layouts:
                    cases.append(Case(op, tuple(shape), dtype, layout))
    return cases


def backend_reason(op: str, name: str) -> str:
    """Empty when vqfast's backend ``name`` loads here and implements the registry op ``op``, else why
    not. Whether it runs a case's inputs (device, dtype, sizes) shows when the case runs: a backend
    named explicitly that declines them raises with the reason, reported as the case's failure."""
    status = vqfast.backends()[name]
    if not status.available:
        return status.reason
    return "" if name in backend.registry()[op] else f"it has no {op} implementation"


def faiss_reason(case: Case, device: torch.device) -> str:
    if device.type != "cpu" or case.dtype != "float32":
        return "faiss-cpu searches float32 CPU arrays only"
    try:
        peers.import_faiss()
    except ImportError as exc:
        return str(exc)
    return ""


def plan(case: Case, device: torch.device, selected: list[str]) -> tuple[list[str], dict[str, str]]:
    """The implementations to run on ``case`` among ``selected`` (vqfast backend names and baselines),
    and for each one left out, why."""
    impls, skipped = [], {}
    for name in selected:
        if name == "faiss" and case.op != "nearest_code":
            continue  # a baseline for nearest_code only
        if name in backend.BACKENDS:
            reason, impl = backend_reason(case.vqfast_op, name), f"vqfast[{name}]"
        else:
            reason, impl = (faiss_reason(case, device) if name == "faiss" else ""), name
        if reason:
            skipped[impl] = reason
        else:
            impls.append(impl)
    return impls, skipped


def latent_size(n: int) -> tuple[int, int]:
    """(h, w) with h * w = n and h the largest divisor of n up to sqrt(n)."""
    h = max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
    return h, n // h


def latent(n: int, d: int, **kw: Any) -> torch.Tensor:
    """Random NCHW latents (1, d, h, w) of :func:`latent_size`."""
    return torch.randn(1, d, *latent_size(n), **kw)


@dataclass
class Bench:
    """A case's inputs on the device, and the functions compared on them (each called as ``fn(*inputs)``)."""

    inputs: tuple[torch.Tensor, ...]
    eager: Callable[..., Any]
    vqfast: Callable[..., Any]
    bytes: int
    flops: int = 0  # nonzero: rated in GFLOP/s, else in GB/s
    faiss: Callable[..., Any] | None = None
    grad_outputs: tuple[torch.Tensor, ...] | None = None  # set: time forward and backward

    def call(self, fn: Callable[..., Any]) -> Callable[[], Any]:
        """``fn`` on the inputs as timed: without autograd, or forward then backward into every input."""
        if self.grad_outputs is None:

            @torch.no_grad()
            def forward() -> Any:
                return fn(*self.inputs)

            return forward

        def forward_backward() -> Any:
            return torch.autograd.grad(fn(*self.inputs), self.inputs, self.grad_outputs)

        return forward_backward


def backend_name(impl: str) -> str:
    """The vqfast backend in an implementation's name: ``vqfast[native]+compile`` -> ``native``."""
    return impl.partition("[")[2].partition("]")[0]


def implementation(bench: Bench, case: Case, impl: str) -> Callable[..., Any]:
    """The function ``impl`` (a name from :func:`plan`) runs on the bench's inputs."""
    if impl == "eager":
        return bench.eager
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic shapes
        return torch.compile(bench.eager, dynamic=False)
    if impl == "faiss":
        return bench.faiss
    name = backend_name(impl)

    def under_backend(*args: Any) -> Any:
        with vqfast.use_backend(**{case.vqfast_op: name}):
            return bench.vqfast(*args)

    return under_backend


def nearest_code_eager(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    rows = z.permute(0, 2, 3, 1).contiguous().view(-1, codebook.shape[1])
    return torch.argmin(torch.cdist(rows, codebook), dim=1)


def group_norm_act_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def group_norm_act_vqfast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ops.group_norm_act(x, GROUPS, weight, bias, EPS, "silu")


def _nearest_code(case: Case, kw: dict[str, Any]) -> Bench:
    n, k, d = case.shape
    z, codebook = latent(n, d, **kw), torch.randn(k, d, **kw)
    bench = Bench(
        (z, codebook), nearest_code_eager, ops.nearest_code, z.nbytes + codebook.nbytes + 8 * n, 2 * n * k * d
    )
    if not faiss_reason(case, z.device):
        bench.faiss = _faiss_search(codebook)
    return bench


def _faiss_search(codebook: torch.Tensor) -> Callable[..., Any]:
    """faiss's exact L2 search (k=1) on the permuted rows of NCHW latents; the index holds the codebook."""
    faiss, _ = peers.import_faiss()
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())

    def search(z: torch.Tensor, codebook: torch.Tensor) -> Any:
        return index.search(z.permute(0, 2, 3, 1).contiguous().view(-1, codebook.shape[1]).numpy(), 1)[1]

    return search


def _group_norm_act(case: Case, kw: dict[str, Any]) -> Bench:
    x = torch.randn(case.shape, **kw).contiguous(memory_format=_memory_format(case))
    weight, bias = torch.randn(x.shape[1], **kw), torch.randn(x.shape[1], **kw)
    return Bench(
        (x, weight, bias), group_norm_act_eager, group_norm_act_vqfast, 2 * x.nbytes + weight.nbytes + bias.nbytes
    )


def _spatial_norm_act(case: Case, kw: dict[str, Any]) -> Bench:
    from diffusers.models.attention_processor import SpatialNorm

    n, c, h, w = case.shape
    zq_channels, size = SPATIAL_LATENT
    fmt = _memory_format(case)
    f = torch.randn(case.shape, **kw).contiguous(memory_format=fmt)
    zq = torch.randn(n, zq_channels, min(h, size), min(w, size), **kw).contiguous(memory_format=fmt)
    norm = SpatialNorm(c, zq_channels).to(**kw)
    torch.nn.init.normal_(norm.norm_layer.weight)
    torch.nn.init.normal_(norm.norm_layer.bias)

    def eager(f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return F.silu(norm(f, zq))

    def fused(f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        layer = norm.norm_layer
        return ops.spatial_norm_act(f, norm.conv_y(zq), norm.conv_b(zq), GROUPS, layer.weight, layer.bias, EPS, "silu")

    params = sum(p.nbytes for p in norm.parameters())
    return Bench((f, zq), eager, fused, 2 * f.nbytes + zq.nbytes + params)


def _vector_quantize(case: Case, kw: dict[str, Any]) -> Bench:
    from diffusers.models.autoencoders.vae import VectorQuantizer

    n, k, d = case.shape
    backward = case.op.endswith("+bwd")
    z = latent(n, d, **kw).requires_grad_(backward)
    quantizer = VectorQuantizer(k, d, beta=BETA).to(**kw)
    torch.nn.init.normal_(quantizer.embedding.weight)
    codebook = quantizer.embedding.weight

    def eager(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantizer(z)[:2]  # the module's own codebook, the same tensor

    def fused(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.vector_quantize(z, codebook, BETA, True, 1)[:2]

    forward_bytes = 2 * z.nbytes + codebook.nbytes + z.element_size() + 8 * n  # z, codebook -> z_q, loss, indices
    backward_bytes = 2 * z.nbytes + codebook.nbytes  # grad_z_q -> grad_z, grad_codebook
    grads = (torch.randn_like(z), torch.ones((), **kw)) if backward else None
    nbytes = forward_bytes + backward_bytes * backward
    return Bench((z, codebook), eager, fused, nbytes, 2 * n * k * d, grad_outputs=grads)


def _codebook_gather(case: Case, kw: dict[str, Any]) -> Bench:
    from diffusers.models.autoencoders.vae import VectorQuantizer

    n, k, d = case.shape
    indices = torch.randint(k, (1, *latent_size(n)), device=kw["device"])
    quantizer = VectorQuantizer(k, d, beta=BETA).to(**kw)
    codebook = quantizer.embedding.weight

    def eager(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return quantizer.get_codebook_entry(indices.flatten(), (*indices.shape, d))  # the module's own codebook

    def fused(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return ops.codebook_gather(indices, codebook, dim=1)

    return Bench((indices, codebook), eager, fused, indices.nbytes + codebook.nbytes + n * d * codebook.element_size())


def _memory_format(case: Case) -> torch.memory_format:
    return torch.channels_last if case.layout == "channels_last" else torch.contiguous_format


BUILDERS: dict[str, Callable[[Case, dict[str, Any]], Bench]] = {
    "nearest_code": _nearest_code,
    "group_norm_act": _group_norm_act,
    "spatial_norm_act": _spatial_norm_act,
    "vector_quantize": _vector_quantize,
    "vector_quantize+bwd": _vector_quantize,
    "codebook_gather": _codebook_gather,
}


def build(case: Case, device: torch.device) -> Bench:
    """The case's inputs (random, seeded) on ``device`` and the functions compared on them."""
    torch.manual_seed(0)
    return BUILDERS[case.op](case, {"device": device, "dtype": getattr(torch, case.dtype)})
