"""``mmfree-fpga generate``: the engine's Verilog for a geometry, with a manifest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mmfree_fpga.config import FORMAT_SETS

from ._common import check_out_dir, engine_lanes, formats_choices_text, lanes_help

HELP = "write the engine's Verilog for a checkpoint's geometry (weights in on-chip RAM) and a manifest"


def add_arguments(p) -> None:
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N", help=lanes_help(16))
    p.add_argument("--packing", choices=("base3", "2bit"), default="base3", help="trit packing (default base3)")
    p.add_argument("--formats", choices=tuple(FORMAT_SETS), default="narrow",
                   help="the number formats, the image is exported in them (default narrow): "
                        + formats_choices_text())
    p.add_argument("--no-init", action="store_true",
                   help="leave the weight RAM uninitialised (weights arrive through the load stream)")
    p.add_argument("--out", default="build/engine", metavar="DIR", help="output directory (default build/engine)")


def run(args) -> dict:
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.hw.engine import Engine, check_geometry, engine_params
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    from mmfree_fpga.sim.engine_sim import load_image
    from mmfree_fpga.sim.runner import write_verilog

    out = check_out_dir(args.out)
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    check_geometry(ModelConfig.from_checkpoint(checkpoint), args.lanes)   # before the export
    cfg, blob = load_image(checkpoint, args.packing, args.formats)
    fmt = FORMAT_SETS[args.formats]
    engine = Engine(cfg, lanes=args.lanes, packing=args.packing, packings=(args.packing,),
                    image=None if args.no_init else blob, formats=fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-generate-", dir=out.parent))
    try:
        write_verilog(engine, tmp / "engine.v", name="engine")
        manifest = {
            "top": "engine", "files": ["engine.v", "manifest.json"], "lanes": args.lanes,
            "packing": args.packing, "formats": args.formats, "number_formats": fmt.as_dict(),
            "geometry": cfg.as_dict(), "weights_in_verilog": not args.no_init,
            "image_bytes": len(blob),
            "params": {str(k): v for k, v in sorted(engine_params(cfg, args.packing, args.lanes, fmt).items())},
            "ports": {"cmd": "cmd__valid/ready/payload (op[2:0], index[10:3], arg[42:11])",
                      "load": "load__valid/ready/payload[7:0]",
                      "result": "result__valid/ready/payload (token[31:0], logit[63:32], cycles[95:64])",
                      "logit_req": "logit_req__valid/ready/payload[31:0]",
                      "logit_resp": "logit_resp__valid/ready/payload[31:0]"},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for f in manifest["files"]:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["files"] = [str(out / f) for f in manifest["files"]]
    if not args.quiet:
        print(f"wrote {out / 'engine.v'} (top 'engine', {args.lanes} lanes)")
    return {k: manifest[k] for k in ("top", "files", "lanes", "packing", "formats", "geometry", "image_bytes")}
