# amaranth: UnusedElaboratable=no
"""TernaryMatVec and its trit decoder/gearbox, bit-exact against reference.integer.matvec.

Amaranth-simulator tests drive every stream with random idle/back-pressure; cocotb tests run
the generated Verilog on Verilator and Icarus (sim/matvec_tb.py); a lint test holds the
generated Verilog to an explicit list of accepted Verilator warnings.

(The first line silences Amaranth's UnusedElaboratable warning: several tests build a unit
only for its stream encodings or to see its constructor refuse bad parameters.)
"""

from __future__ import annotations

import random
import re
import subprocess
from collections import deque

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree_fpga.config import FORMATS
from mmfree_fpga.hw.matvec import PipelinedAdderTree, TernaryMatVec
from mmfree_fpga.hw.trits import TritDecoder, TritGearbox, beat_trits, packing_code, trit_code
from mmfree_fpga.packing import BASE3_DECODE, PACKINGS, unpack_trits
from mmfree_fpga.sim.matvec_tb import MatVecJob, edge_jobs, encode_jobs, random_jobs, unit_env
from mmfree_fpga.sim.runner import verilator_lint, run_cocotb, simulator_missing, write_verilog

BOTH = PACKINGS
_CODE_VALUE = {0b00: 0, 0b01: 1, 0b10: 0, 0b11: -1}


# -- Amaranth-simulator harness -------------------------------------------------------------

def simulate(unit: TernaryMatVec, stim, *, idle: float = 0.0, stall: float = 0.0, seed: int = 0,
             max_cycles: int = 100_000):
    """Run ``stim`` on ``unit``; every result is checked as it leaves.

    One testbench drives all ports each cycle: an input offers its next beat unless it idles
    (probability ``idle``) and holds it until taken; ``out.ready`` drops with probability
    ``stall``. Returns (cycle of each command transfer, cycle of each result transfer).
    """
    rng = random.Random(seed)
    ports = [unit.cmd, unit.act, unit.weights]
    queues = [stim.cmd, stim.act, stim.weights]
    cmd_cycles, out_cycles = [], []

    async def bench(ctx):
        index, offered = [0, 0, 0], [False, False, False]
        for cycle in range(max_cycles):
            if len(out_cycles) == len(stim.expected):
                break
            for k, port in enumerate(ports):
                if not offered[k] and index[k] < len(queues[k]) and rng.random() >= idle:
                    offered[k] = True
                    ctx.set(port.payload.as_value(), queues[k][index[k]])
                ctx.set(port.valid, offered[k])
            ready = rng.random() >= stall
            ctx.set(unit.out.ready, ready)
            _, _, *readies, out_valid, out_payload = await ctx.tick().sample(
                *(p.ready for p in ports), unit.out.valid, unit.out.payload.as_value())
            for k, port_ready in enumerate(readies):
                if offered[k] and port_ready:
                    if k == 0:
                        cmd_cycles.append(cycle)
                    index[k] += 1
                    offered[k] = False
            if ready and out_valid:
                n = len(out_cycles)
                assert n < len(stim.expected), f"cycle {cycle}: an unexpected result"
                got = unit.unpack_out(out_payload)
                assert got == stim.expected[n], \
                    f"result {n} (cycle {cycle}): got {got}, expected {stim.expected[n]}"
                out_cycles.append(cycle)
        assert len(out_cycles) == len(stim.expected), \
            f"timeout: {len(out_cycles)} of {len(stim.expected)} results in {max_cycles} cycles"
        assert index == [len(q) for q in queues], f"beats taken {index}, offered {[len(q) for q in queues]}"
        # idle now: spare act/weight beats are not taken and nothing else comes out
        for port in (unit.act, unit.weights):
            ctx.set(port.valid, 1)
        for _ in range(3):
            _, _, act_ready, weights_ready, out_valid = await ctx.tick().sample(
                unit.act.ready, unit.weights.ready, unit.out.valid)
            assert not (act_ready or weights_ready), "a beat beyond the commands' was taken"
            assert not out_valid, "a result beyond the expected ones"

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return cmd_cycles, out_cycles


# -- trit decoder and gearbox ------------------------------------------------------------

@pytest.mark.parametrize("packings", [("2bit",), ("base3",), BOTH], ids="-".join)
def test_trit_decoder_matches_reference_tables(packings):
    dut = TritDecoder(weight_bytes=3, packings=packings)

    async def bench(ctx):
        for packing in packings:
            if len(packings) > 1:
                ctx.set(dut.packing, packing_code(packing))
            k = beat_trits(3, packing)
            for v in range(256):
                raw = bytes([v, 255 - v, (7 * v + 3) % 256])
                ctx.set(dut.data.as_value(), int.from_bytes(raw, "little"))
                codes = ctx.get(dut.codes.as_value())
                got = [codes >> (2 * i) & 3 for i in range(len(dut.codes))]
                if packing == "base3":
                    want = [trit_code(int(t)) for b in raw for t in BASE3_DECODE[b]]
                else:    # the 2bit codes are the byte's bit pairs, code 10 included
                    want = [b >> (2 * i) & 3 for b in raw for i in range(4)]
                    assert [_CODE_VALUE[c] for c in want] == list(unpack_trits(raw, 12, "2bit"))
                want += [0] * (len(got) - k)
                assert got == want, f"{packing} byte {v}: got {got}, expected {want}"

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("lanes, weight_bytes, packings, packing", [
    (4, 1, ("2bit",), "2bit"),        # beat = lanes: a plain register
    (4, 1, ("base3",), "base3"),      # 5 trits into 4 lanes
    (6, 2, BOTH, "2bit"),             # 8 into 6
    (6, 2, BOTH, "base3"),            # 10 into 6
    (16, 4, ("base3",), "base3"),     # 20 into 16: 5 offsets
    (64, 13, ("base3",), "base3"),    # 65 into 64: 65 offsets (narrowest base3 bus)
])
def test_gearbox_keeps_trit_order_under_stalls_and_flush(lanes, weight_bytes, packings, packing):
    dut = TritGearbox(lanes=lanes, weight_bytes=weight_bytes, packings=packings)
    k = beat_trits(weight_bytes, packing)
    rng = random.Random(lanes * 1000 + k)

    async def bench(ctx):
        if len(packings) > 1:
            ctx.set(dut.packing, packing_code(packing))
        buffered = deque()
        beat, flushes, taken = None, 0, 0
        for cycle in range(3000):
            if beat is None and rng.random() < 0.8:
                beat = [rng.randrange(4) for _ in range(k)]
                ctx.set(dut.i.payload.as_value(), sum(c << (2 * i) for i, c in enumerate(beat)))
            ctx.set(dut.i.valid, beat is not None)
            ctx.set(dut.o.ready, rng.random() < 0.8)
            flush = rng.random() < 0.01
            ctx.set(dut.flush, flush)
            _, _, i_ready, o_valid, o_ready, o_payload = await ctx.tick().sample(
                dut.i.ready, dut.o.valid, dut.o.ready, dut.o.payload.as_value())
            assert o_valid == (len(buffered) >= lanes), f"cycle {cycle}: valid with {len(buffered)} trits"
            if o_valid and o_ready:
                want = [buffered.popleft() for _ in range(lanes)]
                got = [o_payload >> (2 * i) & 3 for i in range(lanes)]
                assert got == want, f"cycle {cycle}: group {taken}"
                taken += 1
            if beat is not None and i_ready:
                buffered.extend(beat)
                beat = None
            if flush:
                buffered.clear()
                flushes += 1
        assert taken > 1000 and flushes > 10     # both paths were exercised

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_adder_tree_is_exact_for_any_size():
    for n in (1, 2, 3, 5, 7, 8):
        dut = PipelinedAdderTree(n, 9)
        rng = random.Random(n)
        vectors = [[rng.choice([-256, 255, rng.randrange(-256, 256)]) for _ in range(n)] for _ in range(40)]

        async def bench(ctx, dut=dut, vectors=vectors):
            sums = []
            for cycle in range(len(vectors) + dut.latency):
                if cycle < len(vectors):
                    ctx.set(dut.i, vectors[cycle])
                if dut.latency == 0:
                    sums.append(ctx.get(dut.o))
                    continue
                await ctx.tick()
                if cycle + 1 >= dut.latency:
                    sums.append(ctx.get(dut.o))
            assert sums[:len(vectors)] == [sum(v) for v in vectors]

        sim = Simulator(dut)
        sim.add_clock(1e-8, if_exists=True)      # n = 1 is a wire: no clock domain
        sim.add_testbench(bench)
        sim.run()


# -- the unit in the Amaranth simulator --------------------------------------------------------

UNITS = {   # id: constructor arguments
    "4-both": dict(lanes=4, max_rows=8, max_cols=32),
    "4-2bit-one-word": dict(lanes=4, packings=("2bit",), max_rows=8, max_cols=4),   # q is one word
    "6-both": dict(lanes=6, max_rows=8, max_cols=36),
    "16-2bit": dict(lanes=16, packings=("2bit",), max_rows=8, max_cols=96),
    "16-base3": dict(lanes=16, packings=("base3",), max_rows=8, max_cols=96),
    "20-base3-narrow": dict(lanes=20, packings=("base3",), weight_bytes=4, max_rows=6, max_cols=100),
    "64-both": dict(lanes=64, max_rows=6, max_cols=256),
    "64-base3-narrow": dict(lanes=64, packings=("base3",), weight_bytes=13, max_rows=6, max_cols=256),
}


@pytest.mark.parametrize("unit_id", UNITS)
def test_random_and_edge_matrices_with_stalls(unit_id):
    rng = random.Random(unit_id)
    unit = TernaryMatVec(**UNITS[unit_id])
    jobs = random_jobs(unit, rng, 10) + edge_jobs(unit, rows=2)
    rng.shuffle(jobs)
    half = len(jobs) // 2
    # first half gently stalled; second half (from reset) with long idles and a slow consumer
    simulate(unit, encode_jobs(unit, jobs[:half]), idle=0.3, stall=0.3, seed=1)
    unit = TernaryMatVec(**UNITS[unit_id])
    simulate(unit, encode_jobs(unit, jobs[half:]), idle=0.6, stall=0.8, seed=2)


@pytest.mark.parametrize("packings", [BOTH], ids="-".join)
def test_longest_rows_reach_the_accumulator_extremes(packings):
    """cols = FORMATS.max_features at 256 lanes: |acc| reaches 128 * max_features."""
    unit = TernaryMatVec(lanes=256, packings=packings, max_rows=2, max_cols=FORMATS.max_features)
    stim = encode_jobs(unit, edge_jobs(unit, rows=2))
    extreme = 128 * FORMATS.max_features
    assert {extreme, -extreme, 127 * FORMATS.max_features, 0} <= {acc for acc, _ in stim.expected}
    simulate(unit, stim, idle=0.2, stall=0.2, seed=3)


THROUGHPUT_UNITS = {
    "4-both": dict(lanes=4),
    "6-both": dict(lanes=6),                                    # 2bit goes through the gearbox too
    "16-both": dict(lanes=16),
    "64-both": dict(lanes=64),
    "20-base3-narrow": dict(lanes=20, packings=("base3",), weight_bytes=4),    # beat = lanes
    "64-base3-narrow": dict(lanes=64, packings=("base3",), weight_bytes=13),   # 65 trits per beat
}


@pytest.mark.parametrize("unit_id", THROUGHPUT_UNITS)
def test_throughput_is_one_group_per_cycle(unit_id):
    """No stalls: each command takes rows * cols / lanes + latency cycles, exactly."""
    args = dict(THROUGHPUT_UNITS[unit_id], max_rows=16)
    lanes = args["lanes"]
    args["max_cols"] = 4 * lanes
    unit = TernaryMatVec(**args)
    assert unit.latency == 7 + (lanes - 1).bit_length()
    rng = np.random.default_rng(lanes)
    q = rng.integers(-128, 128, 4 * lanes)
    # (16, lanes): every group ends a row, the most results in flight
    shapes = [(16, 4 * lanes), (16, lanes), (1, lanes), (3, 2 * lanes)]
    jobs = [MatVecJob(rng.integers(-1, 2, (r, c)), p, q[:c]) for r, c in shapes for p in unit.packings]
    for job in jobs:        # alone, from reset
        stim = encode_jobs(unit, [job])
        cmd_cycles, out_cycles = simulate(TernaryMatVec(**args), stim)
        rows, cols = job.trits.shape
        assert out_cycles[-1] - cmd_cycles[0] == unit.cycles(rows, cols) == stim.groups[0] + unit.latency
    # back to back: a command starts 3 cycles after the previous one's last group
    stim = encode_jobs(unit, jobs)
    cmd_cycles, out_cycles = simulate(unit, stim)
    assert [b - a for a, b in zip(cmd_cycles, cmd_cycles[1:])] == [g + 3 for g in stim.groups[:-1]]
    assert out_cycles[-1] - cmd_cycles[-1] == stim.groups[-1] + unit.latency


@pytest.mark.parametrize("packing", PACKINGS)
def test_512x512_at_64_lanes_takes_4096_cycles_plus_latency(packing):
    unit = TernaryMatVec(lanes=64, max_rows=512, max_cols=512)
    rng = np.random.default_rng(512)
    job = MatVecJob(rng.integers(-1, 2, (512, 512)), packing, rng.integers(-128, 128, 512))
    cmd_cycles, out_cycles = simulate(unit, encode_jobs(unit, [job]))
    measured = out_cycles[-1] - cmd_cycles[0]
    assert unit.latency == 13
    assert measured == 4096 + unit.latency            # measured: 4109
    assert measured <= 1.02 * (4096 + unit.latency)


def test_zero_sized_command_is_accepted_and_does_nothing():
    unit = TernaryMatVec(lanes=4, max_rows=4, max_cols=8)
    stim = encode_jobs(unit, [MatVecJob(np.ones((2, 8), dtype=np.int64), "base3", np.arange(8))])
    stim.cmd[:0] = [unit.cmd_payload(0, 8, load=True, packing="2bit"),
                    unit.cmd_payload(3, 0, load=True, packing="2bit")]
    cmd_cycles, out_cycles = simulate(unit, stim)
    assert len(cmd_cycles) == 3 and out_cycles[-1] - cmd_cycles[-1] == unit.cycles(2, 8)


# -- host-side encodings and parameters -------------------------------------------------------

def test_stream_encodings():
    unit = TernaryMatVec(lanes=8, max_rows=100, max_cols=64)
    trits = np.random.default_rng(0).integers(-1, 2, (3, 16))
    for packing in PACKINGS:
        beats = unit.weight_beats(trits, packing)
        raw = b"".join(b.to_bytes(unit.weight_bytes, "little") for b in beats)
        assert len(beats) == -(-48 // (unit.weight_bytes * {"2bit": 4, "base3": 5}[packing]))
        assert list(unpack_trits(raw, 48, packing)) == list(trits.reshape(-1))
    word = unit.act_beats(np.array([-128, 127, -1, 0, 1, 2, 3, 4]))[0]
    assert word & 0xFFFF == 0x7F80 and (word >> 16) & 0xFF == 0xFF
    cmd = unit.cmd_payload(100, 64, load=False, packing="base3")
    assert cmd == 100 | 64 << 7 | 0 << 14 | packing_code("base3") << 15
    acc_bits = FORMATS.acc_bits
    assert unit.unpack_out((1 << acc_bits) | ((1 << acc_bits) - 5)) == (-5, True)
    assert unit.weight_bytes == 2 and TernaryMatVec(lanes=13, max_cols=13).weight_bytes == 4


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="fewer than"):
        TernaryMatVec(lanes=16, weight_bytes=3)                      # 12 / 15 trits < 16
    with pytest.raises(ValueError, match="fewer than"):
        TernaryMatVec(lanes=16, packings=("2bit",), weight_bytes=3)
    with pytest.raises(ValueError, match="max_cols"):
        TernaryMatVec(lanes=16, max_cols=40)
    with pytest.raises(ValueError, match="max_cols"):
        TernaryMatVec(lanes=16, max_cols=2 * FORMATS.max_features)
    with pytest.raises(ValueError, match="packings"):
        TernaryMatVec(lanes=16, packings=("base4",))
    with pytest.raises(ValueError, match="name the packing"):
        TernaryMatVec(lanes=16).cmd_payload(1, 16)
    with pytest.raises(ValueError, match="decodes 2bit only"):
        TernaryMatVec(lanes=16, packings=("2bit",)).cmd_payload(1, 16, packing="base3")


# -- generated Verilog: cocotb on Verilator and Icarus, Verilator lint ----------------------------

COCOTB_UNITS = {
    "12-both": dict(lanes=12, max_rows=16, max_cols=96),         # runtime packing, 12 and 15 trits per beat
    "16-base3-narrow": dict(lanes=16, packings=("base3",), weight_bytes=4, max_rows=12, max_cols=64),
}
# A Verilator build costs 20-60 s on this shared 2-core machine, an Icarus build 0.1 s: Verilator
# builds the runtime-packing design only.
COCOTB_RUNS = [("12-both", "verilator"), ("12-both", "icarus"), ("16-base3-narrow", "icarus")]


@pytest.fixture(scope="module")
def verilog(tmp_path_factory):
    """Generated Verilog of each COCOTB_UNITS design (and a 64-lane one for lint), once."""
    root = tmp_path_factory.mktemp("matvec_verilog")
    designs = dict(COCOTB_UNITS, **{"64-both": dict(lanes=64, max_rows=64, max_cols=512),
                                    "4-2bit-one-word": dict(lanes=4, packings=("2bit",), max_rows=8, max_cols=4)})
    return {name: (write_verilog(TernaryMatVec(**args), root / name / "top.v"), args)
            for name, args in designs.items()}


@pytest.mark.parametrize("unit_id, simulator", COCOTB_RUNS)
def test_cocotb(unit_id, simulator, verilog, tmp_path):
    reason = simulator_missing(simulator)
    if reason:
        pytest.skip(reason)
    source, args = verilog[unit_id]
    ran = run_cocotb(simulator=simulator, sources=[source], toplevel="top",
                     test_module="mmfree_fpga.sim.matvec_tb", build_dir=tmp_path / "build",
                     env=unit_env(TernaryMatVec(**args), seed=sum(map(ord, unit_id + simulator))))
    assert ran == 2


# Verilator -Wall warnings that Amaranth's Verilog always raises, each harmless here:
ACCEPTED_LINT = {
    # Amaranth leaves Verilog to zero-/sign-extend narrower operands of +, -, ==, <=;
    # the extension is what the Amaranth expression means.
    "WIDTHEXPAND": "implicit operand extension in Amaranth's expressions",
    # `x == 0` is emitted as `!x` (a logical NOT of a vector) and `bit_select` as a shift
    # whose result is truncated to the selected width.
    "WIDTHTRUNC": "Amaranth's `!x` for `x == 0` and its shift-then-truncate bit_select",
    # Every data.View field / array element gets a named debug wire (`act__payload[3]`,
    # `stage.first`), and the FIFO's level outputs are left unconnected; none is read.
    "UNUSEDSIGNAL": "debug aliases of views and unused library outputs (not top-level ports)",
    # Amaranth declares `reg x = init;` and then assigns x in an always block.
    "PROCASSINIT": "Amaranth's style of declaring a register's init value",
    # One file holds the whole hierarchy; submodules are named `top.decoder`, `top.gearbox`.
    "DECLFILENAME": "Amaranth writes every module into the one file named after the top",
}
_TOP_PORTS = {f"{s}__{m}" for s in ("cmd", "act", "weights", "out") for m in ("payload", "valid", "ready")}


@pytest.mark.parametrize("unit_id", ["12-both", "16-base3-narrow", "64-both", "4-2bit-one-word"])
def test_verilator_lint_has_only_accepted_warnings(unit_id, verilog):
    reason = simulator_missing("verilator")
    if reason:
        pytest.skip(reason)
    source, _ = verilog[unit_id]
    bad = verilator_lint(source, ACCEPTED_LINT, _TOP_PORTS)
    assert not bad, "\n".join(bad[:20])
