"""Options, validators and output shared by the commands.

The argparse ``type=`` functions below reject a bad value while the command line is parsed,
before any work starts; :func:`check_out_dir` and :func:`check_out_file` check an output path
the same way (run them at the top of a command's ``run``). Every failure is one line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from mmfree_fpga.errors import UserError
from mmfree_fpga.generation import Generation, Sampler, decode_text, parse_prompt

__all__ = ["int_in", "float_in", "non_negative_int", "positive_int", "finite_float", "non_negative_float",
           "positive_float", "probability", "tcp_port", "engine_lanes", "lanes_help", "check_out_dir",
           "check_out_file", "add_generation_arguments", "prompt_and_sampler", "stream_printer",
           "generation_result"]


# -- argparse types ------------------------------------------------------------------------------
def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


def int_in(lo: int, hi: int | None = None):
    """argparse type: a decimal integer ``lo <= n`` (``<= hi`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi)} (an integer), got {text!r}")
        return value
    parse.__name__ = f"integer {_bounds_text(lo, hi)}"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number, optionally within ``lo``/``hi`` (open or closed ends)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            if lo is None and hi is None:
                what = "a finite number"
            elif hi is None:
                what = f"{_bounds_text(lo, None, lo_open)} (a finite number)"
            elif lo is None:
                what = f"{'<' if hi_open else '<='} {_num(hi)} (a finite number)"
            else:
                what = f"{_bounds_text(lo, hi, lo_open, hi_open)} (a number)"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


non_negative_int = int_in(0)
positive_int = int_in(1)
finite_float = float_in()
non_negative_float = float_in(0.0)
positive_float = float_in(0.0, lo_open=True)
# a per-cycle probability of an event that stops progress (a stall): 1 would never progress
probability = float_in(0.0, 1.0, hi_open=True)
tcp_port = int_in(0, 65535)


def engine_lanes(text: str) -> int:
    """argparse type: lanes of the engine's matrix unit, one of ``hw.engine.LANES_SUPPORTED``."""
    from mmfree_fpga.hw.engine import LANES_SUPPORTED
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value not in LANES_SUPPORTED:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(map(str, LANES_SUPPORTED))}, got {text!r}")
    return value


def formats_choices_text() -> str:
    """The format sets a ``--formats`` option offers, one phrase each (``Formats.summary``)."""
    from mmfree_fpga.config import FORMAT_SETS
    return "; ".join(f"{name}: {fmt.summary()}" for name, fmt in FORMAT_SETS.items())


def lanes_help(default: int) -> str:
    from mmfree_fpga.hw.engine import LANES_SUPPORTED
    return (f"trits per cycle of the matrix unit: {', '.join(map(str, LANES_SUPPORTED))} "
            f"(default {default})")


# -- output paths ------------------------------------------------------------------------------------
def _probe_writable(directory: Path, option: str, path) -> None:
    """UserError unless a file can be created in the existing ``directory``."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmfree-probe-", dir=directory)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create files in {directory} ({e.strerror or e}); "
                        "choose another location") from None
    os.close(fd)
    os.unlink(probe)


def _check_parents(path: Path, option: str, shown=None) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory (so ``path`` can be made)."""
    shown = path if shown is None else shown
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():   # a dangling link: mkdir would fail
            raise UserError(f"{option} {shown}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        what = "a file, not a directory" if parent.is_file() else "not a directory"
        raise UserError(f"{option} {shown}: {parent} is {what}")
    _probe_writable(parent, option, shown)


def check_out_dir(path, option: str = "--out") -> Path:
    """UserError unless ``path`` is an existing writable directory or can be created as one."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{option} {path} is a broken symbolic link")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {path} is an existing file, not a directory; "
                            "name a directory (it is created if missing)")
        _probe_writable(path, option, path)
        return path
    _check_parents(path, option)
    return path


def check_out_file(path, option: str) -> Path:
    """UserError unless ``path`` can be (re)written as a file: not a directory, its parent creatable
    and writable (files are written to a temporary name beside ``path``, then renamed)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; name a file")
    if path.is_symlink() and not path.exists():
        raise UserError(f"{option} {path} is a broken symbolic link")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {path} exists and is not a regular file")
    _check_parents(path, option)
    return path


# -- token generation --------------------------------------------------------------------------------
def add_generation_arguments(p) -> None:
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="prompt text; the demo model is byte-level (ids are UTF-8 bytes); default 'def '")
    p.add_argument("--prompt-ids", default=None, metavar="IDS", help="prompt as comma-separated token ids")
    p.add_argument("--steps", type=non_negative_int, default=32, metavar="N",
                   help="new tokens to generate (default 32)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample among the K most likely (0 = all)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (an integer >= 0)")


def prompt_and_sampler(args, vocab_size: int):
    return parse_prompt(args.prompt, args.prompt_ids, vocab_size), \
        Sampler(temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def stream_printer(vocab_size: int):
    """on_token callback that prints byte-level text as it arrives (ids otherwise)."""
    pending = bytearray()

    def on_token(tok: int) -> None:
        if vocab_size == 256:
            pending.append(tok)
            try:
                text = pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    return
                text = pending.decode("utf-8", errors="replace")
            sys.stdout.write(text)
            pending.clear()
        else:
            sys.stdout.write(f"{tok} ")
        sys.stdout.flush()

    return on_token


def generation_result(gen: Generation, vocab_size: int) -> dict:
    return {"tokens": gen.tokens, "logits": [[float(v) for v in row] for row in gen.logits],
            "text": decode_text(gen.tokens, vocab_size)}
