"""The tiny engine's instruction fetch and decode: the program ROM, ``pc``, ``RA`` and the
instruction register with the decoded form of its instruction."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .tiny_alu import EXEC_MORE, OP_ONE_HOT_BITS
from .tiny_isa import (ADDR_CYCLE_OPS, DIRECT_OPS, FIELDS, IMM_BITS, MEMORY_KINDS, NO_OPERAND_OPS, PROG_DEPTH, Instr,
                       Kind, Op, encode)

__all__ = ["instr_layout", "TinyFetch"]


def instr_layout() -> data.StructLayout:
    """An instruction word's fields (:data:`~.tiny_isa.FIELDS`; ``imm`` signed)."""
    return data.StructLayout({name: signed(IMM_BITS) if name == "imm" else width for name, width in FIELDS})


class TinyFetch(wiring.Component):
    """The program (``program``, a list of :class:`~.tiny_isa.Instr`) in a ROM, read at ``pc``.

    Members
    -------
    jump : In(1), target : In(range(PROG_DEPTH))
        Leave the current instruction: ``pc := target``; the ROM reads it this cycle, so its
        word is on ``word`` in the next (the DECODE cycle). Otherwise the ROM reads ``pc``.
    decode : In(1)
        The DECODE cycle: register ``word`` as ``instr`` with its decoded form (every output
        below but ``word``, ``addr_cycle`` and ``ra``), all valid from the next cycle until the
        next ``decode``.
    call : In(1)
        ``RA := pc + 1``.
    word : Out(instr_layout())
        The ROM's output (the instruction at ``pc`` once ``jump`` has been given a cycle).
    addr_cycle : Out(1)
        ``word`` takes the ADDR cycle (:func:`~.tiny_isa.takes_addr_cycle`).
    instr : Out(instr_layout())
    op : Out(OP_ONE_HOT_BITS), kind : Out(len(Kind))
        ``instr``'s op and operand kind, one-hot: each op's or kind's case is one flip-flop.
    last_in_exec : Out(1)
        The op ends in its first EXEC cycle.
    ends_in_issue : Out(1)
        The op ends in ISSUE and continues with the next address (every op without an operand
        but ``END``); ``is_ret``, ``is_call``, ``is_loop``, ``is_br`` : Out(1) say which address.
    pc1 : Out(range(PROG_DEPTH)), ra : Out(range(PROG_DEPTH))
        ``pc + 1`` (registered with ``instr``) and the return address.
    """

    def __init__(self, program: list[Instr]):
        self.program = program
        pc_shape = range(PROG_DEPTH)
        super().__init__({"jump": In(1), "target": In(pc_shape), "decode": In(1), "call": In(1),
                          "word": Out(instr_layout()), "addr_cycle": Out(1), "instr": Out(instr_layout()),
                          "op": Out(OP_ONE_HOT_BITS), "kind": Out(len(Kind)), "last_in_exec": Out(1),
                          "ends_in_issue": Out(1), "is_ret": Out(1), "is_call": Out(1), "is_loop": Out(1),
                          "is_br": Out(1), "pc1": Out(pc_shape), "ra": Out(pc_shape)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.rom = rom = Memory(shape=self.word.shape().size, depth=PROG_DEPTH,
                                        init=[encode(ins) for ins in self.program])
        rom_rp = rom.read_port()
        pc = Signal(range(PROG_DEPTH))
        # the ROM reads pc (so a held instruction stays readable) unless the instruction ends
        m.d.comb += [rom_rp.addr.eq(pc), self.word.eq(rom_rp.data)]
        with m.If(self.jump):
            m.d.comb += rom_rp.addr.eq(self.target)
            m.d.sync += pc.eq(self.target)
        with m.If(self.call):
            m.d.sync += self.ra.eq(self.pc1)

        d_op, d_kind = self.word.op, self.word.kind
        direct = Cat(d_op == o for o in (*NO_OPERAND_OPS, *DIRECT_OPS, Op.MATVEC)).any()
        m.d.comb += self.addr_cycle.eq(Cat(d_op == o for o in ADDR_CYCLE_OPS).any()
                                       | (~direct & Cat(d_kind == k for k in MEMORY_KINDS).any()))
        # no path starts at the ROM's clock-to-out but those of DECODE: the instruction and its
        # control decoded into registers
        with m.If(self.decode):
            m.d.sync += [self.instr.eq(rom_rp.data), self.pc1.eq(pc + 1),
                         self.kind.eq(Const(1, len(Kind)) << d_kind),
                         self.op.eq(Const(1, OP_ONE_HOT_BITS) << d_op),
                         self.last_in_exec.eq(~Cat(d_op == o for o in EXEC_MORE).any()),
                         self.ends_in_issue.eq(Cat(d_op == o for o in NO_OPERAND_OPS if o != Op.END).any()),
                         self.is_ret.eq(d_op == Op.RET), self.is_call.eq(d_op == Op.CALL),
                         self.is_loop.eq(d_op == Op.LOOP), self.is_br.eq(d_op == Op.BR)]
        return m
