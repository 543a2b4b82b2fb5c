"""``make gpu-check`` (benchmarks/gpu_check.py): its dry run on this CPU brings back what the device tool can
carry (at most 8 files, plain names, one folder) with every step run or skipped for a stated reason, and the
benchmark parts merge into one result with the ratios recomputed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _part(ops: list[tuple], models: list[tuple] = (), skipped: list[dict] = ()) -> dict:
    """A benchmarks.run result: ops rows (op, impl, median_ms), models rows (task, impl, median_ms)."""
    return {
        "meta": {"device_type": "cuda", "device": "X", "wall_s": 1.0, "command": "c", "commit": "abc"},
        "peak": {"copy_gbps": 1.0},
        "ops": [{"op": op, "shape": "1x2x3", "dtype": "float32", "layout": "nchw", "impl": impl, "median_ms": ms,
                 "vs_eager": None, "vs_compile": None} for op, impl, ms in ops],
        "models": [{"model": "m", "task": task, "input": "1x3x8x8", "dtype": "float16", "impl": impl,
                    "median_ms": ms, "vs_eager": None} for task, impl, ms in models],
        "skipped": list(skipped),
    }


def test_merge_recomputes_ratios_and_keeps_the_first_eager_row():
    skip = {"impl": "vqfast[triton]", "reason": "failed: x", "cases": ["a"]}
    first = _part([("a", "eager", 2.0), ("a", "vqfast[native]", 1.0)],
                  [("encode", "eager", 10.0), ("encode", "eager+channels_last", 8.0), ("encode", "vqfast[auto]", 4.0),
                   ("encode", "vqfast[auto] convs", 3.2)], [skip])
    second = _part([("a", "eager", 4.0), ("a", "compile", 0.5)],
                   [("encode", "eager", 20.0), ("encode", "compile", 5.0)], [skip])
    merged = gpu_check.merge_results([first, second])
    rows = {r["impl"]: r for r in merged["ops"]}
    assert set(rows) == {"eager", "vqfast[native]", "compile"}
    assert rows["eager"]["median_ms"] == 2.0  # the first part's
    assert rows["vqfast[native]"]["vs_eager"] == 2.0 and rows["vqfast[native]"]["vs_compile"] == 0.5
    assert rows["compile"]["vs_eager"] == 4.0
    models = {r["impl"]: r for r in merged["models"]}
    assert models["compile"]["vs_eager"] == 2.0 and models["compile"]["vs_compile"] == 1.0
    auto = models["vqfast[auto]"]  # the models' ratios as the runner gives them, across parts
    assert auto["vs_compile"] == 1.25 and auto["vs_best_diffusers"] == 2.0 and auto["limit_ratio"] == 1.25
    assert merged["skipped"] == [skip]
    assert merged["meta"]["wall_s"] == 2.0
    assert gpu_check.merge_results([]) is None


def test_clip_keeps_head_and_tail():
    text = "a" * 1000 + "z" * 1000
    clipped = gpu_check.clip(text, 400)
    assert clipped.startswith("a" * 100) and clipped.endswith("z" * 300) and "bytes cut" in clipped
    assert gpu_check.clip("short", 400) == "short"


def test_step_selection():
    assert gpu_check._matches("bench-compile-amused-256", "bench")
    assert gpu_check._matches("bench-compile-amused-256", "bench-compile*")
    assert not gpu_check._matches("bench-ops", "bench-compile*")
    assert gpu_check._matches("memcheck", "tests,memcheck") and not gpu_check._matches("tests", "memcheck")


def test_parts_cover_every_op_and_model():
    from benchmarks.cases import OPS
    from benchmarks.models import MODELS

    assert gpu_check.OPS == tuple(OPS) and gpu_check.MODELS == tuple(MODELS)


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    step = gpu_check.Step("slow", 1, ["bash", "-c", "sleep 60 & sleep 60; echo $((6 * 7))done"])
    gpu_check.run_command(step, tmp_path, 1.0, dict(os.environ))
    assert step.status == "timeout" and step.seconds < 15
    assert "42done" not in (tmp_path / "slow.log").read_text()


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The dry run (DRY_RUN=1) without its build step, which the other steps do not need here (the extension is
    built in place already) and which takes a minute from scratch on 2 cores: `make gpu-check DRY_RUN=1` runs it."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--skip", "build"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= gpu_check.MAX_FILES and all(p.parent == out for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < gpu_check.MAX_FILE_BYTES for p in files)
    names = {p.name for p in files}
    assert {"gpu-check.md", "gpu-check.log", "gpu-check.json", "gpu-check.tar.gz"} <= names

    steps = {s["name"]: s for s in json.loads((out / "gpu-check.json").read_text())["steps"]}
    assert [s for s in steps.values() if s["status"] not in ("ok", "skipped")] == []
    assert steps["build"]["status"] == "skipped"
    for name in ("env", "tests", "bench-ops", "bench-models", "bench-compile-codebook_gather"):
        assert steps[name]["status"] == "ok", steps[name]
    assert "no GPU" in steps["memcheck"]["summary"] and "no GPU" in steps["racecheck"]["summary"]
    assert " 0 failures, 0 errors" in steps["tests"]["summary"]

    (result,) = [p for p in files if p.name.startswith("cpu-") and p.suffix == ".json"]
    assert result.name.endswith("-quick.json")  # never mistaken by auto_order for a full run
    merged = json.loads(result.read_text())
    impls = {r["impl"] for r in merged["ops"]}
    assert {"eager", "compile", "vqfast[native]"} <= impls
    assert any(r["impl"] == "compile" and r["vs_eager"] for r in merged["ops"])
    assert {r["impl"] for r in merged["models"]} >= {"eager", "eager+channels_last", "vqfast[auto]",
                                                      "vqfast[auto] convs"}
    assert {r["dtype"] for r in merged["models"]} == {"float32", "autocast-bfloat16"}
    assert any(r["limit_ratio"] for r in merged["models"])
    assert any("CUDA graphs need a CUDA device" in s["reason"] for s in merged["skipped"])
