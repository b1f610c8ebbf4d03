"""A progress line on stderr for long work; silent when stdout is not a terminal or --quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, quiet: bool = False, stream=None):
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = not quiet and sys.stdout.isatty()
        self.t0 = time.time()
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        rate = done / max(time.time() - self.t0, 1e-9)
        self.stream.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.1f}/s")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
