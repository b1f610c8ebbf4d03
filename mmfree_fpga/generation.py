"""Token conventions shared by every backend (float, integer, simulated or real hardware)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UserError

__all__ = ["Sampler", "parse_prompt", "decode_text", "generate", "Generation"]


def parse_prompt(prompt: str | None, prompt_ids: str | None, vocab_size: int) -> list[int]:
    """Prompt ids from ``--prompt TEXT`` (UTF-8 bytes; byte-level models) or ``--prompt-ids 1,2,3``."""
    if prompt is not None and prompt_ids is not None:
        raise UserError("give either --prompt or --prompt-ids, not both")
    if prompt_ids is not None:
        try:
            ids = [int(s) for s in prompt_ids.replace(" ", "").split(",") if s != ""]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    else:
        if vocab_size < 256:
            raise UserError(f"the model's vocabulary has {vocab_size} ids, too few for byte-level "
                            "--prompt text; use --prompt-ids")
        ids = list((prompt if prompt is not None else "def ").encode("utf-8"))
    if not ids:
        raise UserError("the prompt is empty; give at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def decode_text(tokens: list[int], vocab_size: int) -> str | None:
    """Text of byte-level token ids; None for other vocabularies (no tokenizer is bundled)."""
    if vocab_size != 256:
        return None
    return bytes(tokens).decode("utf-8", errors="replace")


@dataclass
class Sampler:
    """Greedy when temperature is 0, else softmax sampling with optional top-k."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0")
        if self.top_k < 0:
            raise UserError("--top-k must be >= 0")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.greedy:
            return int(np.argmax(logits))
        z = logits / self.temperature
        if self.top_k and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(self._rng.choice(z.size, p=p))


@dataclass
class Generation:
    tokens: list[int]
    logits: list[np.ndarray]
    n_prompt: int


def generate(step: Callable[[int], np.ndarray], prompt: list[int], steps: int, sampler: Sampler,
             on_token: Callable[[int], None] | None = None, progress=None) -> Generation:
    """Feed the prompt, then sample ``steps`` tokens; ``step(token)`` returns float logits.

    Row t of ``logits`` is the output after feeding ``tokens[t]``: len(prompt) + steps - 1 rows.
    """
    if steps < 0:
        raise UserError("--steps must be >= 0")
    tokens = list(prompt)
    rows = []
    total = len(prompt) + steps - 1 if steps else len(prompt)
    for tok in prompt:
        rows.append(step(tok))
        if progress:
            progress(len(rows), total)
    for s in range(steps):
        nxt = sampler(rows[-1])
        tokens.append(nxt)
        if on_token:
            on_token(nxt)
        if s < steps - 1:
            rows.append(step(nxt))
            if progress:
                progress(len(rows), total)
    return Generation(tokens=tokens, logits=rows, n_prompt=len(prompt))
