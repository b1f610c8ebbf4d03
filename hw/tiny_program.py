"""The token step of HGRN-bit as a program of the tiny engine (:mod:`.tiny_isa`).

:func:`token_program` writes, for one model geometry and weight-image layout, the program the
tiny engine runs: ``RESET_STATE`` starts at word 0 (h := 0 for every layer), ``FEED_TOKEN``
at word 1 (embedding, every layer, lm_head, argmax). Each step follows
``reference/integer.py`` operation by operation; the tests run it in :class:`~.tiny_isa.Machine`
against :class:`~mmfree_fpga.reference.integer.IntegerModel`.

One BitLinear is a subroutine (:data:`BL_ARGS` in the base registers): max |v| (its bit length gives
the normalising shift), a statistics pass (max |v16 c|, sum of ((v16 a) >> 15)^2),
the square root and the reciprocal of the quantiser, a quantise pass into ``QM``, the scale
mantissa by division, ``MATVEC`` and the output-scale pass.

Every value stays within the 48-bit datapath for every input the formats allow (Machine faults
otherwise): products of an int32 and a 16-bit value (gates, sigmoid, norms, the quantiser's
reciprocal, qt < 2^17 times |acc| <= 2^21) stay below 2^47; the sum of squares below 2^44 (p <
2^15, n <= 2^14); k_mant m below 2^46, (k_mant m) << t below 2^38; the two int32 x int32 products
(p = yg silu(h), v = silu(gate) up) are split (:meth:`_Gen.mul_shift_sat`). Left shifts of the
output scale (t < k_exp) would leave the datapath beyond 9 places; exported models have t > k_exp.

Vector memory (32-bit words): ``x`` [d], ``h`` [L d], then a work area of max(3d, 2I, V)
words: ``f``/``i``/``g`` projections at 0 / d / 2d (``p`` replaces ``f``), ``gate_proj``'s
output (``v`` replaces the gate half), the o/down outputs at 0, the logits at 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import DesignError

from .tiny_isa import (B_BITS, DATA_BITS, IMM_BITS, LOOP_COUNT_BITS, MATVEC_COLS, MATVEC_OUT, MATVEC_ROWS,
                       MATVEC_TRITS, N_BASES, N_REGS, RES_LOGIT, RES_TOKEN, TARGET_BITS, Asm, Cond, Kind, Op,
                       sig_frac_bits)

__all__ = ["TinyLayout", "token_program", "BL_ARGS", "RESET_PC", "TOKEN_PC", "TinyPerfModel", "TINY_PERF_MODEL"]

RESET_PC, TOKEN_PC = 0, 1
# base registers of the BitLinear subroutine: MATVEC's own where it reads them, the rest in order
_MATVEC_ARGS = {MATVEC_COLS: "n", MATVEC_TRITS: "trits", MATVEC_OUT: "out", MATVEC_ROWS: "rows"}
_OTHER_ARGS = iter(("src", "a", "c", "k"))
BL_ARGS = tuple(_MATVEC_ARGS.get(k) or next(_OTHER_ARGS) for k in range(N_BASES))
_B = {name: k for k, name in enumerate(BL_ARGS)}
# registers
(R_VMAX, R_SH, R_M, R_SS, R_V, R_P, R_R, R_ZS, R_M16, R_RC, R_Z, R_NUM, R_T, R_TMP, R_QT, R_S2) = range(N_REGS)
# registers reused outside the subroutine (elementwise code; never live across a call)
R_Y, R_FR, R_F, R_C, R_BEST, R_BI, R_ES = R_V, R_P, R_M, R_SS, R_M, R_SS, R_V


@dataclass(frozen=True)
class TinyLayout:
    """Vector memory addresses (words) and sizes of one geometry."""

    d: int
    I: int   # noqa: E741
    L: int
    V: int

    @property
    def x(self) -> int:
        return 0

    def h(self, layer: int) -> int:
        return self.d + layer * self.d

    @property
    def work(self) -> int:
        return self.d * (1 + self.L)

    @property
    def logits(self) -> int:
        return self.work

    @property
    def vm_depth(self) -> int:
        return self.work + max(3 * self.d, 2 * self.I, self.V)

    @property
    def qm_depth(self) -> int:
        return max(self.d, self.I)


class _Gen:
    def __init__(self, fmt: Formats):
        self.a = Asm()
        self.fmt = fmt
        self.n_labels = 0

    def new_label(self, stem: str) -> str:
        self.n_labels += 1
        return f"{stem}{self.n_labels}"

    def e(self, op, target=None, **kw):
        self.a.emit(op, target, **kw)

    # operand shorthands
    def imm(self, op, v):
        self.e(op, kind=Kind.IMM, imm=v)

    def reg(self, op, r, **kw):
        self.e(op, kind=Kind.R, reg=r, **kw)

    def vm(self, op, base, fi=1, **kw):
        self.e(op, kind=Kind.VM, imm=base, fi=fi, **kw)

    def loop(self, top: str, count: int | None = None, breg: int | None = None):
        if breg is not None:
            self.e(Op.LOOP, top, fb=1, bsel=breg)
        else:
            if not 0 < count < (1 << LOOP_COUNT_BITS):
                raise DesignError(f"loop count {count} too large for an immediate")
            self.e(Op.LOOP, top, imm=count << TARGET_BITS)

    def sigmoid(self):
        """A := sigmoid(A) (Q(x_frac) -> Q(gate_frac)); uses R_FR and P."""
        fmt = self.fmt
        frac_bits = sig_frac_bits(fmt)
        self.e(Op.SIGP)
        self.reg(Op.ST, R_FR)
        self.e(Op.LD, kind=Kind.TAB, fp=1, imm=1)
        self.e(Op.SUB, kind=Kind.TAB, fp=1, imm=0)
        self.reg(Op.MUL, R_FR)
        self.e(Op.SHR, kind=Kind.IMM, imm=frac_bits, flag=1)
        self.e(Op.ADD, kind=Kind.TAB, fp=1, imm=0)

    def silu(self):
        """A := silu(A) = rshift_round(y sigmoid(y), gate_frac); uses R_Y, R_FR, P."""
        self.reg(Op.ST, R_Y)
        self.sigmoid()
        self.reg(Op.MUL, R_Y)
        self.e(Op.SHR, kind=Kind.IMM, imm=self.fmt.gate_frac, flag=1)

    def mul_shift_sat(self, b_base: int):
        """A := saturate(rshift_round(A * VM[b_base + i], x_frac)) for int32 A and VM word, within the
        datapath: with b = bh 2^s + bl (s = x_frac, 0 <= bl < 2^s) the result is
        A bh + rshift_round(A bl, s) exactly; both products stay below 2^(31 + s).
        Uses R_R, R_ZS, R_M16, R_RC (free outside the BitLinear subroutine)."""
        s = self.fmt.x_frac
        r_a, r_bh, r_bl, r_lo = R_R, R_ZS, R_M16, R_RC
        self.reg(Op.ST, r_a)
        self.vm(Op.LD, b_base)
        self.imm(Op.SHR, s)
        self.reg(Op.ST, r_bh)
        self.imm(Op.MUL, 1 << s)
        self.reg(Op.ST, r_bl)
        self.vm(Op.LD, b_base)
        self.reg(Op.SUB, r_bl)
        self.reg(Op.ST, r_bl)
        self.reg(Op.LD, r_a)
        self.reg(Op.MUL, r_bl)
        self.e(Op.SHR, kind=Kind.IMM, imm=s, flag=1)
        self.reg(Op.ST, r_lo)
        self.reg(Op.LD, r_a)
        self.reg(Op.MUL, r_bh)
        self.reg(Op.ADD, r_lo)
        self.e(Op.SAT)

    def v16_times_c(self, keep_v16: bool = False):
        """A := normalise(v)[i] * c[i] (z of the statistics and quantise passes); with
        ``keep_v16`` also R_V := normalise(v)[i]."""
        self.e(Op.LD, kind=Kind.VM, fi=1, fb=1, bsel=_B["src"])
        self.reg(Op.SHR, R_SH)
        if keep_v16:
            self.reg(Op.ST, R_V)
        self.e(Op.MUL, kind=Kind.W16, fi=1, fb=1, bsel=_B["c"])

    def bitlinear_subroutine(self):
        fmt = self.fmt
        B = _B
        self.a.label("bitlinear")
        # 1. max |v|: its bit length gives the normalising shift
        self.imm(Op.LD, 0)
        self.reg(Op.ST, R_VMAX)
        top = self.new_label("or")
        self.a.label(top)
        self.e(Op.LD, kind=Kind.VM, fi=1, fb=1, bsel=B["src"])
        self.e(Op.ABS)
        self.reg(Op.MAX, R_VMAX)
        self.reg(Op.ST, R_VMAX)
        self.loop(top, breg=B["n"])
        self.e(Op.BR, "bl_zero", reg=Cond.EQ)
        self.e(Op.BITLEN)
        self.imm(Op.SUB, fmt.norm_bits - 1)
        self.reg(Op.ST, R_SH)
        # 2. statistics: m = max |v16 c|, ss = sum ((v16 a) >> sumsq_shift)^2
        self.imm(Op.LD, 0)
        self.reg(Op.ST, R_M)
        self.reg(Op.ST, R_SS)
        top = self.new_label("stats")
        self.a.label(top)
        self.v16_times_c(keep_v16=True)
        self.e(Op.ABS)
        self.reg(Op.MAX, R_M)
        self.reg(Op.ST, R_M)
        self.reg(Op.LD, R_V)
        self.e(Op.MUL, kind=Kind.W16, fi=1, fb=1, bsel=B["a"])
        self.imm(Op.SHR, fmt.sumsq_shift)
        self.reg(Op.ST, R_P)
        self.reg(Op.MUL, R_P)
        self.reg(Op.ADD, R_SS)
        self.reg(Op.ST, R_SS)
        self.loop(top, breg=B["n"])
        # 3. r = isqrt(ss); zero output when m == 0 or r == 0
        self.reg(Op.LD, R_SS)
        self.e(Op.SQRT)
        self.reg(Op.ST, R_R)
        self.e(Op.BR, "bl_zero", reg=Cond.EQ)
        self.reg(Op.LD, R_M)
        self.e(Op.BR, "bl_zero", reg=Cond.EQ)
        # 4. quantiser: zs = bitlen(m) - quant_bits, m16 = m >> zs, recip = (127 << recip_frac) // m16
        self.e(Op.BITLEN)
        self.imm(Op.SUB, fmt.quant_bits)
        self.reg(Op.ST, R_ZS)
        self.reg(Op.LD, R_M)
        self.reg(Op.SHR, R_ZS)
        self.reg(Op.ST, R_M16)
        self.imm(Op.LD, (1 << (fmt.act_bits - 1)) - 1)
        self.imm(Op.SHR, -fmt.recip_frac)
        self.reg(Op.DIV, R_M16)
        self.reg(Op.ST, R_RC)
        top = self.new_label("quant")
        self.a.label(top)
        self.v16_times_c()
        self.reg(Op.ST, R_Z)
        self.e(Op.ABS)
        self.reg(Op.SHR, R_ZS)
        self.reg(Op.MUL, R_RC)
        self.e(Op.SHR, kind=Kind.IMM, imm=fmt.recip_frac, flag=1)
        self.reg(Op.CSGN, R_Z)
        self.imm(Op.MAX, -(1 << (fmt.act_bits - 1)))
        self.imm(Op.MIN, (1 << (fmt.act_bits - 1)) - 1)
        self.e(Op.STQ, fi=1)
        self.loop(top, breg=B["n"])
        # 5. scale mantissa: num = k_mant m, t = (scale_bits - 1) + bitlen(r) - bitlen(num),
        #    qt = (num << t) // r or num // (r << -t); output shift s2 = t - k_exp
        self.e(Op.LD, kind=Kind.W32, fb=1, bsel=B["k"])
        self.reg(Op.MUL, R_M)
        self.reg(Op.ST, R_NUM)
        self.e(Op.BITLEN)
        self.reg(Op.ST, R_TMP)
        self.reg(Op.LD, R_R)
        self.e(Op.BITLEN)
        self.imm(Op.ADD, fmt.scale_bits - 1)
        self.reg(Op.SUB, R_TMP)
        self.reg(Op.ST, R_T)
        self.e(Op.BR, "bl_tneg", reg=Cond.LT)
        self.imm(Op.LD, 0)
        self.reg(Op.SUB, R_T)
        self.reg(Op.ST, R_TMP)
        self.reg(Op.LD, R_NUM)
        self.reg(Op.SHR, R_TMP)
        self.reg(Op.DIV, R_R)
        self.e(Op.BR, "bl_qt", reg=Cond.ALWAYS)
        self.a.label("bl_tneg")
        self.reg(Op.LD, R_R)
        self.reg(Op.SHR, R_T)
        self.reg(Op.ST, R_TMP)
        self.reg(Op.LD, R_NUM)
        self.reg(Op.DIV, R_TMP)
        self.a.label("bl_qt")
        self.reg(Op.ST, R_QT)
        self.reg(Op.LD, R_T)
        self.e(Op.SUB, kind=Kind.W32, fb=1, bsel=B["k"], imm=4)
        self.reg(Op.ST, R_S2)
        # 6. the matrix, then y = saturate(rshift_round(acc qt, s2))
        self.e(Op.MATVEC)
        top = self.new_label("oscale")
        self.a.label(top)
        self.e(Op.LD, kind=Kind.VM, fi=1, fb=1, bsel=B["out"])
        self.reg(Op.MUL, R_QT)
        self.reg(Op.SHR, R_S2, flag=1)
        self.e(Op.SAT)
        self.e(Op.STV, fi=1, fb=1, bsel=B["out"])
        self.loop(top, breg=B["rows"])
        self.e(Op.RET)
        # all-zero input (or statistics): the output is zero
        self.a.label("bl_zero")
        self.imm(Op.LD, 0)
        top = self.new_label("zero")
        self.a.label(top)
        self.e(Op.STV, fi=1, fb=1, bsel=B["out"])
        self.loop(top, breg=B["rows"])
        self.e(Op.RET)

    def call_bitlinear(self, sec: dict, name: str, src: int, n: int, out: int, rows: int):
        args = {"src": src, "n": n, "trits": sec[f"{name}.trits"].offset, "a": sec[f"{name}.a"].offset,
                "out": out, "rows": rows, "c": sec[f"{name}.c"].offset, "k": sec[f"{name}.k"].offset}
        for key, value in args.items():
            if not 0 <= value < (1 << min(B_BITS, IMM_BITS - 1)):
                raise DesignError(f"{name}: {key} = {value} does not fit the tiny engine's base registers")
            self.e(Op.SETB, bsel=_B[key], imm=value)
        self.e(Op.CALL, "bitlinear")

    def residual(self, x: int, y: int, d: int):
        """x := saturate(x + y) over d words."""
        top = self.new_label("res")
        self.a.label(top)
        self.vm(Op.LD, x)
        self.vm(Op.ADD, y)
        self.e(Op.SAT)
        self.vm(Op.STV, x)
        self.loop(top, d)


def token_program(cfg: ModelConfig, packing: str = "base3", fmt: Formats = FORMATS):
    """(instructions, :class:`TinyLayout`) of ``cfg``'s token step for a ``packing`` image."""
    from mmfree_fpga.image import image_layout
    if fmt.x_bits + fmt.x_frac > DATA_BITS or fmt.x_bits + fmt.gate_frac + 1 > DATA_BITS:
        raise DesignError("the number formats exceed the tiny engine's datapath")
    if packing != "base3":
        raise DesignError("the tiny engine decodes base3 weight images only (use --packing base3)")
    sec = {s.name: s for s in image_layout(cfg, packing)}
    lay = TinyLayout(d=cfg.d, I=cfg.I, L=cfg.L, V=cfg.V)
    d, I, L, V = cfg.d, cfg.I, cfg.L, cfg.V
    g = _Gen(fmt)
    one = 1 << fmt.gate_frac
    g.e(Op.BR, "reset", reg=Cond.ALWAYS)
    g.e(Op.BR, "token", reg=Cond.ALWAYS)

    # RESET_STATE: h := 0
    g.a.label("reset")
    g.imm(Op.LD, 0)
    g.e(Op.SETB, bsel=0, imm=L * d)
    g.a.label("reset_loop")
    g.vm(Op.STV, lay.h(0))
    g.loop("reset_loop", breg=0)
    g.e(Op.END)

    g.bitlinear_subroutine()

    g.a.label("token")
    # embedding: x = rshift_round(emb_q[token] * emb_scale[token], emb_scale_frac - x_frac)
    g.e(Op.GETT)
    g.imm(Op.MUL, 4)
    g.e(Op.SETP)
    g.e(Op.LD, kind=Kind.W32, fp=1, imm=sec["embedding.scale"].offset, flag=1)
    g.reg(Op.ST, R_ES)
    g.e(Op.GETT)
    g.imm(Op.MUL, d)
    g.e(Op.SETP)
    g.a.label("embed")
    g.e(Op.LD, kind=Kind.W8, fi=1, fp=1, imm=sec["embedding.q"].offset)
    g.reg(Op.MUL, R_ES, flag=1)
    g.e(Op.SHR, kind=Kind.IMM, imm=fmt.emb_scale_frac - fmt.x_frac, flag=1)
    g.vm(Op.STV, lay.x)
    g.loop("embed", d)

    W = lay.work
    yf, yi, yg = W, W + d, W + 2 * d
    for layer in range(L):
        pre = f"layers.{layer}"
        h = lay.h(layer)
        lb = sec[f"{pre}.lower_bound"].offset
        # token mixer: three projections of x
        g.call_bitlinear(sec, f"{pre}.f_proj", lay.x, d, yf, d)
        g.call_bitlinear(sec, f"{pre}.i_proj", lay.x, d, yi, d)
        g.call_bitlinear(sec, f"{pre}.g_proj", lay.x, d, yg, d)
        top = g.new_label("mlgru")
        g.a.label(top)
        # f = lb + rshift_round((one - lb) sigmoid(yf), gate_frac)
        g.vm(Op.LD, yf)
        g.sigmoid()
        g.reg(Op.ST, R_F)
        g.imm(Op.LD, one)
        g.e(Op.SUB, kind=Kind.W16, fi=1, imm=lb, flag=1)
        g.reg(Op.MUL, R_F)
        g.e(Op.SHR, kind=Kind.IMM, imm=fmt.gate_frac, flag=1)
        g.e(Op.ADD, kind=Kind.W16, fi=1, imm=lb, flag=1)
        g.reg(Op.ST, R_F)
        # c = rshift_round(silu(yi) (one - f), gate_frac)
        g.vm(Op.LD, yi)
        g.silu()
        g.reg(Op.ST, R_C)
        g.imm(Op.LD, one)
        g.reg(Op.SUB, R_F)
        g.reg(Op.MUL, R_C)
        g.e(Op.SHR, kind=Kind.IMM, imm=fmt.gate_frac, flag=1)
        g.reg(Op.ST, R_C)
        # h = saturate(rshift_round(f h, gate_frac) + c)
        g.reg(Op.LD, R_F)
        g.vm(Op.MUL, h)
        g.e(Op.SHR, kind=Kind.IMM, imm=fmt.gate_frac, flag=1)
        g.reg(Op.ADD, R_C)
        g.e(Op.SAT)
        g.vm(Op.STV, h)
        # p = saturate(rshift_round(yg silu(h), x_frac)), stored over f
        g.silu()
        g.mul_shift_sat(yg)
        g.vm(Op.STV, yf)
        g.loop(top, d)
        g.call_bitlinear(sec, f"{pre}.o_proj", yf, d, W, d)
        g.residual(lay.x, W, d)
        # channel mixer
        g.call_bitlinear(sec, f"{pre}.gate_proj", lay.x, d, W, 2 * I)
        top = g.new_label("glu")
        g.a.label(top)
        g.vm(Op.LD, W)
        g.silu()
        g.mul_shift_sat(W + I)
        g.vm(Op.STV, W)
        g.loop(top, I)
        g.call_bitlinear(sec, f"{pre}.down_proj", W, I, W, d)
        g.residual(lay.x, W, d)

    g.call_bitlinear(sec, "lm_head", lay.x, d, lay.logits, V)
    # argmax: the first index of the largest logit
    g.vm(Op.LD, lay.logits, fi=0)
    g.reg(Op.ST, R_BEST)
    g.imm(Op.LD, 0)
    g.reg(Op.ST, R_BI)
    g.a.label("argmax")
    g.vm(Op.LD, lay.logits)
    g.reg(Op.SUB, R_BEST)
    g.e(Op.BR, "argmax_next", reg=Cond.LE)
    g.vm(Op.LD, lay.logits)
    g.reg(Op.ST, R_BEST)
    g.e(Op.GETI)
    g.reg(Op.ST, R_BI)
    g.a.label("argmax_next")
    g.loop("argmax", V)
    g.reg(Op.LD, R_BI)
    g.e(Op.RES, reg=RES_TOKEN)
    g.reg(Op.LD, R_BEST)
    g.e(Op.RES, reg=RES_LOGIT)
    g.e(Op.END)
    return g.a.assemble(), lay


class TinyPerfModel:
    """Cycles per token of the tiny engine: its instruction-level simulator (:class:`~.tiny_isa.Machine`,
    which counts the hardware's cycles per instruction) run on a pseudo-random image of the geometry.
    ``lanes`` is accepted for the interface of :class:`~mmfree_fpga.config.PerfModel` (always 1)."""

    def cycles_per_token(self, cfg: ModelConfig, lanes: int = 1) -> float:
        return float(_random_image_cycles(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers,
                                          cfg.intermediate_size))

    def ideal_cycles(self, cfg: ModelConfig, lanes: int = 1) -> float:
        return cfg.ideal_cycles(1)


@functools.lru_cache(maxsize=None)
def _random_image_cycles(V, d, L, I, tokens=(1, 2)):  # noqa: E741
    """Mean cycles of the tokens (from accepting FEED_TOKEN to offering the result) on the image
    of a random model (``reference.model.randomize``, seed 0)."""
    from mmfree_fpga.reference.export import image_bytes, integer_weights
    from mmfree_fpga.reference.integer import sigmoid_table
    from mmfree_fpga.reference.model import HGRNBitForCausalLM, randomize

    from .tiny_isa import START_CYCLES, Machine
    cfg = ModelConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, intermediate_size=I)
    model = randomize(HGRNBitForCausalLM(cfg), 0)
    blob = image_bytes(integer_weights(cfg, {k: v.detach() for k, v in model.state_dict().items()}))
    prog, lay = token_program(cfg)
    m = Machine(prog, blob, lay.vm_depth, lay.qm_depth, tuple(int(t) for t in sigmoid_table()))
    total = 0
    for t in tokens:
        m.token, m.cycles = t % V, 0
        m.run(TOKEN_PC)
        total += m.cycles + START_CYCLES
    return total / len(tokens)


TINY_PERF_MODEL = TinyPerfModel()
