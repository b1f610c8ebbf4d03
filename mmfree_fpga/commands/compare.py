"""``mmfree-fpga compare``: float vs integer vs hardware, per token, layer and operation.

JSON: ``top1_agreement`` and ``mean_logit_cosine`` (integer model vs the float model in float32),
``fidelity`` (the three-way figures: ``integer_vs_float64``, ``float32_vs_float64`` and
``integer_vs_float32``, each ``{positions, top1_agreement, mean_logit_cosine, min_logit_cosine}``),
``formats`` (the integer model's number format set), ``per_layer``, ``verdict``, ``hardware`` and
the hardware's ``hardware_*`` / ``simulation`` keys, ``files``.
"""

from __future__ import annotations

from pathlib import Path

from ._common import check_out_dir, engine_lanes, lanes_help, positive_int
from .export import add_formats_argument, default_formats_name, formats_of

HELP = ("compare the float model (float32 and float64), the integer model and the hardware on the same text; "
        "writes a report")

HARDWARE_CHOICES = ("sim", "image", "none")
SIM_CHOICES = ("verilator", "icarus", "amaranth")


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=None, metavar="TEXT", help="text to feed (default: held-out demo-corpus text)")
    p.add_argument("--prompt-ids", default=None, metavar="IDS", help="token ids to feed")
    p.add_argument("--positions", type=positive_int, default=None, metavar="N",
                   help="positions of held-out text when no prompt is given (default 256; 32 with --hardware sim)")
    p.add_argument("--hardware", choices=HARDWARE_CHOICES, default=None,
                   help="'sim': simulate the engine on the exported weight image and capture every vector it "
                        "stores (default when the simulator is installed); 'image': run that image through "
                        "the integer model (no simulation); 'none': float vs integer only")
    p.add_argument("--simulator", choices=SIM_CHOICES, default="verilator",
                   help="simulator for --hardware sim (default verilator; icarus and amaranth are much slower)")
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N",
                   help="engine lanes for --hardware sim: " + lanes_help(16))
    p.add_argument("--image", default=None, metavar="DIR",
                   help="an exported weight image (mmfree-fpga export) to load the hardware with "
                        "(default: the checkpoint exported on the fly, base3)")
    add_formats_argument(p, "the integer model and the image exported on the fly",
                         "; with --image, the image's own")
    p.add_argument("--out", default="out/compare", metavar="DIR", help="report directory (default out/compare)")
    p.epilog = ("JSON keys: top1_agreement, mean_logit_cosine (integer vs float32); fidelity: integer_vs_float64, "
                "float32_vs_float64, integer_vs_float32, each with positions, top1_agreement, mean_logit_cosine, "
                "min_logit_cosine; formats; per_layer; verdict; hardware, hardware_source, hardware_exact, "
                "hardware_first_mismatch, hardware_vectors, simulation; files")


def _simulator_missing(name: str) -> str | None:
    if name == "amaranth":
        return None
    from mmfree_fpga.sim.runner import simulator_missing
    return simulator_missing(name)


def _hardware_image(args, weights, cfg, ckpt, image=None):
    """The WeightImage the hardware is loaded with: ``image`` (from --image) or the checkpoint
    exported on the fly."""
    import tempfile

    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.reference.export import write_image
    if image is not None:
        return image
    with tempfile.TemporaryDirectory(prefix="mmfree-compare-") as tmp:
        write_image(weights, Path(tmp) / "img")
        return WeightImage.from_directory(Path(tmp) / "img")


def _image_weights(args, weights):
    """(IntegerWeights read back from the image, its packing): --image, or ``weights`` exported on
    the fly (base3) and read back, in the image's own number formats."""
    import json
    import tempfile

    from mmfree_fpga.reference.export import read_image, write_image
    if args.image:
        return read_image(args.image), json.loads((Path(args.image) / "manifest.json").read_text())["packing"]
    with tempfile.TemporaryDirectory(prefix="mmfree-compare-") as tmp:
        write_image(weights, Path(tmp) / "img")
        return read_image(Path(tmp) / "img"), "base3"


def _write_report_atomic(report: dict, out: Path) -> list[str]:
    """write_report into a new directory beside ``out``, then its files into ``out``: a failure
    leaves no half-written report."""
    import os
    import shutil
    import tempfile

    from mmfree_fpga.reference.compare import write_report
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-compare-", dir=out.parent))
    try:
        files = write_report(report, tmp)
        out.mkdir(exist_ok=True)
        for f in files:
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def run(args) -> dict:
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.generation import parse_prompt
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.config import FORMAT_SETS, FORMATS
    from mmfree_fpga.hw.engine import check_geometry
    from mmfree_fpga.reference.agreement import THREE_WAY, held_out_ids
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
    from mmfree_fpga.reference.compare import compare_traces, float64_logits, float_trace, integer_trace
    from mmfree_fpga.reference.export import integer_weights, read_formats

    out = check_out_dir(args.out)
    if args.image and args.hardware == "none":
        raise UserError("--image is for the hardware side; leave it out with --hardware none")
    fmt_name, fmt = formats_of(args)
    if args.image and args.hardware != "none":
        image_fmt = read_formats(args.image)
        names = [name for name, f in FORMAT_SETS.items() if f == image_fmt]
        if args.formats is not None and image_fmt != fmt:
            raise UserError(f"the image at {args.image} has other number formats "
                            f"({names[0] if names else 'a set not in FORMAT_SETS'}) than --formats {fmt_name}; "
                            "re-export it with --formats or leave --formats out")
        if not names:
            raise UserError(f"the image at {args.image} has number formats that are not one of "
                            f"{', '.join(FORMAT_SETS)}; re-export it")
        fmt_name, fmt = names[0], image_fmt
    engine_formats = fmt == FORMATS
    hardware = args.hardware
    if hardware is None:
        reason = None if engine_formats else (f"the simulated engine computes with the {default_formats_name()} "
                                              f"number formats, not {fmt_name}")
        reason = reason or _simulator_missing(args.simulator)
        hardware = "sim" if reason is None else "image"
        if reason:
            print(f"compare: {reason}; comparing the weight image through the integer model instead "
                  "(--hardware image)", flush=True)
    elif hardware == "sim":
        if not engine_formats:
            raise UserError(f"--hardware sim: the simulated engine computes with the {default_formats_name()} "
                            f"number formats, not {fmt_name}; use --hardware image")
        reason = _simulator_missing(args.simulator)
        if reason:
            raise UserError(f"--hardware sim: {reason}")
    ckpt = args.checkpoint or DEMO_CHECKPOINT
    cfg, tensors = load_checkpoint(ckpt)
    if hardware == "sim":
        check_geometry(cfg, args.lanes)
    image = None
    image_w = None
    if args.image and hardware == "sim":
        image = WeightImage.from_directory(args.image)
        if image.cfg != cfg:
            raise UserError(f"the image at {args.image} is for a different geometry than {ckpt}")
    elif args.image and hardware == "image":
        image_w, image_packing = _image_weights(args, None)
        if image_w.cfg != cfg:
            raise UserError(f"the image at {args.image} is for a different geometry than {ckpt}")
    if args.prompt is None and args.prompt_ids is None:
        if cfg.V != 256:
            raise UserError("this model is not byte-level: give --prompt-ids")
        positions = args.positions if args.positions is not None else (32 if hardware == "sim" else 256)
        ids = held_out_ids(positions)
        if len(ids) < positions:
            raise UserError(f"--positions {positions}: the held-out text has only {len(ids)} positions")
    else:
        if args.positions is not None:
            raise UserError("--positions counts held-out text; leave it out with --prompt or --prompt-ids")
        ids = parse_prompt(args.prompt, args.prompt_ids, cfg.V)
    weights = integer_weights(cfg, tensors, fmt)
    print(f"compare: {len(ids)} positions; float model ...", flush=True)
    model = load_model(ckpt)
    flt = float_trace(model, ids)
    print("compare: float model in float64 ...", flush=True)
    f64 = float64_logits(model, ids)
    del model
    print(f"compare: integer model ({fmt_name} formats) ...", flush=True)
    itg = integer_trace(weights, ids)
    hw = None
    source = None
    sim_info = None
    if hardware in ("image", "sim"):
        if hardware == "image":
            if image_w is None:
                image_w, image_packing = _image_weights(args, weights)
            print("compare: hardware image through the integer model ...", flush=True)
            hw = integer_trace(image_w, ids)
            source = (f"the weight image ({image_packing}, {fmt_name} formats, "
                      f"{args.image or f'{ckpt} exported on the fly'}) run through the integer model, not simulated")
        else:
            image = _hardware_image(args, weights, cfg, ckpt, image)
            from mmfree_fpga.sim.engine_sim import run_engine
            from mmfree_fpga.sim.trace import hardware_trace
            print(f"compare: simulating the engine ({args.simulator}, {args.lanes} lanes, {len(ids)} tokens) ...",
                  flush=True)
            r = run_engine(cfg=cfg, blob=image.blob, packing=image.packing, lanes=args.lanes, prompt=list(ids),
                           steps=1, simulator=args.simulator, trace=True)
            hw = hardware_trace(r.trace, cfg)
            # the result the engine returned (its argmax logit) must be the largest logit it stored
            consistent = all(int(h["logits"].max()) == lg for h, lg in zip(hw, r.argmax_logits))
            source = (f"the engine ({args.lanes} lanes) simulated on {args.simulator} with the weight image "
                      f"({image.packing}, {args.image or f'{ckpt} exported on the fly'}); every vector its writer "
                      "stored, captured from its trace port")
            sim_info = {"simulator": args.simulator, "lanes": args.lanes, "cycles_per_token": r.cycles,
                        "sim_seconds": round(r.sim_seconds, 2), "argmax_tokens": r.tokens[len(ids):],
                        "argmax_logits": r.argmax_logits, "result_matches_stored_logits": consistent}
    report = compare_traces(ids, flt, itg, hw, fmt, f64)
    report["formats"] = fmt_name
    if source:
        report["hardware_source"] = source
    if sim_info:
        report["simulation"] = sim_info
    files = _write_report_atomic(report, out)
    print(f"compare: {report['verdict']}")
    for key, _, _ in THREE_WAY:
        f = report["fidelity"][key]
        print(f"compare: {key.replace('_', ' ')}: top-1 {f['top1_agreement']:.4f}, logit cosine mean "
              f"{f['mean_logit_cosine']:.6f}, min {f['min_logit_cosine']:.6f}")
    print(f"compare: report in {out / 'report.md'}")
    return {"top1_agreement": report["top1_agreement"], "mean_logit_cosine": report["mean_logit_cosine"],
            "fidelity": report["fidelity"], "formats": fmt_name,
            "per_layer": report["per_layer"], "verdict": report["verdict"], "hardware": hardware,
            "hardware_source": source, "hardware_exact": report.get("hardware_exact"),
            "hardware_first_mismatch": report.get("hardware_first_mismatch"),
            "hardware_vectors": report.get("hardware_vectors"), "simulation": sim_info,
            "files": [str(out / f) for f in files]}
