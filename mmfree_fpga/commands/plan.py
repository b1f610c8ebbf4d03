"""``mmfree-fpga plan``: split a model's layers over several boards (mmfree_fpga/planner.py)."""

from __future__ import annotations

from pathlib import Path

from mmfree_fpga.errors import UserError

from ._common import engine_lanes, float_in, lanes_help, positive_float, positive_int

HELP = ("split a model's layers over N boards (or as few as fit): layers, bytes and cycles per device, "
        "tokens/s for one sequence and with N in flight (performance model)")


def add_arguments(p) -> None:
    from mmfree_fpga.config import PUBLISHED
    from mmfree_fpga.boards.top import DEFAULT_BAUD
    from mmfree_fpga.planner import DRAM_EFFICIENCY, plan_boards
    p.add_argument("--board", default="ulx3s-85f", metavar="B",
                   help=f"board kind of every device: {', '.join(plan_boards())} (default ulx3s-85f)")
    p.add_argument("--devices", type=positive_int, default=None, metavar="N",
                   help="how many boards (default: as few as fit)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"a published geometry ({', '.join(PUBLISHED)}) instead of --checkpoint (the geometry is all "
                        "the plan needs)")
    p.add_argument("--packing", choices=("base3", "2bit"), default="base3", help="trit packing (default base3)")
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N", help=lanes_help(16))
    p.add_argument("--memory", choices=("dram", "bram"), default=None,
                   help="where each board keeps its slice's weights (default: dram where the board has one)")
    p.add_argument("--clock-mhz", type=positive_float, default=None, metavar="F",
                   help="design clock (default: the DRAM controller's clock with dram, the board's with bram)")
    p.add_argument("--baud", type=positive_int, default=DEFAULT_BAUD, metavar="N",
                   help=f"serial link rate for the residual hand-over (default {DEFAULT_BAUD})")
    p.add_argument("--dram-efficiency", type=float_in(0.0, 1.0, lo_open=True), default=DRAM_EFFICIENCY, metavar="E",
                   help=f"fraction of the DRAM's peak while streaming weights (default {DRAM_EFFICIENCY})")


def _geometry(args):
    from mmfree_fpga.config import PUBLISHED, ModelConfig
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    if args.model is not None:
        if args.checkpoint is not None:
            raise UserError("give --model NAME (a published geometry) or --checkpoint DIR, not both")
        if args.model not in PUBLISHED:
            raise UserError(f"--model {args.model}: not a published geometry; use one of {', '.join(PUBLISHED)} "
                            "or --checkpoint DIR")
        return args.model, PUBLISHED[args.model]
    directory = Path(args.checkpoint) if args.checkpoint is not None else DEMO_CHECKPOINT
    name = str(args.checkpoint) if args.checkpoint is not None else "demo"
    if (directory / "manifest.json").is_file():
        from mmfree_fpga.host.image import WeightImage
        image = WeightImage.from_directory(directory)
        if image.packing != args.packing:
            raise UserError(f"{directory} is a {image.packing} weight image; use --packing {image.packing}")
        return name, image.cfg
    return name, ModelConfig.from_checkpoint(directory)


def run(args) -> dict:
    from mmfree_fpga.planner import plan
    name, cfg = _geometry(args)
    try:
        p = plan(cfg, args.packing, args.board, args.devices, lanes=args.lanes, memory=args.memory,
                 clock_hz=args.clock_mhz * 1e6 if args.clock_mhz is not None else None, baud=args.baud,
                 dram_efficiency=args.dram_efficiency, model=name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.quiet:
        print(p.text())
    return p.as_dict()
