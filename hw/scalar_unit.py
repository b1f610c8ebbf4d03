"""The per-BitLinear scalar unit: r = isqrt(sum of squares) and (Qt, t) = scale_mantissa(kM m, r)."""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import enum, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import K_EXP_BITS, msb_index, scale_layout, stats_layout, vector_widths

__all__ = ["ScalarUnit", "EpsKind"]


class EpsKind(enum.Enum, shape=2):
    """How a BitLinear's eps term is formed (``reference.integer.EPS_KINDS``)."""
    INPUT = 0   # G from the statistics pass, E = shift(eps_mant G, eps_exp)
    GSUM = 1    # o_proj: G over the g_proj output, E = shift(eps_mant G, eps_exp - 2 sh)
    CONST = 2   # down_proj: E = shift(eps_mant, eps_exp - 2 sh)


class ScalarUnit(wiring.Component):
    """From one BitLinear's statistics to the scale of its outputs, bit-exact with ``bitlinear``.

    Computes ``r = isqrt(sumsq)`` (``isqrt(sumsq + E)`` with ``norm_eps``),
    ``(Qt, t) = scale_mantissa(k_mant * m, r)`` and the output shift ``t - k_exp``; ``Qt = 0``
    when ``m == 0`` or ``r == 0`` (the reference then returns zeros, and a zero Qt makes
    :class:`OutputScale` produce exactly those).

    Members
    -------
    i : In(stream of stats_layout)
        ``m`` = max|v16 c| and ``sumsq`` from :class:`BitLinearFront`'s ``stats`` stream (with
        ``norm_eps`` also ``g`` and ``sh``).
    k_mant : In(unsigned(const_bits)), k_exp : In(signed(K_EXP_BITS))
        The BitLinear's export-time constant K = k_mant 2^k_exp; sampled when ``i`` is accepted.
    eps_mant : In(unsigned(const_bits)), eps_exp : In(signed(K_EXP_BITS)), eps_kind : In(EpsKind),
    gsum : In(unsigned(eps_gsum_bits))
        With ``norm_eps`` only: the eps constant, how E is formed and o_proj's G (sum of the
        squared, clamped g_proj outputs); sampled when ``i`` is accepted.
        E = shift(eps_mant G', eps_exp - (0 for INPUT, 2 sh otherwise)) with G' the stats' ``g``
        (INPUT), ``gsum`` (GSUM) or 1 (CONST) and shift rounding half up on right shifts.
    o : Out(stream of scale_layout)
        ``qt`` and ``shift`` (t - k_exp, clamped to [shift_min, shift_max], which leaves every
        output unchanged) for :class:`OutputScale`'s ``scale`` input.

    Sequential, no DSP: a shift-add multiplier (one k_mant bit per cycle) runs alongside a
    restoring square root (two sumsq bits per cycle, r_bits cycles); then two cycles find the bit
    lengths and t, and a restoring divider produces Qt = floor(floor(num 2^t) / r) one quotient bit
    per cycle, feeding num's bits from its leading one (scale_bits - 1 + bitlen(r) cycles).
    Latency at most ``max_latency`` = max(ceil(sumsq_bits / 2), const_bits) + scale_bits +
    r_bits + 3 cycles (66 with the default formats) from acceptance to ``o.valid``.
    With ``norm_eps`` the two products (k_mant m and eps_mant G', one bit of each mantissa per
    cycle) come first, then three cycles shift E and add it to sumsq, then the square root of
    the sum, ``se_bits`` wide (r of se_bits / 2 bits): latency at most const_bits + 3 +
    se_bits / 2 + scale_bits + se_bits / 2 + 3. Exact while sumsq + E < 2^se_bits (2^96 with the
    wide formats: E beyond 2^35 times the largest sumsq, an input whose largest |v| is a few
    LSBs with an extreme eps constant); a larger sum is taken as 2^se_bits - 1.
    The unit accepts a new input whenever it is idle, also while its previous result still
    waits in ``o``; a finished result waits until ``o`` is free.
    """

    def __init__(self, fmt: Formats = FORMATS):
        self._w = w = vector_widths(fmt)
        members = {
            "i": In(stream.Signature(stats_layout(w))),
            "k_mant": In(unsigned(w.const_bits)),
            "k_exp": In(signed(K_EXP_BITS)),
            "o": Out(stream.Signature(scale_layout(w))),
        }
        if w.norm_eps:
            members.update({"eps_mant": In(unsigned(w.const_bits)), "eps_exp": In(signed(K_EXP_BITS)),
                            "eps_kind": In(EpsKind), "gsum": In(unsigned(w.eps_gsum_bits))})
        super().__init__(members)

    @property
    def sq_bits(self) -> int:
        """Bits of the square root's operand: sumsq, or sumsq + E (``se_bits``)."""
        return self._w.se_bits if self._w.norm_eps else self._w.sumsq_bits

    @property
    def r_bits(self) -> int:
        return self._w.se_bits // 2 if self._w.norm_eps else self._w.r_bits

    @property
    def max_latency(self) -> int:
        w = self._w
        if w.norm_eps:
            return w.const_bits + 3 + self.sqrt_steps + w.scale_bits + self.r_bits + 3
        return max(self.sqrt_steps, w.const_bits) + w.scale_bits + w.r_bits + 3

    @property
    def sqrt_steps(self) -> int:
        return -(-self.sq_bits // 2)

    def elaborate(self, platform):
        w = self._w
        eps = w.norm_eps
        m = Module()
        steps = self.sqrt_steps
        r_bits = self.r_bits
        mul_steps = w.const_bits
        run_steps = steps if eps else max(steps, mul_steps)

        mval = Signal(w.m_bits)
        kmant = Signal(w.const_bits)
        kexp = Signal(signed(K_EXP_BITS))
        nsr = Signal(2 * steps)                  # sumsq, consumed two bits per step from the top
        srem = Signal(r_bits + 2)                # square-root remainder, <= 2 root
        root = Signal(r_bits)
        num = Signal(w.num_bits)                 # k_mant * m
        cnt = Signal(range(max(run_steps, mul_steps, w.scale_bits + r_bits) + 1))
        # leading-one indices (bit length - 1) of num and r, and whether they are non-zero
        nmsb, nany = Signal(range(w.num_bits)), Signal()
        rmsb, rany = Signal(range(r_bits)), Signal()
        pos = Signal(signed(max(w.num_bits, w.scale_bits + r_bits).bit_length() + 2))
        drem = Signal(r_bits + 1)                # division remainder, < r
        quo = Signal(w.scale_bits)
        zero = Signal()
        bit = Signal()
        sh_raw = Signal(signed(K_EXP_BITS + 2))
        t_min = w.scale_bits - w.num_bits        # (scale_bits - 1) + 1 - num_bits
        t_max = w.scale_bits - 1 + r_bits
        t = Signal(range(t_min, t_max + 1))

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)     # overridden below when a new result moves in

        if eps:
            e = self._eps_signals(m)

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.sync += [
                        mval.eq(self.i.payload.m), nsr.eq(self.i.payload.sumsq),
                        kmant.eq(self.k_mant), kexp.eq(self.k_exp),
                        srem.eq(0), root.eq(0), num.eq(0), cnt.eq(0),
                    ]
                    if eps:
                        m.d.sync += e.accept
                        m.next = "MUL"
                    else:
                        m.next = "RUN"

            if eps:
                with m.State("MUL"):
                    m.d.sync += [num.eq((num << 1) + Mux(kmant[-1], mval, 0)), kmant.eq(kmant << 1),
                                 e.en.eq((e.en << 1) + Mux(e.emant[-1], e.g, 0)), e.emant.eq(e.emant << 1),
                                 cnt.eq(cnt + 1)] + e.plan
                    with m.If(cnt == mul_steps - 1):
                        m.next = "SHIFT"
                with m.State("SHIFT"):
                    m.d.sync += e.shift
                    m.next = "ADD_LO"
                with m.State("ADD_LO"):
                    m.d.sync += e.add_lo
                    m.next = "ADD_HI"
                with m.State("ADD_HI"):
                    m.d.sync += [nsr.eq(e.sum), cnt.eq(0)]
                    m.next = "RUN"

            with m.State("RUN"):
                with m.If(cnt < steps):
                    rem2 = Cat(nsr[-2:], srem)
                    diff = rem2 - Cat(Const(1, 2), root)     # its sign is the comparison
                    fits = ~diff[-1]
                    m.d.sync += [nsr.eq(nsr << 2), srem.eq(Mux(fits, diff, rem2)), root.eq(Cat(fits, root))]
                if not eps:
                    with m.If(cnt < mul_steps):
                        m.d.sync += [num.eq((num << 1) + Mux(kmant[-1], mval, 0)), kmant.eq(kmant << 1)]
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == run_steps - 1):
                    m.next = "NORM"

            with m.State("NORM"):
                n_any, n_msb = msb_index(num, w.num_bits)
                r_any, r_msb = msb_index(root, r_bits)
                m.d.sync += [nany.eq(n_any), nmsb.eq(n_msb), rany.eq(r_any), rmsb.eq(r_msb)]
                m.next = "ALIGN"

            with m.State("ALIGN"):
                m.d.sync += [
                    zero.eq(~nany | ~rany),
                    # t = (scale_bits - 1) + bitlen(r) - bitlen(num); the quotient's
                    # scale_bits - 1 + bitlen(r) steps start from num's leading one
                    t.eq(w.scale_bits - 1 + rmsb - nmsb), pos.eq(nmsb - 1),
                    bit.eq(num.bit_select(nmsb, 1)),
                    cnt.eq(w.scale_bits + rmsb), drem.eq(0), quo.eq(0),
                ]
                m.next = "DIV"

            with m.State("DIV"):
                # `bit` is num's next bit, fetched a cycle ahead; the sign of one subtraction
                # is the comparison
                rem2 = Cat(bit, drem)
                diff = rem2 - root
                fits = ~diff[-1]
                m.d.sync += sh_raw.eq(t - kexp)
                with m.If(zero | (cnt == 0)):
                    m.next = "DONE"
                with m.Else():
                    m.d.sync += [
                        pos.eq(pos - 1), cnt.eq(cnt - 1),
                        bit.eq(Mux(pos >= 0, num.bit_select(pos[:-1].as_unsigned(), 1), 0)),
                        drem.eq(Mux(fits, diff, rem2)), quo.eq(Cat(fits, quo)),
                    ]

            with m.State("DONE"):
                with m.If(~self.o.valid | self.o.ready):
                    sh = sh_raw
                    m.d.sync += [
                        self.o.payload.qt.eq(Mux(zero, 0, quo)),
                        self.o.payload.shift.eq(
                            Mux(sh > w.shift_max, w.shift_max, Mux(sh < w.shift_min, w.shift_min, sh))),
                        self.o.valid.eq(1),
                    ]
                    m.next = "IDLE"
        return m

    def _eps_signals(self, m):
        """The eps term's registers and statements: ``accept`` (latch the operands), ``shift``
        (E's shift, registered), ``plan`` (its amounts, registered during the products),
        ``add_lo`` (the sum's low half and the overflow, registered), ``sum`` (sumsq + E,
        saturated)."""
        w = self._w
        se = w.se_bits
        g_bits = max(w.eps_g_bits, w.eps_gsum_bits)
        en_bits = w.const_bits + g_bits
        e = SimpleNamespace()
        e.emant = Signal(w.const_bits)
        e.g = Signal(g_bits)
        e.en = Signal(en_bits)                   # eps_mant * G'
        e.exp = Signal(signed(K_EXP_BITS + 2))   # eps_exp - (2 sh)
        e.s = Signal(w.sumsq_bits)
        e.t1 = Signal(se)
        e.rnd = Signal()
        e.ovf = Signal()
        pl, kind = self.i.payload, self.eps_kind
        e.accept = [e.emant.eq(self.eps_mant), e.en.eq(0), e.s.eq(pl.sumsq),
                    e.g.eq(Mux(kind == EpsKind.INPUT, pl.g, Mux(kind == EpsKind.GSUM, self.gsum, 1))),
                    e.exp.eq(self.eps_exp - Mux(kind == EpsKind.INPUT, 0, pl.sh * 2))]
        # left: en << exp (exp < se, else every non-zero en overflows); right by s = -exp >= 1:
        # rshift_round(en, s) = ((en >> (s - 1)) + 1) >> 1, and 0 once s - 1 >= en_bits. The
        # shift amounts and their cases are registered while the products run (``plan``: exp is
        # fixed by then), the shift itself in SHIFT, the overflow test on the bits shifted past
        # se_bits in ADD_LO.
        amt_bits = max(se, en_bits).bit_length()
        e.neg, lamt, ramt, rzero = Signal(), Signal(amt_bits), Signal(amt_bits), Signal()
        s1 = (-e.exp - 1).as_unsigned()
        e.plan = [e.neg.eq(e.exp < 0), lamt.eq(Mux(e.exp >= se, se, e.exp[:amt_bits])),
                  rzero.eq(s1 >= en_bits), ramt.eq(s1[:amt_bits])]
        wide = Signal(en_bits + se)
        m.d.comb += wide.eq(e.en << lamt)
        right = Mux(rzero, 0, e.en >> ramt)
        whi = Signal(en_bits)
        e.shift = [e.t1.eq(Mux(e.neg, right, wide[:se])), e.rnd.eq(e.neg), whi.eq(wide[se:])]
        e.ovf_next = e.ovf.eq(~e.rnd & whi.any())
        # sumsq + E in two halves (two shorter carry chains); E = t1, or ceil(t1 / 2) after a right shift
        half = se // 2
        addend = Mux(e.rnd, e.t1 >> 1, e.t1)
        lo = Signal(half + 1)
        e.add_lo = [lo.eq(e.s[:half] + addend[:half] + (e.rnd & e.t1[0])), e.ovf_next]
        hi = Signal(se - half + 1)
        m.d.comb += hi.eq(e.s[half:] + addend[half:] + lo[half])
        e.sum = Mux(e.ovf | hi[-1], (1 << se) - 1, Cat(lo[:half], hi[:-1]))
        return e
