"""``mmfree-fpga compare``: float vs integer vs hardware, per token, layer and operation."""

from __future__ import annotations

from pathlib import Path

HELP = "compare the float model, the integer model and the hardware on the same text; writes a report"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=None, metavar="TEXT", help="text to feed (default: held-out demo-corpus text)")
    p.add_argument("--prompt-ids", default=None, metavar="IDS", help="token ids to feed")
    p.add_argument("--positions", type=int, default=256, metavar="N",
                   help="positions of held-out text when no prompt is given (default 256)")
    p.add_argument("--hardware", choices=("image", "none"), default="image",
                   help="'image': run the exported weight image the hardware is loaded with (default; "
                        "--image DIR, else exported on the fly); 'none': float vs integer only")
    p.add_argument("--image", default=None, metavar="DIR", help="an exported weight image (mmfree-fpga export)")
    p.add_argument("--out", default="out/compare", metavar="DIR", help="report directory (default out/compare)")


def run(args) -> dict:
    import tempfile

    from mmfree_fpga.errors import UserError
    from mmfree_fpga.generation import parse_prompt
    from mmfree_fpga.reference.agreement import held_out_ids
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
    from mmfree_fpga.reference.compare import compare_traces, float_trace, integer_trace, write_report
    from mmfree_fpga.reference.export import integer_weights, read_image, write_image

    ckpt = args.checkpoint or DEMO_CHECKPOINT
    cfg, tensors = load_checkpoint(ckpt)
    if args.prompt is None and args.prompt_ids is None:
        if cfg.V != 256:
            raise UserError("this model is not byte-level: give --prompt-ids")
        ids = held_out_ids(args.positions)
    else:
        ids = parse_prompt(args.prompt, args.prompt_ids, cfg.V)
    weights = integer_weights(cfg, tensors)
    print(f"compare: {len(ids)} positions; float model ...", flush=True)
    flt = float_trace(load_model(ckpt), ids)
    print("compare: integer model ...", flush=True)
    itg = integer_trace(weights, ids)
    hw = None
    if args.hardware == "image":
        if args.image:
            image = read_image(args.image)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_image(weights, Path(tmp) / "img")
                image = read_image(Path(tmp) / "img")
        if image.cfg != cfg:
            raise UserError(f"the image at {args.image} is for a different geometry than {ckpt}")
        print("compare: hardware image ...", flush=True)
        hw = integer_trace(image, ids)
    report = compare_traces(ids, flt, itg, hw)
    files = write_report(report, args.out)
    print(f"compare: {report['verdict']}")
    print(f"compare: report in {Path(args.out) / 'report.md'}")
    return {"top1_agreement": report["top1_agreement"], "mean_logit_cosine": report["mean_logit_cosine"],
            "per_layer": report["per_layer"], "verdict": report["verdict"],
            "hardware_exact": report.get("hardware_exact"),
            "hardware_first_mismatch": report.get("hardware_first_mismatch"),
            "files": [str(Path(args.out) / f) for f in files]}
