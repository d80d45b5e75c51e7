"""A progress bar in plain text on stderr (no dependency): redrawn in place on a terminal, one
line per step in a log file.

    [##########..........] 120/345  35%  2:01 elapsed, ~3:45 left | pooling max_pool2d ...
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """total steps; start(label) before a step, done() after it; log(text) prints a result line
    on stdout without tearing the bar."""

    def __init__(
        self, total: int, stream: TextIO | None = None, width: int = 20, limit_s: float = 0.0
    ):
        self.total = max(total, 1)
        self.limit_s = limit_s  # the run stops starting cases after this: caps the estimate
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self.label = ""
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        filled = int(self.width * self.count / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        pct = 100 * self.count / self.total
        left = ""
        if self.count:
            estimate = elapsed / self.count * (self.total - self.count)
            if self.limit_s:
                estimate = min(estimate, max(0.0, self.limit_s - elapsed))
            left = f", ~{clock(estimate)} left"
        return (
            f"[{bar}] {self.count}/{self.total} {pct:3.0f}%  {clock(elapsed)} elapsed{left}"
            f" | {self.label}"
        )

    def _draw(self) -> None:
        text = self.line()
        if self.tty:
            columns = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r" + text[: columns - 1] + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def start(self, label: str) -> None:
        self.label = label
        self._draw()

    def done(self, steps: int = 1) -> None:
        self.count = min(self.total, self.count + steps)

    def log(self, text: str) -> None:
        self._clear()
        print(text, flush=True)
        if self.tty:
            self._draw()

    def close(self) -> None:
        self._clear()
        self.label = "done"
        self.stream.write(self.line() + "\n")
        self.stream.flush()
