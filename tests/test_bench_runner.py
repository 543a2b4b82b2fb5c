"""The benchmark runner in its quickest mode writes well-formed results (no timing is asserted), its whole-model
plan, limit row (the convolution recorder) and precision check follow their rules, and auto's order
(vqfast/auto_order.json) is what the committed results give."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch
import torch.nn.functional as F

import vqfast
from benchmarks import models, peers, report, run
from benchmarks.auto_order import derive, load_results, render
from benchmarks.models import CONVS, GRAPH, ConvRecorder, TensorSpec, record_convolutions, replay_convolutions
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



# --- the whole model's plan --------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def test_model_plan_orders_the_peers_vqfast_and_the_limit_row() -> None:
    impls, skipped = models.model_plan(list(models.PEERS), ["auto"], False, CPU)
    assert impls == ["eager", "eager+channels_last", "compile", "vqfast[auto]", CONVS] and skipped == {}
    impls, _ = models.model_plan([], ["auto"], True, CPU, convs=False)
    assert impls == ["eager", "vqfast[auto]", "vqfast[auto]+compile"]
    impls, skipped = models.model_plan(["eager+channels_last"], ["auto"], False, CPU, cuda_graphs=True)
    assert GRAPH not in impls and "CUDA" in skipped[GRAPH]
    impls, skipped = models.model_plan([], ["auto"], False, torch.device("cuda"), cuda_graphs=True)
    assert impls[-1] == GRAPH and skipped == {}
    assert models.runs_task(GRAPH, "decode") and not models.runs_task(GRAPH, "encode")
    assert all(models.runs_task(impl, task) for impl in impls[:-1] for task in models.TASKS)


def test_default_cpu_plan() -> None:
    """float32 and autocast-bfloat16 at 256x256 with every peer (compile in float32 only), then 512x512 decodes in
    float32 on eager, eager+channels_last and vqfast[auto]."""
    args = run.parse_args(["--device", "cpu"])
    skipped = {}
    plans = run.model_plans(args, CPU, lambda case, impl, reason: skipped.setdefault(impl, []).append(case))
    full = ["eager", "eager+channels_last", "compile", "vqfast[auto]", CONVS]
    no_compile = [i for i in full if i != "compile"]
    expected = [(m, 256, d, models.TASKS, full if d == "float32" else no_compile)
                for m in models.MODELS for d in ("float32", "autocast-bfloat16")]
    expected += [(m, 512, "float32", ("decode",), ["eager", "eager+channels_last", "vqfast[auto]"]) for m in models.MODELS]
    assert [(c.model, c.resolution, c.dtype, c.tasks, impls) for c, impls in plans] == expected
    assert all(c.batch == 1 and not c.narrow for c, _ in plans)
    assert set(skipped) == {"compile", CONVS}
    assert run.parse_args(["--device", "cpu", "--decode-resolution", "0"]).decode_resolution == 0
    quick = run.parse_args(["--device", "cpu", "--quick"])
    assert quick.model_peers == ["eager+channels_last"] and quick.decode_resolution == 64 and quick.resolution == 32


def test_model_ratios() -> None:
    rows = [
        {"impl": impl, "median_ms": ms}
        for impl, ms in (("eager", 10.0), ("eager+channels_last", 8.0), ("compile", 5.0), ("vqfast[auto]", 4.0),
                         (CONVS, 3.2))
    ]
    report.model_ratios(rows)
    auto = rows[3]
    assert auto["vs_eager"] == 2.5 and auto["vs_channels_last"] == 2.0 and auto["vs_compile"] == 1.25
    assert auto["vs_best_diffusers"] == 2.0 and auto["best_diffusers"] == "eager+channels_last"
    assert auto["limit_ratio"] == 1.25 and all(r["limit_ratio"] is None for r in rows if r is not auto)
    alone = [{"impl": "vqfast[auto]", "median_ms": 4.0}]
    report.model_ratios(alone)
    assert alone[0]["vs_eager"] is None and alone[0]["best_diffusers"] is None and alone[0]["limit_ratio"] is None


# --- the check: relative L2 to diffusers' float32 output ----------------------------------------------------------


def test_precisions() -> None:
    assert models.autocast_dtype("autocast-bfloat16") == torch.bfloat16 and models.autocast_dtype("float16") is None
    assert models.weight_dtype("autocast-float16") == torch.float32 and models.weight_dtype("bfloat16") == torch.bfloat16
    with models.precision_context("autocast-bfloat16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with models.precision_context("float32", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_reduced_precision_passes_within_a_quarter_more_than_diffusers_own_error() -> None:
    reference = torch.ones(4, 25, dtype=torch.float64)  # ||reference|| = 10
    off_by = lambda norm: reference + norm / 10  # noqa: E731  relative L2 error of norm / 10 * 10 / 10 = norm / 10
    bench = SimpleNamespace(case=SimpleNamespace(dtype="autocast-bfloat16"), float32_output=lambda task: reference)
    outputs = {"eager": off_by(0.2), "eager+channels_last": off_by(0.26), "vqfast[auto]": off_by(0.24),
               CONVS: torch.zeros(3)}
    errors = run.model_errors(bench, "decode", outputs)
    assert CONVS not in errors  # the limit row's output means nothing
    assert errors["eager"] == pytest.approx((0.02, 0.025))
    assert errors["vqfast[auto]"][0] == pytest.approx(0.024) and errors["vqfast[auto]"][0] <= errors["vqfast[auto]"][1]
    assert errors["eager+channels_last"][0] > errors["eager+channels_last"][1]


def test_float32_passes_within_5e_5_of_eager() -> None:
    reference = torch.ones(100, dtype=torch.float64)
    bench = SimpleNamespace(case=SimpleNamespace(dtype="float32"), float32_output=None)  # eager is the reference
    errors = run.model_errors(bench, "encode", {"eager": reference, "vqfast[auto]": reference * (1 + 4e-5),
                                                "compile": reference * (1 + 6e-5)})
    assert "eager" not in errors
    assert errors["vqfast[auto]"] == pytest.approx((4e-5, 5e-5)) and errors["compile"][0] > errors["compile"][1]
    assert models.error_bound("float32", None) == 5e-5 and models.error_bound("float16", None) is None


# --- the limit row: vqfast's convolutions alone --------------------------------------------------------------------


class Convs(torch.nn.Module):
    """Three convolutions among other ops: NCHW, channels_last and transposed, plus oneDNN's fused conv + add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.a(x))
        h = self.b(h.contiguous(memory_format=torch.channels_last)) + h
        if torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu"):
            h = torch.ops.mkldnn._convolution_pointwise.binary(
                h, h, self.b.weight, self.b.bias, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None
            )
        return self.up(h)


def test_conv_recorder_records_every_convolution_and_holds_no_tensor() -> None:
    module, x = Convs().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        convs = record_convolutions(lambda: module(x))
        fused = torch.backends.mkldnn.is_available()
        assert [str(c.op) for c in convs] == ["aten.convolution.default"] * 2 + [
            "mkldnn._convolution_pointwise.binary"
        ] * fused + ["aten.convolution.default"]
        first, second = convs[0].args, convs[1].args
        assert first[0] == TensorSpec((1, 3, 16, 16), (768, 256, 16, 1), torch.float32, CPU)
        assert first[1].shape == (8, 3, 3, 3) and list(first[3:]) == [[1, 1], [1, 1], [1, 1], False, [0, 0], 1]
        assert second[0].stride == (2048, 1, 128, 8)  # channels_last, as the op saw it
        assert convs[-1].args[6] is True  # transposed
        flat = [leaf for c in convs for leaf in torch.utils._pytree.tree_leaves((c.args, c.kwargs))]
        assert not any(isinstance(leaf, torch.Tensor) for leaf in flat)

        out = replay_convolutions(convs)()
        assert out.shape == (1, 4, 32, 32) and out.dtype == torch.float32

        with torch.autocast("cpu", dtype=torch.bfloat16):  # dtypes as autocast casts them
            convs = record_convolutions(lambda: module(x))
            assert len(convs) == 3 and all(c.args[0].dtype == torch.bfloat16 for c in convs)
            assert replay_convolutions(convs)().dtype == torch.bfloat16


def test_recorder_sees_vqfast_models_convolutions() -> None:
    """On a tiny model vqfast runs as many convolutions as diffusers' decoder has Conv2d layers (its folds, the
    residual add into oneDNN's fused convolution and nearest upsampling into a phase convolution, keep one
    convolution per layer), and the recording replays."""
    torch.manual_seed(0)
    config = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
              "latent_channels": 4, "num_vq_embeddings": 64}
    reference = diffusers.VQModel(**config).eval()
    model = vqfast.VQModel.from_diffusers(reference).eval()
    latents = torch.randn(1, 4, 8, 8)
    layers = 1 + sum(isinstance(m, torch.nn.Conv2d) for m in reference.decoder.modules())  # + post_quant_conv
    with torch.no_grad():
        assert len(record_convolutions(lambda: reference.decode(latents))) == layers
        convs = record_convolutions(lambda: model.decode(latents))
        assert len(convs) == layers
        assert replay_convolutions(convs)().shape[-2:] == (16, 16)
    assert isinstance(ConvRecorder(), torch.utils._python_dispatch.TorchDispatchMode)


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

    models_ = results["models"]
    expected = {(f"{m} (narrow)", t, "1x3x32x32", d) for m in MODELS for t in TASKS
                for d in ("float32", "autocast-bfloat16")}  # --quick narrows the models
    expected |= {(f"{m} (narrow)", "decode", "1x3x64x64", "float32") for m in MODELS}  # the large decodes
    assert {(r["model"], r["task"], r["input"], r["dtype"]) for r in models_ if r["impl"] == "eager"} == expected
    for case_rows in report.model_cases(models_):
        impls = {r["impl"]: r for r in case_rows}
        large = case_rows[0]["input"] == "1x3x64x64"
        assert set(impls) == ({"eager", "eager+channels_last", "vqfast[auto]"} | ({CONVS} if not large else set()))
        assert impls["vqfast[auto]"]["vs_best_diffusers"] > 0 and impls["vqfast[auto]"]["best_diffusers"]
        assert (impls["vqfast[auto]"]["limit_ratio"] is None) == large
    for row in models_:
        assert row["images_per_s"] > 0 and row["vs_eager"] > 0, row
        if row["impl"] == CONVS or (row["impl"] == "eager" and row["dtype"] == "float32"):
            assert row["match"] is None and row["error"] is None, row  # the reference itself; the limit row
        else:
            assert isinstance(row["match"], bool) and row["error"] >= 0 and row["bound"] > 0, row
    for skipped in results["skipped"]:
        assert skipped["impl"] and skipped["reason"] and skipped["cases"], skipped

    markdown = json_path.with_suffix(".md").read_text()
    assert meta["commit"] in markdown and "| op | shape |" in markdown and "| model | task |" in markdown
    assert "vqfast[auto] against diffusers" in markdown and "| limit (<= 1.15) |" in markdown
    assert "peers' BLAS: torch: " in markdown and meta["peers"]["torch"]["num_threads"] >= 1
    if importlib.util.find_spec("matplotlib"):
        assert json_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "median ms" in run.stdout and str(json_path) in run.stdout
