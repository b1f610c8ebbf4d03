"""The training recipe: a few steps on a tiny corpus, and the int8-representable embeddings."""

import numpy as np
import torch

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.reference.export import integer_weights
from mmfree_fpga.reference.integer import embed
from mmfree_fpga.reference.train import int8_embeddings, train


def test_trained_model_has_int8_representable_embeddings():
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, intermediate_size=256)
    g = np.random.default_rng(0)
    corpus = (g.integers(0, 256, 8192).astype(np.uint8), g.integers(0, 256, 4096).astype(np.uint8))
    model, report = train(cfg, steps=2, batch=2, seq=32, corpus=corpus, log=lambda *_: None)
    emb = model.model.embeddings.weight.detach()
    assert report["int8_embeddings_frac"] == FORMATS.x_frac
    assert torch.equal(int8_embeddings(emb, FORMATS.x_frac), emb)
    w = integer_weights(cfg, model.state_dict())
    want = emb.double().numpy() * (1 << FORMATS.x_frac)
    assert (np.stack([embed(w, v) for v in range(cfg.V)]) == want).all()
    assert (np.abs(w.emb_q).max(axis=1) == 127).all()


def test_int8_embeddings_snaps_rows():
    e = torch.tensor([[0.1, -0.37, 0.0021], [0.0, 0.0, 0.0], [1e-3, 2e-3, -5e-4]])
    s = int8_embeddings(e, 16).double()
    for row, orig in zip(s, e.double()):
        if not orig.any():
            assert not row.any()
            continue
        step = row.abs().max() / 127
        k = step * 2 ** 16
        assert k == torch.round(k) and torch.equal(row / step, torch.round(row / step))
        # q rounding plus the row scale rounded to a multiple of 2^-16
        assert (row - orig).abs().max() <= step / 2 + 127 * 2.0 ** -17 + 1e-12
