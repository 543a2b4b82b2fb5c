"""``python -m benchmarks.tiling``: what tiling saves and what it changes, on ``vqfast.VQModel`` with random
weights (seeded; the codebook given the latents' spread, as benchmarks/models.py does), float32, batch 1,
under ``torch.no_grad()``.

- memory: a SIZE x SIZE decode (default 2048, on ldm-celebahq-256) untiled and tiled (the model's default
  knobs: tiles of ``sample_size`` pixels, overlap 0.25), each in a fresh subprocess: the peak resident set
  over the one after the model and its latent input were made (``benchmarks.timing.peak_extra_memory``:
  VmHWM reset through /proc/self/clear_refs after malloc_trim; on CUDA the allocator's peak), and the
  seconds of that one call (no warmup: a second call would double a long run).
- codes: per shared configuration (../shared/configs, through tests/conftest.py's load_config; identical
  configurations share a row), the share of latent positions whose code (nearest codebook row) from
  ``tiled_encode`` equals the untiled encode's, and the latents' relative L2 difference, for several
  overlap factors, with tiles of ``--tile`` pixels on ``--image``-pixel random images.

Prints the tables and writes ``tiling-<device>-<date>.{json,md}`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vqfast
from benchmarks import report
from benchmarks.run import ROOT, stamp
from benchmarks.timing import peak_extra_memory, timed_call
from tests.conftest import CONFIG_DIR, load_config

MEMORY_CONFIG = "ldm-celebahq-256"
OVERLAPS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)
MEMORY_GOAL = 0.25  # tiled peak over untiled peak, at most (issue 14)


def build(config: dict[str, Any], device: torch.device) -> vqfast.VQModel:
    """vqfast's VQModel with seeded random weights and a codebook spread like the latents of random images."""
    torch.manual_seed(0)
    model = vqfast.VQModel(**config).to(device).eval()
    with torch.no_grad():
        probe = model.encode(torch.randn(1, config.get("in_channels", 3), 64, 64, device=device)).latents
        model.quantize.embedding.weight.normal_(std=probe.std().item())
    return model


# --- memory --------------------------------------------------------------------------------------------------


def decode_case(config_name: str, size: int, tiled: bool, device: torch.device) -> dict[str, Any]:
    """One decode of a ``size`` x ``size`` image's latent (random): peak extra memory and seconds."""
    model = build(load_config(config_name), device)
    scale = 2 ** (len(model.config.block_out_channels) - 1)
    latent = torch.randn(1, model.config.vq_embed_dim or model.config.latent_channels, size // scale, size // scale)
    latent = latent.to(device)
    if tiled:
        model.enable_tiling()
    with torch.no_grad():
        peak, (seconds, image) = peak_extra_memory(lambda: timed_call(lambda: model.decode(latent).sample, device), device)
    assert image.shape[-2:] == (size, size), image.shape
    return {
        "config": config_name,
        "size": size,
        "tiled": tiled,
        "grid": model.tile_grid()._asdict() if tiled else None,
        "peak_mib": None if peak is None else peak / 2**20,
        "seconds": seconds,
    }


def memory_rows(config_name: str, untiled_sizes: list[int], tiled_sizes: list[int], device: str) -> list[dict[str, Any]]:
    """``decode_case`` for each size untiled and tiled, each in a fresh interpreter (a process's peak is only
    ever its own). ``ratio``: the peak over the untiled peak at the same size, measured where there is one,
    else extrapolated (see ``untiled_fit``)."""
    rows = []
    for tiled, sizes in ((False, untiled_sizes), (True, tiled_sizes)):
        for size in sizes:
            case = json.dumps({"config": config_name, "size": size, "tiled": tiled, "device": device})
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.tiling", "--child", case],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode:
                raise RuntimeError(f"decode case {case} failed:\n{child.stderr[-4000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    fit = untiled_fit(rows)
    for row in rows:
        row["untiled_peak_mib"], row["untiled_extrapolated"] = fit(row["size"])
        row["ratio"] = None if row["untiled_peak_mib"] is None else row["peak_mib"] / row["untiled_peak_mib"]
    return rows


def untiled_fit(rows: list[dict[str, Any]]) -> Any:
    """``size -> (untiled peak MiB, extrapolated?)``: measured where a row has it; else a + b * size**2 through
    the two largest measured sizes (every activation of the decoder, attention's included, grows with the
    pixel count), or None with fewer than two."""
    measured = {row["size"]: row["peak_mib"] for row in rows if not row["tiled"] and row["peak_mib"] is not None}

    def fit(size: int) -> tuple[float | None, bool]:
        if size in measured:
            return measured[size], False
        if len(measured) < 2:
            return None, True
        (s0, p0), (s1, p1) = sorted(measured.items())[-2:]
        slope = (p1 - p0) / (s1**2 - s0**2)
        return p1 + slope * (size**2 - s1**2), True

    return fit


# --- codes ---------------------------------------------------------------------------------------------------


def code_config_groups(names: list[str]) -> list[list[str]]:
    """``names`` grouped by identical configuration (their results are identical too: same seed)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(json.dumps(load_config(name), sort_keys=True), []).append(name)
    return list(groups.values())


def code_rows(names: list[str], tile: int, image: int, overlaps: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    device = torch.device("cpu")
    for group in code_config_groups(names):
        model = build(load_config(group[0]), device)
        scale = 2 ** (len(model.config.block_out_channels) - 1)
        model.tile_sample_min_size, model.tile_latent_min_size = tile, tile // scale
        images = torch.randn(1, model.config.in_channels, image, image, generator=torch.Generator().manual_seed(1))
        codebook = model.quantize.embedding.weight
        with torch.no_grad():
            latents = model.encode(images).latents
            codes = vqfast.ops.nearest_code(latents, codebook)
            for overlap in overlaps:
                model.tile_overlap_factor = overlap
                started = time.perf_counter()
                tiled = model.tiled_encode(images).latents
                seconds = time.perf_counter() - started
                grid = model.tile_grid()
                rows.append(
                    {
                        "configs": group,
                        "tile_px": tile,
                        "image_px": image,
                        "latent": list(latents.shape[1:]),
                        "overlap_factor": overlap,
                        "overlap_latents": grid.overlap,
                        "tiles": len(range(0, latents.shape[2], grid.stride)) * len(range(0, latents.shape[3], grid.stride)),
                        "equal_codes": (vqfast.ops.nearest_code(tiled, codebook) == codes).double().mean().item(),
                        "latent_rel_l2": (torch.linalg.vector_norm(tiled - latents) / torch.linalg.vector_norm(latents)).item(),
                        "seconds": seconds,
                    }
                )
                print(f"  {' = '.join(group)} overlap {overlap}: {rows[-1]['equal_codes']:.4f}", file=sys.stderr, flush=True)
    return rows


# --- report --------------------------------------------------------------------------------------------------

MEMORY_COLUMNS: list[report.Column] = [
    ("config", lambda r: r["config"]),
    ("decode", lambda r: f"1x3x{r['size']}x{r['size']}"),
    ("tiling", lambda r: "tiled " + "{tile}/{stride} latents x{scale}".format(**r["grid"]) if r["tiled"] else "untiled"),
    ("peak MiB", lambda r: report.num(r["peak_mib"], 4)),
    ("untiled peak MiB", lambda r: report.num(r["untiled_peak_mib"], 4) + (" (extrapolated)" if r["untiled_extrapolated"] else "")),
    ("vs untiled", lambda r: report.num(r["ratio"])),
    ("s", lambda r: report.num(r["seconds"])),
]
CODE_COLUMNS: list[report.Column] = [
    ("config", lambda r: " = ".join(r["configs"])),
    ("image / tile px", lambda r: f"{r['image_px']} / {r['tile_px']}"),
    ("overlap", lambda r: f"{r['overlap_factor']} ({r['overlap_latents']} latents)"),
    ("tiles", lambda r: str(r["tiles"])),
    ("equal codes", lambda r: f"{100 * r['equal_codes']:.2f}%"),
    ("latent rel L2", lambda r: f"{r['latent_rel_l2']:.2e}"),
    ("s", lambda r: report.num(r["seconds"])),
]


def goal_line(rows: list[dict[str, Any]]) -> str:
    """The goal at the largest tiled size: against the extrapolated untiled peak and against the bound."""
    tiled = max((r for r in rows if r["tiled"]), key=lambda r: r["size"], default=None)
    untiled = max((r for r in rows if not r["tiled"]), key=lambda r: r["size"], default=None)
    if tiled is None or untiled is None or tiled["ratio"] is None:
        return "goal: not judged (no untiled peak to compare with)"
    bound = tiled["peak_mib"] / untiled["peak_mib"]
    verdict = "met" if max(tiled["ratio"], bound if tiled["size"] >= untiled["size"] else 0) < MEMORY_GOAL else "MISSED"
    return (
        f"goal {verdict} at {tiled['size']}x{tiled['size']}: tiled peak {report.num(tiled['ratio'])} of the untiled one"
        f"{' (extrapolated)' if tiled['untiled_extrapolated'] else ''}; {report.num(bound)} of the measured untiled "
        f"peak at {untiled['size']}x{untiled['size']}"
    )


def render(results: dict[str, Any], table: Any) -> str:
    parts = [report.stamp_line(results["meta"])]
    if results["memory"]:
        parts += [
            "Decode peak memory over the resident set after model load, float32, batch 1, no_grad; goal: tiled "
            f"below {MEMORY_GOAL} of untiled at the same size. Untiled sizes that were not run are extrapolated "
            "(a + b * pixels through the two largest measured); the largest measured untiled peak bounds them from "
            "below, so a tiled peak under the goal against it is under the goal against the real one too.",
            table(results["memory"], MEMORY_COLUMNS),
            goal_line(results["memory"]),
        ]
    if results["codes"]:
        parts += ["tiled_encode's codes against untiled encode's:", table(results["codes"], CODE_COLUMNS)]
    parts.append(f"wall time {report.num(results['meta']['wall_s'])} s; options: {results['meta']['command']}")
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the memory part")
    parser.add_argument("--skip", choices=("memory", "codes"), action="append", default=[])
    parser.add_argument("--memory-config", default=MEMORY_CONFIG)
    parser.add_argument(
        "--untiled-sizes",
        type=int,
        nargs="*",
        default=[512, 1024],
        help="decoded image sides run untiled (memory); 2048 needs about 20 GiB on ldm-celebahq-256",
    )
    parser.add_argument("--tiled-sizes", type=int, nargs="*", default=[1024, 2048], help="decoded image sides run tiled")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=sorted(p.stem for p in CONFIG_DIR.glob("*.json")),
        help="configurations of the codes part (default: all shared ones)",
    )
    parser.add_argument("--tile", type=int, default=256, help="tile side, pixels (codes)")
    parser.add_argument("--image", type=int, default=512, help="image side, pixels (codes)")
    parser.add_argument("--overlaps", type=float, nargs="+", default=OVERLAPS, help="tile_overlap_factor values (codes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one memory case, JSON, run by memory_rows
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(decode_case(case["config"], case["size"], case["tiled"], torch.device(case["device"]))))
        return 0
    started = time.perf_counter()
    meta = stamp(torch.device(args.device))
    memory = [] if "memory" in args.skip else memory_rows(args.memory_config, args.untiled_sizes, args.tiled_sizes, args.device)
    codes = [] if "codes" in args.skip else code_rows(args.configs, args.tile, args.image, tuple(args.overlaps))
    meta |= {"wall_s": time.perf_counter() - started, "command": " ".join(sys.argv[1:]) or "(defaults)"}
    results = {"meta": meta, "memory": memory, "codes": codes}
    print(render(results, report.text_table))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"tiling-{report.basename(meta, quick=False)}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    base.with_suffix(".md").write_text(f"# Tiling\n\n{render(results, report.markdown_table)}\n")
    print(f"wrote {base}.json and {base}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
