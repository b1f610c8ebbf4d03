"""The engine against the integer model: same greedy tokens, same Q16 logits, bit for bit.

CI runs short prompts on small geometries (one Verilator build and one Icarus build shared by
every geometry, set at run time); ``-m slow`` runs the full criterion (16-token prompt, 32
generated tokens, demo + two other geometries, both simulators).
"""

from __future__ import annotations

import numpy as np
import pytest

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.image import image_layout
from mmfree_fpga.hw.engine import JOBS, EngineCore, Param, engine_params
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, save_checkpoint
from mmfree_fpga.sim.engine_sim import EngineBuild, default_build, load_image, reference_tokens, run_amaranth, run_engine
from mmfree_fpga.sim.runner import simulator_missing

from conftest import random_model

# Geometries besides the demo (d=128, L=2, I=256, V=256); d and I multiples of 16 lanes.
GEOMETRIES = {
    "d64_L2_I128_V200": ModelConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, intermediate_size=128),
    "d48_L1_I96_V100": ModelConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, intermediate_size=96),
}
TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
LANES = 16
# One build for the demo and every geometry above: they differ only in run-time parameters.
SHARED_BUILD = default_build(ModelConfig.from_checkpoint(DEMO_CHECKPOINT), LANES)
READ_BACK = (0, 1, 37)
DEMO_RATIO_BOUND = 1.25


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> (cfg, {packing: image bytes})."""
    out = {}
    for name, cfg in list(GEOMETRIES.items()) + [("tiny", TINY)]:
        ck = save_checkpoint(random_model(cfg, seed=len(name)), tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = ck
    out["demo"] = DEMO_CHECKPOINT
    return out


def _check(cfg, blob, packing, prompt, steps, run):
    tokens, logits = reference_tokens(cfg, blob, packing, prompt, steps)
    assert run.tokens == tokens
    assert run.argmax_logits == [int(lg.max()) for lg in logits]
    for t, got in run.read_logits.items():
        assert got == {i: int(logits[t][i]) for i in got}, f"read-back logits of step {t}"
    assert len(run.cycles) == len(prompt) + steps - 1


def _skip_if_missing(simulator):
    reason = simulator_missing(simulator)
    if reason:
        pytest.skip(reason)


def test_params_follow_the_image_layout():
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    p = engine_params(cfg, "base3", 16)
    assert (p[Param.D], p[Param.I], p[Param.V], p[Param.L]) == (cfg.d, cfg.I, cfg.V, cfg.L)
    layout = {s.name: s for s in image_layout(cfg, "base3")}
    wb = 4
    assert p[Param.JOB_STRIDE * JOBS.index("down_proj") + Param.TRITS_OFF] * wb == layout["layers.0.down_proj.trits"].offset
    assert p[Param.JOB_STRIDE * JOBS.index("lm_head") + Param.K_OFF] * wb == layout["lm_head.k"].offset
    assert (p[Param.JOB_STRIDE * JOBS.index("f_proj") + Param.A_OFF] + p[Param.LAYER_STRIDE]) * wb \
        == layout["layers.1.f_proj.a"].offset
    with pytest.raises(DesignError):
        EngineCore(cfg, lanes=16, max_d=64)
    with pytest.raises(DesignError):
        engine_params(ModelConfig(vocab_size=10, hidden_size=40, num_hidden_layers=1, intermediate_size=64), "base3", 16)


@pytest.mark.parametrize("compact,lanes", [(False, LANES), (False, 8), (True, LANES), (True, 8)],
                         ids=["full", "full-8lanes", "compact", "compact-8lanes"])
def test_engine_amaranth_tiny_with_load_stream(images, compact, lanes):
    """Amaranth's simulator; the weights arrive through the load stream (RAM without init).
    ``compact``: the iCE40 variant (shared multipliers, the embedding through the output scale);
    8 lanes: 2-byte weight beats (the embedding scale and k take several beats)."""
    cfg, blob = load_image(images["tiny"], "2bit")
    prompt, steps = [3, 60, 7], 2
    run = run_amaranth(cfg=cfg, blob=blob, packing="2bit", lanes=lanes, prompt=prompt, steps=steps,
                       read_logits=READ_BACK, load_stream=True, compact=compact)
    _check(cfg, blob, "2bit", prompt, steps, run)


@pytest.mark.parametrize("name,packing,stall", [
    ("demo", "base3", 0.0),
    ("d64_L2_I128_V200", "2bit", 0.3),
    ("d48_L1_I96_V100", "base3", 0.3),
])
def test_engine_verilator_short(images, name, packing, stall):
    _skip_if_missing("verilator")
    cfg, blob = load_image(images[name], packing)
    prompt = [int(v) for v in np.random.default_rng(7).integers(0, cfg.V, 4)]
    run = run_engine(cfg=cfg, blob=blob, packing=packing, lanes=LANES, prompt=prompt, steps=4,
                     simulator="verilator", build=SHARED_BUILD, stall_rate=stall, cmd_stall_rate=stall,
                     mem_latency=1 if stall == 0 else 9, read_logits=READ_BACK)
    _check(cfg, blob, packing, prompt, 4, run)


def test_engine_verilator_stalls_change_timing_only(images):
    """The C++ harness's idle cycles between commands (seeded) and the memory model's stalls: the
    same tokens; command stalls leave the engine's own cycle counts alone and lengthen the run,
    reproducibly for one seed; memory stalls lengthen every token."""
    _skip_if_missing("verilator")
    cfg, blob = load_image(images["demo"], "base3")

    def run(**kw):
        return run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=[100, 101], steps=2,
                          simulator="verilator", build=SHARED_BUILD, **kw)
    plain, idle, idle_again, slow = run(), run(cmd_stall_rate=0.5, seed=3), run(cmd_stall_rate=0.5, seed=3), \
        run(stall_rate=0.2)
    assert plain.tokens == idle.tokens == slow.tokens == reference_tokens(cfg, blob, "base3", [100, 101], 2)[0]
    assert idle.cycles == plain.cycles and idle.sim_cycles > plain.sim_cycles
    assert (idle_again.cycles, idle_again.sim_cycles) == (idle.cycles, idle.sim_cycles)
    assert all(s > p for s, p in zip(slow.cycles, plain.cycles))


@pytest.mark.slow
def test_engine_verilator_cocotb_short(images):
    """The cocotb testbench on Verilator (``cocotb=True``; the C++ harness is the default)."""
    _skip_if_missing("verilator")
    cfg, blob = load_image(images["d48_L1_I96_V100"], "base3")
    prompt = [5, 9, 63, 0]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=prompt, steps=2, simulator="verilator",
                     build=SHARED_BUILD, stall_rate=0.3, cmd_stall_rate=0.3, mem_latency=5, read_logits=READ_BACK,
                     cocotb=True)
    _check(cfg, blob, "base3", prompt, 2, run)


def test_engine_icarus_short(images):
    _skip_if_missing("icarus")
    cfg, blob = load_image(images["tiny"], "base3")
    build = EngineBuild(lanes=LANES, max_d=32, max_I=64, max_L=2, max_V=64, mem_words=4096)
    prompt = [5, 9, 63, 0]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=prompt, steps=4,
                     simulator="icarus", build=build, stall_rate=0.3, cmd_stall_rate=0.3, mem_latency=5,
                     read_logits=READ_BACK)
    _check(cfg, blob, "base3", prompt, 4, run)


def test_engine_demo_cycles_within_bound():
    """Cycles per token of the demo at 16 lanes: at most 1.25x the ideal (ternary weights / lanes)."""
    _skip_if_missing("verilator")
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3")
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=[100, 101], steps=1,
                     simulator="verilator", build=SHARED_BUILD)
    ideal = cfg.ideal_cycles(LANES)
    assert max(run.cycles) <= DEMO_RATIO_BOUND * ideal, (run.cycles, ideal)
    assert min(run.cycles) >= ideal


@pytest.mark.slow
@pytest.mark.parametrize("simulator", ["verilator", "icarus"])
@pytest.mark.parametrize("name,packing", [("demo", "base3"), ("d64_L2_I128_V200", "2bit"),
                                          ("d48_L1_I96_V100", "base3")])
def test_engine_full(images, simulator, name, packing):
    """The full criterion: 16-token prompt, 32 generated tokens, with stalls."""
    _skip_if_missing(simulator)
    cfg, blob = load_image(images[name], packing)
    prompt = [int(v) for v in np.random.default_rng(11).integers(0, cfg.V, 16)]
    run = run_engine(cfg=cfg, blob=blob, packing=packing, lanes=LANES, prompt=prompt, steps=32,
                     simulator=simulator, build=SHARED_BUILD, stall_rate=0.1, cmd_stall_rate=0.2,
                     mem_latency=4, read_logits=READ_BACK)
    _check(cfg, blob, packing, prompt, 32, run)


def test_board_engine_design_factory():
    """The design factory for boards: on an iCE40 the tiny engine with its weights in SPRAM and the
    Link's small form, elsewhere the full engine."""
    from mmfree_fpga.boards.top import DesignContext, check_design
    from mmfree_fpga.boards.designs import linked_engine
    from mmfree_fpga.hw.tiny_engine import TinyEngine
    for family in ("ice40", "ecp5"):
        ctx = DesignContext(board="b", device="d", family=family, clock_hz=24e6, baud=3_000_000,
                            checkpoint=DEMO_CHECKPOINT, image=None, resources=None, budget=None)
        design = linked_engine()(ctx)
        check_design(design)
        if family == "ice40":
            assert isinstance(design.engine, TinyEngine) and design.engine.spram and design.link.small
            assert design.link.lanes == 1
        else:
            assert not design.engine.core.compact and design.engine.core.lanes == 16 and not design.link.small