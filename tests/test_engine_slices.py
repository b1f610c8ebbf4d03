"""The engine's layer slices and state slots (protocol 1.2's slice ops, EngineCore(slots=...)):
a chain of engines, each holding a slice image, equals the integer model token by token, with
two sequences interleaved on two slots; a slotted engine still runs whole models by FEED_TOKEN."""

from __future__ import annotations

import pytest

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.host.device_model import parse_slice
from mmfree_fpga.hw.engine import EngineCore, Param, beat_bytes, engine_params
from mmfree_fpga.image_slice import Slice, cut_image, slice_layout, whole_slice
from mmfree_fpga.reference.checkpoint import save_checkpoint
from mmfree_fpga.reference.integer import IntegerModel, parse_image, wire_logits
from mmfree_fpga.sim.engine_sim import load_image, reference_tokens, run_amaranth, run_amaranth_slices

from conftest import random_model

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, intermediate_size=64)
LANES = 16
PACKING = "2bit"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    ck = save_checkpoint(random_model(CFG, seed=5), tmp_path_factory.mktemp("slices") / "ckpt")
    return load_image(ck, PACKING)


def test_slice_params_follow_the_slice_layout():
    whole = engine_params(CFG, PACKING, LANES)
    assert engine_params(CFG, PACKING, LANES, sl=whole_slice(CFG)) == {**whole, Param.EMBEDDING: 1, Param.HEAD: 1}
    sl = Slice(1, 3, False, True)
    p = engine_params(CFG, PACKING, LANES, sl=sl)
    layout = {s.name: s.offset for s in slice_layout(CFG, PACKING, sl)}
    wb = beat_bytes(LANES)
    assert (p[Param.L], p[Param.EMBEDDING], p[Param.HEAD]) == (2, 0, 1)
    assert p[Param.JOB_STRIDE * 6 + Param.TRITS_OFF] * wb == layout["lm_head.trits"]
    assert p[Param.LB_OFF] * wb == layout["layers.1.lower_bound"]
    assert (p[Param.LB_OFF] + p[Param.LB_STRIDE]) * wb == layout["layers.2.lower_bound"]
    assert p[Param.JOB_STRIDE * 5 + Param.K_OFF] * wb == layout["layers.1.down_proj.k"]
    p = engine_params(CFG, PACKING, LANES, sl=Slice(3, 3, False, True))     # the head alone
    assert (p[Param.L], p[Param.EMBEDDING], p[Param.HEAD], p[Param.LB_OFF]) == (0, 0, 1, 0)
    assert p[Param.JOB_STRIDE * 6 + Param.TRITS_OFF] == 0 == p[Param.JOB_STRIDE * 0 + Param.TRITS_OFF]
    with pytest.raises(DesignError):
        EngineCore(CFG, lanes=LANES, compact=True, slots=2)


def test_engine_slice_chain_two_slots_equals_integer_model(image):
    """Three engines (embedding + layer 0, layer 1, layer 2 + head), two sequences on slots 0
    and 1 interleaved, slot 1 reset and restarted midway: every residual handed on equals the
    device model's slices, every logit the integer model's of its own sequence."""
    cfg, blob = image
    slices = [Slice(0, 1, True, False), Slice(1, 2, False, False), Slice(2, 3, False, True)]
    feeds = [("feed", 0, 3), ("feed", 1, 9), ("feed", 0, 17), ("reset", 1), ("feed", 1, 9), ("feed", 1, 40),
             ("feed", 0, 5)]
    out = run_amaranth_slices(cfg=cfg, blob=blob, packing=PACKING, lanes=LANES, slices=slices, feeds=feeds)
    models = [parse_slice(cut_image(blob, cfg, PACKING, sl), cfg, PACKING, sl, slots=2) for sl in slices]
    whole = {s: IntegerModel(parse_image(blob, cfg, PACKING)) for s in (0, 1)}
    ran = [f for f in feeds if f[0] == "feed"]
    assert len(out) == len(ran)
    k = 0
    for feed in feeds:
        if feed[0] == "reset":
            for mdl in models:
                mdl.reset(feed[1])
            whole[feed[1]].reset()
            continue
        _, slot, token = feed
        steps, k = out[k], k + 1
        x = None
        for sl, mdl, st in zip(slices, models, steps):
            y = mdl.run(slot, token=token) if sl.embedding else mdl.run(slot, x=x)
            assert st.output == [int(v) for v in (wire_logits(y) if sl.head else y)], (feed, sl.text())
            assert st.cycles > 0
            x = y
        logits = whole[slot].step(token)
        best = IntegerModel.argmax(logits)
        assert steps[-1].token == best
        assert steps[-1].logit == int(wire_logits(logits[best:best + 1])[0])
        assert steps[-1].output == [int(v) for v in wire_logits(logits)]
    # slot 1 restarted from token 9 after its reset: the same outputs as its first step
    assert [s.output for s in out[3]] == [s.output for s in out[1]]


def test_engine_slices_of_no_layers(image):
    """The embedding alone (the residual out is the embedding) and the head alone (lm_head on the
    residual in), around all three layers: the integer model's logits, two slots."""
    cfg, blob = image
    slices = [Slice(0, 0, True, False), Slice(0, 3, False, False), Slice(3, 3, False, True)]
    feeds = [("feed", 0, 3), ("feed", 1, 40), ("feed", 0, 17)]
    out = run_amaranth_slices(cfg=cfg, blob=blob, packing=PACKING, lanes=LANES, slices=slices, feeds=feeds)
    whole = {s: IntegerModel(parse_image(blob, cfg, PACKING)) for s in (0, 1)}
    emb = parse_slice(cut_image(blob, cfg, PACKING, slices[0]), cfg, PACKING, slices[0], slots=2)
    for (_, slot, token), steps in zip(feeds, out):
        assert steps[0].output == [int(v) for v in emb.run(slot, token=token)]
        logits = whole[slot].step(token)
        assert steps[-1].output == [int(v) for v in wire_logits(logits)]
        assert steps[-1].token == IntegerModel.argmax(logits)


def test_slotted_engine_feeds_whole_model_tokens(image):
    """FEED_TOKEN (slot 0, the whole model) on an engine built with slots: unchanged results."""
    cfg, blob = image
    prompt, steps = [3, 60, 7], 2
    run = run_amaranth(cfg=cfg, blob=blob, packing=PACKING, lanes=LANES, prompt=prompt, steps=steps,
                       read_logits=(0, 37), slots=2)
    tokens, logits = reference_tokens(cfg, blob, PACKING, prompt, steps)
    assert run.tokens == tokens
    assert run.argmax_logits == [int(lg.max()) for lg in logits]
    for t, got in run.read_logits.items():
        assert got == {i: int(logits[t][i]) for i in got}
