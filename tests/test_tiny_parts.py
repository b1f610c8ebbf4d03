"""The tiny engine's parts on their own, in Amaranth's simulator: the carry-select adder, the
block-RAM weight store (load stream, rewind, reads), the matrix unit against numpy, and the
decoder against the instruction set's own predicates."""

from __future__ import annotations

import random

import numpy as np
from amaranth.hdl import Module, Signal
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from mmfree_fpga.hw.tiny_alu import carry_select
from mmfree_fpga.hw.tiny_fetch import TinyFetch
from mmfree_fpga.hw.tiny_isa import NO_OPERAND_OPS, Instr, Kind, Op, takes_addr_cycle
from mmfree_fpga.hw.tiny_matvec import TinyMatVec
from mmfree_fpga.hw.tiny_weights import BlockRamWeights
from mmfree_fpga.packing import pack_trits_base3


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def test_carry_select_adds_modulo_its_width():
    m = Module()
    a, b, c = Signal(13), Signal(13), Signal()
    out = Signal(13)
    m.d.comb += out.eq(carry_select(m, a, b, c, "t"))
    rng = random.Random(1)
    cases = [(0x1FFF, 1, 0), (0x1FFF, 0x1FFF, 1), (0x7F, 1, 0), (0x3F, 0x40, 1)]
    cases += [(rng.randrange(1 << 13), rng.randrange(1 << 13), rng.randrange(2)) for _ in range(200)]

    async def bench(ctx):
        for x, y, z in cases:
            ctx.set(a, x)
            ctx.set(b, y)
            ctx.set(c, z)
            assert ctx.get(out) == (x + y + z) % (1 << 13), (x, y, z)

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


def test_block_ram_weights_load_rewind_and_read():
    dut = BlockRamWeights(depth=8)
    data = bytes(range(0x10, 0x1B))         # 11 bytes: the last word half written

    async def bench(ctx):
        ctx.set(dut.accept, 1)
        ctx.set(dut.load.valid, 1)
        for k, byte in enumerate(b"\xee\xee" + data):
            if k == 2:                     # rewind after two bytes: the image starts again at 0
                ctx.set(dut.rewind, 1)
                await ctx.tick()
                ctx.set(dut.rewind, 0)
            ctx.set(dut.load.payload, byte)
            assert ctx.get(dut.load.ready)
            await ctx.tick()
        ctx.set(dut.load.valid, 0)
        ctx.set(dut.accept, 0)
        assert not ctx.get(dut.load.ready)
        await ctx.tick()
        words = []
        for addr in range(6):
            ctx.set(dut.raddr, addr)
            await ctx.tick()
            words.append(ctx.get(dut.rdata))
        blob = data + bytes(1)
        assert words == [blob[2 * k] | (blob[2 * k + 1] << 8) for k in range(6)]

    _run(dut, bench)


def _matvec(rows: int, cols: int, seed: int):
    """(sums written by TinyMatVec, the numpy product, cycles from run to done inclusive)."""
    rng = np.random.default_rng(seed)
    trits = rng.integers(-1, 2, size=(rows, cols))
    q = rng.integers(-128, 128, size=cols)
    offset = 3                                  # the trits start at an odd byte
    blob = bytes(offset) + pack_trits_base3(trits.reshape(-1))
    blob += bytes(len(blob) % 2)
    m = Module()
    m.submodules.mv = mv = TinyMatVec(rows_max=rows, cols_max=cols)
    m.submodules.w = w = Memory(shape=16, depth=len(blob) // 2,
                                init=[blob[2 * k] | (blob[2 * k + 1] << 8) for k in range(len(blob) // 2)])
    m.submodules.q = qm = Memory(shape=8, depth=cols, init=[int(v) & 0xFF for v in q])
    w_rp, q_rp = w.read_port(), qm.read_port()
    m.d.comb += [w_rp.addr.eq(mv.w_addr), mv.w_data.eq(w_rp.data), q_rp.addr.eq(mv.q_addr),
                 mv.q_data.eq(q_rp.data.as_signed())]
    out_base = 5
    got = {}
    cycles = []

    async def bench(ctx):
        ctx.set(mv.cols, cols)
        ctx.set(mv.rows, rows)
        ctx.set(mv.trits, offset)
        ctx.set(mv.out, out_base)
        ctx.set(mv.start, 1)
        await ctx.tick()
        ctx.set(mv.start, 0)
        ctx.set(mv.run, 1)
        n = 0
        while True:
            n += 1
            if ctx.get(mv.vm_en):
                got[ctx.get(mv.vm_addr) - out_base] = ctx.get(mv.vm_data)
            if ctx.get(mv.done):
                break
            await ctx.tick()
        cycles.append(n)

    _run(m, bench)
    return [got.get(r) for r in range(rows)], list(trits @ q), cycles[0]


def test_matvec_unit_is_the_matrix_product():
    from mmfree_fpga.hw.tiny_isa import MATVEC_OVERHEAD
    for rows, cols, seed in ((3, 7, 0), (4, 10, 1), (1, 1, 2)):
        got, want, cycles = _matvec(rows, cols, seed)
        assert got == want, (rows, cols)
        # the instruction's cycles beyond DECODE and ISSUE (tiny_isa.op_cycles)
        assert cycles == rows * cols + MATVEC_OVERHEAD, (rows, cols)


def test_fetch_decodes_as_the_instruction_set_says():
    program = [Instr(Op.LD, kind=k, imm=4) for k in Kind] + [Instr(op) for op in Op]
    dut = TinyFetch(program)

    async def bench(ctx):
        for pc, ins in enumerate(program):
            ctx.set(dut.target, pc)
            ctx.set(dut.jump, 1)
            await ctx.tick()
            ctx.set(dut.jump, 0)
            ctx.set(dut.decode, 1)
            assert ctx.get(dut.word.op) == ins.op and ctx.get(dut.word.kind) == ins.kind
            assert ctx.get(dut.addr_cycle) == takes_addr_cycle(ins), ins
            await ctx.tick()
            ctx.set(dut.decode, 0)
            assert ctx.get(dut.op) == 1 << ins.op and ctx.get(dut.kind) == 1 << ins.kind
            assert ctx.get(dut.instr.imm) == ins.imm and ctx.get(dut.pc1) == pc + 1
            assert ctx.get(dut.ends_in_issue) == (ins.op in NO_OPERAND_OPS and ins.op != Op.END)
            assert ctx.get(dut.is_call) == (ins.op == Op.CALL)

    _run(dut, bench)
