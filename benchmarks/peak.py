"""The machine's peaks, measured in the same run as the cases they are compared with:
memory bandwidth as a large copy, compute as a large float32 matmul (every codebook op computes its
distances in float32, whatever its input dtype). Each is the fastest of several calls: other work on the
machine only ever slows a call down."""

from __future__ import annotations

import torch

from benchmarks.timing import measure

MIN_REPEATS = 5


def copy_gbps(device: torch.device, *, mebibytes: int, budget_s: float) -> float:
    """GB/s of ``dst.copy_(src)`` on buffers of ``mebibytes``: each byte read once and written once."""
    src = torch.ones(mebibytes << 18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget_s=budget_s, min_repeats=MIN_REPEATS)
    return 2 * src.nbytes / min(timing.times_s) / 1e9


def matmul_gflops(device: torch.device, *, n: int, budget_s: float) -> float:
    """GFLOP/s of an n x n by n x n float32 matmul (2 n^3 floating-point operations)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timing = measure(lambda: a @ b, device, budget_s=budget_s, min_repeats=MIN_REPEATS)
    return 2 * n**3 / min(timing.times_s) / 1e9


def measure_peaks(device: torch.device, *, quick: bool, budget_s: float = 0.5) -> dict:
    """Copy GB/s and float32 matmul GFLOP/s."""
    cuda = device.type == "cuda"
    mebibytes = 16 if quick else (1024 if cuda else 256)
    n = 256 if quick else (8192 if cuda else 2048)
    return {
        "copy_gbps": copy_gbps(device, mebibytes=mebibytes, budget_s=budget_s),
        "matmul_gflops": matmul_gflops(device, n=n, budget_s=budget_s),
    }
