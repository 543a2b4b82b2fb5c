"""Progress on stderr: tqdm's bar on a terminal; elsewhere (CI logs, pipes, files) one line per finished task,
as a bar redrawn into a log leaves one line per redraw."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from tqdm import tqdm  # comes with diffusers


class Progress(Protocol):
    def set_postfix_str(self, s: str = "") -> None: ...  # the task now running

    def update(self, n: int = 1) -> None: ...  # a task finished

    def close(self) -> None: ...


class Lines:
    """``[done/total] elapsed  task`` for each finished task."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.done, self.task = total, stream, 0, ""
        self.started = time.perf_counter()

    def set_postfix_str(self, s: str = "") -> None:
        self.task = s

    def update(self, n: int = 1) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.started
        print(f"[{self.done}/{self.total}] {elapsed:6.1f}s  {self.task}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress(total: int, stream: TextIO = sys.stderr) -> Progress:
    """A bar when ``stream`` is a terminal, else :class:`Lines`."""
    if stream.isatty():
        return tqdm(total=total, file=stream, unit="run", dynamic_ncols=True)
    return Lines(total, stream)
