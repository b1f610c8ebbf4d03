"""The ``mmfree-fpga`` command line: thin over the library (see ../shared/CLI.md).

Each command is a module in ``mmfree_fpga.commands`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> dict``; the dict is the JSON result written by ``--json-out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError

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
    "run": "run",
    "sim": "sim",
    "generate": "generate",
    "ports": "ports",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfree-fpga", description=__doc__.splitlines()[0])
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args._run(args)
        if args.json_out and result is not None:
            _write_json_atomic(Path(args.json_out), result)
    except UserError as e:
        print(f"mmfree-fpga {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmfree-fpga {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
