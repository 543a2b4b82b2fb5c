"""The benchmark runner in its quickest mode writes well-formed results (no timing is asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the issue asks the runner to compare.
OPS = {"nearest_code", "group_norm_act", "spatial_norm_act", "vector_quantize", "vector_quantize+bwd"}
MODELS = ("ldm-celebahq-256", "kandinsky-2-2-decoder-movq", "amused-256")
TASKS = ("encode", "decode", "forward")
STAMP = ("device", "device_type", "torch", "triton", "commit", "date", "backends", "wall_s", "command")


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
    if importlib.util.find_spec("matplotlib"):
        assert json_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "median ms" in run.stdout and str(json_path) in run.stdout
