"""Timing: the median and spread of repeated calls after a warmup, and the peak extra memory of a call.

On CUDA each call is timed with CUDA events; on the CPU with ``time.perf_counter``. Calls repeat
until a time budget is spent, with a floor and a ceiling on the count, so slow cases cost few calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    times_s: list[float]
    output: Any  # what the last call returned, for checks
    peak_extra_bytes: int | None = None  # when asked for: memory above what was in use before the call

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        """Interquartile range: the spread of the middle half of the samples (0 for one sample)."""
        if len(self.times_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q3 - q1


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes on ``device``, and what it returned."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    start_s = time.perf_counter()
    out = fn()
    return time.perf_counter() - start_s, out


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    """Hand the C heap's free memory back to the system (glibc), so that reusing it shows in the RSS."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, Any]:
    """Peak memory one call of ``fn`` adds to what was in use before it (its output included), and
    the output. CUDA: the caching allocator's high-water mark. CPU: the process's resident-set
    high-water mark (Linux), reset through /proc/self/clear_refs after the C heap's free memory has
    been handed back (glibc's malloc_trim), so that memory the call reuses counts too. None where it
    cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    _malloc_trim()
    try:
        before = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None, fn()
    out = fn()
    return max(0, _rss_bytes("VmHWM") - before), out


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    budget_s: float,
    min_repeats: int,
    max_repeats: int = 200,
    slow_s: float = 1.0,
    warmup: bool = True,
    track_memory: bool = False,
) -> Timing:
    """Time ``fn``: at least ``min_repeats`` calls (2 are enough when they take ``slow_s`` or more
    each), more while the timed total is under ``budget_s``; after one untimed warmup call when
    ``warmup`` (which measures the peak extra memory when ``track_memory``), as a first call can be
    several times slower than the next ones."""
    times: list[float] = []
    out, peak = None, None
    if warmup:
        peak, _ = peak_extra_memory(fn, device) if track_memory else (None, fn())
    while len(times) < min_repeats or (sum(times) < budget_s and len(times) < max_repeats):
        if len(times) >= 2 and min(times) >= slow_s:
            break
        seconds, out = timed_call(fn, device)
        times.append(seconds)
    return Timing(times, out, peak)
