"""``mmfree-fpga program``: load a bitstream onto a board (see boards/program.py)."""

from __future__ import annotations

HELP = "load the built bitstream onto a board with openFPGALoader (or iceprog); --flash to keep it"


def add_arguments(p) -> None:
    from mmfree_fpga.boards.registry import known_boards_text
    p.add_argument("--board", default="icebreaker", metavar="B",
                   help=f"target board (default icebreaker): {known_boards_text()}")
    p.add_argument("--flash", action="store_true",
                   help="write the configuration flash (persistent); default: SRAM where the board allows it")
    p.add_argument("--bitstream", default=None, metavar="FILE",
                   help="bitstream to load (default: out/build/BOARD/top.bin or top.bit from 'mmfree-fpga build')")


def run(args) -> dict:
    import sys

    from mmfree_fpga.boards.program import program
    r = program(args.board, bitstream=args.bitstream, flash=args.flash, quiet=args.quiet)
    if r["timing_met"] is False:
        print(f"mmfree-fpga program: warning: {r['bitstream']} did not meet timing when it was built",
              file=sys.stderr)
    print(f"programmed the {r['board']} ({r['target']}) with {r['bitstream']} using {r['tool']}")
    if r["note"]:
        print(f"note: {r['note']}")
    return r
