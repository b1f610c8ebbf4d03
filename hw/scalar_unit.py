"""The per-BitLinear scalar unit: r = isqrt(sum of squares) and (Qt, t) = scale_mantissa(kM m, r)."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import K_EXP_BITS, msb_index, scale_layout, stats_layout, vector_widths

__all__ = ["ScalarUnit"]


class ScalarUnit(wiring.Component):
    """From one BitLinear's statistics to the scale of its outputs, bit-exact with ``bitlinear``.

    Computes ``r = isqrt(sumsq)``, ``(Qt, t) = scale_mantissa(k_mant * m, r)`` and the output
    shift ``t - k_exp``; ``Qt = 0`` when ``m == 0`` or ``r == 0`` (the reference then returns
    zeros, and a zero Qt makes :class:`OutputScale` produce exactly those).

    Members
    -------
    i : In(stream of stats_layout)
        ``m`` = max|v16 c| and ``sumsq`` from :class:`BitLinearFront`'s ``stats`` stream.
    k_mant : In(unsigned(const_bits)), k_exp : In(signed(K_EXP_BITS))
        The BitLinear's export-time constant K = k_mant 2^k_exp; sampled when ``i`` is accepted.
    o : Out(stream of scale_layout)
        ``qt`` and ``shift`` (t - k_exp, clamped to [shift_min, shift_max], which leaves every
        output unchanged) for :class:`OutputScale`'s ``scale`` input.

    Sequential, no DSP: a shift-add multiplier (one k_mant bit per cycle) runs alongside a
    restoring square root (two sumsq bits per cycle, r_bits cycles); then two cycles find the bit
    lengths and t, and a restoring divider produces Qt = floor(floor(num 2^t) / r) one quotient bit
    per cycle, feeding num's bits from its leading one (scale_bits - 1 + bitlen(r) cycles).
    Latency at most ``max_latency`` = max(ceil(sumsq_bits / 2), const_bits) + scale_bits +
    r_bits + 3 cycles (66 with the default formats) from acceptance to ``o.valid``. The unit
    accepts a new input whenever it is idle, also while its previous result still waits in
    ``o``; a finished result waits until ``o`` is free.
    """

    def __init__(self, fmt: Formats = FORMATS):
        self._w = w = vector_widths(fmt)
        super().__init__({
            "i": In(stream.Signature(stats_layout(w))),
            "k_mant": In(unsigned(w.const_bits)),
            "k_exp": In(signed(K_EXP_BITS)),
            "o": Out(stream.Signature(scale_layout(w))),
        })

    @property
    def max_latency(self) -> int:
        w = self._w
        return max(self.sqrt_steps, w.const_bits) + w.scale_bits + w.r_bits + 3

    @property
    def sqrt_steps(self) -> int:
        return -(-self._w.sumsq_bits // 2)

    def elaborate(self, platform):
        w = self._w
        m = Module()
        steps = self.sqrt_steps
        run_steps = max(steps, w.const_bits)

        mval = Signal(w.m_bits)
        kmant = Signal(w.const_bits)
        kexp = Signal(signed(K_EXP_BITS))
        nsr = Signal(2 * steps)                  # sumsq, consumed two bits per step from the top
        srem = Signal(w.r_bits + 2)              # square-root remainder, <= 2 root
        root = Signal(w.r_bits)
        num = Signal(w.num_bits)                 # k_mant * m
        cnt = Signal(range(max(run_steps, w.scale_bits + w.r_bits) + 1))
        # leading-one indices (bit length - 1) of num and r, and whether they are non-zero
        nmsb, nany = Signal(range(w.num_bits)), Signal()
        rmsb, rany = Signal(range(w.r_bits)), Signal()
        pos = Signal(signed(max(w.num_bits, w.scale_bits + w.r_bits).bit_length() + 2))
        drem = Signal(w.r_bits + 1)              # division remainder, < r
        quo = Signal(w.scale_bits)
        zero = Signal()
        bit = Signal()
        sh_raw = Signal(signed(K_EXP_BITS + 2))
        t_min = w.scale_bits - w.num_bits        # (scale_bits - 1) + 1 - num_bits
        t_max = w.scale_bits - 1 + w.r_bits
        t = Signal(range(t_min, t_max + 1))

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)     # overridden below when a new result moves in

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.sync += [
                        mval.eq(self.i.payload.m), nsr.eq(self.i.payload.sumsq),
                        kmant.eq(self.k_mant), kexp.eq(self.k_exp),
                        srem.eq(0), root.eq(0), num.eq(0), cnt.eq(0),
                    ]
                    m.next = "RUN"

            with m.State("RUN"):
                with m.If(cnt < steps):
                    rem2 = Cat(nsr[-2:], srem)
                    diff = rem2 - Cat(Const(1, 2), root)     # its sign is the comparison
                    fits = ~diff[-1]
                    m.d.sync += [nsr.eq(nsr << 2), srem.eq(Mux(fits, diff, rem2)), root.eq(Cat(fits, root))]
                with m.If(cnt < w.const_bits):
                    m.d.sync += [num.eq((num << 1) + Mux(kmant[-1], mval, 0)), kmant.eq(kmant << 1)]
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == run_steps - 1):
                    m.next = "NORM"

            with m.State("NORM"):
                n_any, n_msb = msb_index(num, w.num_bits)
                r_any, r_msb = msb_index(root, w.r_bits)
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
