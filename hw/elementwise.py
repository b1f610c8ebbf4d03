"""The elementwise unit: sigmoid, SiLU, the MLGRU steps, the GLU product and the residual add."""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import (DSP_BITS, SHARES, Pipeline, const_product, round_carry_mag, round_carry_signed,
                            rshift_round_mag, saturate_mag, saturate_signed, signed_from_mag, umul, umul_latency,
                            value_layout, vector_widths)

__all__ = ["ElementwiseOp", "ElementwiseUnit", "elementwise_input_layout", "shared_products_fit"]


class ElementwiseOp(enum.Enum, shape=3):
    """What the unit computes for one element (names as in reference/integer.py)."""
    SIGMOID = 0    # o = sigmoid(y)                                  (Q(gate_frac))
    SILU = 1       # o = silu(y)
    FORGET = 2     # o = g + rshift_round((1 - g) sigmoid(y), gate_frac): mlgru's f, g = lower bound
    RECUR = 3      # o = sat(rshift_round(g a, gate_frac) + rshift_round(silu(y) (1 - g), gate_frac)):
    #                mlgru's new h, y = i_proj output, g = f, a = old h
    SILU_MUL = 4   # o = sat(rshift_round(a silu(y), x_frac)): mlgru's o_proj input (a = g_proj
    #                output, y = h) and glu's down_proj input (a = up, y = gate)
    ADD = 5        # o = sat(y + a): the residual add


def _const_product_mag(mag, t: int, k: int, neg):
    """|rshift_round(+-mag * t, k)| for a constant t: a shift when t is 0 or 2^j with j >= k,
    else shifted copies of mag added and subtracted (:func:`~.vector_common.const_product`)."""
    if t == 0:
        return Const(0, 1)
    j = t.bit_length() - 1
    if t == 1 << j and j >= k:
        return mag << (j - k)       # the rounding term 2^(k-1) - neg never reaches bit k
    return rshift_round_mag(const_product(mag, t), k, neg)


def shared_products_fit(w) -> bool:
    """The narrow product structure (shared 16x16 limbs, and ``share=2``) takes these widths:
    gates of DSP_BITS, x of 2 DSP_BITS, x_frac and gate_frac of at most DSP_BITS."""
    return (w.gate_one.bit_length() <= DSP_BITS and (-w.x_min).bit_length() <= 2 * DSP_BITS
            and w.fmt.x_frac <= DSP_BITS and w.gate_frac <= DSP_BITS)


def elementwise_input_layout(w) -> data.StructLayout:
    return data.StructLayout({"op": ElementwiseOp, "y": w.x, "a": w.x, "g": w.gate, "last": unsigned(1)})


class ElementwiseUnit(wiring.Component):
    """Every per-element nonlinearity and product of a layer, one programmable pipeline.

    An engine needs one op at a time (each consumes the output of a different matrix), so one
    pipeline serves them all and they share its multipliers (7 DSPs, all unsigned, signs go
    around them as sign and magnitude): the table interpolation (t1 - t0) frac (10x12 bits);
    |y| sigmoid(y) for SiLU or (1 - g) sigmoid(y) for FORGET (16x16 and 5x16 limb products);
    four 16x16 limb products that form either |a| |silu(y)| (SILU_MUL, 32x32) or the two 32x16
    products |silu(y)| (1 - g) and g |a| (RECUR). One 2^sig_table_log2 x 26-bit ROM (4 iCE40
    EBRs, 1 ECP5 DP16KD), its output registered before the interpolation multiplier.

    Members
    -------
    i : In(stream of elementwise_input_layout)
        ``op`` (:class:`ElementwiseOp`), ``y`` and ``a`` (signed x_bits, Q(x_frac)),
        ``g`` (a gate in [0, 2^gate_frac], Q(gate_frac): the lower bound for FORGET, the forget
        gate for RECUR, unused otherwise), ``last`` (passed through). The op may change from one
        element to the next.
    o : Out(stream of value_layout)
        The result; gates (SIGMOID, FORGET) come out as Q(gate_frac) integers.

    Throughput one element per cycle; latency ``LATENCY`` = 16 cycles with the narrow formats
    (``latency``: this unit's). With ``share=2`` every
    stage takes two cycles and the multipliers serve two products each (4 DSPs: the table
    interpolation, |y| sigmoid(y) limbs, two for the four 16x16 limb products), their operands
    selected in front of them by the phase rather than registered first: one element every two
    cycles, 14 stages, latency 28 (``latency``).

    Formats wider than that sharing allows (x of more than 2 DSP_BITS, gates or x_frac of more
    than DSP_BITS: the "wide" set) take the general product structure instead, unshared only:
    |a| times |silu(y)| (SILU_MUL) or the gate g (RECUR's f h), and |silu(y)| (1 - g), each
    from DSP_BITS x DSP_BITS limb products summed one adder level per stage (:func:`umul`), then
    the roundings, the signs and RECUR's sum a stage each.

    The sigmoid is ``reference.integer.sigmoid`` exactly: a ROM of the 2^sig_table_log2 table
    intervals holding (t0, t1 - t0), generated from ``sigmoid_table``; the interpolation
    t0 + rshift_round((t1 - t0) frac, frac_bits); the table's end values outside it. SiLU inside
    the table multiplies |y| <= 2^sig_in_log2 (21 bits) by the sigmoid; outside it the sigmoid
    is a constant and y times it is a shift (table ends 0 and 2^gate_frac) or a constant product.
    """

    # pipeline stages: unshared (share 1) the multipliers' operands get a stage of registers
    # of their own at the two multipliers that select them (Pipeline.products)
    STAGES = {1: 16, 2: 14}
    LATENCY = STAGES[1]

    def __init__(self, fmt: Formats = FORMATS, *, share: int = 1):
        if share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {share}")
        self.share = share
        self._w = w = vector_widths(fmt)
        if not (0 < fmt.x_frac and 0 < fmt.gate_frac):
            raise ValueError("x_frac and gate_frac must be positive")
        self._narrow = shared_products_fit(w)
        if not self._narrow and share != 1:
            raise ValueError("formats wider than the shared 32x32 multiplier allows need share=1")
        super().__init__({
            "i": In(stream.Signature(elementwise_input_layout(w))),
            "o": Out(stream.Signature(value_layout(w))),
        })

    @property
    def latency(self) -> int:
        """Cycles from an accepted element to its result (``share * stages``)."""
        return self.share * self.stages

    # rows of one block RAM (an ECP5 DP16KD: 1024 x 18)
    ROM_BANK_ROWS = 1024

    @property
    def _rom_banks(self) -> int:
        """Banks of the sigmoid table (1: one memory)."""
        return max(1, self._w.sig_n // self.ROM_BANK_ROWS)

    def _dprod_wide(self) -> bool:
        """The table interpolation's operands exceed one DSP (then :func:`umul`)."""
        w = self._w
        return max(1, w.sig_diff_max.bit_length()) > DSP_BITS or w.sig_frac_bits > DSP_BITS

    @property
    def stages(self) -> int:
        """Pipeline stages (``STAGES[share]`` with the narrow formats)."""
        w = self._w
        reg = self.share == 2            # shared multipliers take no operand stage
        banked = self._rom_banks > 1
        s = 4 + banked
        if self._dprod_wide():
            s += umul_latency(w.sig_diff_max, (1 << w.sig_frac_bits) - 1, registered=not banked)
        elif banked:
            s += 1                                                   # the operands' registers
        s += 1                                                       # the sigmoid
        s += 1 + umul_latency(max(1 << w.sig_in_log2, w.gate_one), max(w.sig_table), registered=reg)
        s += 1                                                       # |silu(y)|, FORGET's gate
        if self._narrow:
            return s + 6 + (self.share == 1)
        x_top, g_top = (1 << w.x_bits) - 1, (1 << w.gate_bits) - 1
        s += max(1 + umul_latency(-w.x_min, x_top, registered=False),
                 1 + umul_latency(x_top, g_top, registered=True))
        return s + 4

    def elaborate(self, platform):
        w = self._w
        gf, fb, n = w.gate_frac, w.sig_frac_bits, w.sig_n
        table = w.sig_table
        t_lo, t_hi = table[0], table[n]
        m = Module()
        out_valid = Signal()
        advance, phase, offered = Pipeline.shared_control(m, self.share, out_valid, self.o.ready)
        m.d.comb += self.i.ready.eq(advance)
        p = Pipeline(m, advance, phase=phase)
        Op = ElementwiseOp

        rom_row = data.StructLayout({"t0": unsigned(max(table).bit_length()),
                                     "d": unsigned(max(1, w.sig_diff_max.bit_length()))})
        rows = [{"t0": table[k], "d": table[k + 1] - table[k]} for k in range(n)]
        banks = self._rom_banks
        depth = n // banks
        # a table deeper than one block RAM is split into banks of their own, each row registered
        # next to its RAM and the bank chosen a stage later: as one memory, Yosys's multiplexer
        # behind the RAMs' slow clock-to-out and a long route made the wide set's critical path
        # (ULX3S, 64 lanes: 87.7 MHz)
        ports = []
        for b in range(banks):
            rom = Memory(shape=rom_row, depth=depth, init=rows[b * depth:(b + 1) * depth])
            m.submodules["sigmoid_rom" if banks == 1 else f"sigmoid_rom{b}"] = rom
            ports.append(rom.read_port())

        # stage 1: the accepted element
        valid = p.reg(1, "valid", self.i.valid)
        op = p.reg(1, "op", self.i.payload.op)
        y = p.reg(1, "y", self.i.payload.y)
        a = p.reg(1, "a", self.i.payload.a)
        g = p.reg(1, "g", self.i.payload.g)
        last = p.reg(1, "last", self.i.payload.last)

        # stage 2: table address (the ROM answers in stage 2), magnitudes, the residual add
        index = ((y >> fb) + n // 2)[:(n - 1).bit_length()]
        bank_bits = (banks - 1).bit_length()
        for rd in ports:
            m.d.comb += [rd.en.eq(advance), rd.addr.eq(index[:len(rd.addr)])]
        if banks > 1:
            bank = p.reg(2, "bank", index[len(index) - bank_bits:])
        frac = p.reg(2, "frac", y[:fb])
        top = y[w.sig_in_log2:]      # inside the table iff these bits are all equal
        lo = p.reg(2, "lo", y[-1] & ~top.all())
        hi = p.reg(2, "hi", ~y[-1] & top.any())
        yneg = p.reg(2, "yneg", y < 0)
        ymag = p.reg(2, "ymag", Mux(y < 0, -y, y), unsigned(w.x_bits))
        aneg = p.reg(2, "aneg", a < 0)
        amag = p.reg(2, "amag", Mux(a < 0, -a, a), unsigned(w.x_bits))
        g1 = p.reg(2, "g1", w.gate_one - g, w.gate)
        early = p.reg(2, "early", saturate_signed(y + a, w), w.x)       # ADD

        # stage 3: the table row, registered (a block RAM's clock-to-out is slow); with banks, each
        # bank's row, and the bank's in stage 4
        if banks == 1:
            d = p.reg(3, "d", ports[0].data.d)
            t0 = p.reg(3, "t0", ports[0].data.t0)
            row_stage = 3
        else:
            bank_rows = [p.reg(3, f"row{b}", rd.data.as_value()) for b, rd in enumerate(ports)]
            chosen = Array(bank_rows)[p.at(bank, 3)]
            row = data.View(rom_row, chosen)
            d = p.reg(4, "d", row.d)
            t0 = p.reg(4, "t0", row.t0)
            row_stage = 4
        if not self._narrow:
            # |silu(y)| outside the table: constant products of |y| (an adder or two each, not
            # shifts as with the narrow table ends), registered early, off the smag stage's path
            early_outside = p.reg(3, "outside", Mux(hi, _const_product_mag(ymag, t_hi, gf, yneg),
                                                    _const_product_mag(ymag, t_lo, gf, yneg)), unsigned(w.x_bits))

        # next stage: interpolation product (its operands are registers already; with banks
        # registered once more, beside the multiplier: from the banks' registers to a DSP block far
        # away was the next critical path, 78.3 MHz)
        fr = p.at(frac, row_stage)
        reg_ops = banks == 1
        if self._dprod_wide():
            dprod, s = umul(p, row_stage + 1, "dprod", d, w.sig_diff_max, fr, (1 << fb) - 1, registered=reg_ops)
        else:
            (dprod,), s = p.products(row_stage + 1, "dprod", [(d, fr, unsigned(len(d) + len(fr)))],
                                     registered=reg_ops)

        # next stage: sigmoid(y)
        # t0 + rshift_round(d frac, fb) = (t0 2^fb + 2^(fb-1) + d frac) >> fb: one adder
        s += 1
        interp = (Cat(Const(1 << (fb - 1), fb), p.at(t0, s - 1)) + dprod) >> fb
        sig = p.reg(s, "sig", Mux(p.at(lo, s - 1), t_lo, Mux(p.at(hi, s - 1), t_hi, interp)), w.gate)
        early = p.reg(s + 1, "early", Mux(p.at(op, s) == Op.SIGMOID, sig, p.at(early, s)), w.x)

        # |y| sigmoid(y) inside the table, or (1 - g) sigmoid(y): an operand stage (unshared),
        # the limb products, their sum
        in_max = 1 << w.sig_in_log2
        forget5 = p.at(op, s) == Op.FORGET
        mul_a = Mux(forget5, p.at(g1, s), p.at(ymag, s)[:in_max.bit_length()])
        p1, s = umul(p, s + 1, "p1", mul_a, max(in_max, w.gate_one), sig, max(table), registered=False)

        # FORGET's gate, |silu(y)|
        s += 1
        forget = (Cat(Const(1 << (gf - 1), gf), p.at(g, s - 1)) + p1) >> gf
        yneg_p, ymag_p = p.at(yneg, s - 1), p.at(ymag, s - 1)
        if self._narrow:
            outside = Mux(p.at(hi, s - 1), _const_product_mag(ymag_p, t_hi, gf, yneg_p),
                          _const_product_mag(ymag_p, t_lo, gf, yneg_p))
        else:
            outside = p.at(early_outside, s - 1)
        inside = ~p.at(lo, s - 1) & ~p.at(hi, s - 1)
        smag = p.reg(s, "smag", Mux(inside, rshift_round_mag(p1, gf, yneg_p), outside), unsigned(w.x_bits))
        op_p = p.at(op, s - 1)
        early = p.reg(s, "early", Mux(op_p == Op.FORGET, forget, p.at(early, s - 1)), w.x)

        if self._narrow:
            s, out = self._narrow_products(p, s, smag, early, op, yneg, amag, aneg, g, g1)
        else:
            s, out = self._wide_products(p, s, smag, early, op, yneg, amag, aneg, g, g1)
        assert s == self.stages
        m.d.comb += [self.o.payload.value.eq(out), self.o.payload.last.eq(p.at(last, s)),
                     out_valid.eq(p.at(valid, s)), self.o.valid.eq(offered)]
        return m

    def _narrow_products(self, p, s, smag, early, op, yneg, amag, aneg, g, g1):
        """The shared 16x16 limb products and what follows them (the narrow formats); returns
        (stage, result) with ``smag`` and ``early`` at stage ``s``."""
        w = self._w
        gf = w.gate_frac
        Op = ElementwiseOp
        # four 16x16 limb products (an operand stage first where they are unshared)
        s += 1
        recur = p.at(op, s - 1) == Op.RECUR
        am, gg, gg1 = p.at(amag, s - 1), p.at(g, s - 1), p.at(g1, s - 1)
        a_lo, a_hi = am[:DSP_BITS], am[DSP_BITS:]
        s_lo, s_hi = smag[:DSP_BITS], smag[DSP_BITS:]
        prod = unsigned(2 * DSP_BITS)
        s0 = s
        (d0, d2, d1, d3), s = p.products(s, "d", [
            (Mux(recur, gg1, a_lo), s_lo, prod),
            (a_lo, Mux(recur, gg, s_hi), prod),
            (Mux(recur, gg1, a_hi), Mux(recur, s_hi, s_lo), prod),
            (a_hi, Mux(recur, gg, s_hi), prod)], registered=False)
        early = p.reg(s0, "early", Mux(p.at(op, s0 - 1) == Op.SILU, signed_from_mag(smag, p.at(yneg, s0 - 1)),
                                       p.at(early, s0 - 1)), w.x)

        # partial sums, each a carry chain of at most 2 DSP_BITS + 1 bits, and the
        # rounding carries from the products' low bits
        s += 1
        sneg, an = p.at(yneg, s - 1), p.at(aneg, s - 1)
        xf = w.fmt.x_frac
        mid = p.reg(s, "mid", d1 + d2)                          # SILU_MUL: a_hi s_lo + a_lo s_hi
        cx_hi = p.reg(s, "cx_hi", d0[DSP_BITS:] + d1)           # RECUR: |silu(y)| (1 - g) >> 16
        fy_hi = p.reg(s, "fy_hi", d2[DSP_BITS:] + d3)           # RECUR: g |a| >> 16
        c_carry = p.reg(s, "c_carry", round_carry_signed(d0, gf, sneg))
        f_carry = p.reg(s, "f_carry", round_carry_signed(d2, gf, an))
        m_carry = p.reg(s, "m_carry", round_carry_mag(d0, xf, sneg ^ an))

        # mlgru's c and rshift_round(f h, gate_frac); the SILU_MUL product's middle
        s += 1
        d0_, d2_ = p.at(d0, s - 1), p.at(d2, s - 1)
        lowsum = p.reg(s, "lowsum", d0_[DSP_BITS:] + mid)

        def rounded(lo_word, hi, carry, neg):
            shifted = Cat(lo_word[gf:DSP_BITS], hi, Const(0, 1)).as_signed()
            return Mux(neg, ~shifted, shifted) + carry
        c = p.reg(s, "c", rounded(d0_, cx_hi, c_carry, p.at(yneg, s - 1)))
        fh = p.reg(s, "fh", rounded(d2_, fy_hi, f_carry, p.at(aneg, s - 1)))

        # the SILU_MUL product >> x_frac; RECUR's sum
        s += 1
        upper = p.at(d3, s - 1) + lowsum[DSP_BITS:]
        floor_prod = p.reg(s, "floor_prod", Cat(p.at(d0, s - 1)[xf:DSP_BITS], lowsum[:DSP_BITS], upper))
        hsum = p.reg(s, "hsum", c + fh)

        # |rshift_round(a silu(y), x_frac)|, exact where it does not saturate
        s += 1
        mm = p.reg(s, "mm", Cat(floor_prod[:w.x_bits] + p.at(m_carry, s - 1), floor_prod[w.x_bits:].any()))

        # the result
        s += 1
        op_r = p.at(op, s - 1)
        pneg_r = p.at(yneg, s - 1) ^ p.at(aneg, s - 1)
        out = p.reg(s, "out", Mux(op_r == Op.RECUR, saturate_signed(p.at(hsum, s - 1), w),
                                  Mux(op_r == Op.SILU_MUL, saturate_mag(mm, pneg_r, w), p.at(early, s - 1))),
                    w.x)
        return s, out

    def _wide_products(self, p, s, smag, early, op, yneg, amag, aneg, g, g1):
        """The general products (module docstring) after |silu(y)| at stage ``s``; returns
        (stage, result)."""
        w = self._w
        gf, xf = w.gate_frac, w.fmt.x_frac
        Op = ElementwiseOp
        s += 1
        early = p.reg(s, "early", Mux(p.at(op, s - 1) == Op.SILU, signed_from_mag(smag, p.at(yneg, s - 1)),
                                      p.at(early, s - 1)), w.x)
        recur = p.at(op, s - 1) == Op.RECUR
        x_top, g_top = (1 << w.x_bits) - 1, (1 << w.gate_bits) - 1
        # SILU_MUL: |a| |silu(y)|; RECUR: g |a| (f h) -- one product, its second operand selected
        pm, sm = umul(p, s, "pm", p.at(amag, s - 1), -w.x_min, Mux(recur, p.at(g, s - 1), smag), x_top,
                      registered=False)
        # RECUR: |silu(y)| (1 - g) (mlgru's c)
        pc, sc = umul(p, s, "pc", smag, x_top, p.at(g1, s - 1), g_top, registered=True)
        s = max(sm, sc)
        pm, pc = p.at(pm, s), p.at(pc, s)
        sneg, an = p.at(yneg, s), p.at(aneg, s)
        # the roundings
        s += 1
        cmag = p.reg(s, "cmag", rshift_round_mag(pc, gf, sneg))
        fmag = p.reg(s, "fmag", rshift_round_mag(pm, gf, an))
        mmag = p.reg(s, "mmag", rshift_round_mag(pm, xf, sneg ^ an))
        # the signs; SILU_MUL saturated
        s += 1
        c = p.reg(s, "c", signed_from_mag(cmag, p.at(yneg, s - 1)))
        fh = p.reg(s, "fh", signed_from_mag(fmag, p.at(aneg, s - 1)))
        msat = p.reg(s, "msat", saturate_mag(mmag, p.at(yneg, s - 1) ^ p.at(aneg, s - 1), w), w.x)
        # RECUR's sum
        s += 1
        hsum = p.reg(s, "hsum", c + fh)
        # the result
        s += 1
        op_r = p.at(op, s - 1)
        out = p.reg(s, "out", Mux(op_r == Op.RECUR, saturate_signed(hsum, w),
                                  Mux(op_r == Op.SILU_MUL, p.at(msat, s - 1), p.at(early, s - 1))), w.x)
        return s, out
