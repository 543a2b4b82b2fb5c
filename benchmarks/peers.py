"""The peers' BLAS: what torch and faiss loaded, recorded with the results, and faiss on its best kernels.

faiss-cpu's wheel bundles an OpenBLAS built for many cores that picks its kernels when it loads, from
the CPU's identity. On a CPU it cannot name (virtual machines often hide the model), and whenever
``OPENBLAS_CORETYPE`` is set but empty, it falls back to its slowest kernels, "Prescott" (SSE3): on a
virtualised Xeon a search took 2.8 s at 8192x16384x256 against 1.1 s with the core named. OpenBLAS
reads ``OPENBLAS_CORETYPE`` only as it loads, so :func:`import_faiss` first asks a child process which
core faiss's OpenBLAS picks. When that core uses a narrower instruction set than the CPU's flags offer,
it names the best core that the CPU runs and that OpenBLAS accepts (each tried in a child process),
for the import of faiss only: numpy's OpenBLAS, loaded with torch, and the processes torch.compile
starts never see the variable. A core named in the environment is left as it is.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

try:
    import threadpoolctl
except ImportError:  # the bench extra's; without it the BLAS goes unrecorded and faiss keeps its own pick
    threadpoolctl = None

ROOT = Path(__file__).resolve().parents[1]
CORETYPE = "OPENBLAS_CORETYPE"
ENVIRONMENT = ("OPENBLAS_", "MKL_", "OMP_", "GOTO_")  # variables that steer the peers' BLAS and threads
# OpenBLAS core names by the widest vector instructions their kernels use: 0 SSE, 1 AVX, 2 AVX2, 3 AVX-512.
CORE_LEVELS = {
    **dict.fromkeys(("Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Athlon", "Opteron"), 0),
    **dict.fromkeys(("Opteron_SSE3", "Barcelona", "Nano", "Katmai", "Coppermine", "Northwood", "Banias"), 0),
    **dict.fromkeys(("Sandybridge", "Bulldozer", "Piledriver", "Steamroller"), 1),
    **dict.fromkeys(("Haswell", "Zen", "Excavator"), 2),
    **dict.fromkeys(("SkylakeX", "Cooperlake", "SapphireRapids"), 3),
}
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels use


class Core(NamedTuple):
    """The core faiss's OpenBLAS runs on: what it picked by itself and what the runner named, if anything."""

    picked: str | None  # by OpenBLAS from the CPU's identity (None: unknown, e.g. without threadpoolctl)
    named: str | None  # OPENBLAS_CORETYPE at faiss's import: the environment's, or the runner's choice
    by: str  # "environment", "runner" or "" (nothing named)


def cpu_identity() -> tuple[str, set[str]]:
    """The CPU's vendor id and instruction-set flags, from /proc/cpuinfo (empty where there is none)."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def core_candidates(vendor: str, flags: set[str]) -> list[str]:
    """OpenBLAS core names whose kernels this CPU can run, best first (an old OpenBLAS may not know the first)."""
    names = []
    if AVX512 <= flags:
        names += ["Cooperlake"] * ("avx512_bf16" in flags) + ["SkylakeX"]
    if {"avx2", "fma"} <= flags:
        names += ["Zen"] * (vendor == "AuthenticAMD") + ["Haswell"]
    if "avx" in flags:
        names.append("Sandybridge")
    return names


def libraries(module: ModuleType) -> list[dict[str, Any]] | None:
    """The BLAS and OpenMP libraries ``module``'s package loaded (threadpoolctl: library, version, core,
    threads), found by path: inside the package or in its wheel's ``<name>*.libs`` folder. None without
    threadpoolctl."""
    if threadpoolctl is None:
        return None
    package = Path(module.__file__).resolve().parent
    roots = [package, *package.parent.glob(f"{package.name}*.libs")]
    keys = ("user_api", "internal_api", "version", "architecture", "threading_layer", "num_threads")
    return [
        {"library": Path(info["filepath"]).name, **{k: info[k] for k in keys if k in info}}
        for info in threadpoolctl.threadpool_info()
        if any(Path(info["filepath"]).resolve().is_relative_to(root) for root in roots)
    ]


def _openblas_core(found: list[dict[str, Any]] | None) -> str | None:
    return next((lib.get("architecture") for lib in found or () if lib["internal_api"] == "openblas"), None)


def _probe_faiss(core: str | None) -> str | None:
    """The core faiss's OpenBLAS runs on in a fresh process, with ``OPENBLAS_CORETYPE=core`` when given."""
    env = dict(os.environ, **({CORETYPE: core} if core else {}))
    code = "import json, faiss; from benchmarks.peers import libraries; print(json.dumps(libraries(faiss)))"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    return _openblas_core(json.loads(child.stdout)) if child.returncode == 0 else None


def choose_faiss_core() -> Core:
    """What faiss's OpenBLAS picks by itself here and, when that is narrower than the CPU allows, the
    best core name it accepts (see the module's docstring)."""
    if os.environ.get(CORETYPE):
        return Core(None, os.environ[CORETYPE], "environment")
    picked = _probe_faiss(None)
    level = CORE_LEVELS.get(picked or "")
    if level is None:  # unknown to this table, or not OpenBLAS: leave it be
        return Core(picked, None, "")
    for name in core_candidates(*cpu_identity()):
        if CORE_LEVELS[name] > level and (_probe_faiss(name) or "").lower() == name.lower():
            return Core(picked, name, "runner")
    return Core(picked, None, "")


@functools.cache
def import_faiss() -> tuple[ModuleType, Core]:
    """faiss, imported with its core named when its OpenBLAS would fall back; ImportError without faiss-cpu."""
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        raise ImportError("faiss-cpu is not installed (pip install -e '.[bench]')")
    core = choose_faiss_core() if "faiss" not in sys.modules else Core(None, None, "")
    previous = os.environ.get(CORETYPE)
    if core.by == "runner":
        os.environ[CORETYPE] = core.named
    try:
        import faiss
    finally:
        if core.by == "runner" and previous is None:
            del os.environ[CORETYPE]
        elif core.by == "runner":
            os.environ[CORETYPE] = previous  # set but empty, as found
    return faiss, core


def torch_blas() -> dict[str, Any]:
    """torch's BLAS as built (MKL is linked statically: threadpoolctl cannot see it), the instruction set
    ATen's kernels dispatch on, its threads, and the OpenMP library it loaded."""
    import torch

    config = torch.__config__.show()
    settings = config.replace(",", " ").split()
    blas = next((s.removeprefix("BLAS_INFO=") for s in settings if s.startswith("BLAS_INFO=")), None)
    mkl = next((line.split("Version", 1)[1].split()[0] for line in config.splitlines() if "Math Kernel" in line), "")
    return {
        "blas": blas,
        "blas_version": mkl.partition("-")[0] or None,  # MKL's; other BLAS do not say theirs
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,  # cuBLAS comes with it
        "num_threads": torch.get_num_threads(),
        "libraries": libraries(torch),
    }


def record() -> dict[str, Any]:
    """Each peer's BLAS as loaded in this process (faiss only where the run imported it), and the
    environment variables in force that steer them."""
    peers: dict[str, Any] = {"torch": torch_blas()}
    if import_faiss.cache_info().currsize:  # imported by this run (a failed import is not cached)
        faiss, core = import_faiss()
        found = libraries(faiss)
        peers["faiss"] = {"core": core._asdict(), "runs_on": _openblas_core(found), "libraries": found}
    if threadpoolctl is None:
        peers["note"] = "threadpoolctl is not installed (pip install -e '.[bench]'): libraries unrecorded"
    peers["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENVIRONMENT)}
    return peers

