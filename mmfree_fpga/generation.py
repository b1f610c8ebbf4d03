"""Token conventions shared by every backend (float, integer, simulated or real hardware)."""

from __future__ import annotations

import math
import numbers
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
        ids = list(_utf8(prompt if prompt is not None else "def "))
    if not ids:
        raise UserError("the prompt is empty; give at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``--prompt``; UserError for text that is not Unicode (argv bytes that were
    not UTF-8 arrive as lone surrogates), naming the ``--prompt-ids`` that would give those bytes."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        raise UserError("--prompt is not valid Unicode text; give the token ids with --prompt-ids") from None
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        where = f" (byte 0x{raw[e.start]:02x} at offset {e.start})"
    ids = ",".join(map(str, raw[:64])) + (",..." if len(raw) > 64 else "")
    raise UserError(f"--prompt is not valid UTF-8 text{where}; give its bytes as token ids instead: "
                    f"--prompt-ids {ids}")


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
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise UserError(f"--temperature must be a finite number >= 0, got {t!r}")
        for name, value in (("--top-k", self.top_k), ("--seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise UserError(f"{name} must be an integer >= 0, got {value!r}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.greedy:
            return int(np.argmax(logits))
        with np.errstate(over="ignore"):
            z = logits / self.temperature
        if not np.isfinite(z.max()):
            # so small a temperature that the scaled logits overflow: its limit, greedy
            return int(np.argmax(logits))
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
