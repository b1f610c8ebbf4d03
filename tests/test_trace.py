"""The engine's trace port: what its writer stores, captured in simulation, equals the integer
model's vectors exactly (Amaranth's simulator and Verilator's C++ harness here; the demo model on
Verilator in test_compare.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.reference.integer import parse_image
from mmfree_fpga.reference.checkpoint import save_checkpoint
from mmfree_fpga.reference.compare import HARDWARE_VECTORS, integer_trace
from mmfree_fpga.sim.trace import hardware_trace
from mmfree_fpga.sim.engine_sim import decode_trace, load_image, run_amaranth, run_engine
from mmfree_fpga.sim.runner import simulator_missing

from conftest import random_model

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


def _equal(hw, itg):
    for t, (h, i) in enumerate(zip(hw, itg)):
        for l in range(len(i["layers"])):
            for v in HARDWARE_VECTORS:
                np.testing.assert_array_equal(h["layers"][l][v], i["layers"][l][v], err_msg=f"token {t} L{l} {v}")
        np.testing.assert_array_equal(h["logits"], i["logits"], err_msg=f"token {t} logits")


def test_trace_amaranth_equals_integer_model(tmp_path):
    ck = save_checkpoint(random_model(TINY, seed=5), tmp_path / "ckpt")
    cfg, blob = load_image(ck, "2bit")
    ids = [3, 60]
    run = run_amaranth(cfg=cfg, blob=blob, packing="2bit", lanes=16, prompt=ids, steps=1, trace=True)
    per_step = cfg.L * (5 * cfg.d + 2 * cfg.I) + cfg.V      # every row of every job: 5 d-row jobs, 2I, V
    assert [len(s) for s in run.trace] == [per_step] * len(ids)
    itg = integer_trace(parse_image(blob, cfg, "2bit"), ids)
    hw = hardware_trace(run.trace, cfg)
    _equal(hw, itg)
    assert run.sim_cycles >= sum(run.cycles)


def test_trace_verilator_harness_equals_integer_model(tmp_path):
    """The C++ harness captures the trace port too, with stalls on the memory and between commands
    (the build is the demo's default one, shared with test_engine.py)."""
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    ck = save_checkpoint(random_model(TINY, seed=6), tmp_path / "ckpt")
    cfg, blob = load_image(ck, "base3")
    ids = [7, 0, 41]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=ids, steps=1, simulator="verilator",
                     stall_rate=0.3, cmd_stall_rate=0.3, mem_latency=7, trace=True)
    per_step = cfg.L * (5 * cfg.d + 2 * cfg.I) + cfg.V
    assert [len(s) for s in run.trace] == [per_step] * len(ids)
    _equal(hardware_trace(run.trace, cfg), integer_trace(parse_image(blob, cfg, "base3"), ids))


def test_hardware_trace_marks_missing_and_repeated_rows():
    cfg = TINY
    rng = np.random.default_rng(0)
    beats = []
    for l in range(cfg.L):
        for jt, rows in enumerate((cfg.d, cfg.d, cfg.d, cfg.d, 2 * cfg.I, cfg.d)):
            beats += [(jt, l, r, int(rng.integers(-1000, 1000))) for r in range(rows)]
    beats += [(6, 0, r, r) for r in range(cfg.V)]
    hw = hardware_trace([beats], cfg)[0]
    layer_beats = 5 * cfg.d + 2 * cfg.I
    assert hw["layers"][1]["down_in"][5] == beats[layer_beats + 4 * cfg.d + cfg.I + 5][3]   # gate_proj row I+5
    dropped = [b for b in beats if b[:3] != (1, 0, 7)]                 # i_proj job of layer 0, row 7: h[7]
    repeated = beats + [(4, 1, 3, 0)]                                 # gate_proj layer 1, row 3 stored twice
    h2 = hardware_trace([dropped], cfg)[0]
    h3 = hardware_trace([repeated], cfg)[0]
    assert hw["unexpected"] == h2["unexpected"] == h3["unexpected"] == 0
    assert hardware_trace([beats + [(0, 0, cfg.d, 1), (1, cfg.L, 0, 1), (7, 0, 0, 1)]], cfg)[0]["unexpected"] == 3
    assert h2["layers"][0]["h"][7] != hw["layers"][0]["h"][7] and (h2["layers"][0]["h"][:7] == hw["layers"][0]["h"][:7]).all()
    assert h3["layers"][1]["gate"][3] != hw["layers"][1]["gate"][3]
    assert not -(1 << 31) <= int(h3["layers"][1]["gate"][3]) < (1 << 31)


def test_decode_trace_fields():
    from mmfree_fpga.hw.engine import trace_layout
    layout = trace_layout(128, 256, 2, 256)
    w = {n: layout[n].shape.width for n in ("job", "layer", "row", "value")}
    word = 4 | (1 << w["job"]) | (300 << (w["job"] + w["layer"])) | \
        (((-5) & 0xFFFFFFFF) << (w["job"] + w["layer"] + w["row"]))
    assert decode_trace([word], layout) == [(4, 1, 300, -5)]
