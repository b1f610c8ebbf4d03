"""``mmfree-fpga train``: train a small byte-level model on the Python standard library's sources."""

from __future__ import annotations

import json

from ._common import check_out_dir, int_in, positive_float, positive_int

HELP = "train a byte-level HGRN-bit model (the demo model's recipe) and save it as a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/trained", metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--hidden-size", type=positive_int, default=None, help="d (default: the demo geometry)")
    p.add_argument("--layers", type=positive_int, default=None, help="L (default: the demo geometry)")
    p.add_argument("--intermediate-size", type=positive_int, default=None, help="I (default: the demo geometry)")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=4e-3)
    p.add_argument("--seed", type=int_in(0, 2 ** 64 - 1), default=0, help="torch and numpy seed (0 .. 2**64-1)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def _check_device(name: str) -> None:
    import torch

    from mmfree_fpga.errors import UserError
    try:
        torch.empty(1, device=name)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise UserError(f"--device {name!r} cannot be used here ({lines[0] if lines else type(e).__name__}); "
                        "use cpu, or cuda on a machine with a CUDA GPU") from None


def run(args) -> dict:
    import dataclasses

    from mmfree_fpga.errors import UserError
    from mmfree_fpga.reference.checkpoint import check_checkpoint_dir, save_checkpoint
    from mmfree_fpga.reference.train import DEMO_CONFIG, stdlib_corpus, train

    check_out_dir(args.out)
    check_checkpoint_dir(args.out)
    _check_device(args.device)
    cfg = DEMO_CONFIG
    over = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                              ("intermediate_size", args.intermediate_size)) if v is not None}
    if over:
        cfg = dataclasses.replace(cfg, **over)
    corpus = stdlib_corpus()
    shortest = min(len(part) for part in corpus)
    if args.seq + 2 > shortest:
        raise UserError(f"--seq {args.seq} is longer than the held-out text allows ({shortest - 2} bytes)")
    log = (lambda s: None) if args.quiet else print
    model, report = train(cfg, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                          seed=args.seed, log=log, device=args.device, corpus=corpus)
    out = save_checkpoint(model, args.out, extra_files={"training.json": json.dumps(report, indent=1) + "\n"})
    print(f"held-out {report['held_out_bits_per_byte']:.3f} bits/byte (unigram "
          f"{report['unigram_bits_per_byte']:.3f}, uniform 8.0); wrote {out}")
    return {"checkpoint": str(out), **report}
