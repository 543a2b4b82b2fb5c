"""Reference ``act(group_norm(x) * weight + bias)``: float32 statistics, output in x's dtype and layout."""

import torch

from vqfast.reference._norm import (
    activate,
    activation_grad,
    affine,
    affine_grads,
    group_norm_input_grad,
    normalize,
    x_hat_from_stats,
)


def forward(x, num_groups, weight, bias, eps, activation):
    x_hat, mean, rstd = normalize(x, num_groups, eps)
    y = activate(affine(x_hat, weight, bias), activation)
    return torch.empty_like(x).copy_(y), mean, rstd


def backward(grad, x, weight, bias, mean, rstd, activation):
    x_hat = x_hat_from_stats(x, mean, rstd)
    g_pre = activation_grad(grad.float(), affine(x_hat, weight, bias), activation)
    g_hat, grad_weight, grad_bias = affine_grads(g_pre, x_hat, weight)
    grad_x = torch.empty_like(x).copy_(group_norm_input_grad(g_hat, x_hat, rstd))
    return grad_x, grad_weight, grad_bias
