"""The registry and backend selection: VQFAST_BACKEND's syntax, set_backend/use_backend in threads and
tasks, availability with reasons, auto's order and fallback, and the backward following the forward."""

import asyncio
import os
import subprocess
import sys
import threading

import pytest
import torch

import vqfast
from vqfast import backend
from vqfast.ops.nearest_code import Inputs as NearestCodeInputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def process_default_restored():
    yield
    vqfast.set_backend("auto")


def test_backends_reports_every_backend_with_reasons():
    status = vqfast.backends()
    assert set(status) == set(backend.BACKENDS)
    assert status["torch"].available
    for name, (available, reason) in status.items():
        assert available or reason, f"{name} is unavailable without a reason"


def test_registry_lists_every_op_on_torch():
    table = backend.registry()
    assert set(table) == set(backend.OPS)
    for op, implementations in table.items():
        assert implementations["torch"].forward.__module__ == f"vqfast.reference.{op}"
        assert (implementations["torch"].backward is None) == (op == "nearest_code")


def test_triton_is_unavailable_on_a_cpu_machine_without_the_interpreter():
    code = "import vqfast; print(vqfast.backends()['triton'].reason); import sys; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    reason, imported = out.strip().splitlines()
    assert "TRITON_INTERPRET=1" in reason
    assert imported == "False", "backends() imported triton where it cannot run"


def test_nested_blocks_compose_op_by_op_and_restore():
    before = backend.current()
    with vqfast.use_backend("torch,nearest_code=auto"):
        assert backend.selected("nearest_code") == "auto"
        assert backend.selected("group_norm_act") == "torch"
        with vqfast.use_backend(nearest_code="native"):
            assert backend.selected("nearest_code") == "native"
            assert backend.selected("group_norm_act") == "torch", "the inner block dropped the outer default"
        with vqfast.use_backend(group_norm_act="auto"):
            assert backend.selected("nearest_code") == "auto", "the inner block dropped the outer per-op choice"
        with vqfast.use_backend("native"):
            assert backend.selected("nearest_code") == "native"
        assert backend.selected("group_norm_act") == "torch"
    assert backend.current() == before


def test_a_block_holds_for_its_own_thread_only():
    barrier = threading.Barrier(2)
    seen: dict[str, list[str]] = {"torch": [], "native": []}

    def worker(name: str) -> None:
        with vqfast.use_backend(name):
            barrier.wait()  # both blocks are open at once
            for _ in range(100):
                seen[name].append(backend.selected("nearest_code"))
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(name,)) for name in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"torch": ["torch"] * 100, "native": ["native"] * 100}
    assert backend.selected("nearest_code") == "auto", "the blocks left the process on another backend"


def test_a_block_holds_for_its_own_asyncio_task_only():
    async def task(name: str, started: asyncio.Event, other: asyncio.Event) -> str:
        with vqfast.use_backend(name):
            started.set()
            await other.wait()  # the other task's block is open now
            return backend.selected("vector_quantize")

    async def main() -> list[str]:
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task("torch", a, b), task("native", b, a))

    assert asyncio.run(main()) == ["torch", "native"]
    assert backend.selected("vector_quantize") == "auto"


def test_set_backend_sets_the_process_default_seen_by_new_threads():
    vqfast.set_backend("torch", nearest_code="native")
    seen = []
    t = threading.Thread(target=lambda: seen.append((backend.selected("nearest_code"), backend.selected("codebook_gather"))))
    t.start()
    t.join()
    assert seen == [("native", "torch")]


@pytest.mark.parametrize(
    "spec,error,words",
    [
        ("cuda", ValueError, "unknown backend 'cuda'"),
        ("auto,argmin=torch", ValueError, "unknown op 'argmin'"),
        ("torch,native", ValueError, "names two defaults"),
        (3, TypeError, "spec must be a str"),
    ],
)
def test_bad_selections_raise(spec, error, words):
    with pytest.raises(error, match=words):
        vqfast.set_backend(spec)
    with pytest.raises(error, match=words), vqfast.use_backend(spec):
        pass
    assert backend.current() == backend.Selection("auto", {})


def test_per_op_keyword_must_name_a_backend():
    with pytest.raises(TypeError, match="backend for nearest_code must be a str"):
        vqfast.set_backend(nearest_code=3)


def test_environment_variable_is_read_at_import():
    code = "from vqfast import backend; print(backend.selected('nearest_code'), backend.selected('vector_quantize'))"
    env = dict(os.environ, VQFAST_BACKEND="torch,nearest_code=auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["auto", "torch"]


def test_environment_variable_with_two_defaults_is_an_error():
    env = dict(os.environ, VQFAST_BACKEND="torch,native")
    run = subprocess.run([sys.executable, "-c", "import vqfast"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "names two defaults" in run.stderr


def _inputs(dtype=torch.float32) -> NearestCodeInputs:
    return NearestCodeInputs(torch.randn(3, 2, dtype=dtype), torch.randn(4, 2, dtype=dtype), 1)


def test_auto_follows_the_measured_order_then_torch():
    order = backend.auto_order()["cpu"]["nearest_code"]
    expected = next((b for b in order if not backend._reason(b, "nearest_code", _inputs())), "torch")
    with vqfast.use_backend("auto"):
        assert backend.choose("nearest_code", _inputs(), CPU) == expected
        assert backend.choose("nearest_code", _inputs(), torch.device("meta")) == "torch"


def test_auto_skips_an_implementation_that_declares_the_inputs_unsupported(monkeypatch):
    declined = backend.Implementation(lambda *a: None, None, lambda inputs: "declined for the test")
    monkeypatch.setitem(backend._LOADERS, "native", lambda: {"nearest_code": declined})
    backend._load.cache_clear()
    monkeypatch.setattr(backend, "auto_order", lambda: {"cpu": {"nearest_code": ("native",)}})
    try:
        with vqfast.use_backend("auto"):
            assert backend.choose("nearest_code", _inputs(), CPU) == "torch"
        with vqfast.use_backend("native"), pytest.raises(RuntimeError, match="declined for the test"):
            backend.choose("nearest_code", _inputs(), CPU)
    finally:
        backend._load.cache_clear()


def test_float64_runs_every_op_through_auto():
    z, cb = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with vqfast.use_backend("auto"):
        assert vqfast.ops.nearest_code(z, cb).dtype == torch.long
        assert vqfast.ops.vector_quantize(z, cb)[0].dtype == torch.float64
        assert vqfast.ops.group_norm_act(z, 3).dtype == torch.float64
        assert vqfast.ops.codebook_gather(torch.tensor([1, 4]), cb).dtype == torch.float64


@pytest.mark.parametrize("name", ["triton", "native"])
def test_backend_named_explicitly_raises_with_the_reason(name):
    z, cb = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    reason = backend._reason(name, "nearest_code", NearestCodeInputs(z, cb, 1))
    if not reason:
        pytest.skip(f"{name} runs float64 nearest_code on the CPU here")
    with vqfast.use_backend(name), pytest.raises(RuntimeError, match=f"vqfast backend '{name}' cannot run nearest_code"):
        vqfast.ops.nearest_code(z, cb, dim=-1)


def test_backward_runs_on_the_backend_the_forward_chose(monkeypatch):
    calls = []
    reference = backend._load("torch")[0]["vector_quantize"]
    spy = reference._replace(backward=lambda *a: calls.append(a) or reference.backward(*a))
    monkeypatch.setitem(backend._load("torch")[0], "vector_quantize", spy)
    z = torch.randn(2, 3, requires_grad=True)
    with vqfast.use_backend("torch"):
        z_q, loss, _ = vqfast.ops.vector_quantize(z, torch.randn(4, 3), dim=1)
    with vqfast.use_backend("native" if vqfast.backends()["native"].available else "auto"):
        (z_q.sum() + loss).backward()  # outside the block: the forward's choice still holds
    assert len(calls) == 1 and z.grad is not None


def test_ops_import_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None; import vqfast.ops, torch;"
        " print(vqfast.ops.nearest_code(torch.ones(1, 2), torch.ones(3, 2), dim=-1).item())"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "0"
