"""The tiny engine's scalar datapath: the accumulator ``A``, the operand register ``X`` and the
units that compute the ALU ops of :mod:`.tiny_isa` (every op but the stores, control and
``MATVEC``)."""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .tiny_isa import DATA_BITS, DIV_X_BITS, FIELDS, Cond, Op, sig_frac_bits
from .vector_common import msb_index

__all__ = ["carry_select", "TinyALU", "OP_ONE_HOT_BITS", "op_cases"]

OP_ONE_HOT_BITS = 1 << dict(FIELDS)["op"]     # the op decoded one-hot: one flip-flop per op


def op_cases(*ops: Op) -> list[str]:
    """``m.Case`` patterns that match a one-hot op (:data:`OP_ONE_HOT_BITS` bits) for any of ``ops``."""
    return ["-" * (OP_ONE_HOT_BITS - 1 - o) + "1" + "-" * o for o in ops]


def carry_select(m: Module, a, b, c_in, name: str):
    """``a + b + c_in`` modulo 2^len(a) (``a`` and ``b`` the same width) as a carry-select
    adder: the high half is added for both carries out of the low half, then chosen, halving
    the carry chain on the path. The two high adders are kept apart (``keep``), or Yosys shares
    them into one with the carry multiplexed in, and the second is written as ``~(~a + ~b)``
    (= a + b + 1): as ``a + b + 1`` Yosys makes it an increment of the first, in series with
    it."""
    w = len(a)
    h = w // 2
    lo = Signal(h + 1, name=f"{name}_lo")
    hi0 = Signal(w - h, name=f"{name}_hi0", attrs={"keep": 1})
    hi1 = Signal(w - h, name=f"{name}_hi1", attrs={"keep": 1})
    m.d.comb += [lo.eq(a[:h] + b[:h] + c_in), hi0.eq(a[h:] + b[h:]), hi1.eq(~(~a[h:] + ~b[h:]))]
    return Cat(lo[:h], Mux(lo[h], hi1, hi0))


# what A takes in a cycle (a_sel): bit 2 set for a source other than the adder
HOLD, SUM, SH, PROD, SMALL, SATV = 0, 1, 4, 5, 6, 7
# the small non-negative values A can take (small_sel)
S_I, S_TOKEN, S_SIG, S_COUNT, S_ROOT = range(5)
# the shifter's modes
R1, R8, L1 = range(3)
# SHR's step taken in a SHIFT cycle
SA_NONE, SA_DONE, SA_ROUND, SA_R8, SA_R1 = range(5)
# the ops with cycles after their first EXEC cycle
EXEC_MORE = (Op.MAX, Op.MIN, Op.CSGN, Op.MUL, Op.SHR, Op.BITLEN, Op.DIV, Op.SQRT)


class TinyALU(wiring.Component):
    """``A`` and ``X``, one adder/comparator, a shifter (1 or 8 places a cycle), a 32 x 33-bit
    multiplier, a restoring divider / square root sharing one subtractor (one bit per one or
    two cycles), BITLEN's two-stage priority encoder and the sigmoid-interval logic. Results
    agree with :class:`~.tiny_isa.Machine` bit for bit and cycle for cycle
    (:func:`~.tiny_isa.op_cycles`).

    Every choice on a path into ``A`` comes from a register set a cycle ahead (``a_sel``, the
    adder's five control bits, the shifter's mode), so ``A``'s update depends on no op or state
    decoding in its own cycle.

    Members
    -------
    op : In(OP_ONE_HOT_BITS)
        The instruction's op, one-hot (bit ``Op.X``), stable from before ``prep`` to ``done``.
    last_in_exec : In(1)
        The op ends in its first EXEC cycle (not one of :data:`EXEC_MORE`; decoded with ``op``).
    flag : In(1), cond : In(4)
        The instruction's ``flag`` and ``reg`` (BR's condition, :class:`~.tiny_isa.Cond`).
    prep : In(1)
        Set the adder for ``op`` (any cycle before ``start``, and ``start``'s own).
    clear : In(1)
        Clear the divider / square root's state (any cycle before ``start``, not ``start``'s).
    load_x : In(1), x : In(signed(DATA_BITS))
        ``X := x`` (the operand).
    load_x_hi : In(1), x_hi : In(16)
        ``X := x_hi : X[15:0]``, sign-extended unless ``flag`` (a 32-bit weight's second half).
    start : In(1)
        The op's first EXEC cycle follows this one (``X`` loaded at the latest now).
    i : In(16), token : In(32)
        The loop index (``GETI``) and the token (``GETT``).
    a : Out(signed(DATA_BITS))
        The accumulator.
    cond_ok : Out(1)
        ``cond`` holds for ``A`` (valid from the second cycle after ``A`` last changed).
    set_p : Out(1), sig_idx : Out(sig_table_log2)
        ``SIGP``'s EXEC cycle: ``P := sig_idx``.
    done : Out(1)
        The op's last cycle (its result is in ``A`` the next).
    """

    def __init__(self, fmt: Formats = FORMATS):
        self.fmt = fmt
        super().__init__({"op": In(OP_ONE_HOT_BITS), "last_in_exec": In(1), "flag": In(1),
                          "cond": In(dict(FIELDS)["reg"]), "prep": In(1), "clear": In(1), "load_x": In(1),
                          "x": In(signed(DATA_BITS)), "load_x_hi": In(1), "x_hi": In(16), "start": In(1),
                          "i": In(16), "token": In(32), "a": Out(signed(DATA_BITS)), "cond_ok": Out(1),
                          "set_p": Out(1), "sig_idx": Out(fmt.sig_table_log2), "done": Out(1)})

    def elaborate(self, platform):
        m = Module()
        N = DATA_BITS
        s = SimpleNamespace(
            A=Signal(signed(N), name="A"), X=Signal(signed(N), name="X"),
            a_en=Signal(), a_inv=Signal(), b_en=Signal(), b_inv=Signal(), c_in=Signal(),
            a_sel_r=Signal(3), small_sel=Signal(3), sh_mode=Signal(2),
            count=Signal(7), blen=Signal(6),                  # DIV / SQRT steps, BITLEN's result
            rem=Signal(DIV_X_BITS + 2), root=Signal(N // 2), dv_ph=Signal(),
            diff_r=Signal(DIV_X_BITS + 4), minmax_r=Signal(), is_min_r=Signal(),
            bl_any=Signal(N // 8), bl_idx=Signal(3 * (N // 8)),
            sh_act=Signal(3), sh_c8=Signal(3), sh_c1=Signal(6), sh_left=Signal(), sh_rnd=Signal())
        m.d.comb += self.a.eq(s.A)
        self._condition(m, s)
        self._adder(m, s)
        self._divider(m, s)
        self._sources(m, s)
        self._operand(m, s)
        self._sequence(m, s)
        return m

    def _condition(self, m, s):
        # A == 0, registered every cycle: BR reads it in its ISSUE cycle, and A holds its value
        # from DECODE on (a zero test of A in DECODE would share BITLEN's trees)
        a_zero = Signal()
        m.d.sync += a_zero.eq(s.A == 0)
        a_neg = s.A[DATA_BITS - 1]
        conds = {Cond.ALWAYS: 1, Cond.EQ: a_zero, Cond.NE: ~a_zero, Cond.LT: a_neg, Cond.GE: ~a_neg,
                 Cond.GT: ~a_neg & ~a_zero, Cond.LE: a_neg | a_zero}
        with m.Switch(self.cond):
            for cond, value in conds.items():
                with m.Case(cond):
                    m.d.comb += self.cond_ok.eq(value)

    def _adder(self, m, s):
        """The one adder: (A or 0, maybe inverted) + (X or 0, maybe inverted) + carry in, its five
        control bits registered a cycle ahead, so each operand bit is one LUT: LD 0 + X, ADD A + X,
        SUB A + ~X + 1 (also the compare of MAX / MIN), ABS / CSGN (~A + 1 or A), the TAKE of
        MAX / MIN (0 + X, or A kept), the rounding increment A + 1. The adder is off (its sum 0)
        while A takes another source (a_sel_r's bit 2), so A's input is the sum ORed with that
        source: one LUT after the carry chain's end."""
        N = DATA_BITS
        add_off = s.a_sel_r[2]
        add_a = Signal(N)
        add_b = Signal(N)
        m.d.comb += [add_a.eq(Mux(add_off, 0, Mux(s.a_en, s.A[:N], 0) ^ s.a_inv.replicate(N))),
                     add_b.eq(Mux(add_off, 0, Mux(s.b_en, s.X[:N], 0) ^ s.b_inv.replicate(N)))]
        s.add_s = Signal(N + 1)
        m.d.comb += s.add_s.eq(carry_select(m, Cat(add_a, add_a[N - 1]), Cat(add_b, add_b[N - 1]),
                                            s.c_in & ~add_off, "add"))
        # the adder's setting for the op's first EXEC cycle (CSGN sets it in EXEC, from X, for TAKE)
        with m.If(self.prep):
            neg = s.A[N - 1]
            with m.Switch(self.op):
                with m.Case(*op_cases(Op.LD)):
                    m.d.sync += [s.a_en.eq(0), s.a_inv.eq(0), s.b_en.eq(1), s.b_inv.eq(0), s.c_in.eq(0)]
                with m.Case(*op_cases(Op.ADD)):
                    m.d.sync += [s.a_en.eq(1), s.a_inv.eq(0), s.b_en.eq(1), s.b_inv.eq(0), s.c_in.eq(0)]
                with m.Case(*op_cases(Op.SUB, Op.MAX, Op.MIN)):
                    m.d.sync += [s.a_en.eq(1), s.a_inv.eq(0), s.b_en.eq(1), s.b_inv.eq(1), s.c_in.eq(1)]
                with m.Case(*op_cases(Op.ABS)):
                    m.d.sync += [s.a_en.eq(1), s.a_inv.eq(neg), s.b_en.eq(0), s.b_inv.eq(0), s.c_in.eq(neg)]

    def _divider(self, m, s):
        """The divider / square root step: one subtractor for both (the square root takes two
        cycles per root bit: a radicand bit shifted in, then the trial)."""
        N = DATA_BITS
        is_div = self.op[Op.DIV]
        s.div_last = Signal()          # the division's last step
        m.d.comb += s.div_last.eq(s.count == N - 1)
        s.r2 = Cat(s.A[N - 1], s.rem[:DIV_X_BITS + 1])
        trial = Mux(is_div, s.X[:DIV_X_BITS + 1], Cat(Const(1, 2), s.root))
        width = len(s.diff_r)
        s.diff = Signal(width)
        m.d.comb += s.diff.eq(carry_select(m, Cat(s.r2, Const(0, 2)), ~Cat(trial, Const(0, width - len(trial))),
                                           Const(1, 1), "diff"))
        s.ge_r = ~s.diff_r[width - 1]

    def _sources(self, m, s):
        """What A takes each cycle: the adder's sum ORed with another source (a_sel_r, a register
        set in the cycle before), except where MAX / MIN's registered comparison keeps A."""
        N, fmt, A = DATA_BITS, self.fmt, s.A
        a_neg = A[N - 1]
        # the shifter: one of A >> 1, A >> 8, A << 1 (bit 0: the quotient bit); its mode is a
        # register set in the cycle before, with a_sel_r
        m.d.sync += s.sh_mode.eq(L1)    # (DIV and SQRT's shift; SHR's steps set it where they differ)
        sh = Signal(N)
        with m.Switch(s.sh_mode):
            with m.Case(R1):
                m.d.comb += sh.eq(A >> 1)
            with m.Case(R8):
                m.d.comb += sh.eq(A >> 8)
            with m.Case(L1):
                m.d.comb += sh.eq(Cat(s.ge_r & self.op[Op.DIV], A[:N - 1]))
        # multiplier: A[31:0] signed x X[31:0] (signed, or unsigned with flag), one cycle + register
        xm = Signal(signed(33))
        m.d.comb += xm.eq(Mux(self.flag, Cat(s.X[:32], Const(0, 1)), Cat(s.X[:32], s.X[31])).as_signed())
        prod = Signal(signed(65))
        m.d.sync += prod.eq(A[:32].as_signed() * xm)
        # sigmoid interval of A; it, and A saturated to int32, are registered every cycle: the ops
        # that take them (SIGP, SAT) hold A in the cycle before EXEC, so they see their own A (and
        # A's comparison trees stay off the path into A's own enable). The interval's range tests
        # (reductions over A's upper bits) are registered a cycle earlier still: A holds its value
        # from DECODE on and EXEC comes two cycles later at the earliest (DECODE, ISSUE, EXEC), so
        # the tests, the interval and SIGP all see the same A
        frac_bits = sig_frac_bits(fmt)
        n_tab = 1 << fmt.sig_table_log2
        hi_bit = frac_bits + fmt.sig_table_log2 - 1          # |y| >= 2^hi_bit is outside the table
        upper = A[hi_bit:]
        below, above = Signal(), Signal()
        m.d.sync += [below.eq(a_neg & ~upper.all()), above.eq(~a_neg & upper.any())]
        sig_frac = Signal(frac_bits + 1)
        with m.If(below):
            m.d.sync += [self.sig_idx.eq(0), sig_frac.eq(0)]
        with m.Elif(above):
            m.d.sync += [self.sig_idx.eq(n_tab - 1), sig_frac.eq(1 << frac_bits)]
        with m.Else():
            m.d.sync += [self.sig_idx.eq(A[frac_bits:hi_bit + 1] ^ (n_tab // 2)), sig_frac.eq(A[:frac_bits])]
        # MAX / MIN: the comparison is registered (lt_r, every cycle, straight from the adder's
        # sign: no op decoding behind the carry chain), and A keeps its value in TAKE unless it
        # says to load X; is_min_r turns it around for MIN
        lt_r = Signal()
        m.d.sync += lt_r.eq(s.add_s[N])          # in SUB mode: A < X (signed)
        a_sel = Signal(3)
        m.d.comb += a_sel.eq(Mux(s.minmax_r & (lt_r == s.is_min_r), HOLD, s.a_sel_r))
        m.d.sync += [s.a_sel_r.eq(HOLD), s.minmax_r.eq(0)]
        small = Signal(32)
        smalls = {S_I: self.i, S_TOKEN: self.token, S_SIG: sig_frac, S_COUNT: s.blen, S_ROOT: s.root}
        with m.Switch(s.small_sel):
            for sel, value in smalls.items():
                with m.Case(sel):
                    m.d.comb += small.eq(value)
        sat_ovf = ~A[31:].all() & A[31:].any()
        satv = Signal(N)
        m.d.sync += satv.eq(Cat(Mux(sat_ovf, (~a_neg).replicate(31), A[:31]),
                                Mux(sat_ovf, a_neg.replicate(N - 31), A[31:])))
        other = Signal(N)             # the source other than the adder (0 while the adder's)
        with m.Switch(s.a_sel_r):
            for sel, value in {SH: sh, PROD: prod[:N], SMALL: small, SATV: satv}.items():
                with m.Case(sel):
                    m.d.comb += other.eq(value)
        with m.If(a_sel != HOLD):
            m.d.sync += A.eq(s.add_s[:N] | other)

    def _operand(self, m, s):
        """X, and the A source and small value the op's first EXEC cycle takes (set at ``start``)."""
        with m.If(self.load_x):
            m.d.sync += s.X.eq(self.x)
        with m.If(self.load_x_hi):
            hi = Cat(s.X[:16], self.x_hi)
            m.d.sync += s.X.eq(Mux(self.flag, hi, hi.as_signed()))
        pre_sel = Signal(3)
        pre_small = Signal(3)
        with m.Switch(self.op):
            with m.Case(*op_cases(Op.LD, Op.ADD, Op.SUB, Op.ABS)):
                m.d.comb += pre_sel.eq(SUM)
            with m.Case(*op_cases(Op.SAT)):
                m.d.comb += pre_sel.eq(SATV)
            with m.Case(*op_cases(Op.SIGP)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_SIG)]
            with m.Case(*op_cases(Op.GETI)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_I)]
            with m.Case(*op_cases(Op.GETT)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_TOKEN)]
            with m.Case(*op_cases(Op.SQRT)):         # (its first step shifts; DIV's first cycle holds A)
                m.d.comb += pre_sel.eq(SH)
        with m.If(self.clear):
            m.d.sync += [s.count.eq(0), s.rem.eq(0), s.root.eq(0), s.dv_ph.eq(0)]
        with m.If(self.start):
            m.d.sync += [s.a_sel_r.eq(pre_sel), s.small_sel.eq(pre_small)]

    def _sequence(self, m, s):
        """EXEC, the op's first cycle after ``start``, and the cycles some ops add (TAKE, SHIFT,
        BITLEN2)."""
        with m.FSM(name="alu"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.next = "EXEC"
            with m.State("EXEC"):
                done = self.last_in_exec | (self.op[Op.DIV] & s.div_last & s.dv_ph)
                m.d.comb += [self.done.eq(done), self.set_p.eq(self.op[Op.SIGP])]
                with m.If(done):
                    m.next = "IDLE"
                self._exec(m, s)
            with m.State("BITLEN2"):
                _, top = msb_index(s.bl_any, DATA_BITS // 8)
                m.d.sync += [s.blen.eq(Cat(s.bl_idx.word_select(top, 3), top)), s.a_sel_r.eq(SMALL),
                             s.small_sel.eq(S_COUNT)]
                m.next = "TAKE"
            with m.State("TAKE"):
                # the last cycle of MAX/MIN, CSGN, MUL, BITLEN, SQRT: A takes a_sel_r
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"
            with m.State("SHIFT"):
                self._shift(m, s)

    def _exec(self, m, s):
        N, X, A = DATA_BITS, s.X, s.A
        with m.Switch(self.op):
            with m.Case(*op_cases(Op.MAX, Op.MIN)):
                # compare now (lt_r); in TAKE, A := 0 + X or A kept
                m.d.sync += [s.is_min_r.eq(self.op[Op.MIN]), s.minmax_r.eq(1),
                             s.a_en.eq(0), s.a_inv.eq(0), s.b_en.eq(1), s.b_inv.eq(0), s.c_in.eq(0),
                             s.a_sel_r.eq(SUM)]
                m.next = "TAKE"
            with m.Case(*op_cases(Op.CSGN)):
                # -A or A in TAKE, as X's sign says
                neg = X[N - 1]
                m.d.sync += [s.a_en.eq(1), s.a_inv.eq(neg), s.b_en.eq(0), s.b_inv.eq(0), s.c_in.eq(neg),
                             s.a_sel_r.eq(SUM)]
                m.next = "TAKE"
            with m.Case(*op_cases(Op.MUL)):
                # the product register is written at the end of this cycle
                m.d.sync += s.a_sel_r.eq(PROD)
                m.next = "TAKE"
            with m.Case(*op_cases(Op.SHR)):
                # s in [-63, 63]; rounding: (s - 1) // 8 steps of 8, (s - 1) % 8 of 1, the
                # increment, a last step of 1; else s // 8, s % 8
                sc = X[:8].as_signed()
                sm1 = Signal(8)
                m.d.comb += sm1.eq(sc - 1)
                m.d.sync += [s.a_en.eq(1), s.a_inv.eq(0), s.b_en.eq(0), s.b_inv.eq(0), s.c_in.eq(1),
                             s.sh_act.eq(SA_NONE), s.sh_left.eq(0), s.sh_rnd.eq(0), s.sh_c8.eq(0), s.sh_c1.eq(0)]
                with m.If(sc > 0):
                    with m.If(self.flag):
                        m.d.sync += [s.sh_c8.eq(sm1[3:6]), s.sh_c1.eq(sm1[:3]), s.sh_rnd.eq(1)]
                    with m.Else():
                        m.d.sync += [s.sh_c8.eq(sc[3:6]), s.sh_c1.eq(sc[:3])]
                with m.Elif(sc < 0):
                    m.d.sync += [s.sh_c1.eq(-sc), s.sh_left.eq(1)]
                m.next = "SHIFT"
            with m.Case(*op_cases(Op.BITLEN)):
                # bit length of A >= 0 = index of the top one of 2A + 1, in two registered
                # stages: each byte's top one here, the top byte's in BITLEN2, then A := it in TAKE
                v = Cat(Const(1, 1), A[:N - 1])
                for k in range(N // 8):
                    any_k, idx_k = msb_index(v[8 * k:8 * k + 8], 8)
                    m.d.sync += [s.bl_any[k].eq(any_k), s.bl_idx[3 * k:3 * k + 3].eq(idx_k)]
                m.next = "BITLEN2"
            with m.Case(*op_cases(Op.DIV)):
                # restoring division, one quotient bit per two cycles, quotient in A: the trial
                # difference is registered (diff_r), then applied
                with m.If(~s.dv_ph):
                    m.d.sync += [s.diff_r.eq(s.diff), s.dv_ph.eq(1), s.a_sel_r.eq(SH)]
                with m.Else():
                    m.d.sync += [s.rem.eq(Mux(s.ge_r, s.diff_r, s.r2)), s.count.eq(s.count + 1), s.dv_ph.eq(0)]
            with m.Case(*op_cases(Op.SQRT)):
                # restoring square root: even steps shift a radicand bit into rem (one cycle), odd
                # steps also try the next root bit (two: the difference is registered, then
                # applied); N steps, then A := root in TAKE
                with m.If(~s.count[0]):
                    m.d.sync += [s.rem.eq(s.r2), s.count.eq(s.count + 1)]
                with m.Elif(~s.dv_ph):
                    m.d.sync += [s.diff_r.eq(s.diff), s.dv_ph.eq(1), s.a_sel_r.eq(SH)]
                with m.Else():
                    m.d.sync += [s.rem.eq(Mux(s.ge_r, s.diff_r, s.r2)), s.root.eq(Cat(s.ge_r, s.root[:-1])),
                                 s.count.eq(s.count + 1), s.dv_ph.eq(0)]
                    with m.If(s.count == N - 1):
                        m.d.sync += [s.a_sel_r.eq(SMALL), s.small_sel.eq(S_ROOT)]
                        m.next = "TAKE"
                    with m.Else():
                        m.d.sync += s.a_sel_r.eq(SH)

    def _shift(self, m, s):
        """SHR's steps: EXEC turned the count into step counts (sh_c8 right-by-8 steps, then sh_c1
        right- or left-by-1 steps, then with rounding the increment and one more right step);
        each SHIFT cycle A takes the step registered in the cycle before (sh_act, with a_sel_r
        and sh_mode) and the next is decided from the counts: no comparison of the count with
        constants on the path into A's select."""
        with m.If(s.sh_act == SA_DONE):
            m.d.comb += self.done.eq(1)
            m.next = "IDLE"
        with m.Elif(s.sh_c8 != 0):
            m.d.sync += [s.sh_act.eq(SA_R8), s.sh_c8.eq(s.sh_c8 - 1), s.a_sel_r.eq(SH), s.sh_mode.eq(R8)]
        with m.Elif(s.sh_c1 != 0):
            m.d.sync += [s.sh_act.eq(SA_R1), s.sh_c1.eq(s.sh_c1 - 1), s.a_sel_r.eq(SH),
                         s.sh_mode.eq(Mux(s.sh_left, L1, R1))]
        with m.Elif(s.sh_rnd):
            m.d.sync += [s.sh_act.eq(SA_ROUND), s.sh_rnd.eq(0), s.sh_c1.eq(1), s.a_sel_r.eq(SUM)]
        with m.Else():
            m.d.sync += s.sh_act.eq(SA_DONE)
