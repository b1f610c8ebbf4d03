"""The input side of a BitLinear: normalise, statistics, quantise, as three passes over v."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import (DSP_BITS, Pipeline, greater_unsigned, msb_index, stats_layout, umul, umul_latency,
                            vector_widths)

__all__ = ["FrontOp", "BitLinearFront", "front_input_layout"]


class FrontOp(enum.Enum, shape=2):
    """The pass an element belongs to."""
    MAX = 0     # reduce max|v| -> the normalisation shift
    STATS = 1   # reduce m = max|v16 c| and sum(((v16 a) >> sumsq_shift)^2) -> ``stats``
    QUANT = 2   # q = quantise(v16 c, m) -> ``q``


def front_input_layout(w) -> data.StructLayout:
    return data.StructLayout({"op": FrontOp, "last": 1, "v": w.x, "a": w.norm, "c": w.norm})


class BitLinearFront(wiring.Component):
    """Steps 1, 2 and 4 of ``bitlinear`` (reference/integer.py) as three streaming passes.

    The engine streams the BitLinear's input vector v three times, with the same ``op`` on every
    element of a pass and ``last`` on its final element:

    1. ``MAX`` (only ``v`` is used): max|v| (as the OR of all |v|, which has the same bit
       length), kept as the shift of ``normalise``; no output.
    2. ``STATS`` (``v``, rms-weights ``a``, quant-weights ``c``): v16 = normalise(v),
       m = max|v16 c| and sumsq = sum(((v16 a) >> sumsq_shift)^2); after the last element they go
       out on ``stats`` (to :class:`ScalarUnit`), and the unit computes the quantiser's reciprocal
       R = floor(qmax 2^recip_frac / m16) with a restoring divider (recip_bits cycles).
    3. ``QUANT`` (``v``, ``c``): q = quantise(v16 c, m) on ``q``, one per element, in order.

    Several BitLinears may share one MAX pass (i_proj, f_proj and g_proj read the same x): one
    MAX result serves any number of STATS/QUANT passes, and a QUANT pass uses the latest STATS
    pass's m. Only the bit length of max|v| matters, so a MAX pass may also be a single element
    carrying the OR of the magnitudes, tracked while v was written (x_min when bit
    x_bits - 1 is set). When m = 0 the QUANT pass gives zeros (and :class:`ScalarUnit` gives Qt = 0).

    Members
    -------
    i : In(stream of front_input_layout)
        ``op``, ``last``, ``v`` (signed x_bits), ``a``, ``c`` (signed norm_bits).
    q : Out(stream of signed(act_bits))
        Quantised activations of QUANT passes, for the matrix-vector unit.
    stats : Out(stream of stats_layout)
        ``m`` and ``sumsq`` of each STATS pass.

    With ``quant_exact`` the QUANT pass gives the exactly rounded q = sign(z)
    floor((254 |z| + m) / (2 m)): the reciprocal's q is a candidate c within one of it, and one
    product c m decides the correction: c + 1 when 254 |z| >= (2 c + 1) m, c - 1 when
    254 |z| < (2 c - 1) m. With ``norm_eps`` the STATS pass also sums
    G = sum((|v16| >> (norm_bits - 16))^2), which goes out on ``stats`` with the normalise shift
    ``sh`` (the eps term of :class:`ScalarUnit`).

    Throughput one element per cycle within a pass. After the last element of a MAX pass the
    input is held off for ``MAX_GAP`` = 3 cycles; after the last of a STATS pass for
    ``stats_gap`` cycles (10 + recip_bits = 26 with the narrow formats), longer if ``stats``
    still holds the previous result. Latency of ``q``: ``latency`` cycles (``LATENCY`` = 8 with
    the narrow formats).
    Multipliers with the narrow formats, all 16x16 (norm_bits): v16 c and v16 a (signed), and
    one unsigned one shared between |p|^2 (STATS) and mag16 R (QUANT). Wider norms: the products
    of the magnitudes from DSP_BITS limbs (:func:`~.vector_common.umul`), |p|^2 and mag16 R
    apart; the exact quantiser's c m and the eps term's square add theirs.
    """

    LATENCY = 8
    MAX_GAP = 3

    def __init__(self, fmt: Formats = FORMATS):
        self._w = w = vector_widths(fmt)
        # norm_bits signed products on single DSPs; one multiplier shared by |p|^2 and mag16 R
        self._narrow_products = w.norm_bits <= DSP_BITS
        self._shared_square = w.p_mag_max.bit_length() <= w.quant_mag_bits and w.recip_bits <= w.quant_mag_bits
        self._exact = w.quant_exact
        self._eps = w.norm_eps
        if self._eps and w.norm_bits < 16:
            raise ValueError("the eps term needs norm_bits >= 16")
        if w.quant_mag_bits > DSP_BITS or w.recip_bits > DSP_BITS + 1:
            raise ValueError("mag16 R is one multiplier: quant_bits <= DSP_BITS and a reciprocal of DSP_BITS + 1 bits")
        # stages: the magnitudes (sm), the products summed (s), the result
        sm = 4 if self._narrow_products else 5 + umul_latency(w.v16_mag_max, w.v16_mag_max, registered=True)
        if self._shared_square:
            s = sm + 3
        else:
            s = sm + 2 + max(umul_latency(w.p_mag_max, w.p_mag_max, registered=True), 0)
        self._mag_stage, self._sum_stage = sm, s
        if self._exact:
            self._latency = s + 1 + umul_latency(w.act_max, (1 << w.m_bits) - 1, registered=True) + 1 + 3
        else:
            self._latency = s + 1
        super().__init__({
            "i": In(stream.Signature(front_input_layout(w))),
            "q": Out(stream.Signature(w.act)),
            "stats": Out(stream.Signature(stats_layout(w))),
        })

    @property
    def latency(self) -> int:
        """Cycles from a QUANT element to its q (``LATENCY`` with the narrow formats)."""
        return self._latency

    @property
    def stats_gap(self) -> int:
        """Cycles the input is held off after a STATS pass (``stats`` free): drain, finish, divide."""
        return self._sum_stage + 3 + self._w.recip_bits

    def elaborate(self, platform):
        w = self._w
        fmt = w.fmt
        qb = w.quant_mag_bits
        m = Module()

        q_valid = Signal()
        advance = ~q_valid | self.q.ready
        idle = Signal()
        m.d.comb += self.i.ready.eq(advance & idle)
        accept = self.i.valid & self.i.ready
        p = Pipeline(m, advance)

        shamt = Signal(range(w.x_bits))          # normalise: v16 = (v << (norm_bits-2)) >> shamt
        zsh = Signal(range(w.m_bits))            # quantise: mag16 = (|z| << (qb-1)) >> zsh
        recip = Signal(w.recip_bits)
        or_acc = Signal(w.x_bits)
        m_acc = Signal(w.m_bits)
        m_q = Signal(w.m_bits)                   # the QUANT pass's m (the exact quantiser)
        sumsq_acc = Signal(w.sumsq_bits)
        g_acc = Signal(w.eps_g_bits)
        first = Signal(init=1)
        with m.If(accept):
            m.d.sync += first.eq(self.i.payload.last)

        # stage 1: the accepted element
        pl = self.i.payload
        valid = p.reg(1, "valid", self.i.valid & idle)
        op = p.reg(1, "op", pl.op)
        last = p.reg(1, "last", pl.last)
        frst = p.reg(1, "first", first)
        v = p.reg(1, "v", pl.v)
        a = p.reg(1, "a", pl.a)
        c = p.reg(1, "c", pl.c)

        # stage 2: |v| for MAX, v16 for the other passes
        vabs = p.reg(2, "vabs", Mux(v < 0, -v, v), unsigned(w.x_bits))
        v16 = p.reg(2, "v16", ((v << (w.norm_bits - 2)) >> shamt)[:w.norm_bits].as_signed())

        def at_op(k, which):
            return p.at(valid, k) & (p.at(op, k) == which)

        max_done = Signal()
        # OR and max are idempotent, so these two reductions may repeat an element while the
        # pipeline is stalled: they need no `advance` in their enables (a shorter path)
        with m.If(at_op(2, FrontOp.MAX)):
            m.d.sync += or_acc.eq(Mux(p.at(frst, 2), 0, or_acc) | vabs)
        m.d.comb += max_done.eq(advance & at_op(2, FrontOp.MAX) & p.at(last, 2))

        # stage 3 on: the two signed products, then magnitudes (stage ``sm``)
        c2, a2 = p.at(c, 2), p.at(a, 2)
        if self._narrow_products:
            (z, pa), s = p.products(3, "zp", [(v16, c2, (v16 * c2).shape()), (v16, a2, (v16 * a2).shape())],
                                    registered=True)
            sm = s + 1
            zneg = p.reg(sm, "zneg", z < 0)
            zabs = p.reg(sm, "zabs", Mux(z < 0, -z, z), unsigned(w.m_bits))
            pv = pa >> fmt.sumsq_shift
            pabs = p.reg(sm, "pabs", Mux(pv < 0, -pv, pv), unsigned(w.p_mag_max.bit_length()))
        else:
            # sign and magnitude, the magnitudes' product from DSP_BITS limbs
            vneg = p.reg(3, "vneg", v16 < 0)
            vmag = p.reg(3, "vmag", Mux(v16 < 0, -v16, v16), unsigned(w.norm_bits))
            cneg = p.reg(3, "cneg", c2 < 0)
            cmag = p.reg(3, "cmag", Mux(c2 < 0, -c2, c2), unsigned(w.norm_bits))
            aneg = p.reg(3, "aneg", a2 < 0)
            amag = p.reg(3, "amag", Mux(a2 < 0, -a2, a2), unsigned(w.norm_bits))
            zprod, s = umul(p, 4, "z", vmag, w.v16_mag_max, cmag, w.v16_mag_max, registered=True)
            paprod, _ = umul(p, 4, "pa", vmag, w.v16_mag_max, amag, w.v16_mag_max, registered=True)
            sm = s + 1
            zneg = p.reg(sm, "zneg", p.at(vneg, s) ^ p.at(cneg, s))
            zabs = p.reg(sm, "zabs", zprod, unsigned(w.m_bits))
            # |floor(+-P / 2^k)|: P >> k, or ceil(P / 2^k) when negative
            k = fmt.sumsq_shift
            pabs = p.reg(sm, "pabs", (paprod + Mux(p.at(vneg, s) ^ p.at(aneg, s), (1 << k) - 1, 0)) >> k,
                         unsigned(w.p_mag_max.bit_length()))
        assert sm == self._mag_stage
        # m = max|z| in two steps, so no comparator drives m_acc directly: stage sm + 1 holds a
        # candidate and whether it replaces m_acc; stage sm's element is compared with the
        # maximum including that candidate (two comparators, one picked by `take`).
        take = Signal()
        cand = p.at(zabs, sm + 1)
        beats = Mux(take, greater_unsigned(zabs, cand), greater_unsigned(zabs, m_acc))
        m.d.comb += take.eq(p.reg(sm + 1, "take", at_op(sm, FrontOp.STATS) & (p.at(frst, sm) | beats)))
        with m.If(take):
            m.d.sync += m_acc.eq(cand)      # repeats harmlessly while the pipeline is stalled

        # |z| brought to the scale of m16
        mag16 = p.reg(sm + 1, "mag16", ((zabs << (qb - 1)) >> zsh)[:qb])

        pabs5 = p.at(pabs, sm + 1)
        if self._shared_square:
            # one unsigned multiplier for |p|^2 or mag16 * R (operands selected at sm + 2)
            quant5 = p.at(op, sm + 1) == FrontOp.QUANT
            (prod,), s = p.products(sm + 2, "prod", [(Mux(quant5, mag16, pabs5), Mux(quant5, recip, pabs5),
                                                      unsigned(2 * qb))], registered=False)
            psq = qprod = prod
        else:
            psq, s1 = umul(p, sm + 2, "psq", pabs5, w.p_mag_max, pabs5, w.p_mag_max, registered=True)
            (qprod,), s2 = p.products(sm + 2, "qprod", [(mag16, recip, unsigned(qb + w.recip_bits))],
                                      registered=True)
            s = max(s1, s2)
            psq, qprod = p.at(psq, s), p.at(qprod, s)
        assert s == self._sum_stage
        stats_done = Signal()
        with m.If(advance & at_op(s, FrontOp.STATS)):
            m.d.sync += sumsq_acc.eq(Mux(p.at(frst, s), 0, sumsq_acc) + psq)
        m.d.comb += stats_done.eq(advance & at_op(s, FrontOp.STATS) & p.at(last, s))
        if self._eps:
            # the eps term's sum of (|v16| >> (norm_bits - 16))^2
            gmag = p.reg(3, "gmag", Mux(v16 < 0, -v16, v16)[w.norm_bits - 16:], unsigned(16))
            gsq, gs = umul(p, 4, "gsq", gmag, 1 << 15, gmag, 1 << 15, registered=True)
            assert gs <= s
            with m.If(advance & at_op(s, FrontOp.STATS)):
                m.d.sync += g_acc.eq(Mux(p.at(frst, s), 0, g_acc) + p.at(gsq, s))

        # round (the candidate of the exact quantiser), sign, clip
        qmag = qprod[fmt.recip_frac:] + qprod[fmt.recip_frac - 1]     # (prod + 2^(rf-1)) >> rf
        if self._exact:
            s = self._exact_quantiser(m, p, s, qmag, zabs, zneg, m_q)
            qv = self._q_exact
        else:
            neg6 = p.at(zneg, s)
            s += 1
            qv = p.reg(s, "q", Mux(neg6, Mux(qmag > -w.act_min, w.act_min, -qmag),
                                   Mux(qmag > w.act_max, w.act_max, qmag)), w.act)
        assert s == self.latency
        m.d.comb += [
            q_valid.eq(at_op(s, FrontOp.QUANT)),
            self.q.valid.eq(q_valid),
            self.q.payload.eq(qv),
        ]

        # between passes: finish a reduction, and the quantiser's reciprocal
        with m.If(self.stats.ready):
            m.d.sync += self.stats.valid.eq(0)
        mmsb = Signal(range(w.m_bits))          # index of m's leading one (0 when m = 0)
        m16 = Signal(qb)
        drem = Signal(qb + 1)
        quo = Signal(w.recip_bits)
        cnt = Signal(range(w.recip_bits + 1))
        dividend = (w.act_max << fmt.recip_frac)
        dividend_low = Const(dividend & ((1 << w.recip_bits) - 1), w.recip_bits)
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += idle.eq(1)
                with m.If(accept & self.i.payload.last):
                    with m.If(self.i.payload.op == FrontOp.MAX):
                        m.next = "DRAIN_MAX"
                    with m.If(self.i.payload.op == FrontOp.STATS):
                        m.next = "DRAIN_STATS"
            with m.State("DRAIN_MAX"):
                with m.If(max_done):
                    m.next = "FIN_MAX"
            with m.State("FIN_MAX"):
                # bit_length(max|v|) - 1; 0 for a zero vector, whose v16 is zero anyway
                m.d.sync += shamt.eq(msb_index(or_acc, w.x_bits)[1])
                m.next = "IDLE"
            with m.State("DRAIN_STATS"):
                with m.If(stats_done):
                    m.next = "FIN_STATS"
            with m.State("FIN_STATS"):
                with m.If(~self.stats.valid | self.stats.ready):
                    m.d.sync += [
                        self.stats.payload.m.eq(m_acc),
                        self.stats.payload.sumsq.eq(sumsq_acc),
                        self.stats.valid.eq(1),
                        mmsb.eq(msb_index(m_acc, w.m_bits)[1]),
                    ]
                    if self._eps:
                        # normalise's shift: v16 = v >> sh with sh = bit_length(max|v|) - (norm_bits - 1)
                        m.d.sync += [self.stats.payload.g.eq(g_acc),
                                     self.stats.payload.sh.eq(shamt + 2 - w.norm_bits)]
                    m.next = "NORM_M"
            with m.State("NORM_M"):
                sh = mmsb
                m.d.sync += [
                    zsh.eq(sh),
                    m16.eq(((m_acc << (qb - 1)) >> sh)[:qb]),
                    drem.eq(dividend >> w.recip_bits),
                    quo.eq(0),
                    cnt.eq(w.recip_bits),
                ]
                m.next = "DIV"
            with m.State("DIV"):
                rem2 = Cat(dividend_low.bit_select((cnt - 1)[:len(cnt)], 1), drem)
                diff = rem2 - m16                   # its sign is the comparison: one adder
                fits = ~diff[-1]
                with m.If(cnt == 0):
                    m.d.sync += [recip.eq(quo), m_q.eq(m_acc)]
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += [cnt.eq(cnt - 1), drem.eq(Mux(fits, diff, rem2)), quo.eq(Cat(fits, quo))]
        return m

    def _exact_quantiser(self, m, p, s, qmag, zabs, zneg, m_q):
        """q = sign(z) floor((254 |z| + m) / (2 m)) from the candidate ``qmag`` (of stage ``s``);
        sets ``_q_exact`` and returns its stage."""
        w = self._w
        qmax = w.act_max
        s += 1
        cq = p.reg(s, "cq", Mux(qmag > qmax, qmax, qmag), unsigned(qmax.bit_length()))
        za = p.at(zabs, s - 1)
        z2 = p.reg(s, "z2", (za << qmax.bit_length() + 1) - (za << 1))     # 2 qmax |z|
        cm, s = umul(p, s + 1, "cm", cq, qmax, m_q, (1 << w.m_bits) - 1, registered=True)
        # (2 c + 1) m and (2 c - 1) m (the latter only for c > 0)
        s += 1
        hi = p.reg(s, "hi", (cm << 1) + m_q)
        lo = p.reg(s, "lo", Mux(p.at(cq, s - 1) == 0, 0, (cm << 1) - m_q), unsigned(len(cm) + 1))
        s += 1
        z2s = p.at(z2, s - 1)
        up = p.reg(s, "up", ~greater_unsigned(hi, z2s) & m_q.any())     # (m = 0: z = 0, q = 0)
        down = p.reg(s, "down", (p.at(cq, s - 1) != 0) & greater_unsigned(lo, z2s))
        s += 1
        qm = p.at(cq, s - 1) + p.at(up, s - 1) - p.at(down, s - 1)
        self._q_exact = p.reg(s, "q", Mux(p.at(zneg, s - 1), -qm, qm), w.act)
        return s
