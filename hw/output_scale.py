"""The BitLinear output scaling: matrix accumulators to Q(x_frac) outputs."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import (DSP_BITS, SHARES, Pipeline, acc_layout, saturate_mag, scale_layout, umul,
                            value_layout, vector_widths)

__all__ = ["OutputScale", "embed_path_fits"]


def embed_path_fits(w) -> bool:
    """``OutputScale(embed=True)`` takes these widths (its two limb products serve both kinds)."""
    return not (w.scale_bits > DSP_BITS + 1 or w.emb_scale_bits > 2 * DSP_BITS or w.act_bits > DSP_BITS
                or getattr(w.fmt, "emb_bits", 8) > 8
                or w.acc_mag_max.bit_length() > 2 * DSP_BITS or not 0 < w.emb_shift <= w.shift_max)


class OutputScale(wiring.Component):
    """``y = saturate(rshift_round(acc * Qt, t - k_exp))`` per accumulator, as ``bitlinear`` does.

    Members
    -------
    i : In(stream of acc_layout)
        The accumulators ``acc = T @ q`` (signed acc_bits) of the matrix-vector unit, in row
        order, with ``last`` on the final row; ``TernaryMatVec.out`` connects directly.
    scale : In(scale_layout)
        ``qt`` = Qt and ``shift`` = t - k_exp, as :class:`ScalarUnit` produces them (``qt = 0``
        gives zeros, the reference's ``m == 0 or r == 0`` case). Sampled with each accepted
        accumulator, so it only has to be stable while the vector's accumulators go in.
        Shifts outside [shift_min, shift_max] act as the nearest end (the result is the same).
    o : Out(stream of value_layout)
        The BitLinear outputs in Q(x_frac), saturated, in row order; ``last`` passed through.

    Throughput one element per cycle; latency 8 cycles from an accepted input to its output
    (``LATENCY``). Multipliers: |acc| (up to 2^(acc_bits-1), 23 bits) x Qt (scale_bits) as
    DSP_BITS-wide limb products: 2 DSPs (16x16 and 7x16); Qt's top bit adds |acc| << 16.
    The shift is one right shifter (with round-half-up in sign-magnitude form) and one left
    shifter for negative shifts, whose input is clamped to 2^x_bits first (it saturates anyway).

    With ``share=2`` each stage takes two cycles and one DSP forms both limb products (one
    element every two cycles, latency ``2 * LATENCY``: ``latency``).

    With ``embed=True`` the unit also does :class:`~.embed_scale.EmbedScale`'s job, so an engine
    needs no multipliers of its own for the embedding: members ``embed`` (In(1)) and
    ``emb_scale`` (In(unsigned(emb_scale_bits))), sampled with each accepted element like
    ``scale``. An element accepted with ``embed`` high carries an int8 embedding value in
    ``acc`` and gives ``rshift_round(acc * emb_scale, emb_scale_frac - x_frac)`` (which always
    fits x, so the saturation never acts). Both kinds use the same two limb products: |acc| <
    2^(acc_bits-1) times Qt < 2^scale_bits, or |q| <= 2^(act_bits-1) times a 32-bit scale.
    """

    LATENCY = 8

    def __init__(self, fmt: Formats = FORMATS, *, share: int = 1, embed: bool = False):
        if share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {share}")
        self.share = share
        self.embed_mode = embed
        self._w = w = vector_widths(fmt)
        members = {
            "i": In(stream.Signature(acc_layout(w))),
            "scale": In(scale_layout(w)),
            "o": Out(stream.Signature(value_layout(w))),
        }
        if embed:
            if not embed_path_fits(w):
                raise ValueError("the embedding path needs scale_bits <= DSP_BITS + 1, a 2 DSP_BITS "
                                 "embedding scale, int8 embeddings and a positive embedding shift")
            members.update({"embed": In(1), "emb_scale": In(unsigned(w.emb_scale_bits))})
        super().__init__(members)

    @property
    def latency(self) -> int:
        """Cycles from an accepted element to its result (``share * stages``)."""
        return self.share * self.stages

    @property
    def stages(self) -> int:
        """Pipeline stages: ``LATENCY``, one more unshared with ``embed`` (the multipliers'
        operands are selected, so they get a register stage of their own)."""
        return self.LATENCY + (self.embed_mode and self.share == 1)

    def elaborate(self, platform):
        w = self._w
        m = Module()
        o_valid = Signal()
        advance, phase, offered = Pipeline.shared_control(m, self.share, o_valid, self.o.ready)
        m.d.comb += self.i.ready.eq(advance)
        p = Pipeline(m, advance, phase=phase)

        acc = p.reg(1, "acc", self.i.payload.acc)
        last = p.reg(1, "last", self.i.payload.last)
        valid = p.reg(1, "valid", self.i.valid)
        if self.embed_mode:
            emb = p.reg(1, "emb", self.embed)
            qt = p.reg(1, "qt", Mux(self.embed, self.emb_scale, self.scale.qt), unsigned(w.emb_scale_bits))
            shift = p.reg(1, "shift", Mux(self.embed, w.emb_shift, self.scale.shift), w.shift)
        else:
            qt = p.reg(1, "qt", self.scale.qt)
            shift = p.reg(1, "shift", self.scale.shift)

        neg = p.reg(2, "neg", acc < 0)
        amag = p.reg(2, "amag", Mux(acc < 0, -acc, acc), unsigned(w.acc_mag_max.bit_length()))
        sh = p.reg(2, "sh", Mux(shift > w.shift_max, w.shift_max,
                                Mux(shift < w.shift_min, w.shift_min, shift)), w.shift)

        # shift controls, ready before the product: right shifts round, left shifts do not
        right = p.reg(3, "right", sh > 0)
        shr = p.reg(3, "shr", Mux(sh > 0, sh, 0), range(w.shift_max + 1))
        rnd = p.reg(3, "rnd", Mux(sh > 0, sh - 1, 0), range(w.shift_max))
        shl = p.reg(3, "shl", Mux(sh > 0, 0, -sh), range(-w.shift_min + 1))
        # 2^rnd, or 2^rnd - 1 for negative products: a decoder and a thermometer code (no carry
        # chain: a 40-bit subtraction would be the longest path of the unit on an iCE40)
        one = Cat(*[rnd == i for i in range(w.shift_max)])
        below = Cat(*[rnd > i for i in range(w.shift_max)])
        half = p.reg(4, "half", Mux(p.at(neg, 3), below, one), unsigned(w.shift_max))

        if self.embed_mode:
            # |acc| = a1 2^16 + a0, Qt = b1 2^16 + b0: normal elements have b1 <= 1 (scale_bits
            # <= 17), embedding elements a1 = 0 (int8), so a0 b0 and one more product suffice:
            # a1 b0 or a0 b1, both weighted 2^16, plus |acc| 2^16 when a normal b1 is set
            e2, q2 = p.at(emb, 2), p.at(qt, 2)
            a0, a1 = amag[:DSP_BITS], amag[DSP_BITS:]
            b0, b1 = q2[:DSP_BITS], q2[DSP_BITS:]
            (lo, hi), ps = p.products(3, "prod_m", [(a0, b0, unsigned(2 * DSP_BITS)),
                                                    (Mux(e2, a0, a1), Mux(e2, b1, b0), unsigned(2 * DSP_BITS))],
                                      registered=False)
            extra = p.reg(3, "prod_x", Mux(~e2 & b1[0], amag, 0), unsigned(len(amag)))
            mid = p.reg(ps + 1, "prod_s", hi + p.at(extra, ps))
            prod = p.reg(ps + 2, "prod", p.at(lo, ps + 1) + Cat(Const(0, DSP_BITS), mid),
                         unsigned(w.prod_mag_max.bit_length()))
            ps += 2
        else:
            prod, ps = umul(p, 3, "prod", amag, w.acc_mag_max, p.at(qt, 2), (1 << w.scale_bits) - 1,
                           registered=True)

        s = ps + 1
        t_right = p.reg(s, "t_right", prod + p.at(half, ps), unsigned(w.prod_mag_max.bit_length() + 1))
        clamp = 1 << w.x_bits
        p_left = p.reg(s, "p_left", Mux(prod[w.x_bits:].any(), clamp, prod), unsigned(w.x_bits + 1))

        s += 1
        mag = p.reg(s, "mag", Mux(p.at(right, s - 1), t_right >> p.at(shr, s - 1),
                                  p_left << p.at(shl, s - 1)))
        s += 1
        y = p.reg(s, "y", saturate_mag(mag, p.at(neg, s - 1), w), w.x)
        assert s == self.stages
        m.d.comb += [self.o.payload.value.eq(y), self.o.payload.last.eq(p.at(last, s)),
                     o_valid.eq(p.at(valid, s)), self.o.valid.eq(offered)]
        return m
