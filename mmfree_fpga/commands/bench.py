"""``mmfree-fpga bench``: performance and accuracy figures, written to BENCHMARKS.md."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmfree_fpga.errors import UserError

HELP = "measure the project's figures and write them to BENCHMARKS.md (and --json-out)"


def add_arguments(p) -> None:
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated sections to run")
    p.add_argument("--quick", action="store_true", help="smaller runs (for tests)")
    p.add_argument("--out", default="BENCHMARKS.md", metavar="FILE", help="Markdown report (default BENCHMARKS.md)")


def run(args) -> dict:
    from mmfree_fpga.bench import SECTIONS, render_markdown
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UserError(f"unknown bench section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    done = []
    for name in names:
        print(f"bench: {name} ...", flush=True)
        t0 = time.time()
        section = SECTIONS[name](args.quick)
        section.seconds = time.time() - t0
        done.append(section)
    argv = "mmfree-fpga bench" + ("".join(f" {a}" for a in sys.argv[2:]) if len(sys.argv) > 2 else "")
    text = render_markdown(done, argv)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    return {"sections": {s.title: s.as_dict() for s in done}, "markdown": str(out)}
