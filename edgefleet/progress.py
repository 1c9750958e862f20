"""A dependency-free progress line for the agent's CLI (the agent extra has no rich)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressLine"]


class ProgressLine:
    """``progress(phase, done, total)`` callback that redraws one line on a terminal."""

    def __init__(self, stream: TextIO | None = None, *, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._last = float("-inf")
        self._min = min_interval

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = done >= total or phase != "download"
        if not final and now - self._last < self._min:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 4)
        self.stream.write(
            f"\r{phase:<10} [{bar:<25}] {pct:5.1f}% {done / 1e6:7.2f}/{total / 1e6:.2f} MB"
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()
