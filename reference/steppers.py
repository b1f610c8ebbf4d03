"""One-token steppers of the two reference models: ``step(token) -> float64 logits``.

:func:`mmfree_fpga.generation.generate` drives either; ``mmfree-fpga reference`` prints what they
produce, and the demo, the tests and the host-side checks compare hardware tokens with them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig

from .checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model

__all__ = ["float_stepper", "integer_stepper"]

Stepper = Callable[[int], np.ndarray]


def float_stepper(checkpoint=None) -> tuple[ModelConfig, Stepper]:
    """The float PyTorch reference (``checkpoint``, default the demo model) with its state."""
    import torch
    model = load_model(checkpoint or DEMO_CHECKPOINT)
    state = model.init_state()

    def step(tok: int) -> np.ndarray:
        nonlocal state
        with torch.no_grad():
            logits, state = model.step(tok, state)
        return logits.numpy().astype("float64")

    return model.config, step


def integer_stepper(checkpoint=None, fmt: Formats = FORMATS) -> tuple[ModelConfig, Stepper]:
    """The integer model of the hardware in the number formats ``fmt`` (``reference --integer``),
    logits as floats (the full-width logits / 2^x_frac)."""
    from .export import integer_weights
    from .integer import IntegerModel
    cfg, tensors = load_checkpoint(checkpoint or DEMO_CHECKPOINT)
    model = IntegerModel(integer_weights(cfg, tensors, fmt))
    return cfg, lambda tok: model.logits_to_float(model.step(tok))
