"""How closely the integer model (the hardware's arithmetic) follows the float reference."""

from __future__ import annotations

import numpy as np
import torch

from .integer import IntegerModel, IntegerWeights
from .model import HGRNBitForCausalLM

__all__ = ["agreement", "held_out_ids"]


def held_out_ids(n: int, offset: int = 100_000) -> list[int]:
    """n consecutive bytes of the demo corpus's held-out files."""
    from .train import stdlib_corpus
    _, held = stdlib_corpus()
    return held[offset:offset + n].tolist()


def agreement(model: HGRNBitForCausalLM, weights: IntegerWeights, ids: list[int]) -> dict:
    """Feed ids to both models; top-1 agreement of next-token predictions and logit cosines."""
    imodel = IntegerModel(weights)
    with torch.no_grad():
        lf = model(torch.tensor([ids]))[0][0].double().numpy()
    li = np.stack([imodel.logits_to_float(imodel.step(t)) for t in ids])
    cos = (lf * li).sum(1) / (np.linalg.norm(lf, axis=1) * np.linalg.norm(li, axis=1) + 1e-30)
    return {"positions": len(ids), "top1_agreement": float((lf.argmax(1) == li.argmax(1)).mean()),
            "mean_logit_cosine": float(cos.mean()), "min_logit_cosine": float(cos.min())}
