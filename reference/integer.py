"""The exact integer model of the hardware: what the engine computes, bit for bit.

Every function here has a counterpart in ``hw/`` and operates on integers only (numpy int64
vectors, Python ints for per-token scalars and for products wider than 63 bits). Every function
takes the number formats (:class:`~mmfree_fpga.config.Formats`, default ``FORMATS``, the narrow
set; ``FORMAT_SETS`` in ``mmfree_fpga/config.py`` names the others).

The one-BitLinear recipe, for an input vector v (Q``x_frac``), rms-weights a and quant-weights c
(``norm_bits`` integers with export-time exponents), trits T and the export-time constant
K = kM * 2^kE:

1. ``v16 = normalise(v)``: one shift ``sh`` so max|v16| has ``norm_bits - 1`` bits;
2. ``z = v16 * c``; ``m = max|z|``; ``q = quantise(z, m)`` (int8, absmax 127; with ``quant_exact``
   exactly ``sign(z) floor((254 |z| + m) / 2m)``, else through a ``recip_frac`` reciprocal);
3. ``acc = T @ q`` (additions only);
4. ``S = sum(((v16 * a) >> sumsq_shift) ** 2)``; ``r = isqrt(S + E)`` with E the inner RMSNorm's
   eps in S's units (:func:`eps_term`; E = 0 unless ``norm_eps``);
5. ``(Qt, t) = scale(kM * m, r)``, a ``scale_bits`` mantissa from one integer division;
6. ``y = sat(round(acc * Qt * 2^(kE - t)))`` in Q``x_frac``.

Outside the engine logits travel as Q16 int32 whatever ``x_frac`` is (:func:`wire_logits`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.image import KIND_DTYPES, LAYER_MATRICES, image_layout, image_size
from mmfree_fpga.packing import unpack_trits

__all__ = [
    "IntBitLinear", "IntLayer", "IntegerWeights", "IntegerModel", "parse_image",
    "normalise", "quantise", "bitlinear", "sigmoid_table", "sigmoid", "silu",
    "rshift_round", "saturate", "isqrt", "scale_mantissa", "embed", "embed_row", "mlgru", "glu", "block",
    "bitlinear_rows", "recurrence", "glu_mix", "block_positions", "activations",
    "norm_shift", "shift", "mul_shift", "eps_term", "wire_logits", "EPS_KINDS", "EPS_KIND_OF",
]

F = FORMATS

# How each BitLinear's inner RMSNorm eps enters its sum of squares (eps_term): "input" (its input
# passed an outer RMSNorm over the same vector), "gsum" (o_proj: the outer norm is g_norm over the
# g_proj output of the same layer and token), "const" (down_proj: no outer norm).
EPS_KINDS = ("input", "gsum", "const")
EPS_KIND_OF = {"i_proj": "input", "f_proj": "input", "g_proj": "input", "o_proj": "gsum",
               "gate_proj": "input", "down_proj": "const", "lm_head": "input"}


# -- scalar and vector primitives ---------------------------------------------------

def rshift_round(v, s: int):
    """Round-half-up right shift by s >= 0 (add half, arithmetic shift); left shift if s < 0."""
    if s > 0:
        return (v + (1 << (s - 1))) >> s
    return v << (-s) if s < 0 else v


def shift(n: int, e: int) -> int:
    """``n << e`` for e >= 0, ``rshift_round(n, -e)`` for e < 0 (Python ints)."""
    return n << e if e >= 0 else rshift_round(n, -e)


def saturate(v, fmt: Formats = F):
    """Clamp to the signed x_bits range (the residual stream, h, BitLinear outputs); int64."""
    return np.clip(v, fmt.x_min, fmt.x_max).astype(np.int64)


def mul_shift(a: np.ndarray, b, s: int) -> np.ndarray:
    """``rshift_round(a * b, s)`` elementwise, exactly: in int64 where the product and its rounding
    constant fit 63 bits, else in Python ints (object array). Products of two x-format values
    reach 78 bits at x_bits 40."""
    a, b = np.asarray(a), np.asarray(b)
    amax, bmax = int(np.abs(a).max(initial=0)), int(np.abs(b).max(initial=0))
    if amax * bmax + (1 << max(s - 1, 0)) < 1 << 63:
        return rshift_round(a * b, s)
    return rshift_round(a.astype(object) * b.astype(object), s)


def isqrt(n: int) -> int:
    """floor(sqrt(n)): the hardware's restoring square root."""
    return math.isqrt(int(n))


def norm_shift(v: np.ndarray, fmt: Formats = F) -> int:
    """The shift ``sh`` of :func:`normalise`: ``bit_length(max|v|) - (norm_bits - 1)``, 0 for v = 0."""
    vmax = int(np.abs(v).max(initial=0))
    return vmax.bit_length() - (fmt.norm_bits - 1) if vmax else 0


def normalise(v: np.ndarray, fmt: Formats = F) -> np.ndarray:
    """Shift the whole vector so its largest magnitude has exactly norm_bits-1 bits:
    ``v >> sh`` for sh >= 0, ``v << -sh`` otherwise (sh = :func:`norm_shift`)."""
    sh = norm_shift(v, fmt)
    if sh == 0 and not np.any(v):
        return np.zeros_like(v)
    return v >> sh if sh >= 0 else v << (-sh)


def quantise(z: np.ndarray, m: int, fmt: Formats = F) -> np.ndarray:
    """int8 absmax quantisation of z with m = max|z| > 0: round(127 z / m), ties away.

    With ``fmt.quant_exact``: exactly ``sign(z) * floor((254 |z| + m) / (2 m))`` (the largest |z|
    gives 127). Otherwise |z| and m are shifted so m has quant_bits bits, then multiplied by
    R = floor(127 * 2^recip_frac / m16).
    """
    if fmt.quant_exact:
        mag = np.abs(z)
        if int(mag.max(initial=0)) * 254 + m >= 1 << 63:
            mag = mag.astype(object)
        qmag = ((254 * mag + m) // (2 * m)).astype(np.int64)
        return np.clip(np.sign(z) * qmag, -(1 << (fmt.act_bits - 1)), (1 << (fmt.act_bits - 1)) - 1)
    zs = m.bit_length() - fmt.quant_bits
    mag = np.abs(z)
    mag16 = mag >> zs if zs >= 0 else mag << (-zs)
    m16 = m >> zs if zs >= 0 else m << (-zs)
    recip = (127 << fmt.recip_frac) // m16
    qmag = (mag16 * recip + (1 << (fmt.recip_frac - 1))) >> fmt.recip_frac
    return np.clip(np.sign(z) * qmag, -(1 << (fmt.act_bits - 1)), (1 << (fmt.act_bits - 1)) - 1)


def scale_mantissa(num: int, r: int, fmt: Formats = F) -> tuple[int, int]:
    """(Qt, t) with Qt = floor(num * 2^t / r) in [2^(scale_bits-2), 2^scale_bits)."""
    t = (fmt.scale_bits - 1) + r.bit_length() - num.bit_length()
    qt = (num << t) // r if t >= 0 else num // (r << (-t))
    return qt, t


def eps_term(layer: "IntBitLinear", v16: np.ndarray, sh: int, fmt: Formats = F,
             yg: np.ndarray | None = None) -> int:
    """E >= 0, the inner RMSNorm's eps in the units of S (0 unless ``fmt.norm_eps``), by
    ``layer.eps_kind``:

    * "input": ``G = sum((|v16| >> (norm_bits - 16))^2)``, ``E = shift(eps_mant * G, eps_exp)``;
    * "gsum": ``G = sum(min(|yg| >> (x_frac - 12), 2^20 - 1)^2)`` over the g_proj output ``yg`` of
      the same layer and token, ``E = shift(eps_mant * G, eps_exp - 2 sh)``;
    * "const": ``E = shift(eps_mant, eps_exp - 2 sh)``;

    with ``sh`` the normalise shift of this BitLinear's input and :func:`shift` rounding half up
    on right shifts. (The float model divides by sqrt(mean(u^2) + eps) with u its input after
    the outer norm; in S's units that adds eps * n * mean-square of the outer norm's input.)"""
    if not fmt.norm_eps:
        return 0
    kind = layer.eps_kind
    if kind == "input":
        g = np.abs(v16) >> (fmt.norm_bits - 16)
        return shift(layer.eps_mant * int(np.dot(g, g)), layer.eps_exp)
    if kind == "gsum":
        if yg is None:
            raise ValueError("a 'gsum' BitLinear (o_proj) needs the g_proj output yg for its eps term")
        g = np.minimum(np.abs(yg) >> (fmt.x_frac - 12), (1 << 20) - 1)
        return shift(layer.eps_mant * int(np.dot(g, g)), layer.eps_exp - 2 * sh)
    if kind == "const":
        return shift(layer.eps_mant, layer.eps_exp - 2 * sh)
    raise ValueError(f"unknown eps kind {kind!r}; expected one of {', '.join(EPS_KINDS)}")


def _bitlinear_front(v: np.ndarray, layer: "IntBitLinear", fmt: Formats, yg: np.ndarray | None):
    """Steps 1, 2 and 4 of the recipe: (q, m, r, S, E); q is None where the output is zero (m or r 0)."""
    sh = norm_shift(v, fmt)
    v16 = normalise(v, fmt)
    z = v16 * layer.c
    m = int(np.abs(z).max(initial=0))
    p = (v16 * layer.a) >> fmt.sumsq_shift
    s = int(np.dot(p, p))
    e = eps_term(layer, v16, sh, fmt, yg)
    r = isqrt(s + e)
    q = quantise(z, m, fmt) if m and r else None
    return q, m, r, s, e


def activations(v: np.ndarray, layer: "IntBitLinear", fmt: Formats = F, yg: np.ndarray | None = None) -> np.ndarray:
    """The int8 activations q a BitLinear feeds its matrix for input ``v`` (zeros where its output
    is zero)."""
    q = _bitlinear_front(v, layer, fmt, yg)[0]
    return np.zeros(layer.trits.shape[1], dtype=np.int64) if q is None else q


def _bitlinear_back(acc: np.ndarray, m: int, r: int, layer: "IntBitLinear", fmt: Formats):
    """Steps 5 and 6: (y, Qt, t)."""
    qt, t = scale_mantissa(layer.k_mant * m, r, fmt)
    return saturate(rshift_round(acc * qt, t - layer.k_exp), fmt), qt, t


def bitlinear(v: np.ndarray, layer: "IntBitLinear", fmt: Formats = F, trace: dict | None = None,
              yg: np.ndarray | None = None) -> np.ndarray:
    """One BitLinear on a Q``x_frac`` vector -> Q``x_frac`` vector (see the module docstring).
    ``yg``: the g_proj output of the same layer and token, for o_proj's eps term (``norm_eps``)."""
    q, m, r, s, e = _bitlinear_front(v, layer, fmt, yg)
    if q is None:
        return np.zeros(layer.trits.shape[0], dtype=np.int64)
    acc = matvec(layer.trits_f32, q)
    y, qt, t = _bitlinear_back(acc, m, r, layer, fmt)
    if trace is not None:
        trace.update(q=q, acc=acc, m=m, r=r, qt=qt, t=t, sumsq=s, eps=e)
    return y


def bitlinear_rows(vs: list[np.ndarray], layer: "IntBitLinear", fmt: Formats = F,
                   ygs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """``[bitlinear(v, layer, fmt, yg=yg) for v, yg in zip(vs, ygs)]`` with one matrix product for
    all the inputs (exact like :func:`matvec`: every partial sum is an integer below 2^24)."""
    ygs = [None] * len(vs) if ygs is None else ygs
    fronts = [_bitlinear_front(v, layer, fmt, yg) for v, yg in zip(vs, ygs, strict=True)]
    out = [np.zeros(layer.trits.shape[0], dtype=np.int64) for _ in vs]
    live = [i for i, f in enumerate(fronts) if f[0] is not None]
    if live:
        q = np.stack([fronts[i][0] for i in live], axis=1).astype(np.float32)
        acc = (layer.trits_f32 @ q).astype(np.int64)
        for j, i in enumerate(live):
            out[i] = _bitlinear_back(acc[:, j], fronts[i][1], fronts[i][2], layer, fmt)[0]
    return out


def matvec(trits: np.ndarray, q: np.ndarray) -> np.ndarray:
    """acc = T @ q, exactly: every partial sum is an integer below 2^24 in magnitude
    (|acc| <= 128 * max_features = 2^21), so float32 BLAS is exact and fast."""
    if trits.dtype != np.float32:
        trits = trits.astype(np.float32)
    return (trits @ q.astype(np.float32)).astype(np.int64)


def sigmoid_table(fmt: Formats = F) -> np.ndarray:
    """Q(gate_frac) sigmoid at 2^sig_table_log2 + 1 points over [-sig_range, sig_range]."""
    n = 1 << fmt.sig_table_log2
    xs = (np.arange(n + 1) - n // 2) / (1 << fmt.sig_step_log2)
    return np.round((1.0 / (1.0 + np.exp(-xs))) * (1 << fmt.gate_frac)).astype(np.int64)


_sigmoid_table_cached = functools.lru_cache(maxsize=None)(sigmoid_table)


def sigmoid(y: np.ndarray, fmt: Formats = F) -> np.ndarray:
    """Q(x_frac) -> Q(gate_frac) sigmoid: table lookup with linear interpolation, saturated outside
    the table."""
    table = _sigmoid_table_cached(fmt)
    frac_bits = fmt.x_frac - fmt.sig_step_log2
    n = 1 << fmt.sig_table_log2
    idx = (y >> frac_bits) + n // 2
    frac = y & ((1 << frac_bits) - 1)
    lo = idx < 0
    hi = idx >= n
    i = np.clip(idx, 0, n - 1)
    t0, t1 = table[i], table[i + 1]
    out = t0 + rshift_round((t1 - t0) * frac, frac_bits)
    return np.where(lo, table[0], np.where(hi, table[n], out))


def silu(y: np.ndarray, fmt: Formats = F) -> np.ndarray:
    """Q(x_frac) -> Q(x_frac): y * sigmoid(y)."""
    return mul_shift(y, sigmoid(y, fmt), fmt.gate_frac)


def wire_logits(logits: np.ndarray, fmt: Formats = F) -> np.ndarray:
    """The logits as the engine's external interface carries them (the FEED_TOKEN result's logit,
    READ_LOGITS): Q16 int32 whatever x_frac is, ``clip(rshift_round(logits, x_frac - 16), int32)``.
    The argmax is taken on the full-width logits (first index of the largest)."""
    v = rshift_round(np.asarray(logits, dtype=np.int64), fmt.x_frac - 16)     # protocol.WIRE_LOGIT_FRAC
    return np.clip(v, -(1 << 31), (1 << 31) - 1).astype(np.int64)


# -- weights in their hardware formats ---------------------------------------------

@dataclass
class IntBitLinear:
    """One BitLinear as the hardware holds it."""

    trits: np.ndarray          # int8 [out, in], values in {-1, 0, 1}
    a: np.ndarray              # int64 [in], rms-weights (norm_bits range), exponent e_a
    c: np.ndarray              # int64 [in], quant-weights (norm_bits range), exponent e_c
    k_mant: int                # K = k_mant * 2^k_exp = beta sqrt(in) / 127 * 2^(e_a - e_c + x_frac - sumsq_shift)
    k_exp: int
    e_a: int = 0
    e_c: int = 0
    # the inner RMSNorm eps in S's units: eps_mant * 2^eps_exp ~= rms_norm_eps * C (eps_term; norm_eps only)
    eps_mant: int = 0
    eps_exp: int = 0
    eps_kind: str = "input"    # one of EPS_KINDS: how the eps term is formed (EPS_KIND_OF by matrix name)

    @functools.cached_property
    def trits_f32(self) -> np.ndarray:
        return self.trits.astype(np.float32)


@dataclass
class IntLayer:
    i_proj: IntBitLinear
    f_proj: IntBitLinear
    g_proj: IntBitLinear
    o_proj: IntBitLinear
    gate_proj: IntBitLinear
    down_proj: IntBitLinear
    lower_bound: np.ndarray    # int64 [d], Q15

    MATRICES = LAYER_MATRICES


@dataclass
class IntegerWeights:
    cfg: ModelConfig
    emb_q: np.ndarray          # [V, d] signed emb_bits mantissas (int8, or int32 when emb_bits > 8)
    emb_scale: np.ndarray      # int64 [V], unsigned Q(emb_scale_frac): one mantissa step
    layers: list[IntLayer]
    lm_head: IntBitLinear
    formats: Formats = field(default_factory=lambda: F)


# -- the datapath, function by function ----------------------------------------------

def embed_row(q: np.ndarray, scale: int, fmt: Formats = F) -> np.ndarray:
    """One embedding row in Q(x_frac): ``rshift_round(q * scale, emb_scale_frac - x_frac)``."""
    return rshift_round(np.asarray(q).astype(np.int64) * int(scale), fmt.emb_scale_frac - fmt.x_frac)


def embed(w: IntegerWeights, token: int) -> np.ndarray:
    return embed_row(w.emb_q[token], int(w.emb_scale[token]), w.formats)


def recurrence(yi: np.ndarray, yf: np.ndarray, yg: np.ndarray, h: np.ndarray, lower_bound: np.ndarray,
               fmt: Formats = F):
    """The token mixer between its BitLinears: returns (forget gate f after the lower bound, new h,
    o_proj's input p = yg * silu(h))."""
    one = 1 << fmt.gate_frac
    f = sigmoid(yf, fmt)
    f = lower_bound + mul_shift(one - lower_bound, f, fmt.gate_frac)
    c = mul_shift(silu(yi, fmt), one - f, fmt.gate_frac)
    h = saturate(mul_shift(f, h, fmt.gate_frac) + c, fmt)
    p = saturate(mul_shift(yg, silu(h, fmt), fmt.x_frac), fmt)
    return f, h, p


def glu_mix(gu: np.ndarray, cfg: ModelConfig, fmt: Formats = F) -> np.ndarray:
    """The channel mixer between its BitLinears: v = silu(gate) * up from gate_proj's output."""
    return saturate(mul_shift(silu(gu[:cfg.I], fmt), gu[cfg.I:], fmt.x_frac), fmt)


def mlgru(x: np.ndarray, h: np.ndarray, layer: IntLayer, fmt: Formats = F, trace=None):
    """Token mixer: returns (o_proj output, new h)."""
    yi = bitlinear(x, layer.i_proj, fmt)
    yf = bitlinear(x, layer.f_proj, fmt)
    yg = bitlinear(x, layer.g_proj, fmt)
    f, h, p = recurrence(yi, yf, yg, h, layer.lower_bound, fmt)
    o = bitlinear(p, layer.o_proj, fmt, yg=yg)
    if trace is not None:
        trace.update(i_proj=yi, f_proj=yf, g_proj=yg, forget=f, h=h, o_in=p, o_proj=o)
    return o, h


def glu(x: np.ndarray, layer: IntLayer, cfg: ModelConfig, fmt: Formats = F, trace=None):
    """Channel mixer: returns down_proj output."""
    gu = bitlinear(x, layer.gate_proj, fmt)
    v = glu_mix(gu, cfg, fmt)
    out = bitlinear(v, layer.down_proj, fmt)
    if trace is not None:
        trace.update(gate_proj=gu, gate=gu[:cfg.I], down_in=v, down_proj=out)
    return out


def block(x: np.ndarray, h: np.ndarray, layer: IntLayer, cfg: ModelConfig, fmt: Formats = F, trace=None):
    """One layer for one token: returns (x after the layer, new h). ``trace``: a dict that gets the
    layer's vectors (see :meth:`IntegerModel.step`)."""
    o, h = mlgru(x, h, layer, fmt, trace)
    x = saturate(x + o, fmt)
    if trace is not None:
        trace["x_attn"] = x.copy()
    x = saturate(x + glu(x, layer, cfg, fmt, trace), fmt)
    if trace is not None:
        trace["x"] = x.copy()
    return x, h


def block_positions(xs: list[np.ndarray], layer: IntLayer, cfg: ModelConfig, fmt: Formats = F) -> list[np.ndarray]:
    """One layer for a run of tokens from the zero state h: ``xs`` are the layer's inputs at every
    position; returns its outputs, equal to :func:`block` token by token, with each BitLinear's
    matrix product taken once for all positions (:func:`bitlinear_rows`; only the recurrence runs
    position by position). For layer-major runs of long models."""
    yi = bitlinear_rows(xs, layer.i_proj, fmt)
    yf = bitlinear_rows(xs, layer.f_proj, fmt)
    yg = bitlinear_rows(xs, layer.g_proj, fmt)
    h = np.zeros(cfg.d, dtype=np.int64)
    ps = []
    for t in range(len(xs)):
        _, h, p = recurrence(yi[t], yf[t], yg[t], h, layer.lower_bound, fmt)
        ps.append(p)
    xa = [saturate(x + o, fmt) for x, o in zip(xs, bitlinear_rows(ps, layer.o_proj, fmt, yg))]
    vs = [glu_mix(gu, cfg, fmt) for gu in bitlinear_rows(xa, layer.gate_proj, fmt)]
    return [saturate(x + d, fmt) for x, d in zip(xa, bitlinear_rows(vs, layer.down_proj, fmt))]


class IntegerModel:
    """Runs the integer datapath one token at a time, keeping the per-layer state h."""

    def __init__(self, weights: IntegerWeights):
        self.w = weights
        self.cfg = weights.cfg
        self.fmt = weights.formats
        self.reset()

    def reset(self):
        self.h = [np.zeros(self.cfg.d, dtype=np.int64) for _ in range(self.cfg.L)]

    def step(self, token: int, trace: list | None = None) -> np.ndarray:
        """Feed one token; returns the full-width Q(x_frac) logits (int64 [V]; :func:`wire_logits`
        gives what the engine's interface carries).

        ``trace``: a list that gets one dict per layer: the BitLinear outputs (``i_proj`` ...
        ``down_proj``), ``forget`` (f after the lower bound, Q(gate_frac)), ``h``, ``o_in`` (p),
        ``x_attn`` (x after the token mixer), ``gate`` (the first I rows of gate_proj),
        ``down_in`` (v) and ``x``, plus the BitLinear internals the functions record."""
        fmt, cfg = self.fmt, self.cfg
        x = embed(self.w, token)
        for l, layer in enumerate(self.w.layers):
            t = {} if trace is not None else None
            x, self.h[l] = block(x, self.h[l], layer, cfg, fmt, t)
            if trace is not None:
                trace.append(t)
        return bitlinear(x, self.w.lm_head, fmt)

    @staticmethod
    def argmax(logits: np.ndarray) -> int:
        """The hardware's argmax: the first index of the largest value."""
        return int(np.argmax(logits))

    def logits_to_float(self, logits: np.ndarray) -> np.ndarray:
        return logits.astype(np.float64) / (1 << self.fmt.x_frac)


def parse_image(blob: bytes, cfg: ModelConfig, packing: str, fmt: Formats = FORMATS,
                exponents: dict[str, tuple[int, int]] | None = None) -> IntegerWeights:
    """IntegerWeights from raw image bytes, using only geometry, packing and the number formats
    (``fmt``: element sizes, the ``k`` section's words), as an engine reads them.

    The export-time exponents e_a/e_c are manifest metadata already folded into k; without
    ``exponents`` they come back as 0 (the integer datapath does not read them). Each
    BitLinear's eps kind follows from its name (:data:`EPS_KIND_OF`).
    """
    layout = {s.name: s for s in image_layout(cfg, packing, fmt)}
    total = image_size(cfg, packing, fmt)
    if len(blob) != total:
        raise UserError(f"image has {len(blob)} bytes; geometry, packing {packing} and these number formats "
                        f"imply {total}")
    view = memoryview(blob)
    exponents = exponents or {}

    def raw(name: str):
        s = layout[name]
        return view[s.offset:s.offset + s.size]

    def vector(name: str) -> np.ndarray:
        return np.frombuffer(raw(name), dtype=KIND_DTYPES[layout[name].kind]).astype(np.int64)

    def bitlinear(name: str) -> IntBitLinear:
        out_f, in_f = layout[f"{name}.trits"].shape
        trits = unpack_trits(bytes(raw(f"{name}.trits")), out_f * in_f, packing).reshape(out_f, in_f)
        words = [int(v) for v in np.frombuffer(raw(f"{name}.k"), dtype="<i4")]
        k_mant, k_exp = words[:2]
        eps_mant, eps_exp = words[2:4] if fmt.norm_eps else (0, 0)
        e_a, e_c = exponents.get(name, (0, 0))
        return IntBitLinear(trits=trits, a=vector(f"{name}.a"), c=vector(f"{name}.c"),
                            k_mant=k_mant, k_exp=k_exp, e_a=e_a, e_c=e_c, eps_mant=eps_mant, eps_exp=eps_exp,
                            eps_kind=EPS_KIND_OF[name.rsplit(".", 1)[-1]])

    layers = [IntLayer(**{m: bitlinear(f"layers.{layer}.{m}") for m in IntLayer.MATRICES},
                       lower_bound=vector(f"layers.{layer}.lower_bound"))
              for layer in range(cfg.L)]
    q = layout["embedding.q"]
    emb_q = np.frombuffer(raw("embedding.q"), dtype=KIND_DTYPES[q.kind]).reshape(cfg.V, cfg.d)
    emb_q = emb_q.astype(np.int8 if q.kind == "int8" else np.int32)
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=vector("embedding.scale"),
                          layers=layers, lm_head=bitlinear("lm_head"), formats=fmt)
