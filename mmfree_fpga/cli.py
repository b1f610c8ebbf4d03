"""The ``mmfree-fpga`` command line: thin over the library (the README lists the commands).

Each command is a module in ``mmfree_fpga.commands`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> dict``; the dict is the JSON result written by ``--json-out``.

Exit codes: 0 success; 2 bad input (one line on stderr: a usage error, or a UserError a command
raised); 130 interrupted; 141 stdout closed early (``mmfree-fpga reference | head``: the status a
process killed by SIGPIPE reports, without a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import sys
import tempfile
import warnings
from pathlib import Path

from .commands._common import check_out_file
from .errors import DesignError, UserError
from .progress import set_quiet

# command name -> module in mmfree_fpga.commands
COMMANDS = {
    "reference": "reference",
    "export": "export",
    "train": "train",
    "demo": "demo",
    "bench": "bench",
    "compare": "compare",
    "build": "build",
    "program": "program",
    "serve": "serve",
    "proxy": "proxy",
    "run": "run",
    "sim": "sim",
    "generate": "generate",
    "ports": "ports",
    "sweep": "sweep",
    "plan": "plan",
}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (the CLI's contract), still exit code 2."""

    def error(self, message):
        head, sep, rest = message.partition(": ")
        if head.startswith("argument ") and sep and rest.startswith("must be"):   # our validators
            message = f"{head[len('argument '):]} {rest}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmfree-fpga", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"mmfree_fpga.commands.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="checkpoint directory (config.json + model.safetensors); default: the bundled demo model")
        p.add_argument("--json-out", default=None, metavar="FILE", help="write the machine-readable result here")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (so a BrokenPipeError came from it)."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):   # no real stdout (captured), or no poll()
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv=None) -> int:
    """Run one command line; returns the exit status (usage errors too: argparse's exit is caught)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help (0) or a usage error (2, its one line already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    set_quiet(args.quiet)
    # A command that fails (a rejected design, a baud rate the clock cannot make) leaves
    # gateware objects it built but never elaborated; the error says what went wrong, Amaranth's
    # UnusedElaboratable warning about those objects would only add noise.
    warnings.filterwarnings("ignore", message=r".* created but never used$")
    try:
        if args.json_out:
            check_out_file(args.json_out, "--json-out")
        result = args._run(args)
        if args.json_out and result is not None:
            _write_json_atomic(Path(args.json_out), result)
        sys.stdout.flush()
    except (UserError, DesignError) as e:
        print(f"mmfree-fpga {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmfree-fpga {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        _silence_stdout()
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
