"""The exact integer model of the hardware: what the engine computes, bit for bit.

Every function here has a counterpart in ``hw/`` and operates on integers only (numpy int64
vectors, Python ints for per-token scalars). Formats are those of ``FORMATS`` (see
``mmfree_fpga/config.py``); the derivation of the scale arithmetic is in ``docs/integer.md``.

The one-BitLinear recipe, for an input vector v (Q16), rms-weights a and quant-weights c
(int16 with export-time exponents), trits T and the export-time constant K = kM * 2^kE:

1. ``v16 = normalise(v)``: one shift so max|v16| has ``norm_bits - 1`` bits;
2. ``z = v16 * c``; ``m = max|z|``; ``q = quantise(z, m)`` (int8, absmax 127);
3. ``acc = T @ q`` (additions only);
4. ``r = isqrt(sum(((v16 * a) >> sumsq_shift) ** 2))``;
5. ``(Qt, t) = scale(kM * m, r)``, a ``scale_bits`` mantissa from one integer division;
6. ``y = sat(round(acc * Qt * 2^(kE - t)))`` in Q16.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.image import LAYER_MATRICES, image_layout, image_size
from mmfree_fpga.packing import unpack_trits

__all__ = [
    "IntBitLinear", "IntLayer", "IntegerWeights", "IntegerModel", "parse_image",
    "normalise", "quantise", "bitlinear", "sigmoid_table", "sigmoid", "silu",
    "rshift_round", "saturate", "isqrt", "scale_mantissa", "embed", "mlgru", "glu",
]

F = FORMATS


# -- scalar and vector primitives ---------------------------------------------------

def rshift_round(v, s: int):
    """Round-half-up right shift by s >= 0 (add half, arithmetic shift); left shift if s < 0."""
    if s > 0:
        return (v + (1 << (s - 1))) >> s
    return v << (-s) if s < 0 else v


def saturate(v, fmt: Formats = F):
    """Clamp to the signed x_bits range (the residual stream, h, BitLinear outputs)."""
    return np.clip(v, fmt.x_min, fmt.x_max)


def isqrt(n: int) -> int:
    """floor(sqrt(n)): the hardware's restoring square root."""
    return math.isqrt(int(n))


def normalise(v: np.ndarray, fmt: Formats = F) -> np.ndarray:
    """Shift the whole vector so its largest magnitude has exactly norm_bits-1 bits."""
    vmax = int(np.abs(v).max(initial=0))
    if vmax == 0:
        return np.zeros_like(v)
    sh = vmax.bit_length() - (fmt.norm_bits - 1)
    return v >> sh if sh >= 0 else v << (-sh)


def quantise(z: np.ndarray, m: int, fmt: Formats = F) -> np.ndarray:
    """int8 absmax quantisation of z with m = max|z| > 0: round(127 z / m), ties away.

    |z| and m are shifted so m has quant_bits bits, then multiplied by R = floor(127 * 2^recip_frac / m16).
    """
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


def bitlinear(v: np.ndarray, layer: "IntBitLinear", fmt: Formats = F, trace: dict | None = None) -> np.ndarray:
    """One BitLinear on a Q16 vector -> Q16 vector (see the module docstring)."""
    v16 = normalise(v, fmt)
    z = v16 * layer.c
    m = int(np.abs(z).max(initial=0))
    p = (v16 * layer.a) >> fmt.sumsq_shift
    r = isqrt(int(np.dot(p, p)))
    if m == 0 or r == 0:
        return np.zeros(layer.trits.shape[0], dtype=np.int64)
    q = quantise(z, m, fmt)
    acc = matvec(layer.trits_f32, q)
    qt, t = scale_mantissa(layer.k_mant * m, r, fmt)
    y = saturate(rshift_round(acc * qt, t - layer.k_exp), fmt)
    if trace is not None:
        trace.update(q=q, acc=acc, m=m, r=r, qt=qt, t=t)
    return y


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
    """Q16 -> Q15 sigmoid: table lookup with linear interpolation, saturated outside the table."""
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
    """Q16 -> Q16: y * sigmoid(y)."""
    return rshift_round(y * sigmoid(y, fmt), fmt.gate_frac)


# -- weights in their hardware formats ---------------------------------------------

@dataclass
class IntBitLinear:
    """One BitLinear as the hardware holds it."""

    trits: np.ndarray          # int8 [out, in], values in {-1, 0, 1}
    a: np.ndarray              # int64 [in], rms-weights (int16 range), exponent e_a
    c: np.ndarray              # int64 [in], quant-weights (int16 range), exponent e_c
    k_mant: int                # K = k_mant * 2^k_exp = beta sqrt(in) / 127 * 2^(e_a - e_c + x_frac - sumsq_shift)
    k_exp: int
    e_a: int = 0
    e_c: int = 0

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
    emb_q: np.ndarray          # int8 [V, d]
    emb_scale: np.ndarray      # int64 [V], unsigned Q(emb_scale_frac): one int8 step
    layers: list[IntLayer]
    lm_head: IntBitLinear
    formats: Formats = field(default_factory=lambda: F)


# -- the datapath, function by function ----------------------------------------------

def embed(w: IntegerWeights, token: int) -> np.ndarray:
    fmt = w.formats
    row = w.emb_q[token].astype(np.int64)
    return rshift_round(row * int(w.emb_scale[token]), fmt.emb_scale_frac - fmt.x_frac)


def mlgru(x: np.ndarray, h: np.ndarray, layer: IntLayer, fmt: Formats = F, trace=None):
    """Token mixer: returns (o_proj output, new h)."""
    one = 1 << fmt.gate_frac
    yi = bitlinear(x, layer.i_proj, fmt)
    yf = bitlinear(x, layer.f_proj, fmt)
    yg = bitlinear(x, layer.g_proj, fmt)
    f = sigmoid(yf, fmt)
    lb = layer.lower_bound
    f = lb + rshift_round((one - lb) * f, fmt.gate_frac)
    c = rshift_round(silu(yi, fmt) * (one - f), fmt.gate_frac)
    h = saturate(rshift_round(f * h, fmt.gate_frac) + c, fmt)
    p = saturate(rshift_round(yg * silu(h, fmt), fmt.x_frac), fmt)
    o = bitlinear(p, layer.o_proj, fmt)
    if trace is not None:
        trace.update(i_proj=yi, f_proj=yf, g_proj=yg, forget=f, h=h, o_in=p, o_proj=o)
    return o, h


def glu(x: np.ndarray, layer: IntLayer, cfg: ModelConfig, fmt: Formats = F, trace=None):
    """Channel mixer: returns down_proj output."""
    gu = bitlinear(x, layer.gate_proj, fmt)
    gate, up = gu[:cfg.I], gu[cfg.I:]
    v = saturate(rshift_round(silu(gate, fmt) * up, fmt.x_frac), fmt)
    out = bitlinear(v, layer.down_proj, fmt)
    if trace is not None:
        trace.update(gate_proj=gu, gate=gu[:cfg.I], down_in=v, down_proj=out)
    return out


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
        """Feed one token; returns the Q16 logits (int64 [V]).

        ``trace``: a list that gets one dict per layer: the BitLinear outputs (``i_proj`` ...
        ``down_proj``), ``forget`` (f after the lower bound, Q15), ``h``, ``o_in`` (p),
        ``x_attn`` (x after the token mixer), ``gate`` (the first I rows of gate_proj),
        ``down_in`` (v) and ``x``, plus the BitLinear internals the functions record."""
        fmt, cfg = self.fmt, self.cfg
        x = embed(self.w, token)
        for l, layer in enumerate(self.w.layers):
            t = {} if trace is not None else None
            o, self.h[l] = mlgru(x, self.h[l], layer, fmt, t)
            x = saturate(x + o, fmt)
            if trace is not None:
                t["x_attn"] = x.copy()
            x = saturate(x + glu(x, layer, cfg, fmt, t), fmt)
            if trace is not None:
                t["x"] = x.copy()
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
    """IntegerWeights from raw image bytes, using only geometry and packing, as an engine reads them.

    The export-time exponents e_a/e_c are manifest metadata already folded into k; without
    ``exponents`` they come back as 0 (the integer datapath does not read them).
    """
    layout = {s.name: s for s in image_layout(cfg, packing)}
    total = image_size(cfg, packing)
    if len(blob) != total:
        raise UserError(f"image has {len(blob)} bytes; geometry and packing {packing} imply {total}")
    view = memoryview(blob)
    exponents = exponents or {}

    def raw(name: str):
        s = layout[name]
        return view[s.offset:s.offset + s.size]

    def vector(name: str, dtype: str) -> np.ndarray:
        return np.frombuffer(raw(name), dtype=dtype).astype(np.int64)

    def bitlinear(name: str) -> IntBitLinear:
        out_f, in_f = layout[f"{name}.trits"].shape
        trits = unpack_trits(bytes(raw(f"{name}.trits")), out_f * in_f, packing).reshape(out_f, in_f)
        k_mant, k_exp = (int(v) for v in np.frombuffer(raw(f"{name}.k"), dtype="<i4"))
        e_a, e_c = exponents.get(name, (0, 0))
        return IntBitLinear(trits=trits, a=vector(f"{name}.a", "<i2"), c=vector(f"{name}.c", "<i2"),
                            k_mant=k_mant, k_exp=k_exp, e_a=e_a, e_c=e_c)

    layers = [IntLayer(**{m: bitlinear(f"layers.{layer}.{m}") for m in IntLayer.MATRICES},
                       lower_bound=vector(f"layers.{layer}.lower_bound", "<u2"))
              for layer in range(cfg.L)]
    emb_q = np.frombuffer(raw("embedding.q"), dtype=np.int8).reshape(cfg.V, cfg.d).copy()
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=vector("embedding.scale", "<u4"),
                          layers=layers, lm_head=bitlinear("lm_head"), formats=fmt)
