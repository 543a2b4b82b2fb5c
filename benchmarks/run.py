"""``python -m benchmarks.run`` (``make bench``): vqfast against eager PyTorch as diffusers writes it,
torch.compile of the same, and faiss, per op; and for the whole model against diffusers eager in NCHW and
channels_last, under torch.compile and under autocast, with the limit row (vqfast's convolutions alone).
Prints a table and writes JSON, markdown and a PNG chart under benchmarks/results/, named by device and date.

Every available vqfast backend is picked up by itself (``vqfast.backends()``); the results record
the BLAS each peer loaded and its core (:mod:`benchmarks.peers`). The default run covers every op, shape and
dtype of the comparison and every model case on the default device (CUDA when present); on a 2-core CPU it
takes about half an hour, most of it compiling diffusers' models (benchmarks/README.md, "Run time");
``--quick`` runs tiny shapes once, to check that it all works.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import diffusers
import torch

import vqfast
from benchmarks import peers, report
from benchmarks.cases import BASELINES, LAYOUTS, OPS, Case, build, implementation, make_cases, plan
from benchmarks.models import (
    AUTO,
    CONVS,
    EAGER,
    LARGE_DECODE_IMPLS,
    MODEL_DTYPES,
    MODELS,
    PEERS,
    ModelBench,
    ModelCase,
    build_model,
    error_bound,
    model_plan,
    relative_l2,
    runs_task,
)
from benchmarks.peak import measure_peaks
from benchmarks.progress import Progress, progress
from benchmarks.report import Row
from benchmarks.timing import Timing, measure, timed_call
from vqfast.backend import BACKENDS, EMULATED

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
IMPLS = BACKENDS + BASELINES


def _choices(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        names = [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)} or none")
        return names

    return parse


def _shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) not in (3, 4) or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected NxCxHxW (norms) or NxKxD (codebook ops) shapes, got {text!r}")
    return shapes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="vqfast against eager PyTorch (as diffusers writes it), torch.compile and faiss, per op and for "
        "the whole model. Lists are comma-separated; 'none' skips a part.",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default cuda when present, else cpu",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, once, ops in float32 and NCHW; models narrowed to a quarter of their channels at 32x32 "
        "(decodes at 64x64), without torch.compile",
    )
    p.add_argument("--ops", type=_choices(OPS), default=list(OPS), help=f"of {', '.join(OPS)}; default all")
    p.add_argument(
        "--shapes",
        type=_shapes,
        default=None,
        help="replace the default shapes: NxCxHxW for the norms, NxKxD for the codebook ops",
    )
    p.add_argument(
        "--dtypes",
        type=_choices(DTYPES),
        default=None,
        help="of the ops; default float32,bfloat16 (and float16 on CUDA), float32 with --quick",
    )
    p.add_argument(
        "--layouts",
        type=_choices(LAYOUTS),
        default=None,
        help="of the norms' inputs; default both for group_norm_act, nchw for spatial_norm_act",
    )
    p.add_argument(
        "--backends",
        type=_choices(IMPLS),
        default=[impl for impl in IMPLS if impl not in EMULATED],
        help=f"what the ops compare, of {', '.join(IMPLS)} (vqfast backends run where available); default all "
        "but the emulated (cuda_host)",
    )
    p.add_argument("--models", type=_choices(MODELS), default=list(MODELS), help=f"of {', '.join(MODELS)}; default all")
    p.add_argument(
        "--model-peers",
        type=_choices(PEERS),
        default=None,
        help=f"diffusers' whole model beside eager (NCHW, always run: the reference), of {', '.join(PEERS)}; "
        "default both (eager+channels_last alone with --quick)",
    )
    p.add_argument(
        "--model-backends",
        type=_choices(("auto", *BACKENDS)),
        default=["auto"],
        help="vqfast backends for the whole model; default auto (each op's default choice)",
    )
    p.add_argument(
        "--model-dtypes",
        type=_choices(MODEL_DTYPES),
        default=None,
        help="the models' precisions (autocast-*: float32 weights, calls under torch.autocast); default "
        "float32,autocast-bfloat16 on the CPU, float16,autocast-float16 on CUDA",
    )
    p.add_argument(
        "--model-compile-dtypes",
        type=_choices(MODEL_DTYPES),
        default=None,
        help="the precisions torch.compile runs the models in (diffusers' compile, vqfast's with --model-compile); "
        "default float32 on the CPU (a compile costs about a minute per model and task there), all on CUDA",
    )
    p.add_argument("--resolution", type=int, default=None, help="model input size; default 256 (512 on CUDA)")
    p.add_argument(
        "--decode-resolution",
        type=int,
        default=None,
        help="extra decode rows at this input size, in the first model dtype, on eager, eager+channels_last and "
        "vqfast[auto]; default 512 on the CPU (64 with --quick), none on CUDA (its --resolution is 512); 0: none",
    )
    p.add_argument("--batch", type=int, default=1, help="model batch size; default 1")
    p.add_argument(
        "--model-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile vqfast's models too; default on CUDA only (a minute per model and task on a CPU)",
    )
    p.add_argument(
        "--model-convs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the limit row, vqfast[auto] convs: the convolutions of one vqfast[auto] call, replayed alone; "
        "default on",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="add vqfast[auto]+graph: decode captured once in a CUDA graph at the fixed shape, replayed (CUDA only)",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement; default 0.1")
    p.add_argument("--min-repeats", type=int, default=None, help="timed calls per op at least; default 3")
    p.add_argument(
        "--model-repeats",
        type=int,
        default=None,
        help="timed calls per model task, taken in turns by the implementations; default 2 on the CPU, 5 on CUDA",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where the JSON, markdown and PNG go; default benchmarks/results",
    )
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    quick = args.quick
    autocast = "autocast-float16" if cuda else "autocast-bfloat16"
    defaults = {
        "dtypes": ["float32"] if quick else ["float32", "bfloat16"] + ["float16"] * cuda,
        "model_dtypes": ["float16" if cuda and not quick else "float32", autocast],
        "model_compile_dtypes": list(MODEL_DTYPES) if cuda else ["float32"],
        "model_peers": [p for p in PEERS if not quick or p != "compile"],
        "resolution": 32 if quick else (512 if cuda else 256),
        "decode_resolution": 0 if cuda else (64 if quick else 512),
        "model_compile": cuda and not quick,
        "budget": 0.0 if quick else 0.1,
        "min_repeats": 1 if quick else 3,
        "model_repeats": 1 if quick else (5 if cuda else 2),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run_one(
    call: Callable[[], Any],
    device: torch.device,
    *,
    compiled: bool,
    budget_s: float,
    min_repeats: int,
    warmup: bool,
    track_memory: bool = False,
) -> tuple[Row, Any]:
    """Time ``call``: the first call apart when ``compiled`` (compilation included), then the timing.
    Returns the row's timing fields (``cost_s``: what measuring it took) and the last output."""
    started = time.perf_counter()
    compile_s = timed_call(call, device)[0] if compiled else None
    timing = measure(call, device, budget_s=budget_s, min_repeats=min_repeats, warmup=warmup, track_memory=track_memory)
    row = {
        "median_ms": 1e3 * timing.median_s,
        "iqr_ms": 1e3 * timing.iqr_s,
        "repeats": len(timing.times_s),
        "compile_s": compile_s,
        "cost_s": time.perf_counter() - started,
    }
    if track_memory:
        row["peak_extra_mib"] = None if timing.peak_extra_bytes is None else timing.peak_extra_bytes / 2**20
    return row, timing.output


def _failure(exc: Exception) -> str:
    """``failed: <type>: <the message's first line, at most 200 characters>``."""
    message = str(exc).strip().partition("\n")[0]
    return f"failed: {type(exc).__name__}: {message[:200]}"


def _ratios(rows: list[Row], key: str, against: str) -> None:
    """``rows[i][key]``: how many times faster than the ``against`` implementation of the same run."""
    base = next((r["median_ms"] for r in rows if r["impl"] == against), None)
    for row in rows:
        row[key] = base / row["median_ms"] if base else None


def _release(device: torch.device) -> None:
    """Hand a case's memory back on CUDA. On the CPU reference counting has already freed it (a full
    ``gc.collect()`` costs a quarter of a second there)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_ops(
    plans: list[tuple[Case, list[str]]],
    device: torch.device,
    peaks: dict[str, Any],
    args: argparse.Namespace,
    progress: Progress,
    skip: Callable[[str, str, str], None],
) -> list[Row]:
    rows: list[Row] = []
    for case, impls in plans:
        bench = build(case, device)
        case_rows = []
        for impl in impls:
            progress.set_postfix_str(f"{case.label} {impl}")
            try:
                timing, _ = run_one(
                    bench.call(implementation(bench, case, impl)),
                    device,
                    compiled=impl == "compile",
                    budget_s=args.budget,
                    min_repeats=args.min_repeats,
                    warmup=True,
                    track_memory=case.op == "nearest_code",
                )
            except Exception as exc:  # noqa: BLE001  compile "where it works", and any failure: reported, not fatal
                skip(case.label, impl, _failure(exc))
            else:
                shape = "x".join(map(str, case.shape))
                case_rows.append(
                    {"op": case.op, "shape": shape, "dtype": case.dtype, "layout": case.layout, "impl": impl, **timing}
                )
            progress.update()
        for row in case_rows:
            seconds = row["median_ms"] / 1e3
            if bench.flops:
                row.update(metric="GFLOP/s", rate=bench.flops / seconds / 1e9)
                row["peak_share"] = row["rate"] / peaks["matmul_gflops"]
            else:
                row.update(metric="GB/s", rate=bench.bytes / seconds / 1e9)
                row["peak_share"] = row["rate"] / peaks["copy_gbps"]
        _ratios(case_rows, "vs_eager", "eager")
        _ratios(case_rows, "vs_compile", "compile")
        rows += case_rows
        del bench
        _release(device)
    return rows


def run_models(
    plans: list[tuple[ModelCase, list[str]]],
    device: torch.device,
    args: argparse.Namespace,
    progress: Progress,
    skip: Callable[[str, str, str], None],
) -> list[Row]:
    """Per case and task, every implementation runs once untimed (compile's compiling call, timed apart;
    vqfast[auto]'s call recording its convolutions stands as its own), then the timed calls take turns call by
    call (eager, vqfast, eager, ...), so that a machine's drift during the minutes a model takes weighs on every
    one of them alike."""
    rows: list[Row] = []
    for case, impls in plans:
        bench = build_model(case, device, impls)
        case_rows = []
        for task in case.tasks:
            task_impls = [impl for impl in impls if runs_task(impl, task)]
            calls, compile_s = prepare_model_calls(bench, task, task_impls, progress, skip)
            times, outputs = take_turns(calls, device, args.model_repeats, lambda impl, reason: skip(
                f"{case.label} {task}", impl, reason))
            errors = model_errors(bench, task, outputs)
            for impl in task_impls:
                progress.set_postfix_str(f"{case.label} {task} {impl}")
                progress.update()
                if impl not in calls:
                    continue
                timing = Timing(times[impl], outputs[impl])
                error, bound = errors.get(impl, (None, None))
                case_rows.append(
                    {
                        "model": case.model + " (narrow)" * case.narrow,
                        "task": task,
                        "input": case.input,
                        "dtype": case.dtype,
                        "impl": impl,
                        "median_ms": 1e3 * timing.median_s,
                        "iqr_ms": 1e3 * timing.iqr_s,
                        "repeats": len(timing.times_s),
                        "compile_s": compile_s.get(impl),
                        "cost_s": (compile_s.get(impl) or 0.0) + sum(timing.times_s),
                        "images_per_s": case.batch / timing.median_s,
                        "error": error,
                        "bound": bound,
                        "match": None if error is None or bound is None else error <= bound,
                    }
                )
            del calls, outputs
        for task_rows in report.model_cases(case_rows):
            report.model_ratios(task_rows)
        rows += case_rows
        del bench
        _release(device)
    return rows


def prepare_model_calls(
    bench: ModelBench,
    task: str,
    impls: list[str],
    progress: Progress,
    skip: Callable[[str, str, str], None],
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Each implementation's call of ``task``, having run once: compilation (its seconds returned), the limit
    row's recording of vqfast[auto]'s convolutions, the CUDA graph's capture, a warmup call for the rest. An
    implementation that fails is left out, with the reason."""
    label = f"{bench.case.label} {task}"
    calls: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    # Every call made before any first call: making a compiled one resets torch._dynamo, dropping what another
    # had compiled.
    for impl in impls:
        progress.set_postfix_str(f"{label} {impl} (setting up)")
        try:
            calls[impl] = bench.function(impl, task)
        except Exception as exc:  # noqa: BLE001  any failure: reported, not fatal
            skip(label, impl, _failure(exc))
    for impl in list(calls):
        progress.set_postfix_str(f"{label} {impl} (first call)")
        try:
            if impl.endswith("compile"):
                compile_s[impl] = timed_call(calls[impl], bench.device)[0]
            elif not (impl == AUTO and CONVS in calls):  # the limit row's recording call warmed it
                calls[impl]()
        except Exception as exc:  # noqa: BLE001  compile "where it works", and any failure: reported, not fatal
            skip(label, impl, _failure(exc))
            del calls[impl]
    return calls, compile_s


def take_turns(
    calls: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    skip: Callable[[str, str], None],
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``repeats`` timed calls of each, in turns; the seconds and each one's last output. A call that fails is
    dropped from ``calls`` with the reason."""
    times: dict[str, list[float]] = {impl: [] for impl in calls}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for impl in list(calls):
            try:
                seconds, outputs[impl] = timed_call(calls[impl], device)
            except Exception as exc:  # noqa: BLE001
                skip(impl, _failure(exc))
                del calls[impl]
            else:
                times[impl].append(seconds)
    return times, outputs


def model_errors(bench: ModelBench, task: str, outputs: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Each output's relative L2 error to diffusers' float32 output on the same inputs, and the bound it must
    meet (DESIGN.md section 1). In float32 eager's output is that reference; the limit row's output means
    nothing."""
    float32 = bench.case.dtype == "float32"
    if float32 and EAGER not in outputs:
        return {}
    reference = outputs[EAGER] if float32 else bench.float32_output(task)
    errors = {impl: relative_l2(out, reference) for impl, out in outputs.items() if impl != CONVS}
    if float32:
        del errors[EAGER]
    bound = error_bound(bench.case.dtype, errors.get(EAGER))
    return {impl: (error, bound) for impl, error in errors.items()}


def model_plans(
    args: argparse.Namespace, device: torch.device, skip: Callable[[str, str, str], None]
) -> list[tuple[ModelCase, list[str]]]:
    """Every model case asked for, with the implementations it runs: the full cases (every task at
    ``--resolution``, each model dtype), then the large decode cases; compile only in ``--model-compile-dtypes``.
    What is left out is reported through ``skip``."""
    if not args.models:
        return []
    impls, left_out = model_plan(
        args.model_peers, args.model_backends, args.model_compile, device, args.model_convs, args.cuda_graphs
    )
    for impl, reason in left_out.items():
        skip("whole model", impl, reason)
    if args.quick and "compile" not in args.model_peers:
        skip("whole model", "compile", "off with --quick (--model-peers compile turns it on)")
    cases = [
        ModelCase(model, args.resolution, args.batch, dtype, args.quick)
        for model in args.models
        for dtype in args.model_dtypes
    ]
    if args.decode_resolution:
        cases += [
            ModelCase(model, args.decode_resolution, args.batch, args.model_dtypes[0], args.quick, ("decode",))
            for model in args.models
        ]
    plans = []
    for case in cases:
        case_impls = []
        for impl in impls:
            if case.tasks == ("decode",) and impl not in LARGE_DECODE_IMPLS:
                skip(f"{case.label} decode", impl, f"the large decode rows run {', '.join(LARGE_DECODE_IMPLS)} only")
            elif impl.endswith("compile") and case.dtype not in args.model_compile_dtypes:
                skip(case.label, impl, "not in --model-compile-dtypes (default float32 on the CPU)")
            else:
                case_impls.append(impl)
        plans.append((case, case_impls))
    return plans


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD's short hash, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short=12", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(device: torch.device) -> dict[str, Any]:
    auto = vqfast.backend.auto_order().get(device.type, {})
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "vqfast": vqfast.__version__,
        "faiss": _version("faiss-cpu"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backends": {name: status.reason or "available" for name, status in vqfast.backends().items()},
        "auto": {op: [*auto.get(op, ()), "torch"] for op in vqfast.backend.OPS},  # what auto tries, in order
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    diffusers.utils.logging.set_verbosity_error()  # its warning on every model.to(dtype=...) breaks the bar
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32, for convolutions too (as for matmuls)
    device = torch.device(args.device)
    meta = stamp(device)

    skipped: dict[tuple[str, str], list[str]] = {}

    def skip(case: str, impl: str, reason: str) -> None:
        skipped.setdefault((impl, reason), []).append(case)

    plans = []
    for case in make_cases(args.ops, args.shapes, args.dtypes, args.layouts, args.quick):
        impls, left_out = plan(case, device, args.backends)
        for impl, reason in left_out.items():
            skip(case.label, impl, reason)
        plans.append((case, impls))
    models = model_plans(args, device, skip)
    total = sum(len(i) for _, i in plans)
    total += sum(runs_task(impl, task) for case, impls in models for task in case.tasks for impl in impls)
    bar = progress(total)
    try:
        bar.set_postfix_str("measuring peaks")
        peaks = measure_peaks(device, quick=args.quick)
        op_rows = run_ops(plans, device, peaks, args, bar, skip)
        model_rows = run_models(models, device, args, bar, skip)
    finally:
        bar.close()

    meta["peers"] = peers.record()
    meta["wall_s"] = time.perf_counter() - started
    meta["command"] = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    results = {
        "meta": meta,
        "peak": peaks,
        "ops": op_rows,
        "models": model_rows,
        "skipped": [{"impl": impl, "reason": reason, "cases": cases} for (impl, reason), cases in skipped.items()],
    }
    print(report.render(results, report.text_table))
    for path in report.write(results, args.out_dir, args.quick):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
