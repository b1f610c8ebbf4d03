"""``mmfree-fpga bench``: performance and accuracy figures, written to BENCHMARKS.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmfree_fpga.errors import UserError

from ._common import check_out_file

HELP = "measure the project's figures and write them to BENCHMARKS.md (and --json-out)"


def add_arguments(p) -> None:
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated sections to run; the other sections of an existing --out file (and "
                        "--json-out file) are kept as they are")
    p.add_argument("--skip", default=None, metavar="NAMES",
                   help="comma-separated sections not to run (kept as they are in an existing --out file), "
                        "e.g. boards (a bitstream build per board and lane count, the longest section)")
    p.add_argument("--quick", action="store_true", help="smaller runs (for tests)")
    p.add_argument("--out", default="BENCHMARKS.md", metavar="FILE", help="Markdown report (default BENCHMARKS.md)")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(args) -> dict:
    from mmfree_fpga.bench import SECTIONS, merge_markdown, render_markdown, run_stamp
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    skip = [n.strip() for n in (args.skip or "").split(",") if n.strip()]
    unknown = [n for n in names + skip if n not in SECTIONS]
    if unknown:
        raise UserError(f"unknown bench section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    names = [n for n in SECTIONS if n in names and n not in skip]
    if not names:
        raise UserError("--only and --skip leave no bench section to run")
    check_out_file(args.out, "--out")
    partial = bool(args.only or skip)
    done = []
    for name in names:
        print(f"bench: {name} ...", flush=True)
        t0 = time.time()
        section = SECTIONS[name](args.quick)
        section.seconds = time.time() - t0
        section.name = name
        section.when = run_stamp()
        if args.quick:
            section.command += " --quick"
        done.append(section)
    argv = ("mmfree-fpga bench" + (f" --only {','.join(names)}" if args.only else "")
            + (f" --skip {','.join(skip)}" if skip else "")
            + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out != "BENCHMARKS.md" else ""))
    out = Path(args.out)
    if partial and out.exists():
        text = merge_markdown(out.read_text(), done, argv, list(SECTIONS))
    else:
        text = render_markdown(done, argv)
    _write(out, text)
    print(text)
    sections = {}
    json_out = getattr(args, "json_out", None)
    if partial and json_out and Path(json_out).exists():
        try:
            sections = {k: v for k, v in json.loads(Path(json_out).read_text()).get("sections", {}).items()
                        if k in SECTIONS}
        except (json.JSONDecodeError, AttributeError):
            sections = {}
    sections.update({s.name: s.as_dict() for s in done})
    return {"sections": {n: sections[n] for n in list(SECTIONS) + list(sections) if n in sections},
            "markdown": str(out)}
