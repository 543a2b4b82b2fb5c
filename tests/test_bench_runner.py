"""The benchmark runner in its quickest mode writes well-formed results (no timing is asserted), and
auto's order (vqfast/auto_order.json) is what the committed results give."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peers
from benchmarks.auto_order import derive, load_results, render
from vqfast.backend import AUTO_ORDER_FILE

ROOT = Path(__file__).resolve().parents[1]
# What the issue asks the runner to compare.
OPS = {
    "nearest_code",
    "group_norm_act",
    "spatial_norm_act",
    "vector_quantize",
    "vector_quantize+bwd",
    "codebook_gather",
}
MODELS = ("ldm-celebahq-256", "kandinsky-2-2-decoder-movq", "amused-256")
TASKS = ("encode", "decode", "forward")
STAMP = ("device", "device_type", "torch", "triton", "commit", "date", "backends", "auto", "peers", "wall_s", "command")


def test_auto_order_is_what_the_committed_results_give() -> None:
    assert AUTO_ORDER_FILE.read_text() == render(derive(load_results())), (
        "vqfast/auto_order.json is out of date: run `python -m benchmarks.auto_order` after committing results"
    )


def _result(device: str, rows: list[tuple[str, str, str, float]], failed: tuple[str, str] | None = None) -> dict:
    """A results file's shape: (op, shape, impl, median_ms) rows; ``failed``: (impl, case label)."""
    ops = [
        {"op": op, "shape": shape, "dtype": "float32", "layout": "nchw", "impl": impl, "median_ms": ms}
        for op, shape, impl, ms in rows
    ]
    skipped = [{"impl": failed[0], "reason": "failed: RuntimeError: boom", "cases": [failed[1]]}] if failed else []
    return {"meta": {"device_type": device}, "ops": ops, "skipped": skipped}


def test_auto_order_rule() -> None:
    cpu = _result(
        "cpu",
        [
            # native beats eager on both group-norm cases (the spatial one counts for group_norm_act); torch is
            # never listed: auto ends at it
            ("group_norm_act", "a", "eager", 2.0), ("group_norm_act", "a", "vqfast[native]", 1.0),
            ("group_norm_act", "a", "vqfast[torch]", 1.5),
            ("spatial_norm_act", "b", "eager", 2.0), ("spatial_norm_act", "b", "vqfast[native]", 1.9),
            ("spatial_norm_act", "b", "vqfast[torch]", 3.0),
            # nearest_code: nothing beats eager everywhere; faiss and compile are not backends
            ("nearest_code", "c", "eager", 1.0), ("nearest_code", "c", "vqfast[native]", 0.5),
            ("nearest_code", "c", "faiss", 0.1), ("nearest_code", "d", "eager", 1.0),
            ("nearest_code", "d", "vqfast[native]", 1.1),
        ],
    )
    cuda = _result(
        "cuda",
        [
            # both faster; triton faster still, but it failed on the +bwd case, which counts for vector_quantize
            ("vector_quantize", "e", "eager", 4.0), ("vector_quantize", "e", "vqfast[triton]", 1.0),
            ("vector_quantize", "e", "vqfast[native]", 2.0), ("vector_quantize+bwd", "f", "eager", 4.0),
            ("vector_quantize+bwd", "f", "vqfast[native]", 3.0),
        ],
        failed=("vqfast[triton]", "vector_quantize+bwd f float32"),
    )
    faster_triton = _result(
        "cuda",
        [
            ("codebook_gather", "g", "eager", 3.0),
            ("codebook_gather", "g", "vqfast[native]", 2.0),
            ("codebook_gather", "g", "vqfast[triton]", 1.0),
        ],
    )
    assert derive([cpu, cuda, faster_triton]) == {
        "cpu": {"nearest_code": [], "group_norm_act": ["native"]},
        "cuda": {"vector_quantize": ["native"], "codebook_gather": ["triton", "native"]},
    }



# An OpenBLAS like faiss-cpu 1.15's (0.3.15): it accepts these core names and falls back to Prescott on others.
KNOWN_CORES = {"Prescott", "Sandybridge", "Haswell", "Zen", "SkylakeX"}
XEON = ("GenuineIntel", {"avx", "avx2", "fma", *peers.AVX512, "avx512_bf16"})


@pytest.mark.parametrize(
    ("cpu", "picked", "environment", "expected"),
    [
        (XEON, "Prescott", None, peers.Core("Prescott", "SkylakeX", "runner")),  # Cooperlake unknown: next best
        (("AuthenticAMD", {"avx", "avx2", "fma"}), "Prescott", "", peers.Core("Prescott", "Zen", "runner")),
        (("AuthenticAMD", {"avx", "avx2", "fma"}), "Zen", None, peers.Core("Zen", None, "")),
        (("GenuineIntel", {"sse3"}), "Prescott", None, peers.Core("Prescott", None, "")),  # nothing wider to name
        (XEON, "Prescott", "Haswell", peers.Core(None, "Haswell", "environment")),
    ],
)
def test_faiss_core_is_named_only_when_openblas_fell_back(monkeypatch, cpu, picked, environment, expected) -> None:
    monkeypatch.setattr(peers, "cpu_identity", lambda: cpu)

    def probe(core: str | None) -> str:  # what the OpenBLAS reports after loading with OPENBLAS_CORETYPE=core
        return picked if core is None else core if core in KNOWN_CORES else "Prescott"

    monkeypatch.setattr(peers, "_probe_faiss", probe)
    if environment is None:
        monkeypatch.delenv(peers.CORETYPE, raising=False)
    else:
        monkeypatch.setenv(peers.CORETYPE, environment)
    assert peers.choose_faiss_core() == expected


@pytest.mark.slow  # about a minute: the runner's own start, a first torch.compile, three narrowed models
def test_quick_run_writes_well_formed_results(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    (json_path,) = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    meta = results["meta"]
    assert all(meta[key] is not None or key == "triton" for key in STAMP), meta
    assert json_path.name.startswith(meta["device_type"]) and meta["date"][:10] in json_path.name
    assert results["peak"]["copy_gbps"] > 0 and results["peak"]["matmul_gflops"] > 0

    ops = results["ops"]
    assert {row["op"] for row in ops} == OPS
    for row in ops:
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["repeats"] >= 1, row
        assert row["metric"] in ("GB/s", "GFLOP/s") and row["rate"] > 0 and row["peak_share"] > 0, row
        assert row["compile_s"] is None or row["compile_s"] > 0, row
    for case in {(r["op"], r["shape"], r["dtype"], r["layout"]) for r in ops}:
        impls = {r["impl"]: r for r in ops if (r["op"], r["shape"], r["dtype"], r["layout"]) == case}
        assert "eager" in impls and "vqfast[torch]" in impls, case
        assert impls["eager"]["vs_eager"] == 1.0
        assert all(r["vs_eager"] > 0 for r in impls.values())
    assert all("peak_extra_mib" in r for r in ops if r["op"] == "nearest_code")

    models = results["models"]
    expected = {(f"{m} (narrow)", t) for m in MODELS for t in TASKS}  # --quick narrows the models
    assert {(r["model"], r["task"]) for r in models if r["impl"] == "eager"} == expected
    for row in models:
        assert row["images_per_s"] > 0 and row["vs_eager"] > 0, row
        if row["impl"] == "eager":
            assert row["match"] is None and row["max_rel_err"] is None, row
        else:
            assert isinstance(row["match"], bool) and row["max_rel_err"] >= 0, row
    for skipped in results["skipped"]:
        assert skipped["impl"] and skipped["reason"] and skipped["cases"], skipped

    markdown = json_path.with_suffix(".md").read_text()
    assert meta["commit"] in markdown and "| op | shape |" in markdown and "| model | task |" in markdown
    assert "peers' BLAS: torch: " in markdown and meta["peers"]["torch"]["num_threads"] >= 1
    if importlib.util.find_spec("matplotlib"):
        assert json_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "median ms" in run.stdout and str(json_path) in run.stdout
