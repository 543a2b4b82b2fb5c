"""Native ``group_norm_act``: ``torch.ops.vqfast_C.group_norm_act[_backward]`` (csrc/cpu/group_norm_act.cpp)."""

import torch

from vqfast import _C  # noqa: F401  (registers torch.ops.vqfast_C)


def forward(x, num_groups, weight, bias, eps, activation):
    return torch.ops.vqfast_C.group_norm_act(x, num_groups, weight, bias, eps, activation == "silu")


def backward(grad, x, weight, bias, mean, rstd, activation):
    return torch.ops.vqfast_C.group_norm_act_backward(grad, x, weight, bias, mean, rstd, activation == "silu")
