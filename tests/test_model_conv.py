"""The folded convolutions of vqfast/models/conv.py against the passes they replace."""

import pytest
import torch
import torch.nn.functional as F

from vqfast.models import conv as conv_module
from vqfast.models.conv import conv2d_add, upsample2x_conv3x3

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (0, 4, 3, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_conv_matches_upsampling_then_conv(fmt, shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(shape).to(memory_format=fmt)
    weight = torch.randn(6, shape[1], 3, 3)
    bias = torch.randn(6) if with_bias else None
    out = upsample2x_conv3x3(x, weight, bias)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    assert out.shape == ref.shape
    if x.is_contiguous() != x.is_contiguous(memory_format=torch.channels_last):  # x's format is unambiguous
        assert out.is_contiguous(memory_format=fmt)
    if ref.numel():
        assert relative_error(out, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsample_conv_low_precision(dtype):
    """Within the dtype's rounding of the float32 result (the phase kernels sum taps before rounding)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 16, 6, 6), torch.randn(16, 16, 3, 3) / 12, torch.randn(16)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = upsample2x_conv3x3(x.to(dtype), weight.to(dtype), bias.to(dtype))
    assert out.dtype == dtype and relative_error(out, ref) < 2e-2


def test_upsample_conv_gradients():
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample2x_conv3x3, (x, weight, bias))


def _conv_and_inputs(fmt: torch.memory_format, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(dtype)
    x = torch.randn(2, 8, 5, 7, dtype=dtype).to(memory_format=fmt)
    residual = torch.randn(2, 8, 5, 7, dtype=dtype).to(memory_format=fmt)
    return conv, x, residual


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@torch.no_grad()
def test_conv_add_fuses_for_cpu_inference(fmt):
    conv, x, residual = _conv_and_inputs(fmt)
    assert conv_module._fuses_add(conv, x, residual)
    out = conv2d_add(conv, x, residual)
    assert out.is_contiguous(memory_format=fmt)
    assert relative_error(out, conv(x) + residual) < 1e-6


@torch.no_grad()
def test_conv_add_under_bfloat16_autocast():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    conv, x, residual = _conv_and_inputs(torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, residual = conv(x), residual.bfloat16()  # activations as autocast leaves them
        assert conv_module._fuses_add(conv, x, residual)
        out, ref = conv2d_add(conv, x, residual), conv(x).float() + residual.float()
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 1e-2


def test_conv_add_falls_back_where_it_cannot_fuse():
    """Autograd, mismatched dtypes or layouts take conv + add, with the same result and gradients."""
    conv, x, residual = _conv_and_inputs(torch.channels_last)
    assert not conv_module._fuses_add(conv, x, residual)  # the weight requires grad
    out = conv2d_add(conv, x, residual)
    out.sum().backward()
    assert conv.weight.grad is not None
    with torch.no_grad():
        assert not conv_module._fuses_add(conv, x, residual.double())
        assert not conv_module._fuses_add(conv, x, residual.contiguous())
        assert not conv_module._fuses_add(conv, x.double(), residual.double())
        torch.testing.assert_close(conv2d_add(conv, x, residual.contiguous()), conv(x) + residual)
