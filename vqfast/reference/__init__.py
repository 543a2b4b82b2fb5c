"""The ``torch`` backend: plain PyTorch implementations that define each op's answer."""

import torch


def supports(op: str, device: torch.device) -> str:
    return ""
