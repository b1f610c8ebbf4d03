"""``mmfree-fpga build``: a bitstream for a board (see boards/build.py)."""

from __future__ import annotations

from ._common import (check_out_dir, formats_choices_text, int_in, lanes_help, non_negative_int, positive_float,
                      positive_int)

HELP = "build the bitstream of the design for a board (YoWASP Yosys + nextpnr), with timing and utilisation"


def add_arguments(p) -> None:
    from mmfree_fpga.boards.registry import BOARDS, known_boards_text
    from mmfree_fpga.boards.top import DEFAULT_BAUD
    clocks = ", ".join(f"{name} {board.default_clock_hz / 1e6:g}" for name, board in BOARDS.items())
    p.add_argument("--board", default="icebreaker", metavar="B",
                   help=f"target board (default icebreaker): {known_boards_text()}")
    p.add_argument("--clock-mhz", type=positive_float, default=None, metavar="F",
                   help=f"design clock in MHz, made by the board's PLL (default: {clocks})")
    p.add_argument("--baud", type=positive_int, default=DEFAULT_BAUD, metavar="N",
                   help=f"UART bit rate (default {DEFAULT_BAUD})")
    from mmfree_fpga.boards.designs import DEFAULT_LANES, DESIGNS
    defaults = ", ".join(f"{name} {board.design}" for name, board in BOARDS.items())
    p.add_argument("--design", choices=tuple(DESIGNS), default=None,
                   help=f"what goes on the board (default: the board's, {defaults}): "
                        + "; ".join(f"{k}: {v}" for k, v in DESIGNS.items()))
    p.add_argument("--lanes", type=positive_int, default=None, metavar="N",
                   help=lanes_help(DEFAULT_LANES) + "; the iCE40 builds run the one-lane tiny engine")
    from mmfree_fpga.boards.build import MEMORIES
    from mmfree_fpga.boards.registry import dram_boards
    p.add_argument("--memory", choices=MEMORIES, default="bram",
                   help="where the engine keeps the weights: bram (default; on-chip RAM, the model must fit it) "
                        f"or dram (the board's DRAM through a LiteDRAM controller, weights uploaded over the "
                        f"UART; boards: {', '.join(dram_boards())}; default clock: the controller's tested one)")
    from mmfree_fpga.config import FORMAT_SETS
    dram_defaults = ", ".join(f"{name} {board.dram_formats}" for name, board in BOARDS.items() if board.dram)
    own = ", ".join(f"{name} {board.formats}" for name, board in BOARDS.items())
    p.add_argument("--formats", choices=tuple(FORMAT_SETS), default=None,
                   help="the engine's number formats, the image is sized and exported in them (default: an "
                        "exported image's own; with --memory dram and no --slots the board's DRAM set, "
                        f"{dram_defaults}; with --slots narrow; otherwise the board's, {own}; the iCE40's "
                        f"tiny engine narrow only): {formats_choices_text()}")
    p.add_argument("--slots", type=int_in(0, 255), default=0, metavar="N",
                   help="state slots of the engine (protocol 1.2's slice ops: the board can hold a layer slice "
                        "in a run over several boards, N sequences in flight); default 0, none. Any --memory "
                        "(with dram a slice image goes into the DRAM, and a model larger than the DRAM is built "
                        "for when it splits over boards of this kind: mmfree-fpga plan); not the iCE40's tiny "
                        "engine, not --formats wide (the slice ops carry Q16 int32 residuals)")
    p.add_argument("--packing", choices=("2bit", "base3"), default=None,
                   help="trit packing for the model size check (default base3, or that of an exported image)")
    p.add_argument("--seed", type=non_negative_int, default=None, metavar="N",
                   help="nextpnr's placement seed (default: nextpnr's own); Fmax varies with it by a few "
                        "percent, so a build that misses its clock narrowly may meet it with another seed")
    from mmfree_fpga.boards.build import ROUTERS
    dram_routers = ", ".join(f"{name} {board.dram_router}" for name, board in BOARDS.items() if board.dram_router)
    p.add_argument("--router", choices=ROUTERS, default=None,
                   help=f"nextpnr's router (default: nextpnr's own, router1, but with --memory dram the board's: "
                        f"{dram_routers}; router1 stalls there on the wide engine)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default out/build/BOARD)")
    p.add_argument("--no-cache", action="store_true", help="run the toolchain even if this build is cached")


def _utilisation_text(util: dict) -> str:
    names = {"lut": "LUT", "ff": "FF", "logic_cell": "LC", "bram": "BRAM", "spram": "SPRAM", "dsp": "DSP"}
    parts = []
    for key, label in names.items():
        if key in util:
            u = util[key]
            pct = f" ({u['percent']:g}%)" if u["percent"] is not None else ""
            parts.append(f"{label} {u['used']}/{u['available']}{pct}")
    return ", ".join(parts)


def _model_text(fit: dict) -> str:
    """The model's fit in one line (printed once the design is prepared, before the tools run)."""
    if fit.get("split"):
        sp, mib = fit["split"], 2 ** 20
        return (f"model: {sp['model']}: {sp['image_bytes'] / mib:.1f} MiB does not fit one board's "
                f"{fit['available_bytes'] / mib:.0f} MiB; with --slots it runs as a slice of a split over "
                f">= {sp['boards']} boards ({sp['plan_command']}); the largest slice {fit['needed_bytes']:,} B "
                f"({fit['percent']:g}% of {fit['dram']}), recurrent state of {fit['slots']} slots "
                f"{fit['on_chip_bytes']:,} B on chip")
    if fit.get("memory") == "dram":
        return (f"model: {fit['image']['packing']} weight image of {fit['needed_bytes']:,} B in DRAM "
                f"({fit['percent']:g}% of {fit['dram']}), uploaded over the UART; recurrent state "
                f"{fit['on_chip_bytes']:,} B on chip")
    return (f"model: {fit['needed_bytes']:,} of {fit['available_bytes']:,} bytes of on-chip RAM "
            f"({fit['percent']:g}%), {fit['image']['packing']} weight image")


def run(args) -> dict:
    import sys

    from mmfree_fpga.errors import UserError

    from mmfree_fpga.boards.build import build, check_memory
    from mmfree_fpga.boards.designs import design_factory
    from mmfree_fpga.boards.registry import resolve_board
    if args.out is not None:
        check_out_dir(args.out)
    board = resolve_board(args.board)
    check_memory(board, args.memory)
    name = args.design or board.design
    if args.lanes is not None and name != "engine":
        raise UserError(f"--lanes applies to the engine; the design built for {args.board} is {name} "
                        "(add --design engine)")
    if args.slots and name != "engine":
        raise UserError(f"--slots applies to the engine; the design built for {args.board} is {name} "
                        "(add --design engine)")
    if args.memory != "bram" and name != "engine":
        raise UserError(f"--memory {args.memory} applies to the engine; the design built for {args.board} is "
                        f"{name} (add --design engine)")
    def announce(prepared) -> None:
        # the model's fit, before any tool runs (a model that does not fit stopped in prepare)
        if prepared.fit:
            print(_model_text(prepared.fit), flush=True)

    r = build(args.board, out=args.out, clock_mhz=args.clock_mhz, baud=args.baud, checkpoint=args.checkpoint,
              packing=args.packing, design=design_factory(name, lanes=args.lanes, slots=args.slots),
              use_cache=not args.no_cache,
              quiet=args.quiet, seed=args.seed, memory=args.memory, router=args.router,
              announce=announce, formats=args.formats)
    how = f"from the cache in {r['build_seconds']:.1f} s" if r["cached"] else f"in {r['build_seconds']:.1f} s"
    print(f"built {r['bitstream']} for {r['board']} ({r['device']}) {how}")
    lanes = f", {r['lanes']} lanes, {r['formats']} formats" if r["lanes"] else ""
    print(f"design: {r['design']}{lanes}" + (f" ({r['design_description']})" if r["design_description"] else ""))
    pll = r["pll"]
    clock = f"{r['clock_mhz']:g} MHz" + (" from the PLL" if pll else " from the oscillator")
    print(f"clock: {clock}; UART {r['baud']} baud 8N1")
    if r["fmax_mhz"] is None:
        print("Fmax: not found in the nextpnr log (no timing line for the design clock)")
    else:
        verdict = "timing met" if r["timing_met"] else "TIMING NOT MET"
        print(f"Fmax: {r['fmax_mhz']:g} MHz at {r['clock_mhz']:g} MHz: {verdict}")
        if not r["timing_met"]:
            print(f"mmfree-fpga build: warning: the design clock ({r['clock_mhz']:g} MHz) is faster than the "
                  f"design's Fmax ({r['fmax_mhz']:g} MHz); rebuild with a lower --clock-mhz (or, if it missed "
                  "narrowly, another --seed)", file=sys.stderr)
    print(f"utilisation: {_utilisation_text(r['utilization'])}")
    if r.get("dram"):
        d = r["dram"]
        print(f"DRAM controller: LiteDRAM {d['versions'].get('litedram', '?')} ({d['module']}, {d['phy']}, "
              f"{d['data_width']}-bit native port) at {d['clk_mhz']:g} MHz")
    for note in r["notes"]:
        print(f"note: {note}")
    return r
