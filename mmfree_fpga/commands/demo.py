"""``mmfree-fpga demo``: the main job on the bundled demo model, as ``make demo`` runs it."""

from __future__ import annotations

HELP = "the main job on the demo model: what the hardware's arithmetic writes, checked against the float model"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default="def ", metavar="TEXT")
    p.add_argument("--steps", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T")
    p.add_argument("--top-k", type=int, default=40, metavar="K")
    p.add_argument("--seed", type=int, default=1)


def run(args) -> dict:
    import torch

    with torch.no_grad():
        return _run(args)


def _run(args) -> dict:
    from mmfree_fpga.generation import Sampler, decode_text, generate, parse_prompt

    from .reference import float_stepper, integer_stepper
    cfg, int_step = integer_stepper(args.checkpoint)
    prompt = parse_prompt(args.prompt, None, cfg.V)
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    sampled = generate(int_step, prompt, args.steps, sampler)
    print(f"--- integer model (the hardware's arithmetic), {args.steps} tokens sampled at "
          f"temperature {args.temperature}, top-k {args.top_k}, seed {args.seed}:")
    print(decode_text(sampled.tokens, cfg.V))
    greedy = {}
    for name, make in (("float", float_stepper), ("integer", integer_stepper)):
        _, step = make(args.checkpoint)
        greedy[name] = generate(step, prompt, args.steps, Sampler()).tokens
    a, b = greedy["float"], greedy["integer"]
    same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) - len(prompt)
    print(f"--- greedy decoding: the integer and float models agree on the first {same} of "
          f"{args.steps} tokens")
    return {"sampled": {"tokens": sampled.tokens, "text": decode_text(sampled.tokens, cfg.V)},
            "greedy": {"float": a, "integer": b, "agreeing_prefix": same}}
