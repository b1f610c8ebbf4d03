"""Board benchmarks: the engine built for each board and lane count, with its timing and size.

:func:`board_benchmarks` runs :func:`~.build.build` (cached like any build) for every
(board, lanes) pair and returns one row per build: the requested clock, nextpnr's final Fmax,
whether timing is met, LUT/FF/BRAM/DSP use, the demo model's cycles per token at that lane
count (``config.PERF_MODEL``; on iCE40 the tiny engine's ``TINY_PERF_MODEL``, its instruction-set simulator's count) and the
tokens per second the design would reach at its Fmax (Fmax / cycles per token).
"""

from __future__ import annotations

from typing import Callable

from mmfree_fpga.errors import DesignError, UserError

from .designs import engine_perf_model, linked_engine, weight_image

__all__ = ["BENCH_CLOCK_MHZ", "board_benchmarks", "BENCH_COLUMNS", "bench_row_cells"]

# Clocks asked for in the bench where they differ from the board's default clock (registry):
# the board issue's targets (ECP5 100 MHz, iCE40UP5K 40 MHz). Other boards build at their default clock.
BENCH_CLOCK_MHZ = {"ulx3s-85f": 100.0, "icebreaker": 40.0}

BENCH_COLUMNS = ["board", "lanes", "clock MHz", "Fmax MHz", "timing", "LUT", "FF", "BRAM", "DSP",
                 "cycles/token", "tokens/s at Fmax", "build s"]


def _use(util: dict, key: str) -> dict | None:
    u = util.get(key)
    return None if u is None else {"used": u["used"], "available": u["available"], "percent": u["percent"]}


def board_benchmarks(boards=("ulx3s-85f",), lanes_list=(16, 32, 64), progress: Callable[[str], None] | None = None,
                     *, checkpoint=None, clock_mhz: dict | None = None, cache_dir=None, use_cache: bool = True,
                     out_dir=None) -> list[dict]:
    """Build the engine for each board x lanes; one row (dict) per build.

    ``clock_mhz`` maps board -> requested clock (default :data:`BENCH_CLOCK_MHZ`, else the
    board's default clock). ``progress`` gets one line before each build. A build that fails
    (e.g. a design too large for the device) gives a row with ``error`` set and no figures.
    """
    from pathlib import Path

    from .registry import resolve_board

    from .build import build
    clocks = dict(BENCH_CLOCK_MHZ, **(clock_mhz or {}))
    cfg = weight_image(checkpoint, None).cfg
    rows = []
    for board in boards:
        for lanes in lanes_list:
            mhz = clocks.get(board)
            if progress is not None:
                progress(f"building the engine for {board}, {lanes} lanes"
                         + (f", {mhz:g} MHz" if mhz else ""))
            cycles = engine_perf_model(resolve_board(board).family).cycles_per_token(cfg, lanes)
            row = {"board": board, "lanes": lanes, "requested_clock_mhz": mhz, "cycles_per_token": round(cycles, 1)}
            out = Path(out_dir) / f"{board.replace(':', '_')}-{lanes}" if out_dir is not None else None
            try:
                r = build(board, out=out, clock_mhz=mhz, checkpoint=checkpoint, design=linked_engine(lanes=lanes),
                          cache_dir=cache_dir, use_cache=use_cache, quiet=True)
            except (UserError, DesignError) as e:
                rows.append({**row, "error": str(e)})
                continue
            util = r["utilization"]
            fmax = r["fmax_mhz"]
            rows.append({
                **row,
                "clock_mhz": r["clock_mhz"],
                "fmax_mhz": fmax,
                "timing_met": r["timing_met"],
                "lut": _use(util, "lut"), "ff": _use(util, "ff"), "bram": _use(util, "bram"), "dsp": _use(util, "dsp"),
                "tokens_per_s_at_fmax": round(fmax * 1e6 / cycles, 1) if fmax else None,
                "build_seconds": r["build_seconds"],
                "cached": r["cached"],
                # the toolchain's own time (for a cached bitstream: when it was built)
                "tool_seconds": round(sum(st["seconds"] for st in r["stages"]), 1),
                "bitstream": r["bitstream"],
                "error": None,
            })
    return rows


def bench_row_cells(row: dict) -> list:
    """A row as the cells of :data:`BENCH_COLUMNS` (for a Markdown table)."""
    def use(key):
        u = row.get(key)
        return "-" if not u else f"{u['used']}/{u['available']} ({u['percent']:g}%)"

    if row.get("error"):
        return [row["board"], row["lanes"], row.get("requested_clock_mhz") or "-", "-", row["error"],
                "-", "-", "-", "-", row["cycles_per_token"], "-", "-"]
    return [row["board"], row["lanes"], row["clock_mhz"], row["fmax_mhz"],
            "met" if row["timing_met"] else "NOT met", use("lut"), use("ff"), use("bram"), use("dsp"),
            row["cycles_per_token"], row["tokens_per_s_at_fmax"],
            f"{row['tool_seconds']:g} (cached)" if row.get("cached") else row["build_seconds"]]
