"""The tiny engine's matrix unit: ``MATVEC``, the ternary matrix times the int8 vector in ``QM``,
one trit per cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .tiny_isa import B_BITS
from .tiny_weights import WORD_ADDR_BITS
from .trits import base3_decode_table

__all__ = ["TinyMatVec"]


class TinyMatVec(wiring.Component):
    """``VM[out + r] := sum_c T[r][c] QM[c]`` for ``r < rows``, ``c < cols``, the trits ``T``
    base3-packed (five a byte, row after row) from byte ``trits`` of the weight image.

    ``rows_max`` / ``cols_max``: the largest ``rows`` / ``cols`` (the vector / q memories'
    depths); ``fmt``: the accumulator's width (``acc_bits``).

    Members
    -------
    start : In(1)
        Load ``cols``, ``rows``, ``trits`` and clear the unit (any cycle before ``run``).
    run : In(1)
        Work this cycle (held until ``done``).
    cols, rows, trits, out : In(B_BITS)
        The operands (``cols``, ``rows`` >= 1), read at ``start``; ``out`` while running.
    w_addr : Out(WORD_ADDR_BITS), w_read : Out(1)
        While ``w_read``: a weight word to read this cycle; its data is expected on ``w_data``
        one cycle later.
    w_data : In(16)
    q_addr : Out(range(cols_max)), q_data : In(signed(8))
        The q memory's read port (data one cycle later); ``q_addr`` is 0 when unused.
    vm_en : Out(1), vm_addr : Out(B_BITS), vm_data : Out(signed(acc_bits))
        While ``vm_en``: a row's sum, to be written to the vector memory this cycle.
    done : Out(1)
        The last cycle of the operation (every sum written).

    Latency: ``rows * cols`` cycles plus a fixed overhead (``tiny_isa.MATVEC_OVERHEAD`` with the
    cycles around it): a byte is read (one cycle), decoded by a ROM into five trits (one), then
    each trit reads its q value (one), forms the operand (one) and accumulates (one).
    """

    def __init__(self, rows_max: int, cols_max: int, fmt: Formats = FORMATS):
        self.row_bits = max(1, rows_max.bit_length())
        self.col_bits = max(1, cols_max.bit_length())
        self.fmt = fmt
        super().__init__({"start": In(1), "run": In(1), "cols": In(B_BITS), "rows": In(B_BITS),
                          "trits": In(B_BITS), "out": In(B_BITS), "w_addr": Out(WORD_ADDR_BITS),
                          "w_read": Out(1), "w_data": In(16), "q_addr": Out(self.col_bits),
                          "q_data": In(signed(8)), "vm_en": Out(1), "vm_addr": Out(B_BITS),
                          "vm_data": Out(signed(fmt.acc_bits)), "done": Out(1)})

    def elaborate(self, platform):
        m = Module()
        acc_bits = self.fmt.acc_bits
        m.submodules.b3 = b3 = Memory(shape=10, depth=256, init=base3_decode_table())
        b3_rp = b3.read_port()
        r = Signal(self.row_bits)
        c = Signal(self.col_bits)
        ba = Signal(B_BITS)           # the next weight byte to decode
        p1 = Signal()                 # a weight word read is in flight (its byte lane in lane)
        lane = Signal()
        p2 = Signal()                 # a decoder lookup is in flight
        nxt = Signal(10)              # the five trits of the next byte
        nvalid = Signal()
        tq = Signal(10)               # the trits of the current byte, next in bits 1:0
        tn = Signal(range(6))
        issue_done = Signal()
        s1 = Signal()                 # stage 1 valid: its trit, last-column flag, row
        s1_trit = Signal(2)
        s1_last = Signal()
        s1_row = Signal(self.row_bits)
        s2 = Signal()                 # stage 2 valid: the signed operand (q, ~q or 0; +1 in s2_neg)
        s2_op = Signal(acc_bits)
        s2_neg = Signal()
        s2_last = Signal()
        s2_row = Signal(self.row_bits)
        acc = Signal(signed(acc_bits))
        cols_m1 = Signal(self.col_bits)   # the last column and row
        rows_m1 = Signal(self.row_bits)

        # the start state, loaded whenever ``start`` (no decoding in these registers' enables)
        with m.If(self.start):
            m.d.sync += [cols_m1.eq(self.cols - 1), rows_m1.eq(self.rows - 1), r.eq(0), c.eq(0),
                         ba.eq(self.trits), p1.eq(0), p2.eq(0), nvalid.eq(0), tn.eq(0), issue_done.eq(0),
                         s1.eq(0), s2.eq(0), acc.eq(0)]

        with m.If(self.run):
            # producer: weight byte -> (read) -> decoder ROM -> nxt, one byte in flight
            m.d.sync += [p1.eq(0), p2.eq(0)]
            m.d.comb += self.w_addr.eq(ba[1:])
            with m.If(~nvalid & ~p1 & ~p2 & ~issue_done):
                m.d.comb += self.w_read.eq(1)
                m.d.sync += [p1.eq(1), lane.eq(ba[0]), ba.eq(ba + 1)]
            with m.If(p1):
                m.d.comb += b3_rp.addr.eq(Mux(lane, self.w_data[8:], self.w_data[:8]))
                m.d.sync += p2.eq(1)
            with m.If(p2):
                m.d.sync += [nxt.eq(b3_rp.data), nvalid.eq(1)]
            # consumer: one trit per cycle -> stage 1 (q read)
            m.d.sync += s1.eq(0)
            have = tn != 0
            last_col = c == cols_m1
            with m.If(have & ~issue_done):
                m.d.comb += self.q_addr.eq(c)
                m.d.sync += [s1.eq(1), s1_trit.eq(tq[:2]), s1_last.eq(last_col), s1_row.eq(r)]
                with m.If(last_col):
                    m.d.sync += [c.eq(0), r.eq(r + 1)]
                    with m.If(r == rows_m1):
                        m.d.sync += issue_done.eq(1)
                with m.Else():
                    m.d.sync += c.eq(c + 1)
                with m.If((tn == 1) & nvalid):
                    m.d.sync += [tq.eq(nxt), tn.eq(5), nvalid.eq(0)]
                with m.Else():
                    m.d.sync += [tq.eq(tq >> 2), tn.eq(tn - 1)]
            with m.Elif(~have & nvalid & ~issue_done):
                m.d.sync += [tq.eq(nxt), tn.eq(5), nvalid.eq(0)]
            # stage 1: the operand of acc + q, acc - q = acc + ~q + 1, or acc, registered (the q
            # memory's output goes through the trit's choice into a register, not on into the
            # accumulator's carry chain)
            neg = s1_trit == 3
            q_ext = Signal(signed(acc_bits))
            m.d.comb += q_ext.eq(Mux(s1_trit[0], self.q_data, 0))
            m.d.sync += [s2.eq(s1), s2_op.eq(q_ext ^ neg.replicate(acc_bits)), s2_neg.eq(neg),
                         s2_last.eq(s1_last), s2_row.eq(s1_row)]
            # stage 2: accumulate (one carry chain); write the row's sum after its last column
            total = Signal(signed(acc_bits))
            m.d.comb += total.eq(acc + s2_op.as_signed() + s2_neg)
            m.d.comb += [self.vm_addr.eq(self.out + s2_row), self.vm_data.eq(total)]
            with m.If(s2):
                with m.If(s2_last):
                    m.d.comb += self.vm_en.eq(1)
                    m.d.sync += acc.eq(0)
                with m.Else():
                    m.d.sync += acc.eq(total)
            m.d.comb += self.done.eq(issue_done & ~s1 & ~s2)
        return m
