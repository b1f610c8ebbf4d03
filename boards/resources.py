"""iCE40 resource breakdown of the board design, per submodule (Yosys only, no place and route).

``python -m mmfree_fpga.boards.resources [--variant tiny|compact|full] [--lanes 16] [--design linked|engine]``
writes the design's RTLIL, runs ``synth_ice40 -dsp`` with the hierarchy kept (YoWASP Yosys from
the virtual environment, or ``$YOSYS``) and prints LUT4, flip-flops, carry cells, DSPs (SB_MAC16),
block RAMs (SB_RAM40_4K) and SPRAMs per Amaranth submodule, inclusive of its children, against
the iCE40UP5K's resources (``boards/budget.py``). The default variant is the one the iCEBreaker
builds: the tiny engine (``hw/tiny_engine.py``, weights in SPRAM); ``compact`` is
``EngineCore(compact=True)`` (base3 only, SPRAM store; it does not fit the UP5K), ``full`` the
ECP5 engine.

Flattening (as the board build does) lets Yosys optimise across module boundaries, so the
totals of a real build differ a little; this is for seeing where the resources go.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .budget import DEVICES

__all__ = ["UP5K", "VARIANTS", "design_for", "synth_stats", "inclusive", "main"]

_UP5K = DEVICES["iCE40UP5K"]
UP5K = {"LUT4": _UP5K.luts, "FF": _UP5K.ffs, "CARRY": None, "DSP": _UP5K.dsps, "EBR": _UP5K.bram_blocks,
        "SPRAM": _UP5K.spram_blocks}
_CELL = {"SB_LUT4": "LUT4", "SB_CARRY": "CARRY", "SB_MAC16": "DSP", "SB_RAM40_4K": "EBR",
         "SB_SPRAM256KA": "SPRAM"}
COLUMNS = ("LUT4", "FF", "CARRY", "DSP", "EBR", "SPRAM")


VARIANTS = ("tiny", "compact", "full")


def design_for(cfg, *, lanes: int = 16, variant: str = "tiny", which: str = "linked"):
    """The board design (Link + Engine, or the Engine alone) as the iCEBreaker builds it
    (``tiny``), the compact pipelined engine, or the full one (both packings, 14 DSPs, weight
    store in block RAM)."""
    if variant == "tiny":
        if which == "engine":
            from mmfree_fpga.hw.tiny_engine import TinyEngine
            return TinyEngine(cfg, spram=True)
        from mmfree_fpga.hw.linked_engine import LinkedEngine
        return LinkedEngine(cfg, lanes=1, packing="base3", max_payload=256, tiny=True, spram=True)
    kw = dict(packings=("base3",), compact=True, mem_spram=True, mem_fifo_depth=4) if variant == "compact" else {}
    if which == "engine":
        from mmfree_fpga.hw.engine import Engine
        return Engine(cfg, lanes=lanes, packing="base3", **kw)
    from mmfree_fpga.hw.linked_engine import LinkedEngine
    return LinkedEngine(cfg, lanes=lanes, packing="base3", max_payload=256, **kw)


def synth_stats(design, workdir: Path, *, flatten: bool = False) -> dict[str, dict[str, int]]:
    """{module path: {column: count}} of the module's own cells (not its children's)."""
    from amaranth.back import rtlil

    from .build import YOSYS_AFTER_READ, tool_command
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "top.il").write_text(rtlil.convert(design, name="top"))
    opts = "" if flatten else " -noflatten"
    script = f"read_rtlil top.il; {YOSYS_AFTER_READ}; synth_ice40 -dsp{opts} -top top; tee -o top.stat stat -width"
    subprocess.run([tool_command("yosys"), "-q", "-l", "yosys.log", "-p", script], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    text = (workdir / "top.stat").read_text()
    stats = {}
    for block in re.split(r"\n=== ", text)[1:]:
        name = block.split(" ===")[0].strip()
        if name == "design hierarchy":
            continue
        row = dict.fromkeys(COLUMNS, 0)
        for count, cell in re.findall(r"^\s+(\d+)\s+(?:[\d.]+\s+)?(\$?\w+)\s*$", block, re.M):
            if cell.startswith("SB_DFF"):
                row["FF"] += int(count)
            elif cell in _CELL:
                row[_CELL[cell]] += int(count)
        stats[name] = row
    return stats


def inclusive(stats: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Each module's counts plus those of every module below it (by hierarchical name)."""
    out = {}
    for name in stats:
        row = dict.fromkeys(COLUMNS, 0)
        for other, counts in stats.items():
            if other == name or other.startswith(name + "."):
                for c in COLUMNS:
                    row[c] += counts[c]
        out[name] = row
    return out


def format_table(stats: dict[str, dict[str, int]], depth: int = 4) -> str:
    inc = inclusive(stats)
    lines = [f"{'module (inclusive)':44s}" + "".join(f"{c:>7s}" for c in COLUMNS)]
    for name in sorted(inc):
        if name.count(".") < depth:
            lines.append(f"{name:44s}" + "".join(f"{inc[name][c]:7d}" for c in COLUMNS))
    lines.append(f"{'iCE40UP5K':44s}" + "".join(f"{UP5K[c] if UP5K[c] else '-':>7}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmfree_fpga.boards.resources", description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, default="tiny",
                    help="the tiny engine (the iCEBreaker's), the compact pipelined engine, or the full one")
    ap.add_argument("--lanes", type=int, default=16, help="lanes of the compact or full engine")
    ap.add_argument("--design", choices=("linked", "engine"), default="linked")
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the demo model)")
    ap.add_argument("--depth", type=int, default=4, help="hierarchy levels shown")
    ap.add_argument("--keep", default=None, help="directory for RTLIL and logs (default: a temporary one)")
    args = ap.parse_args(argv)
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(args.checkpoint or DEMO_CHECKPOINT)
    design = design_for(cfg, lanes=args.lanes, variant=args.variant, which=args.design)
    t0 = time.monotonic()
    if args.keep:
        stats = synth_stats(design, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            stats = synth_stats(design, Path(tmp))
    print(format_table(stats, args.depth))
    lanes = 1 if args.variant == "tiny" else args.lanes
    print(f"({args.variant} {args.design}, d={cfg.d} L={cfg.L} I={cfg.I} V={cfg.V}, "
          f"lanes={lanes}; synth_ice40 -dsp -noflatten, {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
