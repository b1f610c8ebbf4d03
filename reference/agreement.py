"""How closely the integer model (the hardware's arithmetic) follows the float reference."""

from __future__ import annotations

import numpy as np
import torch

from .integer import IntegerModel, IntegerWeights
from .model import HGRNBitForCausalLM

__all__ = ["agreement", "held_out_ids", "logit_agreement", "three_way", "THREE_WAY"]

# the comparisons of three_way(), in report order: (key, model, reference)
THREE_WAY = (("integer_vs_float64", "integer", "float64"), ("float32_vs_float64", "float32", "float64"),
             ("integer_vs_float32", "integer", "float32"))


def held_out_ids(n: int, offset: int = 100_000) -> list[int]:
    """n consecutive bytes of the demo corpus's held-out files."""
    from .train import stdlib_corpus
    _, held = stdlib_corpus()
    return held[offset:offset + n].tolist()


def logit_agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Two models' logits over the same positions ([positions, V] each): ``top1_agreement`` (the
    fraction of positions whose argmax, first index of the largest, is the same), and the
    ``mean_logit_cosine`` / ``min_logit_cosine`` of the rows."""
    a, b = np.asarray(logits, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"logit_agreement needs two [positions, V] arrays of one shape, got {a.shape} and {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {"positions": int(a.shape[0]), "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "mean_logit_cosine": float(cos.mean()), "min_logit_cosine": float(cos.min())}


def three_way(integer: np.ndarray, float32: np.ndarray, float64: np.ndarray) -> dict:
    """The fidelity figures (:func:`logit_agreement`) of the integer model (logits as floats) and the
    float32 model against the float64 model, and of the integer model against float32, keyed as
    :data:`THREE_WAY` (``integer_vs_float64``, ``float32_vs_float64``, ``integer_vs_float32``)."""
    models = {"integer": integer, "float32": float32, "float64": float64}
    return {key: logit_agreement(models[a], models[b]) for key, a, b in THREE_WAY}


def agreement(model: HGRNBitForCausalLM, weights: IntegerWeights, ids: list[int]) -> dict:
    """Feed ids to both models; top-1 agreement of next-token predictions and logit cosines."""
    imodel = IntegerModel(weights)
    with torch.no_grad():
        lf = model(torch.tensor([ids]))[0][0].double().numpy()
    li = np.stack([imodel.logits_to_float(imodel.step(t)) for t in ids])
    return logit_agreement(li, lf)
