"""The multi-board planner against splits worked out by hand, its refusals, and ``mmfree-fpga plan``."""

from __future__ import annotations

import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import PERF_MODEL, PUBLISHED, ModelConfig
from mmfree_fpga.image import image_size
from mmfree_fpga.planner import DeviceSpec, layer_bytes, plan, plan_section

# 2bit, d=32, I=64, L=4, V=64. Per layer, stored (with the padding after each section):
#   i/f/g/o_proj: trits 32*32/4 = 256, a 64, c 64, k 8 (+8 padding)      = 4 x 400 = 1600
#   gate_proj (128 x 32): trits 1024, a 64, c 64, k 8+8                  = 1168
#   down_proj (32 x 64): trits 512, a 128, c 128, k 8+8                  = 784
#   lower_bound: 2 * 32                                                  = 64   -> 3616 per layer
# lm_head (64 x 32): trits 512, a 64, c 64, k 8+8 = 656; embedding: q 64*32 + scale 4*64 = 2304.
# Read per token: the same without padding (3568 per layer, 648 lm_head), one embedding row d + 4 = 36.
# Compute cycles at 16 lanes (PERF_MODEL: 2 passes, job latency 104): a layer
#   32 * (4*32 + 3*64) / 16 + 2 * (3*32 + 64) + 4*104 = 640 + 320 + 416 = 1376; lm_head 64*32/16 + 2*32 + 104 = 296.
SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, intermediate_size=64)
LAYER, LM_HEAD, EMBEDDING = 3616, 656, 2304
LAYER_CYCLES, LM_HEAD_CYCLES = 1376, 296


def _device(weight_bytes=10 ** 9, peak=None, clock_hz=1e6):
    return DeviceSpec(board="test", memory="dram" if peak else "bram", weight_bytes=weight_bytes,
                      state_bytes=10 ** 9, shared=False, clock_hz=clock_hz, peak_bytes_per_cycle=peak,
                      memory_text="test memory", capacity_text="test memory")


def _check_sums(p):
    """Slices add up to the image, their compute cycles to the whole model's, their reads to its bytes per token."""
    assert sum(s.bytes for s in p.stages) == image_size(p.cfg, p.packing) == p.image_bytes
    assert sum(s.compute_cycles for s in p.stages) == pytest.approx(PERF_MODEL.cycles_per_token(p.cfg, p.lanes))
    assert sum(s.read_bytes for s in p.stages) == PERF_MODEL.bytes_per_token(p.cfg, p.packing)
    assert sum(s.layers for s in p.stages) == p.cfg.L
    assert [s.first_layer for s in p.stages] == [sum(t.layers for t in p.stages[:i]) for i in range(p.devices)]
    assert p.stages[0].embedding and p.stages[-1].lm_head
    assert not any(s.embedding for s in p.stages[1:]) and not any(s.lm_head for s in p.stages[:-1])


def test_layer_bytes_by_hand():
    parts = layer_bytes(SMALL, "2bit")
    assert parts == {**{i: (LAYER, 3568) for i in range(4)}, "lm_head": (LM_HEAD, 648), "embedding": (EMBEDDING, 36)}
    assert image_size(SMALL, "2bit") == 4 * LAYER + LM_HEAD + EMBEDDING == 17424


def test_capacity_forces_three_devices():
    """8,000 B each: device 0 takes the embedding and at most one layer (5,920 B; two: 9,536), the last
    lm_head and at most two (7,888), a middle one two (7,232): two devices hold 3 of the 4 layers at
    most, so three. Of the splits (1, 2, 1), (0, 2, 2), (1, 1, 2), the first has the fastest slowest
    stage: 2 x 1376 cycles (the others' last stage: 2 x 1376 + 296)."""
    p = plan(SMALL, "2bit", _device(8000), lanes=16)
    assert p.devices == 3
    assert [s.layers for s in p.stages] == [1, 2, 1]
    assert [s.bytes for s in p.stages] == [EMBEDDING + LAYER, 2 * LAYER, LAYER + LM_HEAD]
    assert [s.cycles for s in p.stages] == [LAYER_CYCLES, 2 * LAYER_CYCLES, LAYER_CYCLES + LM_HEAD_CYCLES]
    assert all(s.bound == "compute" for s in p.stages)
    _check_sums(p)
    assert p.tokens_per_s_in_flight == pytest.approx(1e6 / (2 * LAYER_CYCLES))
    # four devices: one layer each, the last (with lm_head) the slowest at 1,672 cycles
    four = plan(SMALL, "2bit", _device(8000), 4, lanes=16)
    assert [s.layers for s in four.stages] == [1, 1, 1, 1]
    assert max(s.cycles for s in four.stages) == LAYER_CYCLES + LM_HEAD_CYCLES
    _check_sums(four)


def test_memory_bound_stages_and_the_link():
    """Peak 1 B/cycle at efficiency 0.5: a stage takes 2 cycles per byte read, more than its compute.
    Two devices: stage 0 = 2 (36 + 3568 a), stage 1 = 2 (3568 (4 - a) + 648); a = 2 gives 14,344 and
    15,568 cycles, the best slowest stage (a = 1: 22,704; a = 3: 21,480). At 1 MHz and 1 Mbaud a
    residual (32 x 4 B, 10 bits a byte) takes 1.28 ms, a hop relayed by the host twice that."""
    p = plan(SMALL, "2bit", _device(peak=1.0), 2, lanes=16, baud=1_000_000, dram_efficiency=0.5)
    assert [s.layers for s in p.stages] == [2, 2]
    assert [s.cycles for s in p.stages] == [14344, 15568]
    assert all(s.bound == "memory bandwidth" for s in p.stages)
    _check_sums(p)
    assert p.transfer_s == pytest.approx(1.28e-3) and p.hop_s == pytest.approx(2.56e-3)
    assert p.tokens_per_s_sequence == pytest.approx(1 / (14.344e-3 + 15.568e-3 + 2.56e-3))
    assert p.tokens_per_s_in_flight == pytest.approx(1 / 15.568e-3)
    assert p.bottleneck[0] == "device 1 (memory bandwidth)"
    # a slow link: the residual's 128 ms per token sets the pipeline's rate
    slow = plan(SMALL, "2bit", _device(peak=1.0), 2, lanes=16, baud=10_000, dram_efficiency=0.5)
    assert slow.bottleneck[0] == "the serial links" and slow.tokens_per_s_in_flight == pytest.approx(1 / 0.128)


@pytest.mark.parametrize("weight_bytes,devices,message", [
    (8000, 2, "does not fit 2 x test, test memory each; the fewest that fit are 3"),
    (3000, None, "one layer alone is 3,616 B"),
    (2000, None, "the embedding table alone is 2,304 B"),
])
def test_no_split_fits(weight_bytes, devices, message):
    with pytest.raises(ValueError, match=message):
        plan(SMALL, "2bit", _device(weight_bytes), devices, lanes=16)


def test_the_370m_over_ulx3s_and_ecpix5():
    """ULX3S, 32 MiB of SDRAM: the embedding table (32,896,000 B) and one layer (2,602,960 B base3)
    exceed it, so device 0 holds the table alone; 24 layers and lm_head over the rest need three
    more (two hold 25.6 M of the 64.0 M + 6.6 M); memory bound, so the split balances bytes: 9 / 9 /
    6 + lm_head (8 / 8 / 8 + lm_head would make the last the slowest). The ECPIX-5's 512 MiB
    holds it on one board."""
    cfg = PUBLISHED["370M"]
    p = plan(cfg, "base3", "ulx3s-85f", lanes=64)
    assert p.devices == 4 and p.device.weight_bytes == 32 * 2 ** 20
    assert [s.layers for s in p.stages] == [0, 9, 9, 6]
    assert p.stages[0].bytes == 32_896_000 and layer_bytes(cfg, "base3")[0][0] == 2_602_960
    assert all(s.bytes <= 32 * 2 ** 20 for s in p.stages)
    _check_sums(p)
    with pytest.raises(ValueError, match="the fewest that fit are 4"):
        plan(cfg, "base3", "ulx3s-85f", 3, lanes=64)
    one = plan(cfg, "base3", "ecpix5-85f", lanes=64)
    assert one.devices == 1 and one.device.weight_bytes == 512 * 2 ** 20
    three = plan(cfg, "base3", "ecpix5-85f", 3, lanes=64)
    _check_sums(three)
    assert three.tokens_per_s_in_flight > 2.5 * one.tokens_per_s_in_flight


def test_plan_section_rows():
    s = plan_section(True)
    boards = [row[0] for row in s.rows]
    assert boards == ["ulx3s-85f"] * 2 + ["ecpix5-85f"] * 4       # N = 4, 5 and 1 to 4
    assert [row[2] for row in s.rows] == [4, 5, 1, 2, 3, 4]
    assert all(row[7] >= row[6] for row in s.rows)                  # in flight never slower than one sequence


def test_plan_command(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "370M", "--lanes", "64", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 x ulx3s-85f" in text and "layers 18-23, norm + lm_head" in text
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and [s["layers"] for s in r["stages"]] == [0, 9, 9, 6]
    assert sum(s["bytes"] for s in r["stages"]) == r["image_bytes"]
    assert main(["plan", "--model", "370M", "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit 2 x ulx3s-85f" in err[0] and "the fewest that fit are 4" in err[0]
    assert main(["plan", "--board", "icebreaker"]) == 2
    assert "unknown board 'icebreaker' for the planner" in capsys.readouterr().err
