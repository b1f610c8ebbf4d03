"""The embedding scaling: one int8 embedding row to a Q(x_frac) residual-stream vector."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import (Pipeline, rshift_round_mag, signed_from_mag, umul, umul_latency, value_layout,
                            vector_widths)

__all__ = ["EmbedScale"]


class EmbedScale(wiring.Component):
    """``x = rshift_round(row * emb_scale, emb_scale_frac - x_frac)``, as ``embed`` does.

    Members
    -------
    i : In(stream of {q: signed(emb_bits), last})
        The token's embedding row (int8, or ``emb_bits`` wide values), element by element,
        ``last`` on its final element.
    scale : In(unsigned(emb_scale_bits))
        The row's scale (Q(emb_scale_frac)); sampled with each accepted element.
    o : Out(stream of value_layout)
        The embedding in Q(x_frac), ``last`` passed through. Every int8 times every scale fits
        x_bits after the shift (checked when the core is built), so like the reference there is
        no saturation.

    Throughput one element per cycle; latency ``latency`` cycles (``LATENCY`` = 6 with int8
    rows). Multipliers: |row| x scale (32 bits) as DSP_BITS limb products (two 8x16 for int8).
    """

    LATENCY = 6

    @property
    def latency(self) -> int:
        """Cycles from an accepted element to its result (``LATENCY`` with int8 rows)."""
        return self._latency

    def __init__(self, fmt: Formats = FORMATS):
        self._w = w = vector_widths(fmt)
        bits = getattr(fmt, "emb_bits", 8)
        self._q_bits = q_bits = 8 if bits <= 8 else bits
        self._q_mag = q_mag = 1 << (q_bits - 1)
        smax = (1 << w.emb_scale_bits) - 1
        k = w.emb_shift
        def mag(v, neg):
            return (v + (1 << (k - 1)) - neg) >> k if k > 0 else v << -k
        if mag(q_mag * smax, 1) > -w.x_min or mag((q_mag - 1) * smax, 0) > w.x_max:
            raise ValueError("embedding values can leave the x range: the reference does not saturate them")
        self._latency = 5 + umul_latency(q_mag, smax, registered=True)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({"q": signed(q_bits), "last": unsigned(1)}))),
            "scale": In(unsigned(w.emb_scale_bits)),
            "o": Out(stream.Signature(value_layout(w))),
        })

    def elaborate(self, platform):
        w = self._w
        m = Module()
        advance = ~self.o.valid | self.o.ready
        m.d.comb += self.i.ready.eq(advance)
        p = Pipeline(m, advance)

        valid = p.reg(1, "valid", self.i.valid)
        q = p.reg(1, "q", self.i.payload.q)
        last = p.reg(1, "last", self.i.payload.last)
        scale = p.reg(1, "scale", self.scale)

        neg = p.reg(2, "neg", q < 0)
        qmag = p.reg(2, "qmag", Mux(q < 0, -q, q), unsigned(self._q_bits))
        prod, s = umul(p, 3, "prod", qmag, self._q_mag, p.at(scale, 2), (1 << w.emb_scale_bits) - 1,
                       registered=True)
        s += 1
        xmag = p.reg(s, "xmag", rshift_round_mag(prod, w.emb_shift, p.at(neg, s - 1)), unsigned(w.x_bits))
        s += 1
        x = p.reg(s, "x", signed_from_mag(xmag, p.at(neg, s - 1)), w.x)
        assert s == self.latency
        m.d.comb += [self.o.payload.value.eq(x), self.o.payload.last.eq(p.at(last, s)),
                     self.o.valid.eq(p.at(valid, s))]
        return m
