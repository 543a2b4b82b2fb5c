"""Backend selection: VQFAST_BACKEND's syntax, set_backend/use_backend, availability and fallback."""

import os
import subprocess
import sys

import pytest
import torch

import vqfast
from vqfast import backend

CPU = torch.device("cpu")


def test_backends_reports_every_backend_with_reasons():
    status = vqfast.backends()
    assert set(status) == set(backend.BACKENDS)
    assert status["torch"].available
    for name, (available, reason) in status.items():
        assert available or reason, f"{name} is unavailable without a reason"


def test_per_op_spec_and_restore():
    with vqfast.use_backend("torch,nearest_code=auto"):
        assert backend.selected("nearest_code") == "auto"
        assert backend.selected("group_norm_act") == "torch"
        with vqfast.use_backend(group_norm_act="auto"):
            assert backend.selected("group_norm_act") == "auto"
            assert backend.selected("nearest_code") == "auto"
        assert backend.selected("group_norm_act") == "torch"


@pytest.mark.parametrize("spec,words", [("cuda", "unknown backend 'cuda'"), ("auto,argmin=torch", "unknown op 'argmin'")])
def test_unknown_names_raise(spec, words):
    with pytest.raises(ValueError, match=words):
        vqfast.set_backend(spec)


def test_auto_falls_back_to_torch_quietly():
    with vqfast.use_backend("auto"):
        for op in backend.OPS:
            assert backend.resolve(op, CPU) in backend.BACKENDS


@pytest.mark.parametrize("name", ["triton", "native"])
def test_unavailable_backend_named_explicitly_raises_with_reason(name):
    reason = backend._supports(name, "nearest_code", CPU)
    if not reason:
        pytest.skip(f"{name} runs nearest_code on the CPU here")
    with vqfast.use_backend(name), pytest.raises(RuntimeError, match=f"vqfast backend '{name}' cannot run nearest_code"):
        vqfast.ops.nearest_code(torch.randn(3, 2), torch.randn(4, 2), dim=-1)


def test_environment_variable_is_read_at_import():
    code = "from vqfast import backend; print(backend.selected('nearest_code'), backend.selected('vector_quantize'))"
    env = dict(os.environ, VQFAST_BACKEND="torch,nearest_code=auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["auto", "torch"]


def test_ops_import_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import vqfast.ops, torch; print(vqfast.ops.nearest_code(torch.ones(1, 2), torch.ones(3, 2), dim=-1).item())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "0"
