"""Where a whole model's time goes, per layer type: ``python -m benchmarks.profile``.

One profiled call (torch.profiler, after warm-up calls) of each model and task, for vqfast[auto] and
diffusers' eager on the same weights and inputs as ``benchmarks.models`` builds them. Every operator's
self time goes to one layer type (:func:`layer_type`): convolutions (oneDNN's fused ones included),
norms (vqfast's fused GroupNorm/SpatialNorm + SiLU, torch's group norm and activations), attention
(scaled dot-product attention and the projections' matrix products), the quantizer, and the rest
(copies, adds, padding, allocation). Prints a markdown table and writes it with ``--out``.

Profiler self times add a little overhead per operator, so the shares, not the sums, are the result;
``benchmarks.run`` gives the times.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.models import MODELS, TASK_FUNCTIONS, TASKS, ModelCase, build_model, precision_context
from benchmarks.report import AUTO, EAGER, stamp_line
from benchmarks.run import stamp

LAYER_TYPES = ("convolution", "norm", "attention", "quantizer", "other")


def layer_type(op: str) -> str:
    """The layer type an operator's self time counts for (``op`` as the profiler names it)."""
    name = op.partition("::")[2] or op
    if "convolution" in name or name in ("conv2d", "conv1d", "_convolution"):
        return "convolution"
    if "norm" in name or name in ("silu", "silu_", "sigmoid"):
        return "norm"
    if "attention" in name or name in ("addmm", "bmm", "baddbmm", "linear", "matmul", "mm", "softmax", "_softmax"):
        return "attention"
    quantizer_ops = ("vector_quantize", "nearest_code", "codebook_gather", "cdist", "euclidean_dist", "argmin")
    if any(part in name for part in quantizer_ops):
        return "quantizer"
    return "other"


def profile_call(call, warmup: int = 2) -> dict[str, float]:
    """Self CPU milliseconds per layer type of one call of ``call`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    totals: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        totals[layer_type(event.key)] += event.self_cpu_time_total / 1e3
    return {kind: totals.get(kind, 0.0) for kind in LAYER_TYPES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--dtypes", default="float32,autocast-bfloat16", help="as benchmarks.run --model-dtypes")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    lines = [
        f"Self time per layer type, one profiled call, batch 1, {args.resolution}x{args.resolution}: "
        f"{stamp_line(stamp(device))}",
        "",
        "| model | task | dtype | impl | ms | " + " | ".join(LAYER_TYPES) + " |",
        "|---|---|---|---|---|" + "---|" * len(LAYER_TYPES),
    ]
    print("\n".join(lines), flush=True)
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            case = ModelCase(model, args.resolution, 1, dtype)
            bench = build_model(case, device, [EAGER, AUTO])
            for task in args.tasks.split(","):
                for impl in (EAGER, AUTO):
                    model_ = bench.vqfast_model if impl == AUTO else bench.reference

                    def call(fn=TASK_FUNCTIONS[task], m=model_) -> None:
                        with torch.no_grad(), precision_context(dtype, device):
                            fn(m, bench.images, bench.latents)

                    times = profile_call(call)
                    total = sum(times.values())
                    shares = " | ".join(f"{100 * times[kind] / total:.1f}%" for kind in LAYER_TYPES)
                    lines.append(f"| {model} | {task} | {dtype} | {impl} | {total:.0f} | {shares} |")
                    print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
