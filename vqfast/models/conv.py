"""Convolutions of the VQModel blocks with the passes around them folded in: the residual add of a
resnet block into its last convolution (a oneDNN post-op on the CPU), and nearest 2x upsampling into
the 3x3 convolution that follows it (four 2x2 phase kernels on the small input)."""

import torch
import torch.nn.functional as F

from vqfast.layout import memory_format


def _phase_taps(kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """The two phases' 2-tap kernels of a 3-tap ``kernel`` along ``dim``, stacked in a new leading dim.
    Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, that is input rows i - 1, i, i
    (a = 0) or i, i, i + 1 (a = 1): two input rows weighted (K0, K1 + K2) or (K0 + K1, K2)."""
    k0, k1, k2 = kernel.unbind(dim)
    return torch.stack([torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)])


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` without the
    upsampled tensor: one 2x2 convolution (padding 1) of x with the four phase kernels stacked as output
    channels, whose (H + 1, W + 1) output holds phase (a, b) at offset (a, b), interleaved into the
    (2H, 2W) result. 16 multiply-adds per output pixel and input channel instead of 36. The result is in
    x's memory format."""
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    # (2 row phases, 2 column phases, c_out, c_in, 2, 2), phase-major as the output channels; made on the
    # weight's device from its slices (no host tensor: CUDA graphs capture it).
    kernels = _phase_taps(_phase_taps(weight, 2), 4).transpose(0, 1).flatten(0, 2)
    stacked = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)
    out = torch.empty(n, c_out, 2 * h, 2 * w, dtype=stacked.dtype, device=x.device, memory_format=memory_format(x))
    grid = out.view(n, c_out, h, 2, w, 2)  # a view of out in either memory format
    for a in (0, 1):
        for b in (0, 1):
            phase = stacked[:, (2 * a + b) * c_out : (2 * a + b + 1) * c_out, a : a + h, b : b + w]
            grid[:, :, :, a, :, b] = phase
    return out


def conv2d_add(conv: torch.nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``conv(x) + residual``. On the CPU, for inference, oneDNN adds residual as the convolution writes
    its output (a post-op), saving a pass that reads two activations and writes one."""
    if not _fuses_add(conv, x, residual):
        return conv(x) + residual
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled("cpu"):  # the fused op is not on autocast's lists: cast as conv2d would
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add", None, None, [], None
    )


def _fuses_add(conv: torch.nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution + add can run: CPU inference (no autograd, not being traced by
    torch.compile, which fuses on its own) in float32, or bfloat16 where oneDNN supports it, with
    residual in x's dtype and memory format."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or conv.weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != x.dtype:
        return False
    if x.dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    elif x.dtype != torch.float32:
        return False
    fmt = memory_format(x)
    return (
        conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and residual.dtype == x.dtype
        and residual.dim() == 4
        and residual.is_contiguous(memory_format=fmt)
        and x.is_contiguous(memory_format=fmt)
        and residual.shape[1] == conv.out_channels
    )
