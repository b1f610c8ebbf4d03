"""The engine with its weights in DRAM (hw/dram_engine.py), against the integer model.

* The loader in Amaranth's simulator, against a behavioural LiteDRAM native port (commands held
  until a random ``ready``, closed until ``init_done``; one port's commands served in order, as a
  LiteDRAM bank machine serves them; write data sampled some cycles after its command with
  ``wdata_valid`` required high): the load stream with random gaps reaches DRAM byte for byte,
  a partial last beat included, and commands wait for ``init_done`` and the loader.
* Co-simulation in Verilator (the engine's C++ harness, ``run_engine(memory="sdram")``): the
  engine with a LiteDRAM core generated for the ULX3S's SDRAM in its ``sim`` variant (LiteDRAM's
  controller and SDRAM model), and with the ECPIX-5's DDR3 (``memory="ddr3"``: the ECP5DDRPHY's
  settings; its 8 bytes/cycle outpace the 16 lanes' 4, so its efficiency is over the cycles the
  engine waited for weights); the image goes in through ``load`` after the init sequence, then
  the tokens, with random idle cycles before every command and load byte. Tokens, argmax logits
  and read-back logits equal ``reference --integer``; the weight stream keeps the native port
  busy (``dram_efficiency``). The demo in the default suite, a random 1.3 MB model (larger than
  the ULX3S's block RAM) as ``slow``; both share one simulator build (``DRAM_BUILD_FLOOR``).
* The wide number formats (issue 21) from DRAM: the demo's wide image (int32 norms, lower bounds
  and embedding mantissas) loaded into the simulated SDRAM, every logit of every step read back
  and equal to ``reference --integer --formats wide`` (its own simulator build, shared with
  ``sim --memory sdram --formats wide``); the DDR3 the same way as ``slow``.
"""

from __future__ import annotations

import json
import random
from collections import deque

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree_fpga.cli import main
from mmfree_fpga.config import FORMAT_SETS, PERF_MODEL, ModelConfig
from mmfree_fpga.hw.control import EngineOp
from mmfree_fpga.hw.dram_engine import DramEngine
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, save_checkpoint
from mmfree_fpga.sim.engine_sim import DRAM_BUILD_FLOOR, default_build, load_image, run_engine

from conftest import random_model
from test_engine import _check as check_tokens
from test_engine_formats import _check as check_tokens_in

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
READ_BACK = (0, 1, 37)
EFFICIENCY_BOUND = 0.90         # issue 20: sequential weight streaming from DRAM


def _needs_dram_cosim():
    from mmfree_fpga.boards.litedram import litedram_available
    from mmfree_fpga.sim.runner import simulator_missing
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    if not litedram_available():
        pytest.skip("LiteDRAM is not installed")


# -- the loader, in Amaranth's simulator ----------------------------------------------------------

def _native_in_order(dut, mem: dict, nbytes: int, rng: random.Random, state: dict):
    """A LiteDRAM native port serving commands in order; ``mem``: word address -> word."""
    n = dut.native

    async def model(ctx):
        queue = deque()             # (we, addr, cycle it may be served)
        cycle = 0
        while True:
            ready = state["init_done"] and rng.random() < 0.6
            ctx.set(n.cmd_ready, ready)
            wready = False
            if queue and queue[0][2] <= cycle and rng.random() < 0.7:
                we, addr, _ = queue[0]
                assert we, "the loader test issues no reads"
                wready = True
                assert ctx.get(n.wdata_valid), "write data not valid when the controller takes it"
                word, enables = ctx.get(n.wdata_data), ctx.get(n.wdata_we)
                old = mem.get(addr, 0)
                for k in range(nbytes):
                    if enables >> k & 1:
                        old = (old & ~(0xFF << 8 * k)) | (word & (0xFF << 8 * k))
                mem[addr] = old
                queue.popleft()
            ctx.set(n.wdata_ready, wready)
            if ready and ctx.get(n.cmd_valid):
                queue.append((ctx.get(n.cmd_we), ctx.get(n.cmd_addr), cycle + rng.randint(2, 6)))
            state["pending"] = len(queue)
            await ctx.tick()
            cycle += 1
    return model


def _dram_bytes(mem: dict, nbytes: int, length: int) -> bytes:
    words = max(mem, default=-1) + 1
    blob = b"".join(mem.get(w, 0).to_bytes(nbytes, "little") for w in range(words))
    return blob[:length]


def test_loader_writes_the_load_stream_to_dram():
    """Bytes with random gaps, a partial last beat written before the next command and rewritten
    once completed; no command before init_done or while image beats are on their way."""
    rng = random.Random(3)
    native_bits = 16
    dut = DramEngine(TINY, lanes=16, packing="2bit", native_data_width=native_bits, native_address_width=20)
    assert dut.beat_bytes == 4
    image = rng.randbytes(4 * 37 + 3)           # the last beat holds 3 bytes
    mem = {}
    state = {"init_done": False, "pending": 0}
    nb = native_bits // 8

    async def command(ctx, op):
        ctx.set(dut.cmd.payload, {"op": op, "index": 0, "arg": 0})
        ctx.set(dut.cmd.valid, 1)
        for _ in range(200):
            _, _, taken = await ctx.tick().sample(dut.cmd.ready)
            if taken:
                break
        else:
            raise AssertionError(f"{op} not accepted in 200 cycles")
        ctx.set(dut.cmd.valid, 0)

    async def send(ctx, data):
        for byte in data:
            for _ in range(rng.choice([0, 0, 0, 1, 4])):
                await ctx.tick()
            ctx.set(dut.load.payload, byte)
            ctx.set(dut.load.valid, 1)
            await ctx.tick().until(dut.load.ready)
            ctx.set(dut.load.valid, 0)

    async def served(ctx):
        # the last write command may still wait in the adapter's command register
        while state["pending"] or ctx.get(dut.native.cmd_valid):
            await ctx.tick()

    async def bench(ctx):
        # before init_done: a command waits, and load bytes back up into the loader
        ctx.set(dut.cmd.payload, {"op": EngineOp.LOAD_RESET, "index": 0, "arg": 0})
        ctx.set(dut.cmd.valid, 1)
        for _ in range(40):
            await ctx.tick()
            assert not ctx.get(dut.cmd.ready)
        state["init_done"] = True
        ctx.set(dut.init_done, 1)
        await ctx.tick().until(dut.cmd.ready)
        ctx.set(dut.cmd.valid, 0)
        await send(ctx, image)
        # a command is accepted only after the partial beat has been handed to the native
        # command register: the memory holds the image once the commands are served
        await command(ctx, EngineOp.RESET_STATE)
        await served(ctx)
        assert _dram_bytes(mem, nb, len(image) + 1) == image + b"\0"
        # one more byte completes the beat, which is written again
        await send(ctx, b"\xa5")
        await command(ctx, EngineOp.RESET_STATE)
        await served(ctx)
        assert _dram_bytes(mem, nb, len(image) + 1) == image + b"\xa5"
        # LOAD_RESET: the next bytes land at address 0
        await command(ctx, EngineOp.LOAD_RESET)
        await send(ctx, b"\x01\x02\x03\x04\x05\x06\x07\x08")
        await command(ctx, EngineOp.RESET_STATE)
        await served(ctx)
        assert _dram_bytes(mem, nb, len(image) + 1) == bytes(range(1, 9)) + image[8:] + b"\xa5"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(_native_in_order(dut, mem, nb, rng, state), background=True)
    sim.add_testbench(bench)
    sim.run()


# -- co-simulation with LiteDRAM's controller and SDRAM model ---------------------------------------

def _check(cfg, blob, packing, prompt, steps, run, memory="sdram"):
    """test_engine's bit-exact check (tokens, argmax logits, read-back logits), and the DRAM figures."""
    check_tokens(cfg, blob, packing, prompt, steps, run)
    assert run.memory == memory
    d = run.dram
    assert d["load_bytes"] == len(blob) and d["load_cycles"] >= len(blob)
    assert d["weight_bytes"] > 0 and d["efficiency"] >= EFFICIENCY_BOUND, d


def test_engine_sdram_demo_with_command_stalls():
    _needs_dram_cosim()
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3")
    prompt = [int(v) for v in np.random.default_rng(11).integers(0, cfg.V, 4)]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=3, memory="sdram",
                     cmd_stall_rate=0.3, seed=5, read_logits=READ_BACK, progress=False)
    _check(cfg, blob, "base3", prompt, 3, run)


def test_engine_ddr3_demo_with_command_stalls():
    """The ECPIX-5's DDR3 controller (ECP5DDRPHY settings, LiteDRAM's model): bit-exact with
    command stalls. Its bus gives 8 bytes per cycle, twice what the 16 lanes' 4-byte beats take, so
    the efficiency is over the cycles the engine waited for weights (ready, beats owed), against
    one beat per cycle (``dram_figures``); the engine runs near its block-RAM speed."""
    _needs_dram_cosim()
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3")
    prompt = [int(v) for v in np.random.default_rng(11).integers(0, cfg.V, 4)]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=3, memory="ddr3",
                     cmd_stall_rate=0.3, seed=5, read_logits=READ_BACK, progress=False)
    _check(cfg, blob, "base3", prompt, 3, run, memory="ddr3")
    d = run.dram
    assert d["peak_bytes_per_cycle"] == 8 and d["port_bytes_per_cycle"] == 4
    assert d["memory_utilisation"] <= 0.5 < d["efficiency"] <= 1.0, d
    assert min(run.cycles) < 1.25 * cfg.ideal_cycles(16)


@pytest.mark.parametrize("memory", ["sdram", "ddr3"])
def test_sim_command_memory(tmp_path, memory):
    """``sim --memory sdram|ddr3`` on the demo: the integer model's tokens and the DRAM figures.
    The SDR port's 2 bytes/cycle carry 10 base3 trits, fewer than the 16 lanes take; the DDR3
    bus's 8 bytes/cycle outpace them (near the block-RAM speed)."""
    _needs_dram_cosim()
    out = tmp_path / "sim.json"
    assert main(["sim", "--memory", memory, "--prompt", "def", "--steps", "2", "--quiet",
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["memory"] == memory and r["matches_integer_model"] is True
    assert r["tokens"][:3] == list(b"def") and len(r["tokens"]) == 5 and len(r["cycles_per_token"]) == 4
    assert r["dram_efficiency"] == r["dram"]["efficiency"] >= EFFICIENCY_BOUND
    if memory == "sdram":
        assert min(r["cycles_per_token"]) > 1.5 * r["ideal_cycles_per_token"]
    else:
        assert min(r["cycles_per_token"]) < 1.25 * r["ideal_cycles_per_token"]


def test_sim_command_memory_ddr3_rejects(capsys):
    for extra in (["--simulator", "amaranth"], ["--synthetic"], ["--stall-rate", "0.1"]):
        assert main(["sim", "--memory", "ddr3", "--steps", "1", "--quiet", *extra]) == 2
        assert "--memory ddr3" in capsys.readouterr().err


def test_sim_command_memory_sdram_rejects(capsys):
    for extra in (["--simulator", "amaranth"], ["--synthetic"], ["--stall-rate", "0.1"], ["--mem-latency", "5"]):
        assert main(["sim", "--memory", "sdram", "--steps", "1", "--quiet", *extra]) == 2
        assert "--memory sdram" in capsys.readouterr().err


# -- the wide number formats from DRAM ---------------------------------------------------------------

def _wide_demo():
    from mmfree_fpga.image import image_size
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3", "wide")
    # int32 norms, lower bounds and embedding mantissas: the image the DRAM holds is the wide one
    assert len(blob) == image_size(cfg, "base3", FORMAT_SETS["wide"]) > image_size(cfg, "base3")
    return cfg, blob


@pytest.mark.parametrize("memory", ["sdram", pytest.param("ddr3", marks=pytest.mark.slow)])
def test_engine_dram_wide_formats_with_command_stalls(memory):
    """The demo in the wide formats from DRAM, with random idle cycles before every command and
    load byte: the tokens and every logit of every step (read back through ``logit_req``, Q16
    on the interface) equal the wide integer model's; the whole wide image was loaded."""
    _needs_dram_cosim()
    cfg, blob = _wide_demo()
    prompt = [int(v) for v in np.random.default_rng(12).integers(0, cfg.V, 3)]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=3, memory=memory,
                     formats="wide", cmd_stall_rate=0.3, seed=6, read_logits=tuple(range(cfg.V)), progress=False)
    check_tokens_in(cfg, blob, "base3", prompt, 3, run, "wide")
    assert all(len(got) == cfg.V for got in run.read_logits.values()) and len(run.read_logits) == len(run.cycles)
    assert run.memory == memory and run.dram["load_bytes"] == len(blob)
    assert run.dram["efficiency"] >= EFFICIENCY_BOUND, run.dram
    # every token streams the wide image but the embedding table (the performance model's count,
    # to the beat rounding of each request)
    per_token = run.dram["weight_bytes"] / len(run.cycles)
    assert per_token == pytest.approx(PERF_MODEL.bytes_per_token(cfg, "base3", FORMAT_SETS["wide"]), rel=1e-3)
    assert per_token > 1.05 * PERF_MODEL.bytes_per_token(cfg, "base3")


def test_sim_command_memory_sdram_wide_formats(tmp_path):
    """``sim --memory sdram --formats wide``: the wide image exported, loaded into the SDRAM and
    run; the tokens of ``reference --integer --formats wide`` (the build of the test above)."""
    _needs_dram_cosim()
    out = tmp_path / "sim.json"
    assert main(["sim", "--memory", "sdram", "--formats", "wide", "--prompt", "de", "--steps", "2", "--quiet",
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["memory"] == "sdram" and r["formats"] == "wide" and r["matches_integer_model"] is True
    assert r["tokens"][:2] == list(b"de") and len(r["tokens"]) == 4
    assert r["dram"]["load_bytes"] == len(_wide_demo()[1])


@pytest.mark.slow
def test_engine_sdram_model_larger_than_block_ram(tmp_path):
    """A random-weight model of 1.3 MB (V=2048, d=256, L=4, I=768: more than the ULX3S's 420 KB of
    block RAM) from the simulated SDRAM, with command and load stalls: bit-exact."""
    _needs_dram_cosim()
    cfg = DRAM_BUILD_FLOOR
    ck = save_checkpoint(random_model(cfg, seed=5), tmp_path / "ckpt")
    cfg, blob = load_image(ck, "base3")
    assert len(blob) > 1_300_000
    assert default_build(cfg, 16, len(blob), "sdram") == default_build(ModelConfig.from_checkpoint(DEMO_CHECKPOINT),
                                                                       16, 0, "sdram")
    prompt = [5, 1000, 2047, 77]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=3, memory="sdram",
                     cmd_stall_rate=0.3, seed=2, read_logits=(0, 1, 2047), progress=False)
    _check(cfg, blob, "base3", prompt, 3, run)
