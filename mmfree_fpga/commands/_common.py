"""Options and output shared by the commands that generate tokens."""

from __future__ import annotations

import sys

from mmfree_fpga.generation import Generation, Sampler, decode_text, parse_prompt


def add_generation_arguments(p) -> None:
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="prompt text; the demo model is byte-level (ids are UTF-8 bytes); default 'def '")
    p.add_argument("--prompt-ids", default=None, metavar="IDS", help="prompt as comma-separated token ids")
    p.add_argument("--steps", type=int, default=32, metavar="N", help="new tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def prompt_and_sampler(args, vocab_size: int):
    return parse_prompt(args.prompt, args.prompt_ids, vocab_size), \
        Sampler(temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def stream_printer(vocab_size: int):
    """on_token callback that prints byte-level text as it arrives (ids otherwise)."""
    pending = bytearray()

    def on_token(tok: int) -> None:
        if vocab_size == 256:
            pending.append(tok)
            try:
                text = pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    return
                text = pending.decode("utf-8", errors="replace")
            sys.stdout.write(text)
            pending.clear()
        else:
            sys.stdout.write(f"{tok} ")
        sys.stdout.flush()

    return on_token


def generation_result(gen: Generation, vocab_size: int) -> dict:
    return {"tokens": gen.tokens, "logits": [[float(v) for v in row] for row in gen.logits],
            "text": decode_text(gen.tokens, vocab_size)}
