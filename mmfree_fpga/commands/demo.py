"""``mmfree-fpga demo``: the main job on the bundled demo model, as ``make demo`` runs it."""

from __future__ import annotations

HELP = "the main job on the demo model: float and integer model side by side on one prompt"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default="def fibonacci(n):\n", metavar="TEXT")
    p.add_argument("--steps", type=int, default=160, metavar="N")


def run(args) -> dict:
    import torch

    from mmfree_fpga.generation import Sampler, decode_text, generate, parse_prompt

    from .reference import float_stepper, integer_stepper
    torch.set_grad_enabled(False)
    result = {}
    for name, make in (("float", float_stepper), ("integer", integer_stepper)):
        cfg, step = make(args.checkpoint)
        prompt = parse_prompt(args.prompt, None, cfg.V)
        gen = generate(step, prompt, args.steps, Sampler())
        text = decode_text(gen.tokens, cfg.V)
        print(f"--- {name} model, greedy, {args.steps} new tokens " + "-" * 30)
        print(text)
        result[name] = {"tokens": gen.tokens, "text": text}
    same = sum(a == b for a, b in zip(result["float"]["tokens"], result["integer"]["tokens"]))
    print(f"--- float and integer models agree on {same}/{len(result['float']['tokens'])} tokens")
    return result
