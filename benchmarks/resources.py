"""Registers, spills, shared memory and global loads of every GPU kernel, compiled ahead of time for sm_90
and sm_80 without a GPU: ``python -m benchmarks.resources``.

Triton: every specialization the Triton tests launch. The tests' CPU cases (tests/test_triton.py and the
triton cases of tests/test_conformance.py) run in a child pytest under ``TRITON_INTERPRET=1`` with this
module as a plugin, which records each launch's arguments as triton specializes them (dtypes, 16-byte
alignment, integers equal to 1 or divisible by 16, constexprs, ``INTERPRET=False`` as on a GPU) and, for
autotuned kernels, every config (the interpreter runs only the first). Each distinct specialization is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in a process pool; its
ptxas -v log gives the resources, its PTX the ``ld.global`` count. CUDA: csrc/cuda/*.cu through
``nvcc -Xptxas -v``.

Each result is keyed by (triton version, kernel source hash with its jit dependencies, specialization,
target). Known keys are not compiled again: those of the committed table (its JSON is the proof that
they compile) and of build/resources-cache.json. ``--check`` (CI) compiles only the unknown ones, writes
no table and fails on any compile error; without it the table benchmarks/results/resources-sm80-sm90.
{md,json} is rewritten. Either way the exit status is non-zero on a compile error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import io
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

if __name__ == "__main__":  # one module, so that pickled TensorArgs unpickle as this module's class
    sys.modules.setdefault("benchmarks.resources", sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "resources-sm80-sm90"
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
    """``(module, name, args, kwargs)`` of a launch, one per autotune config, as a GPU would launch it:
    ``INTERPRET`` (the kernels' interpreter workarounds) False, launch options (num_warps, ...) as given."""
    from triton.runtime.autotuner import Autotuner

    configs = [None]
    fn = kernel
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        configs = getattr(kernel, "compiled_configs", kernel.configs)
    constexpr = {p.name for p in _params(fn) if p.is_constexpr}
    names = fn.arg_names
    bound = {**dict(zip(names, args)), **kwargs}
    stand = {k: v if k not in names else _stand_in(v, k in constexpr) for k, v in bound.items()}
    if "INTERPRET" in stand:
        stand["INTERPRET"] = False
    out = []
    for config in configs:
        extra = {} if config is None else config.all_kwargs()
        out.append((fn.fn.__module__, fn.fn.__name__, (), {**stand, **extra}))
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

    triton.knobs.compilation.always_compile = True  # triton's own cache would skip ptxas and its log
    triton.knobs.nvidia.dump_ptxas_log = True  # printed: the -v log of the ptxas run that makes the cubin
    fn = _kernel(module, name)
    try:
        source, target, options = _specialize(fn, args, kwargs, capability)
        with contextlib.redirect_stdout(io.StringIO()) as log:
            compiled = triton.compile(source, target=target, options=options.__dict__)
        (stats,) = parse_ptxas(log.getvalue()).values()
        stats["smem"] = max(stats["smem"], compiled.metadata.shared)  # triton's is dynamic shared memory
        stats["global_loads"] = len(re.findall(r"\bld\.global\b", compiled.asm["ptx"]))
        return stats
    except Exception as error:  # reported in the table, and the script fails
        return {"error": f"{type(error).__name__}: {str(error)[:2000]}"}


def _kernel(module: str, name: str):
    """The compiled ``JITFunction`` of a kernel (an autotuned one's inner function)."""
    from triton.runtime.autotuner import Autotuner

    fn = getattr(importlib.import_module(module), name)
    return fn.fn if isinstance(fn, Autotuner) else fn


def _task_key(task: tuple) -> str:
    """The proof's key: triton's version, the kernel's source hash (its jit dependencies included), the
    specialization and the target."""
    import triton

    module, name, args, kwargs, capability = task
    fn = _kernel(module, name)
    spec = f"{triton.__version__}|{fn.cache_key}|{args!r}|{sorted(kwargs.items())!r}|{capability}"
    return hashlib.sha256(spec.encode()).hexdigest()


def _leaves(name: str, value: Any):
    """``(path, value)`` of an argument and, for a tuple, of its items (``z_strides.vector``)."""
    if isinstance(value, tuple):
        fields = getattr(value, "_fields", range(len(value)))
        for field, item in zip(fields, value):
            yield from _leaves(f"{name}.{field}", item)
    else:
        yield name, value


def _describe(args: tuple, kwargs: dict, fn) -> str:
    """The specialization in a few words: dtypes, the constexprs that select code, the arguments
    specialized to 1 (unit strides: the layout), the launch options, the absent (None) pointers."""
    import torch

    bound = {**dict(zip(fn.arg_names, args)), **kwargs}
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    leaves = [leaf for name in fn.arg_names if name not in constexpr for leaf in _leaves(name, bound.get(name))]
    dtypes = [str(v.dtype).replace("torch.", "").replace("float", "f") for _, v in leaves if isinstance(v, TensorArg)]
    shown = [f"{k}={v}" for k, v in bound.items() if k in constexpr and k != "INTERPRET" and not isinstance(v, torch.dtype)]
    shown += [f"{k}=1" for k, v in leaves if v == 1 and not isinstance(v, bool)]
    shown += [f"{k}={bound[k]}" for k in ("num_warps", "num_stages") if k in bound]
    nones = [k for k, v in leaves if v is None]
    return " ".join(["/".join(dict.fromkeys(dtypes))] + shown + ([f"None:{','.join(nones)}"] if nones else []))


def _known() -> dict[str, dict]:
    """Results by key: the committed table's rows, then build/'s cache (which keeps every key ever compiled)."""
    table = TABLE.with_suffix(".json")
    rows = json.loads(table.read_text())["triton_kernels"] if table.exists() else []
    known = {row["key"]: {k: v for k, v in row.items() if k not in ("kernel", "target", "specialization", "key")}
             for row in rows if "key" in row}  # fmt: skip
    if CACHE.exists():
        known.update(json.loads(CACHE.read_text()))
    return known


def triton_rows(launches: list[tuple], workers: int) -> tuple[list[dict], int]:
    """One row per (specialization, capability); the number compiled afresh."""
    known = _known()
    tasks = [(*launch, cc) for launch in launches for cc in TARGETS]
    keys = [_task_key(task) for task in tasks]
    todo = list({key: task for key, task in zip(keys, tasks) if key not in known}.items())
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    CACHE.parent.mkdir(exist_ok=True)
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(compile_triton, [t for _, t in todo], chunksize=4)
            for done, ((key, _), stats) in enumerate(zip(todo, results), 1):
                cache[key] = known[key] = stats
                if done % 50 == 0 or done == len(todo):  # an interrupted run keeps what it compiled
                    CACHE.write_text(json.dumps(cache))
    rows = []
    for key, (module, name, args, kwargs, cc) in zip(keys, tasks):
        fn = _kernel(module, name)
        rows.append({"kernel": f"{module.rsplit('.', 1)[-1]}.{name}", "target": f"sm_{cc}",
                     "specialization": _describe(args, kwargs, fn), "key": key, **known[key]})  # fmt: skip
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
    outside_table = f":!{TABLE.relative_to(ROOT)}.*"  # the table's own files do not make the tree dirty
    dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", outside_table], cwd=ROOT, capture_output=True,
                           text=True).stdout  # fmt: skip
    return {
        "targets": [f"sm_{cc}" for cc in TARGETS],
        "triton": triton.__version__,
        "triton_ptxas": get_ptxas(90).version,
        "nvcc": (re.findall(r"release ([\d.]+)", nvcc_version) or ["-"])[0],
        "torch": torch.__version__,
        "commit": commit.strip() + ("+dirty" if dirty.strip() else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _flagged(row: dict) -> bool:
    return bool(row.get("spill_stores")) or row.get("registers", 0) >= 254


def _markdown(meta: dict, triton_rows: list[dict], cuda_rows: list[dict]) -> str:
    """One line per kernel, target and description: the worst of the specializations it covers (they
    differ only in 16-byte alignment and divisibility by 16)."""
    lines = [
        "# Registers, spills, shared memory and global loads, compiled ahead of time (no GPU)",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "seconds") + f"; {meta['seconds']:.0f} s.",
        "",
        "Registers per thread (255 is the ceiling; **!** marks 254+ or spills), spill stores/loads and stack",
        "frame in bytes per thread, shared memory in bytes per block, `ld.global` instructions in the PTX; n",
        "specializations per line, the worst shown. `python -m benchmarks.resources` regenerates this file;",
        "the JSON has every specialization with its key.",
    ]
    fields = ("registers", "spill_stores", "spill_loads", "stack", "smem", "global_loads")
    for title, rows in (("Triton (every specialization the tests launch)", triton_rows), ("CUDA", cuda_rows)):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["kernel"], r["target"], r["specialization"]), []).append(r)
        lines += ["", f"## {title}", "",
                  "| kernel | target | specialization | n | regs | spill st/ld | stack | smem | ld.global |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for (kernel, target, spec), group in sorted(groups.items()):
            if any("error" in r for r in group):
                lines.append(f"| {kernel} | {target} | {spec} | {len(group)} | ERROR | | | | |")
                continue
            worst = {f: max(r.get(f, -1) for r in group) for f in fields}
            flag = " **!**" if _flagged(worst) else ""
            loads = worst["global_loads"] if worst["global_loads"] >= 0 else "-"
            lines.append(
                f"| {kernel} | {target} | {spec} | {len(group)} | {worst['registers']}{flag} | "
                f"{worst['spill_stores']}/{worst['spill_loads']} | {worst['stack']} | {worst['smem']} | {loads} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="compile processes")
    parser.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda")
    parser.add_argument("--check", action="store_true", help="compile what the table does not prove, write nothing")
    options = parser.parse_args()
    start = time.perf_counter()
    launches = record_launches()
    recorded = time.perf_counter() - start
    rows, compiled = triton_rows(launches, options.workers)
    cuda = [] if options.no_cuda or options.check else cuda_rows()
    meta = {**_versions(), "seconds": time.perf_counter() - start}
    if not options.check:
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        table = {**meta, "triton_kernels": rows, "cuda_kernels": cuda}
        TABLE.with_suffix(".json").write_text(json.dumps(table, indent=1))
        TABLE.with_suffix(".md").write_text(_markdown(meta, rows, cuda))
    errors = [r for r in rows + cuda if "error" in r]
    print(
        f"{len(launches)} Triton specializations x {len(TARGETS)} targets ({compiled} compiled, the rest known), "
        f"{len(cuda)} CUDA kernel builds; recorded in {recorded:.0f} s, total {meta['seconds']:.0f} s; "
        f"{sum(map(_flagged, rows + cuda))} spilling or at 254+ registers; {len(errors)} errors"
        + ("" if options.check else f" -> {TABLE}.md")
    )
    if options.check and compiled:
        print(f"{compiled} not in the committed table: `make resources` records them")
    for r in errors:
        print(f"ERROR {r['kernel']} {r['target']} {r['specialization']}\n{r['error']}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
