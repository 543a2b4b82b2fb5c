"""The vqfast operator library: schemas, fakes and autograd registrations pass torch's own op checks,
and a process's first op call does not import torch._dynamo (custom_op's kernel wrapper did: ~1.4 s)."""

import subprocess
import sys

import pytest
import torch

import vqfast
from vqfast.layout import nearest_source


def _cases():
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale, shift = (torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    source = nearest_source((6, 5), (3, 3), x.device)
    return {
        "nearest_code": (torch.ops.vqfast.nearest_code.default, (z.detach(), cb.detach(), 1)),
        "vector_quantize": (torch.ops.vqfast.vector_quantize.default, (z, cb, 1.0, 0.25, 1)),
        "vector_quantize_stats": (torch.ops.vqfast.vector_quantize_stats.default, (z, cb, 1.0, 0.25, 1)),
        "codebook_gather": (torch.ops.vqfast.codebook_gather.default, (torch.tensor([[1, 6], [0, 3]]), cb, 1)),
        "codebook_gather 0-d": (torch.ops.vqfast.codebook_gather.default, (torch.tensor(3), cb, 0)),
        "group_norm_act": (torch.ops.vqfast.group_norm_act.default, (x, 2, w, b, None, None, None, 1e-6, True)),
        "spatial_norm_act": (torch.ops.vqfast.group_norm_act.default, (x, 2, w, b, scale, shift, source, 1e-6, True)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_opcheck(name):
    op, args = _cases()[name]
    with vqfast.use_backend("torch"):
        torch.library.opcheck(op, args)


def test_first_op_call_does_not_import_dynamo():
    code = (
        "import sys, torch, vqfast.ops as ops\n"
        "z = torch.randn(2, 3, requires_grad=True)\n"
        "z_q, loss, _ = ops.vector_quantize(z, torch.randn(4, 3), dim=1)\n"
        "(z_q.sum() + loss).backward()\n"
        "ops.group_norm_act(torch.randn(1, 4, 3, 3), 2)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
