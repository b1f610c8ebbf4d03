"""``mmfree-fpga reference``: the float PyTorch model, or with --integer the hardware's integer model."""

from __future__ import annotations

import sys

from mmfree_fpga.generation import generate

from ._common import add_generation_arguments, generation_result, prompt_and_sampler, stream_printer
from .export import add_formats_argument, formats_of

HELP = "run the float reference (or --integer: the exact integer model of the hardware) on a prompt"


def add_arguments(p) -> None:
    add_generation_arguments(p)
    p.add_argument("--integer", action="store_true", help="run the integer model the hardware implements")
    add_formats_argument(p, "the integer model (with --integer)")


def run(args) -> dict:
    import torch

    with torch.no_grad():
        return _run(args)


def _run(args) -> dict:
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.reference.steppers import float_stepper, integer_stepper
    if args.formats is not None and not args.integer:
        raise UserError("--formats sets the integer model's number formats; add --integer")
    name, fmt = formats_of(args)
    if args.integer:
        cfg, step = integer_stepper(args.checkpoint, fmt)
    else:
        cfg, step = float_stepper(args.checkpoint)
    prompt, sampler = prompt_and_sampler(args, cfg.V)
    on_token = stream_printer(cfg.V)
    if cfg.V == 256:
        sys.stdout.write(bytes(prompt).decode("utf-8", errors="replace"))
    gen = generate(step, prompt, args.steps, sampler, on_token=on_token)
    sys.stdout.write("\n")
    result = generation_result(gen, cfg.V)
    result["model"] = "integer" if args.integer else "float"
    if args.integer:
        result["formats"] = name
    return result
