"""``mmfree-fpga train``: train a small byte-level model on the Python standard library's sources."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "train a byte-level HGRN-bit model (the demo model's recipe) and save it as a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/trained", metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--hidden-size", type=int, default=None, help="d (default: the demo geometry)")
    p.add_argument("--layers", type=int, default=None, help="L (default: the demo geometry)")
    p.add_argument("--intermediate-size", type=int, default=None, help="I (default: the demo geometry)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def run(args) -> dict:
    import dataclasses

    from mmfree_fpga.reference.checkpoint import save_checkpoint
    from mmfree_fpga.reference.train import DEMO_CONFIG, train
    cfg = DEMO_CONFIG
    over = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                              ("intermediate_size", args.intermediate_size)) if v is not None}
    if over:
        cfg = dataclasses.replace(cfg, **over)
    log = (lambda s: None) if args.quiet else print
    model, report = train(cfg, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                          seed=args.seed, log=log, device=args.device)
    out = save_checkpoint(model, args.out)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out {report['held_out_bits_per_byte']:.3f} bits/byte (unigram "
          f"{report['unigram_bits_per_byte']:.3f}, uniform 8.0); wrote {out}")
    return {"checkpoint": str(out), **report}
