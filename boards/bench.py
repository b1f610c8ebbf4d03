"""Board benchmarks: the engine built for each board and lane count, with its timing and size; and
the engine with its weights in each board's DRAM (:func:`dram_build_rows`).

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

__all__ = ["BENCH_CLOCK_MHZ", "BENCH_SEEDS", "board_benchmarks", "BENCH_COLUMNS", "bench_row_cells", "DRAM_BUILD_BOARDS",
           "dram_build_rows", "DRAM_BUILD_COLUMNS", "dram_build_row_cells"]

# Clocks asked for in the bench where they differ from the board's default clock (registry):
# the board issue's targets (ECP5 100 MHz, iCE40UP5K 40 MHz). Other boards build at their default clock.
BENCH_CLOCK_MHZ = {"ulx3s-85f": 100.0, "icebreaker": 40.0}

# nextpnr placement seeds of bench builds (board, lanes, formats) -> seed, where the default seed's
# placement did not route or missed the clock, measured. The ULX3S's medium engine: at 32 lanes
# router1 was still oscillating around 2,000 unrouted arcs after 25 minutes (placement estimate
# 86.9 MHz); seed 1 routes in 6 minutes at 108.6 MHz. At 16 lanes 96.5 MHz, the critical path the
# fetcher's tag-queue level through the response router's ready (control every set shares; the
# narrow engine's default-seed build meets 100 MHz with it); seed 1: 109.8 MHz.
BENCH_SEEDS = {("ulx3s-85f", 16, "medium"): 1, ("ulx3s-85f", 32, "medium"): 1}

BENCH_COLUMNS = ["board", "lanes", "clock MHz", "Fmax MHz", "timing", "LUT", "FF", "BRAM", "DSP",
                 "cycles/token", "tokens/s at Fmax", "build s"]


def _use(util: dict, key: str) -> dict | None:
    u = util.get(key)
    return None if u is None else {"used": u["used"], "available": u["available"], "percent": u["percent"]}


def _build_figures(r: dict) -> dict:
    """The row keys every bench build row has, from a ``build`` result."""
    util = r["utilization"]
    return {
        "clock_mhz": r["clock_mhz"],
        "fmax_mhz": r["fmax_mhz"],
        "timing_met": r["timing_met"],
        "lut": _use(util, "lut"), "ff": _use(util, "ff"), "bram": _use(util, "bram"), "dsp": _use(util, "dsp"),
        "build_seconds": r["build_seconds"],
        "cached": r["cached"],
        # the toolchain's own time (for a cached bitstream: when it was built)
        "tool_seconds": round(sum(st["seconds"] for st in r["stages"]), 1),
        "bitstream": r["bitstream"],
        "error": None,
    }


def board_benchmarks(boards=("ulx3s-85f",), lanes_list=(16, 32, 64), progress: Callable[[str], None] | None = None,
                     *, checkpoint=None, clock_mhz: dict | None = None, cache_dir=None, use_cache: bool = True,
                     out_dir=None, formats: str | None = None) -> list[dict]:
    """Build the engine for each board x lanes in the number formats ``formats`` (a name of
    ``config.FORMAT_SETS``; None: each board's own, ``Board.formats``); one row (dict) per build.

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
        fmt = formats or resolve_board(board).formats
        for lanes in lanes_list:
            mhz = clocks.get(board)
            if progress is not None:
                progress(f"building the engine for {board}, {lanes} lanes, {fmt} formats"
                         + (f", {mhz:g} MHz" if mhz else ""))
            cycles = engine_perf_model(resolve_board(board).family).cycles_per_token(cfg, lanes)
            seed = BENCH_SEEDS.get((board, lanes, fmt))
            row = {"board": board, "lanes": lanes, "requested_clock_mhz": mhz, "cycles_per_token": round(cycles, 1),
                   "formats": fmt, "seed": seed}
            out = Path(out_dir) / f"{board.replace(':', '_')}-{lanes}" if out_dir is not None else None
            try:
                r = build(board, out=out, clock_mhz=mhz, checkpoint=checkpoint, design=linked_engine(lanes=lanes),
                          cache_dir=cache_dir, use_cache=use_cache, quiet=True, formats=fmt, seed=seed)
            except (UserError, DesignError) as e:
                rows.append({**row, "error": str(e)})
                continue
            fmax = r["fmax_mhz"]
            rows.append({**row, **_build_figures(r),
                         "tokens_per_s_at_fmax": round(fmax * 1e6 / cycles, 1) if fmax else None})
    return rows


def bench_row_cells(row: dict) -> list:
    """A row as the cells of :data:`BENCH_COLUMNS` (for a Markdown table)."""
    def use(key):
        u = row.get(key)
        return "-" if not u else f"{u['used']}/{u['available']} ({u['percent']:g}%)"

    lanes = row["lanes"] if row.get("seed") is None else f"{row['lanes']} (seed {row['seed']})"
    if row.get("error"):
        return [row["board"], lanes, row.get("requested_clock_mhz") or "-", "-", row["error"],
                "-", "-", "-", "-", row["cycles_per_token"], "-", "-"]
    return [row["board"], lanes, row["clock_mhz"], row["fmax_mhz"],
            "met" if row["timing_met"] else "NOT met", use("lut"), use("ff"), use("bram"), use("dsp"),
            row["cycles_per_token"], row["tokens_per_s_at_fmax"],
            f"{row['tool_seconds']:g} (cached)" if row.get("cached") else row["build_seconds"]]


# the boards whose DRAM builds the bench reports (build --memory dram), each at its controller's clock
DRAM_BUILD_BOARDS = ("ulx3s-85f", "ecpix5-85f")

DRAM_BUILD_COLUMNS = ["board", "memory", "PHY", "formats", "router", "clock MHz", "Fmax MHz", "timing", "LUT", "FF",
                      "BRAM", "DSP", "IOLOGIC", "build s"]


def dram_build_rows(boards=DRAM_BUILD_BOARDS, lanes: int = 16, progress: Callable[[str], None] | None = None,
                    *, checkpoint=None, cache_dir=None, use_cache: bool = True, out_dir=None,
                    formats=(None,)) -> list[dict]:
    """Build the engine with its weights in each board's DRAM (``build --memory dram``, the demo
    model unless ``checkpoint``, at the board's controller clock ``Board.dram_clock_hz``); one
    row per board and entry of ``formats`` (names of ``config.FORMAT_SETS``; None: the board's
    default, ``Board.dram_formats``), from the real build (cached like any build).

    Row keys: ``board``, ``memory`` (the DRAM's text, e.g. "33,554,432 B of SDRAM (IS42S16160, 32
    MiB)"), ``module``, ``phy``, ``memtype``, ``read_leveling``, ``lanes``, ``clock_mhz`` (the
    design and controller clock), ``fmax_mhz`` (nextpnr's final figure for it), ``timing_met``,
    ``lut``/``ff``/``bram``/``dsp``/``iologic`` (``{"used", "available", "percent"}``; IOLOGIC:
    the I/O cells' registers, where the PHY's DDR registers go), ``dram_cells`` (the DDR PHY's
    other hard blocks nextpnr placed: DQSBUFM, DDRDLL, ECLKSYNCB, CLKDIVF, ...),
    ``build_seconds``, ``tool_seconds``, ``cached``, ``bitstream``, ``formats``, ``router``
    (nextpnr's), ``error`` (None, or why the build failed; the figures are then missing).
    """
    from pathlib import Path

    from .build import build
    from .dram import dram_budget
    from .registry import resolve_board

    rows = []
    for board, fmt in [(b, f) for b in boards for f in formats]:
        spec = resolve_board(board)
        fmt = fmt or spec.dram_formats
        if progress is not None:
            progress(f"building the engine with its weights in DRAM for {board}, {fmt} formats"
                     + (f", {spec.dram_clock_hz / 1e6:g} MHz" if spec.dram_clock_hz else ""))
        row = {"board": board, "lanes": lanes, "requested_clock_mhz": (spec.dram_clock_hz or 0) / 1e6 or None,
               "formats": fmt}
        try:
            row["memory"] = dram_budget(spec).text()
        except ValueError as e:
            rows.append({**row, "error": str(e)})
            continue
        out = Path(out_dir) / f"{board.replace(':', '_')}-dram-{fmt}" if out_dir is not None else None
        try:
            r = build(board, out=out, checkpoint=checkpoint, design=linked_engine(lanes=lanes), cache_dir=cache_dir,
                      use_cache=use_cache, quiet=True, memory="dram", formats=fmt)
        except (UserError, DesignError) as e:
            rows.append({**row, "error": str(e)})
            continue
        dram = r["dram"]
        rows.append({
            **row, **_build_figures(r),
            "module": dram["module"], "phy": dram["phy"], "memtype": dram["memtype"], "router": r["nextpnr_router"],
            "read_leveling": dram.get("read_leveling"),
            "iologic": _use(r["utilization"], "IOLOGIC"),
            "dram_cells": {cell: r["nextpnr_cells"][cell]["used"] for cell in _DDR_CELLS if cell in r["nextpnr_cells"]},
        })
    return rows


# the ECP5's DDR hard blocks, as nextpnr counts them
_DDR_CELLS = ("DQSBUFM", "DDRDLL", "ECLKSYNCB", "CLKDIVF", "TRELLIS_ECLKBUF", "EHXPLLL")


def dram_build_row_cells(row: dict) -> list:
    """A :func:`dram_build_rows` row as the cells of :data:`DRAM_BUILD_COLUMNS`."""
    def use(key):
        u = row.get(key)
        return "-" if not u else f"{u['used']}/{u['available']} ({u['percent']:g}%)"

    if row.get("error"):
        return [row["board"], row.get("memory", "-"), "-", row.get("formats", "-"), "-",
                row.get("requested_clock_mhz") or "-", "-", row["error"], "-", "-", "-", "-", "-", "-"]
    return [row["board"], row["memory"], row["phy"], row["formats"], row["router"] or "nextpnr's own",
            row["clock_mhz"], row["fmax_mhz"],
            "met" if row["timing_met"] else "NOT met", use("lut"), use("ff"), use("bram"), use("dsp"),
            use("iologic"), f"{row['tool_seconds']:g} (cached)" if row.get("cached") else row["build_seconds"]]
