"""``python3 -m benchmarks.gpu_check`` (``make gpu-check``): everything a lent GPU should check, in one call.

Run from the repository root with the GPU machine's own ``python3`` (no virtualenv, no network). In order,
each step timed and stopped at its own time limit, all of them inside one overall budget (``--budget``,
525 s: the device tool gives a call 10 minutes and a task 15):

1. ``wheels``: the wheels under ``.whl/`` (below) installed into /tmp/site and put on PYTHONPATH; ``env``:
   nvidia-smi, the versions of python, torch, triton, diffusers and nvcc, the GPU;
2. ``build``: ``setup.py build_ext --inplace`` (ninja; the CUDA kernels are in when torch has CUDA and nvcc
   is found: setup.py's rule; the host build of the CUDA kernels, ``cuda_host``, is left out: CI tests it),
   then a check that ``vqfast._C.has_cuda()``;
3. ``tests``: ``pytest -m cuda`` over tests/ (the conformance suite's CUDA cases for every backend, the
   Triton and native CUDA tests), JUnit XML kept; with pytest-xdist when importable;
4. ``memcheck``, ``racecheck``: compute-sanitizer over the native backend's CUDA tests (tests/test_native.py
   and the conformance suite's ``native`` CUDA cases), only vqfast's kernels instrumented
   (``--kernel-name kns=vqfast``); memcheck with PyTorch's caching allocator off, so that an access past a
   tensor's end reaches unallocated memory; skipped, saying so, when no compute-sanitizer is found;
5. ``bench-*``: ``python3 -m benchmarks.run --device cuda`` in parts, most valuable first, each its own
   process, so that one stopped at its limit loses only itself: every op, shape, dtype and layout on eager
   and every vqfast backend; the whole models in float16 and autocast-float16 on diffusers eager (NCHW and
   channels_last) and vqfast (auto, triton, native), with the limit row (vqfast[auto]'s convolutions alone)
   and vqfast[auto]'s decode in a CUDA graph; then torch.compile of the ops, one op at a time; then of the
   models (diffusers and vqfast, float16), one model at a time. The parts are merged into one result (ratios
   recomputed over the merged rows), as ``benchmarks.run`` writes it;
6. everything goes into one folder, at most 8 files, as the device tool brings back: ``gpu-check.md``
   (the step table and each step's summary), ``gpu-check.log`` (every step's output), ``gpu-check.json``
   (the step table as data), ``gpu-check.tar.gz`` (each step's log, the JUnit XML, each part's results),
   and the merged ``<device>-<date>.{json,md,png}`` to commit under benchmarks/results/ (then run
   ``python -m benchmarks.auto_order``).

The folder: ``--out``, else ``$OUT`` when set (the device machine's), else benchmarks/results/gpu-check-<date>/.
Exit status 0 when every step that ran passed (a step skipped for want of a tool or of time, or a benchmark
part stopped at its limit, is no failure, but is listed), 1 otherwise.

``DRY_RUN=1`` (or ``--dry-run``) runs the same steps on this CPU at tiny sizes, to test the script without a
GPU: the build goes to build/gpu-check/ (not in place: the running tests have vqfast._C loaded), the tests
are the same files' CPU cases of the native backend, the sanitizers are skipped with a message, and the
benchmark parts run ``--device cpu --quick`` (one model, compiling one op and no model: on a CPU a model's
compile costs a minute per task).

Wheels. The GPU machine's python3 (3.12, torch 2.11+cu130, triton 3.6) lacks ``diffusers``, which the tests'
conftest and the benchmark runner import. Everything else the steps need is there (pytest, pytest-xdist,
transformers, matplotlib, tqdm, threadpoolctl, huggingface-hub 1.33, safetensors 0.8, numpy, regex, requests,
pillow, filelock, setuptools, ninja), and diffusers 0.42.1's requirements hold there (huggingface-hub>=1.32,
safetensors>=0.8); it declares ``importlib_metadata`` but imports it only on Python < 3.8. One wheel, then
(6.4 MB), fetched here in the repository root, once::

    echo /.whl/ >> .git/info/exclude   # .gitignore already ignores /.whl/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl diffusers==0.42.1

and name ``.whl`` in the call's ``carry``. This script installs them itself (step ``wheels``: ``pip install
--no-index --no-deps --target /tmp/site .whl/*.whl``, then PYTHONPATH=/tmp/site for every later step), so the
call is just::

    run(command="PYTHONUNBUFFERED=1 make gpu-check", carry=[".whl"], timeout_s=600)

Where one call cannot hold it all, split it over two on the same warm machine (the build's outputs stay
between calls, so the second build is ninja's no-op): ``make gpu-check ARGS="--skip bench"``, then
``make gpu-check ARGS="--skip tests,memcheck,racecheck"``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 525.0  # the whole run: under 9 minutes, leaving the device call's 10 room to bring files back
RESERVE_S = 15.0  # kept back from the steps for the merge and the bundle
MIN_STEP_S = 5.0  # a step with less time left than this is skipped
LOG_MAX_BYTES = 4 << 20  # a step's log in the bundle and in gpu-check.log: head and tail past this
MAX_FILES, MAX_FILE_BYTES = 8, 16 << 20  # what the device tool brings back from $OUT

OPS = ("nearest_code", "group_norm_act", "spatial_norm_act", "vector_quantize", "vector_quantize+bwd",
       "codebook_gather")
MODELS = ("ldm-celebahq-256", "kandinsky-2-2-decoder-movq", "amused-256")
SANITIZER_TESTS = ["tests/test_native.py", "tests/test_conformance.py", "-m", "cuda", "-k", "native"]
# Where compute-sanitizer usually is, after PATH.
SANITIZER_GLOBS = (
    "/usr/local/cuda/bin/compute-sanitizer",
    "/usr/local/cuda/compute-sanitizer/compute-sanitizer",
    "/usr/local/cuda-*/bin/compute-sanitizer",
    "/usr/local/cuda-*/compute-sanitizer/compute-sanitizer",
    "/opt/nvidia/*/compute-sanitizer/compute-sanitizer",
    "/opt/cuda/bin/compute-sanitizer",
)


@dataclass
class Step:
    name: str
    budget_s: float  # its own limit; the overall deadline may cut it shorter
    command: list[str] | None = None  # None: a step run in this process (``action``)
    env: dict[str, str] = field(default_factory=dict)
    action: Any = None  # callable(step) -> (status, summary) for in-process steps
    skip_reason: str = ""  # set: not run, with this message
    ok_codes: tuple[int, ...] = (0,)
    # filled in by running
    status: str = "pending"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    returncode: int | None = None
    summary: str = ""
    log: str = ""  # the log file's name in the work folder

    def record(self) -> dict[str, Any]:
        fields = ("name", "status", "seconds", "budget_s", "limit_s", "returncode", "summary", "log")
        return {k: v for k, v in asdict(self).items() if k in fields} | {
            "command": shlex.join(self.command) if self.command else None
        }


# ---------------------------------------------------------------------------------------------- helpers


def find_sanitizer() -> str | None:
    """compute-sanitizer's path: PATH, $CUDA_HOME/bin, then the usual CUDA folders."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "compute-sanitizer")] if cuda_home else []
    for pattern in SANITIZER_GLOBS:
        candidates += sorted(glob.glob(pattern))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], cwd=ROOT, capture_output=True).returncode == 0


def clip(text: str, limit: int = LOG_MAX_BYTES) -> str:
    """``text`` whole, or its first quarter and last three quarters of ``limit`` bytes."""
    data = text.encode(errors="replace")
    if len(data) <= limit:
        return text
    head, tail = data[: limit // 4], data[-(3 * limit // 4) :]
    cut = len(data) - len(head) - len(tail)
    return f"{head.decode(errors='replace')}\n[... {cut} bytes cut ...]\n{tail.decode(errors='replace')}"


def last_lines(text: str, n: int = 3, containing: tuple[str, ...] = ()) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("# ", "$ "))]
    if containing:
        lines = [line for line in lines if any(c in line for c in containing)]
    return " | ".join(lines[-n:])


def run_command(step: Step, work: Path, limit_s: float, base_env: dict[str, str]) -> None:
    """Runs ``step.command`` in its own process group, output to ``<work>/<name>.log``, killed with its
    children at ``limit_s``."""
    log_path = work / f"{step.name}.log"
    step.log = log_path.name
    env = {**base_env, **step.env}
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(step.command)}\n# limit {limit_s:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(
            step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            step.returncode = proc.wait(timeout=limit_s)
            step.status = "ok" if step.returncode in step.ok_codes else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            step.returncode, step.status = proc.returncode, "timeout"
        finally:
            try:  # what the step left behind (xdist workers, a sanitizer's target)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    step.seconds = time.monotonic() - started
    with open(log_path, "a") as log:
        log.write(f"\n# {step.status}, exit {step.returncode}, {step.seconds:.1f} s\n")


# ------------------------------------------------------------------------------------------ the steps


def plan_steps(args: argparse.Namespace, python: str, work: Path, dry: bool) -> list[Step]:
    device = "cpu" if dry else "cuda"
    quick = ["--quick"] if dry else []
    xdist = has_module(python, "xdist")
    jobs = max(1, min(8, (os.cpu_count() or 2) // 2))
    steps: list[Step] = []

    env_probe = (
        "import importlib.metadata as m, platform, torch\n"
        "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)\n"
        "for p in ('triton', 'diffusers', 'transformers', 'pytest', 'pytest-xdist', 'matplotlib', 'huggingface-hub'):\n"
        "    try: print(p, m.version(p))\n"
        "    except m.PackageNotFoundError: print(p, 'MISSING')\n"
        "print('cuda available', torch.cuda.is_available())\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    print('device', p.name, 'sm', f'{p.major}{p.minor}', 'SMs', p.multi_processor_count,\n"
        "          'GiB', round(p.total_memory / 2**30, 1))\n"
    )
    (work / "env_probe.py").write_text(env_probe)
    shell = (
        f"{shlex.quote(python)} {shlex.quote(str(work / 'env_probe.py'))}; "
        "command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,"
        "temperature.gpu,power.draw,memory.used --format=csv; "
        "(command -v nvcc || ls /usr/local/cuda/bin/nvcc) 2>/dev/null && "
        "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) --version | tail -2; "
        f"echo compute-sanitizer: {shlex.quote(find_sanitizer() or 'not found')}; echo cpus: $(nproc); true"
    )

    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    wheel_cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                 "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels]
    steps.append(
        Step(
            "wheels",
            60,
            wheel_cmd,
            skip_reason="dry run: this environment's own packages"
            if dry
            else ("" if wheels else "no .whl/*.whl: nothing to install (diffusers must be importable already)"),
        )
    )

    steps.append(Step("env", 30, ["bash", "-c", shell]))

    build_env = {"VQFAST_NO_CUDA_HOST": "1", "MAX_JOBS": str(os.cpu_count() or 2)}
    if dry:  # not in place: this process's parent (pytest) may have vqfast/_C*.so mapped
        build = [python, "setup.py", "-q", "build_ext", "--build-lib", "build/gpu-check/lib",
                 "--build-temp", "build/gpu-check/tmp"]
        check = "from vqfast import _C; print('vqfast._C importable; has_cuda', _C.has_cuda())"
    else:
        build = [python, "setup.py", "-q", "build_ext", "--inplace"]
        check = "from vqfast import _C; assert _C.has_cuda(), 'vqfast._C built without CUDA'; print('has_cuda True')"
    steps.append(
        Step("build", 240, ["bash", "-c", f"{shlex.join(build)} && {shlex.quote(python)} -c {shlex.quote(check)}"],
             env=build_env)
    )

    pytest = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--durations=10"]
    if dry:
        # The native backend's CPU tests: test_native.py and the conformance suite's native CPU cases.
        tests = ["tests", "-k", "test_native.py or (test_conformance.py and native and cpu)"]
    else:
        tests = ["tests", "-m", "cuda", *(["-n", str(jobs)] if xdist else [])]
    steps.append(Step("tests", 150, [*pytest, f"--junitxml={work / 'tests.xml'}", *tests]))

    sanitizer = None if dry else find_sanitizer()
    why = "dry run: no GPU" if dry else ("" if sanitizer else "compute-sanitizer not found (PATH, $CUDA_HOME/bin, "
                                          "/usr/local/cuda*/bin, /opt/nvidia/*/compute-sanitizer)")
    for tool, budget, extra_env, extra in (
        ("memcheck", 90, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, ["--leak-check", "no"]),
        ("racecheck", 75, {}, ["--racecheck-report", "hazard"]),
    ):
        command = [sanitizer or "compute-sanitizer", "--tool", tool, *extra, "--error-exitcode", "86",
                   "--print-limit", "50", "--kernel-name", "kns=vqfast", "--target-processes", "all",
                   *pytest, f"--junitxml={work / (tool + '.xml')}", *SANITIZER_TESTS]
        steps.append(Step(tool, budget, command, env=extra_env, skip_reason=why))

    def bench(part: str, budget: float, *options: str, skip: str = "") -> None:
        command = [python, "-m", "benchmarks.run", "--device", device, *quick, *options,
                   "--out-dir", str(work / "bench" / part)]
        steps.append(Step(f"bench-{part}", budget, command, skip_reason=skip))

    eager_and_backends = "eager,torch,triton,native" + (",faiss" if dry else "")
    bench("ops", 200, "--backends", eager_and_backends, "--models", "none")
    # The models in their default precisions (float16 and autocast-float16 at 512x512 on CUDA): diffusers eager in
    # both layouts, vqfast on each backend, the limit row, vqfast's decode in a CUDA graph.
    bench("models", 180, "--ops", "none", "--model-peers", "eager+channels_last", "--model-backends",
          "auto,triton,native", "--no-model-compile", "--cuda-graphs", *(["--models", "amused-256"] if dry else []))
    for op in OPS:
        skip = "dry run: one op compiled (on a CPU, a compile costs seconds)" if dry and op != "codebook_gather" else ""
        bench(f"compile-{op.replace('+', '-')}", 75, "--ops", op, "--backends", "eager,compile", "--models", "none",
              skip=skip)
    for model in MODELS:  # float16 alone: each precision compiles diffusers and vqfast once per task
        skip = "dry run: on a CPU a model's compile costs a minute per task" if dry else ""
        bench(f"compile-{model}", 150, "--ops", "none", "--models", model, "--model-dtypes", "float16",
              "--model-peers", "compile", "--model-backends", "auto", "--model-compile", "--no-model-convs", skip=skip)
    return steps


def summarize(step: Step, work: Path) -> None:
    """A line or two for the report, from the step's log and JUnit XML."""
    if step.status == "skipped" or not step.log:
        return
    text = (work / step.log).read_text(errors="replace")
    if step.name in ("tests", "memcheck", "racecheck"):
        junit = junit_counts(work / f"{step.name}.xml")
        pytest_line = last_lines(text, 1, ("passed", "failed", "error", "no tests ran", "skipped"))
        sanitizer_line = last_lines(text, 1, ("ERROR SUMMARY", "RACECHECK SUMMARY"))
        step.summary = " ; ".join(s for s in (junit, pytest_line, sanitizer_line) if s)
    elif step.name.startswith("bench-"):
        step.summary = last_lines(text, 1, ("wall time", "Error", "error:"))
    elif step.name == "env":
        lines = [line for line in text.splitlines() if line.startswith(("python ", "device ", "compute-sanitizer"))]
        step.summary = " | ".join(lines)
    else:
        step.summary = last_lines(text, 3)


def junit_counts(path: Path) -> str:
    if not path.exists():
        return ""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return "junit: unreadable"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return "junit: {tests} tests, {failures} failures, {errors} errors, {skipped} skipped".format(**total)


# ---------------------------------------------------------------------------------------- the results


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The benchmark parts as one ``benchmarks.run`` result: the first part's stamp and peaks, each op case's
    and model task's rows once per implementation (the first part's row wins: the eager rows every part
    repeats), the ratios recomputed over the merged rows (the ops' to eager and compile, the models' as the
    runner gives them), and the skips of every part."""
    if not parts:
        return None
    from benchmarks.report import model_ratios  # light (no torch), unlike the runner
    meta = dict(parts[0]["meta"])
    meta["wall_s"] = sum(p["meta"].get("wall_s", 0.0) for p in parts)
    meta["command"] = " ; ".join(p["meta"].get("command", "") for p in parts)
    commits = {p["meta"].get("commit") for p in parts}
    if len(commits) > 1:
        meta["commit"] = " ".join(sorted(c for c in commits if c))

    def merged(key: str, case_keys: tuple[str, ...]) -> list[dict[str, Any]]:
        rows: dict[tuple, dict[str, Any]] = {}
        for part in parts:
            for row in part.get(key, []):
                rows.setdefault((*(row[k] for k in case_keys), row["impl"]), dict(row))
        cases: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows.values():
            cases.setdefault(tuple(row[k] for k in case_keys), []).append(row)
        for case_rows in cases.values():
            if key == "models":
                model_ratios(case_rows)
                continue
            for ratio, against in (("vs_eager", "eager"), ("vs_compile", "compile")):
                base = next((r["median_ms"] for r in case_rows if r["impl"] == against), None)
                for row in case_rows:
                    row[ratio] = base / row["median_ms"] if base and row["median_ms"] else None
        return [row for case_rows in cases.values() for row in case_rows]

    skipped: dict[tuple[str, str], list[str]] = {}
    for part in parts:
        for entry in part.get("skipped", []):
            cases = skipped.setdefault((entry["impl"], entry["reason"]), [])
            cases += [c for c in entry["cases"] if c not in cases]
    return {
        "meta": meta,
        "peak": parts[0]["peak"],
        "ops": merged("ops", ("op", "shape", "dtype", "layout")),
        "models": merged("models", ("model", "task", "input", "dtype")),
        "skipped": [{"impl": i, "reason": r, "cases": c} for (i, r), c in skipped.items()],
    }


def bench_parts(steps: list[Step], work: Path) -> list[dict[str, Any]]:
    parts = []
    for step in steps:
        if step.name.startswith("bench-") and step.status == "ok":
            parts += [json.loads(p.read_text()) for p in sorted((work / "bench" / step.name[6:]).glob("*.json"))]
    return parts


def write_merged(steps: list[Step], work: Path, dry: bool) -> tuple[list[Path], str]:
    """The merged result's JSON, markdown and PNG in ``<work>/merged``, and its text table."""
    results = merge_results(bench_parts(steps, work))
    if results is None:
        return [], "no benchmark part finished"
    from benchmarks import report

    return report.write(results, work / "merged", quick=dry), report.render(results, report.text_table)


def step_table(steps: list[Step]) -> str:
    lines = ["| step | status | s | limit s | summary |", "|---|---|---|---|---|"]
    for s in steps:
        summary = (s.summary or s.skip_reason).replace("|", "/")[:300]
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.limit_s:.0f} | {summary} |")
    return "\n".join(lines)


def bundle(steps: list[Step], work: Path, out: Path, header: str, merged: list[Path], table: str) -> list[Path]:
    """At most MAX_FILES files into ``out``, each under MAX_FILE_BYTES."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    records = [s.record() for s in steps]
    (out / "gpu-check.json").write_text(json.dumps({"header": header, "steps": records}, indent=1) + "\n")
    written.append(out / "gpu-check.json")

    report = [f"# make gpu-check\n\n{header}\n\n{step_table(steps)}\n"]
    if table:
        report.append(f"## benchmarks (merged)\n\n```\n{clip(table, 2 << 20)}\n```\n")
    (out / "gpu-check.md").write_text("\n".join(report))
    written.append(out / "gpu-check.md")

    budget = MAX_FILE_BYTES - (1 << 20)
    logs = []
    for s in steps:
        if s.log:
            logs.append(f"\n\n======== {s.name}: {s.status}, {s.seconds:.1f} s ========\n")
            logs.append(clip((work / s.log).read_text(errors="replace"), min(LOG_MAX_BYTES, budget // 8)))
    (out / "gpu-check.log").write_text(clip("".join(logs), budget))
    written.append(out / "gpu-check.log")

    tar_path = out / "gpu-check.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.stat().st_size <= LOG_MAX_BYTES:
                tar.add(path, arcname=str(path.relative_to(work)))
            elif path.is_file():  # a long log: clipped
                clipped = work / "clipped" / path.name
                clipped.parent.mkdir(exist_ok=True)
                clipped.write_text(clip(path.read_text(errors="replace")))
                tar.add(clipped, arcname=str(path.relative_to(work)))
    if tar_path.stat().st_size > budget:  # too big to come back: the logs alone are in gpu-check.log
        tar_path.unlink()
    else:
        written.append(tar_path)

    for path in merged:
        if path.stat().st_size <= budget and len(written) < MAX_FILES:
            shutil.copy(path, out / path.name)
            written.append(out / path.name)
    return written


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                   help="the same steps on the CPU at tiny sizes (also DRY_RUN=1)")
    p.add_argument("--out", type=Path, default=None,
                   help="the results folder; default $OUT, else benchmarks/results/gpu-check-<date>/")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run; default {BUDGET_S:.0f} (no limit in a dry run)")
    p.add_argument("--skip", default="", help="comma-separated steps or step prefixes to leave out (e.g. bench)")
    p.add_argument("--only", default="", help="comma-separated steps or step prefixes to run alone")
    p.add_argument("--python", default=sys.executable, help="the interpreter for the steps; default this one")
    return p.parse_args(argv)


def _matches(name: str, patterns: str) -> bool:
    return any(name == p or name.startswith(p + "-") or (p.endswith("*") and name.startswith(p[:-1]))
               for p in (x.strip() for x in patterns.split(",")) if p)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    started = time.monotonic()
    budget = args.budget if args.budget is not None else (math.inf if dry else BUDGET_S)
    deadline = started + budget
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks" / "results" / f"gpu-check-{date}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths even where a GPU is
    header = (f"{'DRY RUN (CPU, tiny sizes)' if dry else 'GPU run'}; started {date}; budget "
              f"{'none' if math.isinf(budget) else f'{budget:.0f} s'}; python {args.python}; out {out}")
    print(header, flush=True)

    steps = plan_steps(args, args.python, work, dry)
    for step in steps:
        if args.only and not _matches(step.name, args.only):
            step.skip_reason = step.skip_reason or "not in --only"
        elif _matches(step.name, args.skip):
            step.skip_reason = step.skip_reason or "in --skip"
        left = deadline - time.monotonic() - RESERVE_S
        if not step.skip_reason and left < MIN_STEP_S:
            step.skip_reason = f"out of time ({max(left, 0):.0f} s left of the budget)"
        if step.skip_reason:
            step.status, step.summary = "skipped", step.skip_reason
            print(f"[{step.name}] skipped: {step.skip_reason}", flush=True)
            continue
        step.limit_s = min(step.budget_s, left)
        print(f"[{step.name}] running, limit {step.limit_s:.0f} s: {shlex.join(step.command)}", flush=True)
        run_command(step, work, step.limit_s, env)
        if step.name == "wheels" and step.status == "ok":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, ["/tmp/site", env.get("PYTHONPATH", "")]))
        summarize(step, work)
        print(f"[{step.name}] {step.status} in {step.seconds:.1f} s  {step.summary}", flush=True)
        if step.name == "build" and step.status != "ok":
            for later in steps[steps.index(step) + 1:]:
                later.skip_reason = later.skip_reason or "the build failed"

    try:
        merged, table = write_merged(steps, work, dry)
    except Exception as exc:  # noqa: BLE001  the bundle must still be written
        merged, table = [], f"merging the benchmark parts failed: {type(exc).__name__}: {exc}"
    total = time.monotonic() - started
    header += f"; total {total:.1f} s"
    written = bundle(steps, work, out, header, merged, table)
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{table}\n\n{step_table(steps)}\n\ntotal {total:.1f} s; wrote {len(written)} files to {out}:")
    for path in written:
        print(f"  {path.name} ({path.stat().st_size} bytes)")
    failed = [s.name for s in steps
              if s.status == "failed" or (s.status == "timeout" and not s.name.startswith("bench-"))]
    cut = [s.name for s in steps if s.status == "timeout" and s.name.startswith("bench-")]
    if cut:
        print(f"benchmark parts stopped at their limit (their results are missing, not wrong): {', '.join(cut)}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
