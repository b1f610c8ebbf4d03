"""Shared pieces of the vector datapath: widths, a stalling pipeline, DSP-sized multipliers.

Every width of the vector cores is derived here from :data:`FORMATS` (``mmfree_fpga/config.py``)
by evaluating the largest magnitude each value can take in ``reference/integer.py``; no core
writes a width of its own. Two numbers are not in ``FORMATS`` and are named here:

* :data:`DSP_BITS`, the operand width of one hardware multiplier: the iCE40UP5K's SB_MAC16
  is 16x16; the ECP5's MULT18X18D takes 16-bit unsigned operands as well (as 18-bit signed).
  Every product wider than that is split into unsigned ``DSP_BITS`` x ``DSP_BITS`` limb
  products (sign and magnitude), so each multiplier maps onto one DSP of either family.
* :data:`K_EXP_BITS`, the width of a BitLinear's ``k_exp`` as the weight image stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data

from mmfree_fpga.config import FORMATS, Formats
from mmfree_fpga.reference.integer import sigmoid_table

__all__ = ["DSP_BITS", "K_EXP_BITS", "GSUM_BITS", "VectorWidths", "vector_widths", "Pipeline", "umul", "umul_latency",
           "const_product", "SHARES",
           "rshift_round_mag", "signed_from_mag", "saturate_mag",
           "saturate_signed", "greater_unsigned", "round_carry_mag", "round_carry_signed",
           "msb_index", "signed_range_shape", "stats_layout", "scale_layout",
           "acc_layout", "value_layout"]

DSP_BITS = 16
# multiplier sharing of the vector cores: 1 (a multiplier per product, one element per cycle) or
# 2 (two products per multiplier, one element every two cycles)
SHARES = (1, 2)
# reference/export.py writes (k_mant, k_exp) as two little-endian int32 values.
K_EXP_BITS = 32
# the scalar unit's sum sumsq + E (norm_eps) has room for E up to 2^(2 SE_MARGIN_BITS) times the
# largest sumsq (VectorWidths.se_bits)
SE_MARGIN_BITS = 17
# o_proj's eps term squares min(|yg| >> (x_frac - 12), 2^GSUM_BITS - 1) (reference/integer.py)
GSUM_BITS = 20


def signed_range_shape(lo: int, hi: int):
    """The narrowest signed shape that holds every integer in [lo, hi]."""
    return signed(max(hi, -1 - lo, 0).bit_length() + 1)


@dataclass(frozen=True)
class VectorWidths:
    """Bounds and widths of every value in the vector datapath, derived from a :class:`Formats`.

    A ``*_max`` is the largest magnitude a value can have (over the full input ranges the ports
    admit, not only over the values export produces); a ``*_bits`` the unsigned width that holds
    it, unless noted.
    """

    fmt: Formats
    x_bits: int
    x_min: int
    x_max: int
    act_bits: int
    act_min: int
    act_max: int
    acc_bits: int
    acc_mag_max: int          # |acc| over signed(acc_bits)
    norm_bits: int
    v16_mag_max: int          # |normalise(v)| <= 2^(norm_bits-1)
    vmag_max: int             # |v| over signed(x_bits)
    z_mag_max: int            # |v16 * c|
    m_bits: int               # m = max|z|
    p_mag_max: int            # |(v16 * a) >> sumsq_shift|
    sumsq_bits: int           # sum of max_features squares
    r_bits: int               # isqrt(sumsq)
    quant_mag_bits: int       # quantise() brings m to this many bits (quant_bits)
    recip_bits: int           # R = floor(qmax << recip_frac / m16)
    const_bits: int           # k_mant
    num_bits: int             # k_mant * m
    scale_bits: int           # Qt < 2^scale_bits
    prod_mag_max: int         # |acc * Qt|
    shift_min: int            # output shifts at or below this saturate every non-zero product
    shift_max: int            # output shifts at or above this round every product to zero
    gate_frac: int
    gate_one: int             # 1.0 in Q(gate_frac)
    gate_bits: int            # gates lie in [0, gate_one]
    sig_frac_bits: int        # bits of y below one table step
    sig_n: int                # table intervals
    sig_in_log2: int          # y lies inside the table iff -2^k <= y < 2^k
    sig_table: tuple          # 2^sig_table_log2 + 1 entries, Q(gate_frac)
    sig_diff_max: int
    emb_scale_bits: int
    emb_shift: int            # emb_scale_frac - x_frac
    quant_exact: bool         # the exactly rounded quantiser
    norm_eps: bool            # the inner RMSNorm eps term
    eps_g_bits: int           # G of an "input" BitLinear: max_features (|v16| >> (norm_bits - 16))^2
    eps_gsum_bits: int        # G of o_proj: max_features min(|yg| >> (x_frac - 12), 2^20 - 1)^2
    sh_min: int               # normalise's shift sh (v16 = v >> sh)
    sh_max: int
    se_bits: int              # the scalar unit's sumsq + E (norm_eps): exact below 2^se_bits

    @property
    def x(self):
        return signed(self.x_bits)

    @property
    def acc(self):
        return signed(self.acc_bits)

    @property
    def act(self):
        return signed(self.act_bits)

    @property
    def norm(self):
        return signed(self.norm_bits)

    @property
    def gate(self):
        return unsigned(self.gate_bits)

    @property
    def shift(self):
        return signed_range_shape(self.shift_min, self.shift_max)


def vector_widths(fmt: Formats = FORMATS) -> VectorWidths:
    table = sigmoid_table(fmt)
    if np.any(np.diff(table) < 0):
        raise ValueError("the sigmoid table must be non-decreasing")
    act_max = (1 << (fmt.act_bits - 1)) - 1
    v16_mag_max = 1 << (fmt.norm_bits - 1)
    z_mag_max = v16_mag_max * v16_mag_max
    p_mag_max = z_mag_max >> fmt.sumsq_shift
    sumsq_max = fmt.max_features * p_mag_max * p_mag_max
    quant_mag_bits = fmt.quant_bits
    acc_mag_max = 1 << (fmt.acc_bits - 1)
    prod_mag_max = acc_mag_max * ((1 << fmt.scale_bits) - 1)
    # the divider's first remainder (qmax << recip_frac) >> recip_bits must be below every m16
    recip_bits = ((act_max << fmt.recip_frac) // (1 << (quant_mag_bits - 1))).bit_length()
    if (act_max << fmt.recip_frac) >> recip_bits >= 1 << (quant_mag_bits - 1):
        raise ValueError("recip_frac too small for the quantiser's divider")
    frac_bits = fmt.x_frac - fmt.sig_step_log2
    if frac_bits <= 0:
        raise ValueError("the sigmoid table step must be coarser than one x step")
    return VectorWidths(
        fmt=fmt,
        x_bits=fmt.x_bits, x_min=fmt.x_min, x_max=fmt.x_max,
        act_bits=fmt.act_bits, act_min=-(act_max + 1), act_max=act_max,
        acc_bits=fmt.acc_bits, acc_mag_max=acc_mag_max,
        norm_bits=fmt.norm_bits, v16_mag_max=v16_mag_max, vmag_max=-fmt.x_min,
        z_mag_max=z_mag_max, m_bits=z_mag_max.bit_length(),
        p_mag_max=p_mag_max, sumsq_bits=sumsq_max.bit_length(),
        r_bits=math.isqrt(sumsq_max).bit_length(),
        quant_mag_bits=quant_mag_bits, recip_bits=recip_bits,
        const_bits=fmt.const_bits,
        num_bits=(((1 << fmt.const_bits) - 1) * z_mag_max).bit_length(),
        scale_bits=fmt.scale_bits, prod_mag_max=prod_mag_max,
        shift_min=-fmt.x_bits, shift_max=prod_mag_max.bit_length() + 1,
        gate_frac=fmt.gate_frac, gate_one=1 << fmt.gate_frac,
        gate_bits=(1 << fmt.gate_frac).bit_length(),
        sig_frac_bits=frac_bits, sig_n=1 << fmt.sig_table_log2,
        sig_in_log2=frac_bits + fmt.sig_table_log2 - 1,
        sig_table=tuple(int(t) for t in table),
        sig_diff_max=int(np.diff(table).max()),
        emb_scale_bits=fmt.emb_scale_bits, emb_shift=fmt.emb_scale_frac - fmt.x_frac,
        quant_exact=bool(getattr(fmt, "quant_exact", False)), norm_eps=bool(getattr(fmt, "norm_eps", False)),
        eps_g_bits=(fmt.max_features << 30).bit_length(),
        eps_gsum_bits=(fmt.max_features * ((1 << GSUM_BITS) - 1) ** 2).bit_length(),
        sh_min=2 - fmt.norm_bits, sh_max=fmt.x_bits + 1 - fmt.norm_bits,
        se_bits=2 * (math.isqrt(sumsq_max).bit_length() + SE_MARGIN_BITS),
    )


def acc_layout(w: VectorWidths) -> data.StructLayout:
    """An accumulator of the matrix-vector unit, ``last`` on a vector's final row (the same
    layout as ``TernaryMatVec.out_layout``, so its ``out`` connects to :class:`OutputScale`)."""
    return data.StructLayout({"acc": w.acc, "last": unsigned(1)})


def value_layout(w: VectorWidths) -> data.StructLayout:
    """One element of an x-valued vector (Q(x_frac), signed x_bits), ``last`` on its final one."""
    return data.StructLayout({"value": w.x, "last": unsigned(1)})


def stats_layout(w: VectorWidths) -> data.StructLayout:
    """What one BitLinear's statistics pass yields: m = max|v16 c| and sum(((v16 a) >> s)^2);
    with ``norm_eps`` also ``g`` = sum((|v16| >> (norm_bits - 16))^2) and normalise's shift ``sh``."""
    fields = {"m": unsigned(w.m_bits), "sumsq": unsigned(w.sumsq_bits)}
    if w.norm_eps:
        fields.update({"g": unsigned(w.eps_g_bits), "sh": signed_range_shape(w.sh_min, w.sh_max)})
    return data.StructLayout(fields)


def scale_layout(w: VectorWidths) -> data.StructLayout:
    """Per-token scale of one BitLinear: ``y = saturate(rshift_round(acc * qt, shift))``."""
    return data.StructLayout({"qt": unsigned(w.scale_bits), "shift": w.shift})


class Pipeline:
    """Registers of a pipeline whose stages all move forward together while ``advance`` is high.

    Values are registered at a numbered stage (``reg``); ``at`` returns a value delayed to a later
    stage, so expressions only combine values of the same stage. A stage-k register takes an
    expression of stage k-1 values.
    """

    def __init__(self, m, advance, domain: str = "sync", name: str = "pipe", phase=None):
        # A module of its own, so registers (and delays created by ``at``) are never nested in
        # whatever ``m.If`` the caller happens to be inside.
        self._m = Module()
        m.submodules[name] = self._m
        self._advance = advance
        self._domain = domain
        self._stage = {}
        self._delayed = {}
        self._phase = phase

    @staticmethod
    def shared_control(m, share: int, out_valid, out_ready, name: str = "phase"):
        """(advance, phase, offered) of a pipeline whose multipliers each serve ``share`` products.

        ``share`` 1: ``advance = ~offered | out_ready``, phase None, ``offered`` = ``out_valid``
        (the last stage's valid). ``share`` 2: the stages hold for at least two cycles; in the
        first (``phase`` low) every shared multiplier computes its first product into a holding
        register, in the second (``phase`` high) its second, and the pipeline may advance.
        The output is offered only while ``phase`` is high, so a stream's ``valid`` stays high
        until it is taken (``phase`` falls only when the pipeline advances).
        """
        if share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {share}")
        if share == 1:
            return ~out_valid | out_ready, None, out_valid
        phase = Signal(name=name)
        advance = phase & (~out_valid | out_ready)
        m.d.sync += phase.eq(~advance)
        return advance, phase, out_valid & phase

    def products(self, stage: int, name: str, pairs, *, registered: bool):
        """Registered products a * b of (a, b, shape) operands of stage ``stage - 1``.

        Returns (products, stage of the products). Without a phase one multiplier per product,
        with registers on both sides of it (a DSP block's multiplier alone is about as slow as a
        whole pipeline stage may be): ``registered`` says the operands are register outputs
        already (signals, slices of them or constants); otherwise they are registered at
        ``stage`` first, which puts the products one stage later. With a phase
        (:meth:`shared_control`, share 2) consecutive pairs of products share a multiplier: the
        first is computed while ``phase`` is low into a holding register, the second while it is
        high; the products are registered at ``stage`` (operands selected by the phase in front
        of the multiplier: the iCE40 compact engine, where a register stage costs more)."""
        out = []
        if self._phase is None:
            if not registered:
                pairs = [(self._operand(stage, f"{name}{k}_a", a), self._operand(stage, f"{name}{k}_b", b), shape)
                         for k, (a, b, shape) in enumerate(pairs)]
                stage += 1
            for k, (a, b, shape) in enumerate(pairs):
                out.append(self.reg(stage, f"{name}{k}", a * b, shape))
            return out, stage
        for k in range(0, len(pairs), 2):
            if k + 1 == len(pairs):
                a, b, shape = pairs[k]
                out.append(self.reg(stage, f"{name}{k}", a * b, shape))
                break
            (a0, b0, sh0), (a1, b1, sh1) = pairs[k], pairs[k + 1]
            width = max(len(Value.cast(a0)), len(Value.cast(a1))), max(len(Value.cast(b0)), len(Value.cast(b1)))
            ma = Signal(width[0], name=f"{name}{k}_ma")
            mb = Signal(width[1], name=f"{name}{k}_mb")
            self._m.d.comb += [ma.eq(Mux(self._phase, a1, a0)), mb.eq(Mux(self._phase, b1, b0))]
            prod = ma * mb
            hold = Signal(sh0, name=f"{name}{k}_hold")
            with self._m.If(~self._phase):
                self._m.d[self._domain] += hold.eq(prod)
            out.append(self.reg(stage, f"{name}{k}", hold, sh0))
            out.append(self.reg(stage, f"{name}{k + 1}", prod, sh1))
        return out, stage

    def _operand(self, stage: int, name: str, v):
        """v (of stage ``stage - 1``) as a register of ``stage``: a pipeline signal is delayed
        (sharing the delay registers of ``at``), anything else registered."""
        v = Value.cast(v)
        if isinstance(v, Signal) and id(v) in self._stage and self.stage_of(v) == stage - 1:
            return self.at(v, stage)
        return self.reg(stage, name, v)

    def reg(self, stage: int, name: str, value, shape=None, *, base=None) -> Signal:
        value = Value.cast(value)
        sig = Signal(shape if shape is not None else value.shape(), name=f"s{stage}_{name}")
        with self._m.If(self._advance):
            self._m.d[self._domain] += sig.eq(value)
        self._stage[id(sig)] = (stage, sig, base or name)
        return sig

    def stage_of(self, sig) -> int:
        return self._stage[id(sig)][0]

    def at(self, sig, stage: int) -> Signal:
        first, _, base = self._stage[id(sig)]
        if stage < first:
            raise ValueError(f"{sig.name} exists from stage {first}, not at stage {stage}")
        cur = sig
        for k in range(first + 1, stage + 1):
            key = (id(sig), k)
            if key not in self._delayed:
                self._delayed[key] = self.reg(k, base, cur, base=base)
            cur = self._delayed[key]
        return cur


def _limb_plan(a_max: int, b_max: int):
    """umul's limb products: (i, j, shift, product max, multiplier?) for every pair of
    DSP_BITS limbs of a <= a_max and b <= b_max whose product can be non-zero; a pair with a
    1-bit limb is an AND, not a multiplier."""
    def limbs(vmax):
        n = max(1, -(-vmax.bit_length() // DSP_BITS))
        return [(DSP_BITS * k, min((1 << DSP_BITS) - 1, vmax >> (DSP_BITS * k))) for k in range(n)]
    plan = []
    for i, (ash, amax) in enumerate(limbs(a_max)):
        for j, (bsh, bmax) in enumerate(limbs(b_max)):
            if amax and bmax:
                plan.append((i, j, ash + bsh, amax * bmax, amax > 1 and bmax > 1))
    return plan


def umul_latency(a_max: int, b_max: int, *, registered: bool) -> int:
    """Stages :func:`umul` adds in a pipeline without a shared phase: ``umul(p, s, ...)``
    returns its product at stage ``s + umul_latency(...)``."""
    plan = _limb_plan(a_max, b_max)
    if not plan:
        return 0
    stage = 0 if registered or not any(big for *_, big in plan) else 1
    levels = (len(plan) - 1).bit_length()
    return stage + levels + (min(sh for _, _, sh, _, _ in plan) != 0)


def umul(pipe: Pipeline, stage: int, name: str, a, a_max: int, b, b_max: int, *, registered: bool):
    """Unsigned a * b from DSP_BITS x DSP_BITS limb products.

    ``a`` and ``b`` are stage ``stage - 1`` values with a <= a_max, b <= b_max; ``registered``:
    both are register outputs (:meth:`Pipeline.products`). The limb products are registered at
    ``stage`` (a stage later when the operands are registered first), then summed pairwise, one
    adder level per stage (:func:`umul_latency` stages in all).
    Returns (product, stage of the product).
    """
    a, b = Value.cast(a), Value.cast(b)
    terms = []
    big, big_meta = [], []
    for i, j, sh, pmax, is_big in _limb_plan(a_max, b_max):
        amax = min((1 << DSP_BITS) - 1, a_max >> (DSP_BITS * i))
        bmax = min((1 << DSP_BITS) - 1, b_max >> (DSP_BITS * j))
        al = a[DSP_BITS * i:DSP_BITS * (i + 1)][:amax.bit_length()]
        bl = b[DSP_BITS * j:DSP_BITS * (j + 1)][:bmax.bit_length()]
        if is_big:
            big.append((al, bl, unsigned(pmax.bit_length())))
            big_meta.append((sh, pmax))
        else:
            terms.append((pipe.reg(stage, f"{name}_p{i}{j}", al * bl, unsigned(pmax.bit_length())), sh, pmax))
    out_bits = (a_max * b_max).bit_length()
    if not terms and not big:
        return pipe.reg(stage, name, 0, unsigned(max(1, out_bits))), stage
    prods, pstage = pipe.products(stage, f"{name}_m", big, registered=registered) if big else ([], stage)
    terms = [(pipe.at(t, pstage), sh, mx) for t, sh, mx in terms]
    terms += [(r, sh, mx) for r, (sh, mx) in zip(prods, big_meta)]
    stage = pstage
    level = 0
    while len(terms) > 1:
        level += 1
        terms.sort(key=lambda t: t[1])
        merged = []
        for k in range(0, len(terms) - 1, 2):
            (x, xs, xm), (y, ys, ym) = terms[k], terms[k + 1]
            vmax = xm + (ym << (ys - xs))
            # Cat when the lower term ends below the higher term's first bit: no adder needed
            if xm.bit_length() <= ys - xs:
                expr = Cat(x, Const(0, ys - xs - len(x)), y)
            else:
                expr = x + (y << (ys - xs))
            merged.append((pipe.reg(stage + level, f"{name}_s{level}_{k // 2}", expr,
                                    unsigned(vmax.bit_length())), xs, vmax))
        if len(terms) % 2:
            merged.append(terms[-1])
        terms = [(pipe.at(t, stage + level), s, mx) for t, s, mx in merged]
    value, shift, vmax = terms[0]
    if shift:
        value = pipe.reg(stage + level + 1, name, value << shift, unsigned(out_bits))
        level += 1
    return value, stage + level


def const_product(v, t: int):
    """v * t for a constant t >= 0 as a sum of shifted copies of v, added or subtracted by the
    non-adjacent form of t (at most half its digits non-zero): no multiplier is inferred."""
    v = Value.cast(v)
    digits, k = [], 0
    while t:
        if t & 1:
            digit = 2 - (t & 3)          # +1 or -1
            digits.append((k, digit))
            t -= digit
        t >>= 1
        k += 1
    if not digits:
        return Const(0, 1)
    total = None
    for k, digit in sorted(digits, key=lambda d: -d[1]):     # the +1 digits first
        term = v << k
        total = term if total is None else (total + term if digit > 0 else total - term)
    return total


def msb_index(v: Value, width: int):
    """(any, index of the highest set bit) of the low ``width`` bits of v; LUT logic only
    (a tree of halves), so its depth grows with log2(width). The index is 0 when v is 0."""
    v = Value.cast(v)[:width]
    if width == 1:
        return v[0], Const(0, 1)
    if width == 2:
        return v.any(), v[1]
    lo_w = 1 << ((width - 1).bit_length() - 1)      # the largest power of two below width
    bits = (lo_w - 1).bit_length()
    any_lo, idx_lo = msb_index(v[:lo_w], lo_w)
    if width - lo_w == 1:
        any_hi, idx_hi = v[lo_w], Const(0, bits)
    else:
        any_hi, idx_hi = msb_index(v[lo_w:], width - lo_w)
        idx_hi = Cat(idx_hi, Const(0, bits - len(idx_hi))) if len(idx_hi) < bits else idx_hi
    return any_lo | any_hi, Cat(Mux(any_hi, idx_hi, idx_lo), any_hi)


# Timing: every helper below is at most one carry chain plus LUT logic, so a pipeline stage
# that uses one of them reaches 40 MHz on an iCE40 and 100 MHz on an ECP5.

def rshift_round_mag(mag: Value, k: int, neg):
    """|rshift_round(+-mag, k)| for a constant k: the sign decides how a half rounds.

    rshift_round(-P, k) = floor((2^(k-1) - P) / 2^k) = -floor((P + 2^(k-1) - 1) / 2^k).
    """
    if k <= 0:
        return Value.cast(mag) << (-k)
    half = 1 << (k - 1)
    return (mag + Mux(neg, half - 1, half)) >> k


def round_carry_mag(low: Value, k: int, neg):
    """The carry that rshift_round_mag adds to P >> k, from P's low k bits only."""
    half = 1 << (k - 1)
    return (Value.cast(low)[:k] + Mux(neg, half - 1, half))[k]


def round_carry_signed(low: Value, k: int, neg):
    """The carry c with rshift_round(+-P, k) = (P >> k, or ~(P >> k) when negative) + c,
    from P's low k bits only (-P = ~P + 1)."""
    low = Value.cast(low)[:k]
    half = 1 << (k - 1)
    return (Mux(neg, ~low, low) + Mux(neg, half + 1, half))[k]


def signed_from_mag(mag: Value, neg):
    return Mux(neg, -mag, mag)


def greater_unsigned(a: Value, b: Value, chunk: int = DSP_BITS):
    """a > b for unsigned values, as parallel comparators of ``chunk`` bits (short carry chains)."""
    a, b = Value.cast(a), Value.cast(b)
    width = max(len(a), len(b))
    a, b = a.as_unsigned()[:width], b.as_unsigned()[:width]
    a = Cat(a, Const(0, width - len(a)))
    b = Cat(b, Const(0, width - len(b)))
    gt, eq = Const(0, 1), Const(1, 1)
    for top in range(width, 0, -chunk):
        lo = max(0, top - chunk)
        gt = gt | (eq & (a[lo:top] > b[lo:top]))
        eq = eq & (a[lo:top] == b[lo:top])
    return gt


def saturate_mag(mag: Value, neg, w: VectorWidths):
    """saturate(+-mag) into signed(x_bits); the range checks are LUT logic on the top bits."""
    mag = Value.cast(mag)
    xb = w.x_bits
    if len(mag) < xb:
        mag = Cat(mag, Const(0, xb - len(mag)))
    above = mag[xb:].any() if len(mag) > xb else Const(0, 1)
    top = mag[xb - 1]
    over_pos = above | top                          # mag >= 2^(x_bits-1)
    over_neg = above | (top & mag[:xb - 1].any())   # mag > 2^(x_bits-1)
    return Mux(neg, Mux(over_neg, w.x_min, -mag[:xb]), Mux(over_pos, w.x_max, mag[:xb]))


def saturate_signed(v: Value, w: VectorWidths):
    """saturate(v) into signed(x_bits); the range check is LUT logic on the top bits."""
    v = Value.cast(v)
    if len(v) <= w.x_bits:
        return v
    top = v[w.x_bits - 1:]
    fits = top.all() | ~top.any()
    return Mux(fits, v[:w.x_bits].as_signed(), Mux(v[-1], w.x_min, w.x_max))
