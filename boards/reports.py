"""Reading nextpnr's log (``top.tim``) and Yosys's log (``top.rpt``).

nextpnr prints "Max frequency for clock 'NET': F MHz (PASS|FAIL at T MHz)" once after
placement (an estimate) and again after routing (the final figure): the last line per clock
wins. Its "Device utilisation" block lists ``CELL: used/ available percent%`` per cell type.
Yosys's ``stat`` prints cell counts of the top module; the last statistics block wins.
"""

from __future__ import annotations

import re

__all__ = ["parse_nextpnr_log", "parse_yosys_log", "design_clock", "utilization"]

_FMAX = re.compile(r"Max frequency for clock\s+'(?P<clock>[^']+)':\s*(?P<fmax>[0-9.]+)\s*MHz\s*"
                   r"\((?P<verdict>PASS|FAIL) at (?P<target>[0-9.]+)\s*MHz\)")
_UTIL_ROW = re.compile(r"^\s*(?P<cell>[A-Za-z0-9_$]+):\s*(?P<used>\d+)\s*/\s*(?P<total>\d+)\s+(?P<pct>\d+)%")


def _strip_info(line: str) -> str:
    return re.sub(r"^(Info|Warning):\s?", "", line)


def parse_nextpnr_log(text: str) -> dict:
    """{"clocks": {net: {"fmax_mhz", "target_mhz", "pass"}}, "cells": {cell: (used, total)}}."""
    clocks = {}
    for m in _FMAX.finditer(text):
        clocks[m["clock"]] = {"fmax_mhz": float(m["fmax"]), "target_mhz": float(m["target"]),
                              "pass": m["verdict"] == "PASS"}
    cells = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Device utilisation" in line:
            block = {}
            for row in lines[i + 1:]:
                m = _UTIL_ROW.match(_strip_info(row))
                if not m:
                    if block:
                        break
                    continue
                block[m["cell"]] = (int(m["used"]), int(m["total"]))
            if block:
                cells = block
    return {"clocks": clocks, "cells": cells}


def parse_yosys_log(text: str) -> dict:
    """Cell counts {type: n} of the last ``stat`` block (both the old and the 0.5x+ layouts)."""
    blocks = [m.start() for m in re.finditer(r"^=== .* ===$", text, flags=re.M)]
    if not blocks:
        return {}
    tail = text[blocks[-1]:]
    cells = {}
    for line in tail.splitlines()[1:]:
        if line.startswith("===") or line.startswith("End of script"):
            break
        # "     SB_LUT4       123"  (old)  or  "      123   SB_LUT4"  (new, with optional area)
        m = re.match(r"^\s+(?P<name>[A-Za-z_$\\][\w$\\.]*)\s+(?P<n>\d+)\s*$", line)
        if m:
            cells[m["name"]] = int(m["n"])
            continue
        m = re.match(r"^\s+(?P<n>\d+)(?:\s+[0-9.]+)?\s+(?P<name>[A-Za-z_$\\][\w$\\.]*)\s*$", line)
        if m:
            cells[m["name"]] = int(m["n"])
    return {k: v for k, v in cells.items()
            if not k.lower().endswith(("wires", "cells", "bits", "memories", "processes", "ports", "submodules"))}


def design_clock(clocks: dict, clock_mhz: float) -> tuple[str, dict] | None:
    """The clock whose constraint is ``clock_mhz`` (the design clock): (net, entry), or None.

    Several nets may carry it (nextpnr reports each constrained net); the slowest one rules.
    With no matching constraint, a lone clock is taken as the design clock.
    """
    matching = [(net, c) for net, c in clocks.items() if abs(c["target_mhz"] - clock_mhz) <= 0.01 * clock_mhz]
    if not matching and len(clocks) == 1:
        matching = list(clocks.items())
    if not matching:
        return None
    return min(matching, key=lambda item: item[1]["fmax_mhz"])


# nextpnr cell type -> our utilisation key, per family
_NEXTPNR_KEYS = {
    "ice40": {"ICESTORM_LC": "logic_cell", "ICESTORM_RAM": "bram", "ICESTORM_SPRAM": "spram",
              "ICESTORM_DSP": "dsp", "SB_IO": "io", "SB_GB": "global_buffer", "ICESTORM_PLL": "pll"},
    "ecp5": {"TRELLIS_COMB": "lut", "TRELLIS_FF": "ff", "DP16KD": "bram", "MULT18X18D": "dsp",
             "TRELLIS_IO": "io", "EHXPLLL": "pll", "TRELLIS_RAMW": "distributed_ram", "DCCA": "global_buffer"},
}


def _entry(used, available):
    return {"used": used, "available": available,
            "percent": round(100 * used / available, 1) if available else None}


def utilization(family: str | None, nextpnr_cells: dict, yosys_cells: dict, resources=None) -> dict:
    """{key: {"used", "available", "percent"}}: lut, ff, bram, dsp (and spram, io, pll, ...).

    iCE40: nextpnr counts logic cells (a LUT and a FF each), so LUTs and FFs come from Yosys's
    cell counts against the device totals. Cell types the family table does not name are
    listed under their nextpnr names when used.
    """
    out = {}
    keys = _NEXTPNR_KEYS.get(family, {})
    for cell, (used, total) in nextpnr_cells.items():
        if cell in keys:
            out[keys[cell]] = _entry(used, total)
        elif used:
            out[cell] = _entry(used, total)
    if family == "ice40" and resources is not None:
        out["lut"] = _entry(yosys_cells.get("SB_LUT4", 0), resources.luts)
        out["ff"] = _entry(sum(n for name, n in yosys_cells.items() if name.startswith("SB_DFF")), resources.ffs)
    order = {key: i for i, key in enumerate(_ORDER)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


_ORDER = ("lut", "ff", "logic_cell", "bram", "spram", "dsp", "io", "pll", "global_buffer")
