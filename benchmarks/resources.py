"""Registers, spills and shared memory of every GPU kernel, compiled ahead of time for sm_90 and sm_80
without a GPU: ``python -m benchmarks.resources``.

Triton: every specialization the Triton tests launch. The tests' CPU cases (tests/test_triton.py and the
triton cases of tests/test_conformance.py) run in a child pytest under ``TRITON_INTERPRET=1`` with this
module as a plugin, which records each launch's arguments as triton specializes them (dtypes, 16-byte
alignment, integers equal to 1 or divisible by 16, constexprs) and, for autotuned kernels, every config
(the interpreter runs only the first). Each distinct specialization is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in a process pool, and its PTX read
by ptxas -v with the flags triton uses. CUDA: csrc/cuda/*.cu through ``nvcc -Xptxas -v``.

Results are cached in build/resources-cache.json, keyed by the kernel's source hash and specialization, so
a rerun compiles only what changed. Writes benchmarks/results/resources-sm80-sm90.{md,json}; exits non-zero
on any compile error.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "build" / "resources-cache.json"
TESTS = ("tests/test_triton.py", "tests/test_conformance.py")
TARGETS = (90, 80)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; fusion is the default
RECORD_ENV = "VQFAST_RECORD_LAUNCHES"  # the child's output file: set, this module records as a plugin

# ------------------------------------------------------------------------ recording (in the child)


class TensorArg:
    """A tensor argument as triton specializes it: its dtype and whether its address is 16-byte aligned
    (not a tuple: triton would specialize a tuple's items)."""

    def __init__(self, dtype: Any, aligned: bool):
        self.dtype, self.aligned = dtype, aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8

    def __repr__(self) -> str:
        return f"TensorArg({self.dtype}, {self.aligned})"


def _stand_in(value: Any, constexpr: bool = False) -> Any:
    """A picklable value that triton specializes exactly as it does ``value``: integers keep only
    what specialization reads (1, divisibility by 16, 32 or 64 bits), unless they are constexprs."""
    import torch

    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, tuple):
        return type(value)(*(_stand_in(v, constexpr) for v in value)) if hasattr(value, "_fields") else tuple(
            _stand_in(v, constexpr) for v in value
        )
    if constexpr or isinstance(value, bool) or not isinstance(value, int):
        return 0.5 if isinstance(value, float) and not constexpr else value
    if value == 1:
        return 1
    wide = not -(2**31) <= value < 2**31
    return (2**32 if wide else 16) + (value % 16 != 0)


def _record(kernel, args: tuple, kwargs: dict) -> list[tuple]:
    """``(module, name, args, kwargs)`` of a launch, one per autotune config."""
    from triton.runtime.autotuner import Autotuner

    configs = [None]
    fn = kernel
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        configs = getattr(kernel, "compiled_configs", kernel.configs)
    constexpr = {p.name for p in _params(fn) if p.is_constexpr}
    names = fn.arg_names
    stand_args = tuple(_stand_in(v, names[i] in constexpr) for i, v in enumerate(args))
    stand_kwargs = {k: _stand_in(v, k in constexpr) for k, v in kwargs.items()}
    out = []
    for config in configs:
        extra = {} if config is None else config.all_kwargs()
        out.append((fn.fn.__module__, fn.fn.__name__, stand_args, {**stand_kwargs, **extra}))
    return out


def _params(fn):
    """The jit parameters of an interpreted or compiled kernel (``is_constexpr`` from the annotation)."""
    import inspect

    import triton.language as tl

    return [
        type("P", (), {"name": p.name, "is_constexpr": p.annotation is tl.constexpr or "constexpr" in str(p.annotation)})
        for p in inspect.signature(fn.fn).parameters.values()
    ]


def pytest_configure(config) -> None:
    """As a plugin in the child: record every launch (and still run it) while the tests run."""
    if not os.environ.get(RECORD_ENV):
        return
    from triton.runtime.jit import KernelInterface

    launches: dict[bytes, tuple] = {}
    original = KernelInterface.__getitem__

    def recording(self, grid):
        launch = original(self, grid)

        def run(*args, **kwargs):
            for entry in _record(self, args, kwargs):
                launches.setdefault(pickle.dumps(entry), entry)
            return launch(*args, **kwargs)

        return run

    KernelInterface.__getitem__ = recording
    config._vqfast_launches = launches


def pytest_unconfigure(config) -> None:
    launches = getattr(config, "_vqfast_launches", None)
    if launches is not None:
        Path(os.environ[RECORD_ENV]).write_bytes(pickle.dumps(list(launches.values())))


def record_launches() -> list[tuple]:
    """Run the tests' Triton CPU cases under the interpreter in a child pytest; its recorded launches."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.pkl"
        env = {**os.environ, "TRITON_INTERPRET": "1", RECORD_ENV: str(out)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.resources"]
        run = subprocess.run(command + list(TESTS), env=env, cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0 or not out.exists():
            sys.exit(f"the interpreted tests failed:\n{run.stdout[-5000:]}\n{run.stderr[-3000:]}")
        return pickle.loads(out.read_bytes())


# ------------------------------------------------------------------------ compiling (in the pool)

PTXAS_LINE = re.compile(r"(\d+) bytes (stack frame|spill stores|spill loads)|Used (\d+) registers|(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per entry function: registers, spill stores/loads, stack frame and static shared memory (bytes)."""
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if entry:
            current = functions.setdefault(entry.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                           "stack": 0, "smem": 0})  # fmt: skip
        if current is None:
            continue
        for count, what, registers, smem in PTXAS_LINE.findall(line):
            if registers:
                current["registers"] = int(registers)
            elif smem:
                current["smem"] = int(smem)
            else:
                current[{"stack frame": "stack", "spill stores": "spill_stores", "spill loads": "spill_loads"}[what]] = (
                    int(count)
                )
    return functions


def _specialize(fn, args: tuple, kwargs: dict, capability: int):
    """``(ASTSource, target, options)`` of a launch, specialized as ``JITFunction.run`` would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = {"debug": fn.debug, **kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compiler.ASTSource(fn, signature, constexprs, attrs), target, options


def compile_triton(task: tuple) -> dict:
    """Compile one specialization for one capability; its resources (or its error)."""
    module, name, args, kwargs, capability = task
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    fn = _kernel(module, name)
    try:
        source, target, options = _specialize(fn, args, kwargs, capability)
        compiled = triton.compile(source, target=target, options=options.__dict__)
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(compiled.asm["ptx"])
            command = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
            log = subprocess.run(command + [str(ptx), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
        (stats,) = parse_ptxas(log.stderr + log.stdout).values()
        stats["smem"] = max(stats["smem"], compiled.metadata.shared)  # triton's is dynamic shared memory
        return stats
    except Exception as error:  # reported in the table, and the script fails
        return {"error": f"{type(error).__name__}: {str(error)[:2000]}"}


def _kernel(module: str, name: str):
    """The compiled ``JITFunction`` of a kernel (an autotuned one's inner function)."""
    from triton.runtime.autotuner import Autotuner

    fn = getattr(importlib.import_module(module), name)
    return fn.fn if isinstance(fn, Autotuner) else fn


def _task_key(task: tuple) -> str:
    """Cache key: the kernel's source hash (its jit dependencies included) and the specialization."""
    module, name, args, kwargs, capability = task
    fn = _kernel(module, name)
    return hashlib.sha256(f"{fn.cache_key}|{args!r}|{sorted(kwargs.items())!r}|{capability}".encode()).hexdigest()


def _describe(args: tuple, kwargs: dict, fn) -> str:
    """The specialization in a few words: dtypes, the constexprs that select code, the launch options."""
    import torch

    names = fn.arg_names
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    bound = dict(zip(names, args), **kwargs)
    dtypes = []
    for name in names:
        v = bound.get(name)
        if isinstance(v, TensorArg):
            dtypes.append(str(v.dtype).replace("torch.", "").replace("float", "f").replace("bf16", "bf16"))
    shown = [f"{k}={v}" for k, v in bound.items() if k in constexpr and k != "INTERPRET" and not isinstance(v, torch.dtype)]
    shown += [f"{k}={bound[k]}" for k in ("num_warps", "num_stages") if k in bound]
    nones = [k for k in names if bound.get(k, 0) is None]
    return " ".join(["/".join(dict.fromkeys(dtypes))] + shown + ([f"None:{','.join(nones)}"] if nones else []))


def triton_rows(launches: list[tuple], workers: int) -> tuple[list[dict], int]:
    """One row per (specialization, capability); the number compiled afresh."""
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    tasks = [(*launch, cc) for launch in launches for cc in TARGETS]
    keys = [_task_key(task) for task in tasks]
    todo = [(key, task) for key, task in zip(keys, tasks) if key not in cache]
    CACHE.parent.mkdir(exist_ok=True)
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(compile_triton, [t for _, t in todo], chunksize=4)
            for done, ((key, _), stats) in enumerate(zip(todo, results), 1):
                cache[key] = stats
                if done % 50 == 0 or done == len(todo):  # an interrupted run keeps what it compiled
                    CACHE.write_text(json.dumps(cache))
    rows = []
    for key, (module, name, args, kwargs, cc) in zip(keys, tasks):
        fn = _kernel(module, name)
        rows.append({"kernel": f"{module.rsplit('.', 1)[-1]}.{name}", "target": f"sm_{cc}",
                     "specialization": _describe(args, kwargs, fn), **cache[key]})  # fmt: skip
    return rows, len(todo)


# ------------------------------------------------------------------------------------------ CUDA


def cuda_rows() -> list[dict]:
    """``nvcc -Xptxas -v`` of every csrc/cuda/*.cu for each target; one row per kernel and target."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return [{"kernel": "csrc/cuda", "target": "-", "specialization": "", "error": "nvcc not found"}]
    rows = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for cc in TARGETS:
            command = [nvcc, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-c", "-Xptxas", "-v",
                       "-gencode", f"arch=compute_{cc},code=sm_{cc}", str(source), "-o", os.devnull]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                rows.append({"kernel": source.name, "target": f"sm_{cc}", "specialization": "",
                             "error": run.stderr[-2000:]})  # fmt: skip
                continue
            functions = parse_ptxas(run.stderr)
            names = _demangle(list(functions))
            for mangled, stats in functions.items():
                kernel, _, spec = names[mangled].partition("<")
                rows.append({"kernel": f"{source.stem}.{kernel.split('(')[0].split('::')[-1]}", "target": f"sm_{cc}",
                             "specialization": ("<" + spec).split("(")[0] if spec else "", **stats})  # fmt: skip
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# ------------------------------------------------------------------------------------------ report


def _versions() -> dict:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if Path(nvcc).exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "targets": [f"sm_{cc}" for cc in TARGETS],
        "triton": triton.__version__,
        "triton_ptxas": get_ptxas(90).version,
        "nvcc": (re.findall(r"release ([\d.]+)", nvcc_version) or ["-"])[0],
        "torch": torch.__version__,
        "commit": commit.strip() + ("+dirty" if dirty.strip() else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _markdown(meta: dict, triton_rows: list[dict], cuda_rows: list[dict]) -> str:
    lines = [
        "# Registers, spills and shared memory, compiled ahead of time (no GPU)",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "seconds") + f"; {meta['seconds']:.0f} s.",
        "",
        "Registers per thread (255 is the ceiling), spill stores/loads and stack frame in bytes per thread,",
        "shared memory in bytes per block. `python -m benchmarks.resources` regenerates this file.",
    ]
    for title, rows in (("Triton (every specialization the tests launch)", triton_rows), ("CUDA", cuda_rows)):
        lines += ["", f"## {title}", "", "| kernel | target | specialization | regs | spill st/ld | stack | smem |",
                  "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in sorted(rows, key=lambda r: (r["kernel"], r["target"], r["specialization"])):
            if "error" in r:
                lines.append(f"| {r['kernel']} | {r['target']} | {r['specialization']} | ERROR | | | |")
                continue
            flag = " **!**" if r["spill_stores"] or r["registers"] >= 254 else ""
            lines.append(
                f"| {r['kernel']} | {r['target']} | {r['specialization']} | {r['registers']}{flag} | "
                f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['smem']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="compile processes")
    parser.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda")
    options = parser.parse_args()
    start = time.perf_counter()
    launches = record_launches()
    recorded = time.perf_counter() - start
    rows, compiled = triton_rows(launches, options.workers)
    cuda = [] if options.no_cuda else cuda_rows()
    meta = {**_versions(), "seconds": time.perf_counter() - start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "resources-sm80-sm90"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "triton_kernels": rows, "cuda_kernels": cuda}, indent=1))
    stem.with_suffix(".md").write_text(_markdown(meta, rows, cuda))
    errors = [r for r in rows + cuda if "error" in r]
    worst = [r for r in rows + cuda if r.get("spill_stores") or r.get("registers", 0) >= 254]
    print(
        f"{len(launches)} Triton specializations x {len(TARGETS)} targets ({compiled} compiled, the rest cached), "
        f"{len(cuda)} CUDA kernel builds; recorded in {recorded:.0f} s, total {meta['seconds']:.0f} s; "
        f"{len(worst)} spilling or at 254+ registers; {len(errors)} errors -> {stem}.md"
    )
    for r in errors:
        print(f"ERROR {r['kernel']} {r['target']} {r['specialization']}\n{r['error']}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
