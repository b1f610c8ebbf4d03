"""Progress bars (tqdm) on stderr for long work.

Bars show only when stdout is a terminal and ``--quiet`` was not given (``../CLI.md``'s rule):
piped or captured output stays clean. The CLI calls :func:`set_quiet` once per command, so
library code (checkpoint loading, traces, simulations) can show a bar without a ``quiet``
argument threaded through every call.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

__all__ = ["Progress", "track", "set_quiet", "enabled"]

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no bars from here on (the CLI calls this for every command)."""
    global _quiet
    _quiet = bool(quiet)


def enabled(quiet: bool = False) -> bool:
    return not (quiet or _quiet) and sys.stdout.isatty()


class Progress:
    """A bar driven by ``progress(done, total)`` callbacks (as :meth:`Driver.load_weights` and
    :func:`mmfree_fpga.generation.generate` call it); ``close()`` (or ``with``) ends it."""

    def __init__(self, desc: str, quiet: bool = False, unit: str = "it", unit_scale: bool = False):
        self._bar = tqdm(desc=desc, total=None, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                         disable=not enabled(quiet), leave=False, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          quiet: bool = False) -> Iterator[T]:
    """``items`` with a bar (``for x in track(xs, "loading tensors"): ...``)."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, disable=not enabled(quiet),
                    leave=False, dynamic_ncols=True)
