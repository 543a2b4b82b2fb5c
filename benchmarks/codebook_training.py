"""``python -m benchmarks.codebook_training``: what training the codebook by EMA with dead-code restarts costs.

One VQModel training step (forward, the loss ``mse(sample, x) + commit_loss``, backward, AdamW step) with
the codebook trained by EMA (``quantize.enable_ema()``) and restarts (``enable_dead_code_restart()``) against
the same step with diffusers' gradient-trained codebook, on models with the same weights. The goal (issue 15):
at most 5% more. Beside it, the quantizer alone (forward and backward of ``model.quantize`` on the step's
latents), the part where the difference lives, to show where the time goes.

The two variants run in alternating turns after warmups, and the table gives medians, so that a shared and
busy machine slows both alike; the spread (interquartile range) says how busy it was. The codebook gets the
latents' spread (as a trained one has) so that the vectors spread over many codes. Restarts run every step at
no extra cost when no code is dead (the draws and the masked replacement are made whatever the mask), and
with 8192 codes and a few hundred vectors per step most codes are below the default threshold: the worst case.

Prints a table and writes ``benchmarks/results/codebook-training-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vqfast
from benchmarks.models import load_config
from benchmarks.report import basename, markdown_table, num, stamp_line, text_table
from benchmarks.run import stamp
from benchmarks.timing import timed_call

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.05
VARIANTS = ("gradient", "ema+restarts")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs", nargs="+", default=["ldm-celebahq-256", "amused-256"], help="benchmarks/configs/<name>.json"
    )
    parser.add_argument("--resolution", type=int, help="image side (default: 256 on CUDA, 64 on the CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed turns of each variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 256 if args.device.startswith("cuda") else 64
    return args


def models(config: dict[str, Any], images: torch.Tensor, device: torch.device) -> dict[str, vqfast.VQModel]:
    """The two variants, same weights; the codebook with the latents' spread."""
    torch.manual_seed(0)
    base = vqfast.VQModel(**config).to(device)
    with torch.no_grad():
        spread = base.encode(images).latents.std().item()
        base.quantize.embedding.weight.normal_(std=spread)
    ema = copy.deepcopy(base)
    ema.quantize.enable_ema()
    ema.quantize.enable_dead_code_restart()
    return {"gradient": base, "ema+restarts": ema}


def training_step(model: vqfast.VQModel, images: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        out = model(images)
        (F.mse_loss(out.sample, images) + out.commit_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def quantizer_step(model: vqfast.VQModel, latents: torch.Tensor) -> Callable[[], None]:
    """The quantizer's share of the step: its forward (with the EMA update and restarts) and backward."""

    def step() -> None:
        z = latents.detach().requires_grad_()
        z_q, loss, _ = model.quantize(z)
        (z_q.square().mean() + loss).backward()
        model.quantize.embedding.weight.grad = None

    return step


def alternate(calls: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict:
    """Each call's times over ``repeats`` turns, the calls taking turns (after ``warmup`` untimed calls each)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed_call(call, device)[0])
    return times


def summary(times: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_ms": 1e3 * median, "iqr_ms": 1e3 * (q3 - q1), "repeats": len(times)}


def measure(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    config = load_config(name)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, config.get("in_channels", 3), args.resolution, args.resolution, generator=g)
    images = images.to(device)
    variants = models(config, images, device)
    with torch.no_grad():
        latents = variants["gradient"].encode(images).latents
    vq = variants["gradient"].quantize
    shape = {
        "config": name,
        "resolution": args.resolution,
        "batch": args.batch,
        "vectors": latents.numel() // latents.shape[1],
        "codes": vq.n_e,
        "dim": vq.vq_embed_dim,
    }
    rows = []
    for part, make in (("training step", training_step), ("quantizer fwd+bwd", quantizer_step)):
        inputs = images if make is training_step else latents
        times = alternate({v: make(m, inputs) for v, m in variants.items()}, device, args.warmup, args.repeats)
        stats = {v: summary(t) for v, t in times.items()}
        ratio = stats["ema+restarts"]["median_ms"] / stats["gradient"]["median_ms"]
        rows.append({**shape, "part": part, **{v: stats[v] for v in VARIANTS}, "ratio": ratio})
    return rows


COLUMNS = [
    ("config", lambda r: r["config"]),
    ("image", lambda r: f"{r['batch']}x{r['resolution']}x{r['resolution']}"),
    ("N x K x D", lambda r: f"{r['vectors']} x {r['codes']} x {r['dim']}"),
    ("part", lambda r: r["part"]),
    *[(f"{v} ms (IQR)", lambda r, v=v: f"{num(r[v]['median_ms'])} ({num(r[v]['iqr_ms'], 2)})") for v in VARIANTS],
    ("ratio", lambda r: f"{r['ratio']:.3f}"),
    ("goal <= 1.05", lambda r: ("met" if r["ratio"] <= GOAL else "missed") if r["part"] == "training step" else "-"),
]


def render(meta: dict[str, Any], rows: list[dict[str, Any]], table: Callable) -> str:
    return "\n\n".join(
        [
            "Codebook training cost: one training step with EMA + dead-code restarts vs the gradient-trained "
            "codebook (medians of alternating turns)",
            stamp_line(meta),
            table(rows, COLUMNS),
            f"wall time {num(meta['wall_s'])} s; options: {meta['command']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    meta = stamp(device)
    rows = [row for name in args.configs for row in measure(name, args, device)]
    meta["wall_s"] = time.perf_counter() - started
    meta["command"] = " ".join(["python -m benchmarks.codebook_training", *argv])
    print(render(meta, rows, text_table))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"codebook-training-{basename(meta, quick=False)}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base.with_suffix(".md").write_text(render(meta, rows, markdown_table) + "\n")
    print(f"wrote {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
