"""A progress bar on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 plain_every_s: float = 2.0) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._every = plain_every_s
        self._last = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._draw(final=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def _draw(self, final: bool = False) -> None:
        now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-9)
        if self.tty:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if final else ""
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} "
                              f"{rate:.1f}/s{end}")
            self.stream.flush()
        elif final or now - self._last >= self._every:
            self._last = now
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s)\n")
            self.stream.flush()
