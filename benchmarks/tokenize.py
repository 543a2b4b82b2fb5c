"""``vqfast tokenize`` throughput: images/s for 1, 2, ... processes on a generated dataset.

    python -m benchmarks.tokenize                      # 64 JPEGs of 256x256, ldm-celebahq-256, 1 and 2 processes
    python -m benchmarks.tokenize --processes 1 2 4 --device cuda --dtype bfloat16 --images 2048

Each count of processes runs the command as a user would, through torchrun (``--nproc_per_node=N -m
vqfast.tokenize``; one process included, so that each uses cores / N threads on the CPU), into a new folder,
then again on the finished folder: that second run does everything but encoding (start-up, model load,
weights hash, listing, manifest), and its time is taken off the first's for the encoding rate; the CPU time of
all their processes is recorded too (less disturbed by other jobs than the wall time). The model has
the configuration's architecture and random weights (the speed does not depend on them). Prints a table
and writes JSON and markdown to ``benchmarks/results/tokenize-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vqfast
from benchmarks import report
from benchmarks.run import ROOT, stamp

CONFIGS = ROOT.parent / "shared" / "configs"
COLUMNS: list[report.Column] = [
    ("processes", lambda r: str(r["processes"])),
    ("threads each", lambda r: str(r["threads_per_process"])),
    ("images", lambda r: str(r["images"])),
    ("wall s", lambda r: report.num(r["wall_s"])),
    ("start-up s", lambda r: report.num(r["startup_s"])),
    ("images/s", lambda r: report.num(r["images_per_s"])),
    ("images/s end to end", lambda r: report.num(r["images_per_s_end_to_end"])),
    ("speedup", lambda r: f"{report.num(r['speedup'])}x" if r["speedup"] else ""),
    ("CPU s", lambda r: report.num(r["cpu_s"])),
    ("start-up CPU s", lambda r: report.num(r["startup_cpu_s"])),
    ("CPU s per image", lambda r: report.num(r["cpu_s_per_image"])),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ldm-celebahq-256", help="a configuration of ../shared/configs, by name, "
                        "or a config.json path (default: ldm-celebahq-256)")
    parser.add_argument("--images", type=int, default=64, help="JPEGs generated (default: 64)")
    parser.add_argument("--size", type=int, default=256, help="their side, and the crop (default: 256)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    parser.add_argument("--shard-size", type=int, default=8, help="small enough for every process to get shards "
                        "(default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    return parser.parse_args(argv)


def make_dataset(folder: Path, count: int, size: int) -> None:
    """``count`` JPEGs of size x size: smooth gradients with noise (a photo's file size, not random bytes')."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size)[None, :, None] + np.linspace(0, 55, size)[:, None, None]
    for i in range(count):
        pixels = np.clip(ramp * rng.uniform(0.3, 1) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def make_model(folder: Path, config: str) -> None:
    path = Path(config) if config.endswith(".json") else CONFIGS / f"{config}.json"
    torch.manual_seed(0)
    arguments = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    vqfast.VQModel(**arguments).save_pretrained(folder)


def timed(command: list[str], threads: int) -> tuple[float, float]:
    """The command's wall time and CPU time (user + system, its processes and theirs), in seconds."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # OMP_NUM_THREADS: what tokenize sets under torchrun anyway, now from the start (and torchrun's notice goes).
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = stamp(torch.device(args.device)) | {
        "benchmark": "tokenize",
        "config": args.config,
        "command": " ".join(["python -m benchmarks.tokenize", *(sys.argv[1:] if argv is None else argv)]),
        "load_average_before": os.getloadavg(),
    }
    cores = len(os.sched_getaffinity(0))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        images, model = Path(scratch) / "images", Path(scratch) / "model"
        images.mkdir()
        make_dataset(images, args.images, args.size)
        make_model(model, args.config)
        for processes in args.processes:
            output = Path(scratch) / f"codes-{processes}"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       "-m", "vqfast.tokenize", str(images), str(output), "--model", str(model), "--resize",
                       str(args.size), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
                       "--device", args.device, "--dtype", args.dtype, "--no-progress"]
            threads = max(1, cores // processes)
            wall, cpu = timed(command, threads)
            startup, startup_cpu = timed(command, threads)  # the finished folder: everything but encoding
            rows.append({
                "processes": processes,
                "threads_per_process": threads,
                "images": args.images,
                "size": args.size,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "wall_s": wall,
                "startup_s": startup,
                "images_per_s": args.images / max(wall - startup, 1e-9),
                "images_per_s_end_to_end": args.images / wall,
                "cpu_s": cpu,
                "startup_cpu_s": startup_cpu,
                "cpu_s_per_image": (cpu - startup_cpu) / args.images,
            })
            print(f"{processes} process(es): {wall:.1f} s, of which start-up {startup:.1f} s", file=sys.stderr)
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    meta["load_average_after"] = os.getloadavg()
    heading = (f"vqfast tokenize, {args.config} (random weights), {args.images} JPEGs of {args.size}x{args.size}, "
               f"batch {args.batch_size}, shards of {args.shard_size}, {args.dtype} on {meta['device']} "
               f"({cores} cores); load average before {meta['load_average_before'][0]:.1f}, after "
               f"{meta['load_average_after'][0]:.1f}")
    print(f"{heading}\n{report.stamp_line(meta)}\n\n{report.text_table(rows, COLUMNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"tokenize-{report.basename(meta, quick=False)}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base.with_suffix(".md").write_text(
        f"# vqfast tokenize\n\n{heading}\n\n{report.stamp_line(meta)}\n\n"
        "images/s: images over (wall time - start-up), start-up being a rerun on the finished folder (launch, "
        "imports, model load and hash, listing, manifest). CPU s: user + system time of all the command's "
        "processes; CPU s per image = (CPU s - start-up CPU s) / images, which other jobs on the machine "
        f"disturb less than the wall time.\n\n{report.markdown_table(rows, COLUMNS)}\n"
    )
    print(f"wrote {base}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
