"""The integer model: primitives against exact definitions, widths at the worst case, and
agreement with the float reference."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import random_model
from mmfree_fpga.config import FORMAT_SETS, FORMATS, ModelConfig
from mmfree_fpga.reference import integer as im
from mmfree_fpga.reference.agreement import agreement, held_out_ids
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
from mmfree_fpga.reference.export import integer_weights
from mmfree_fpga.reference.model import HGRNBitForCausalLM, randomize, weight_ternary
from mmfree_fpga.reference.train import int8_embeddings

F = FORMATS


def test_quantise_matches_exact_rounding():
    g = np.random.default_rng(0)
    for bits in (8, 16, 20, 30):
        z = g.integers(-(1 << bits), 1 << bits, size=4000)
        m = int(np.abs(z).max())
        q = im.quantise(z, m)
        exact = np.sign(z) * np.floor(np.abs(z) * 127 / m + 0.5)
        assert np.abs(q - exact).max() <= 1  # the 16-bit reciprocal moves rare ties by one
        assert (q != exact).mean() < 0.01
        assert np.abs(q).max() == 127 and q[np.argmax(np.abs(z))] == np.sign(z[np.argmax(np.abs(z))]) * 127


def test_normalise_and_scale_mantissa():
    v = np.array([3, -5, 1])
    n = im.normalise(v)
    assert np.abs(n).max().item().bit_length() == F.norm_bits - 1 and (n == v << 12).all()
    big = np.array([1 << 30, -(1 << 29)])
    assert (im.normalise(big) == big >> 16).all()
    for num, r in [(12345678, 999), (1, 1 << 20), (1 << 46, 3)]:
        qt, t = im.scale_mantissa(num, r)
        assert 1 << (F.scale_bits - 2) <= qt < 1 << F.scale_bits
        assert qt == math.floor(num * 2.0 ** t / r)


def test_sigmoid_and_silu_error():
    y = np.arange(-20 << 16, 20 << 16, 997, dtype=np.int64)
    xs = y / 65536.0
    sig = 1 / (1 + np.exp(-xs))
    assert np.abs(im.sigmoid(y) / 2 ** 15 - sig).max() < 2e-4
    assert np.abs(im.silu(y) / 2 ** 16 - xs * sig).max() < 5e-3
    assert im.sigmoid(np.array([-(1 << 40), 1 << 40])).tolist() == [0, 1 << 15]


def test_rshift_round_and_saturate():
    assert im.rshift_round(np.array([5, -5, 6, -6, 7]), 1).tolist() == [3, -2, 3, -3, 4]
    assert im.saturate(np.array([1 << 40, -(1 << 40)])).tolist() == [F.x_max, F.x_min]


def test_worst_case_widths_do_not_overflow():
    """All |q| = 128 and all trits equal at the largest vector: acc fits acc_bits, and the
    float32 matvec is still exact; every intermediate of the BitLinear fits its width."""
    n = F.max_features
    for trit, qv in [(1, -128), (-1, -128), (1, 127)]:
        acc = im.matvec(np.full((2, n), trit, dtype=np.int8), np.full(n, qv))
        assert acc[0] == trit * qv * n
        assert abs(int(acc[0])) < 1 << (F.acc_bits - 1)
    assert 128 * n < 1 << 24  # float32 holds every partial sum exactly
    v16_max = 1 << (F.norm_bits - 1)
    z_max = v16_max * v16_max                      # |v16 * c| with |c| <= 2^15
    assert z_max.bit_length() <= 31
    p_max = z_max >> F.sumsq_shift
    s2_max = n * p_max * p_max
    assert s2_max < 1 << 63
    qt_max = (1 << F.scale_bits) - 1
    assert 128 * n * qt_max < 1 << 63              # acc * Qt before the shift


def test_bitlinear_against_float_formula():
    """One BitLinear: integer result vs the float formula acc * beta * max|v c| / (127 rms(v a))."""
    g = np.random.default_rng(3)
    d, out = 256, 64
    w = torch.randn(out, d) * 0.05
    a, c = g.uniform(0.5, 1.5, d), g.uniform(0.5, 1.5, d)
    from mmfree_fpga.reference.export import _bitlinear
    bl = _bitlinear(w, a, a * c, F)
    v = g.normal(0, 3, d)
    y = im.bitlinear(np.round(v * 65536).astype(np.int64), bl) / 65536
    from mmfree_fpga.reference.model import activation_quant, weight_ternary
    t, beta = weight_ternary(w.double())
    u = torch.tensor(v * a) / torch.tensor(v * a).pow(2).mean().sqrt() * torch.tensor(c)
    q, s = activation_quant(u)
    want = ((t @ q) * beta / s).numpy()
    assert np.abs(y - want).max() < 2e-3 * np.abs(want).max()


@pytest.mark.parametrize("d,L,I", [(64, 1, 256), (128, 2, 256), (256, 3, 512), (512, 4, 768)])
def test_random_models_agree(d, L, I):
    cfg = ModelConfig(vocab_size=256, hidden_size=d, num_hidden_layers=L, intermediate_size=I)
    model = random_model(cfg, seed=d)
    ids = np.random.default_rng(d).integers(0, 256, 48).tolist()
    r = agreement(model, integer_weights(cfg, model.state_dict()), ids)
    assert r["mean_logit_cosine"] >= 0.99, r


def test_demo_model_agrees_on_held_out_text():
    """Integer vs float on 2,048 held-out positions of the demo model: the issue's targets.

    Measured on the four held-out windows of BENCHMARKS.md: top-1 0.9917, 0.9907, 0.9922, 0.9927,
    mean logit cosine 0.99999. Margins are thin: this small model's own float32 forward agrees
    with float64 on only about 0.995 (one flipped int8 activation moves an accumulator by a
    whole step and the recurrent state carries it on), so every rounding before a quantiser
    counts; see test_demo_model_agrees_with_wider_formats for formats with more margin.
    """
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    r = agreement(load_model(DEMO_CHECKPOINT), integer_weights(cfg, tensors), held_out_ids(2048))
    assert r["top1_agreement"] >= 0.99 and r["mean_logit_cosine"] >= 0.995, r


def test_export_ternarises_like_the_float_reference():
    """Trits from the checkpoint's float32 weights, not a float64 copy: for one lm_head weight of
    the demo model W / beta is -0.5 in float32 (trit 0) but just beyond it in float64 (trit -1)."""
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    w = integer_weights(cfg, tensors)
    model = load_model(DEMO_CHECKPOINT)
    want = weight_ternary(model.lm_head.weight)[0].to(torch.int8).numpy()
    assert (w.lm_head.trits == want).all()
    assert (weight_ternary(model.lm_head.weight.double())[0].to(torch.int8).numpy() != want).any()
    for l, layer in enumerate(w.layers):
        for name in im.IntLayer.MATRICES:
            sub = "mlp" if name in ("gate_proj", "down_proj") else "attn"
            ref = getattr(getattr(model.model.layers[l], sub), name).weight
            assert (getattr(layer, name).trits == weight_ternary(ref)[0].to(torch.int8).numpy()).all()


# Formats with more margin on the demo model than the defaults (see the test below). They need hardware
# changes: 24x24 products in the BitLinear front (v16 c, v16 a), a 24 x 34-bit quantiser product with
# a 34-step reciprocal divider, 24-bit norm vectors in the image, a 2^11-entry sigmoid ROM.
AGREE_FORMATS = dataclasses.replace(F, norm_bits=24, sumsq_shift=31, quant_bits=24, recip_frac=50,
                                    sig_table_log2=11)


@pytest.mark.slow
@pytest.mark.parametrize("offset", [100_000, 300_000, 600_000, 900_000])
def test_demo_model_agrees_with_wider_formats(offset):
    """Top-1 >= 0.99 on each held-out window with AGREE_FORMATS (measured 0.9927-0.9966).

    Ablation (issue #3, BENCHMARKS.md): one flipped int8 activation moves an accumulator by a
    whole step and the recurrent state carries it on, so every rounding before a quantiser
    counts. The quantiser's reciprocal had only ~16 significant bits whatever quant_bits was
    (R = 127 * 2^recip_frac / m16 with recip_frac = quant_bits + 8), the vector entering a
    BitLinear and the quant-weights c had 16 bits, the sigmoid table 2^9 intervals; the demo
    model's embeddings are int8-representable by construction (test below).
    """
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    r = agreement(load_model(DEMO_CHECKPOINT), integer_weights(cfg, tensors, AGREE_FORMATS),
                  held_out_ids(2048, offset))
    assert r["top1_agreement"] >= 0.99 and r["mean_logit_cosine"] >= 0.995, r


def test_demo_embeddings_are_exact_in_the_integer_model():
    """The demo model's embedding rows are int8 times a row scale (train.int8_embeddings), so the
    exported int8 table reproduces the float embedding exactly in Q(x_frac)."""
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    emb = tensors["model.embeddings.weight"]
    assert torch.equal(int8_embeddings(emb, F.x_frac), emb)
    w = integer_weights(cfg, tensors)
    want = emb.double().numpy() * (1 << F.x_frac)
    assert (np.stack([im.embed(w, v) for v in range(cfg.V)]) == want).all()


def test_quantise_is_exact_with_a_wide_reciprocal():
    """With recip_frac >= 2 quant_bits + 2, z of at most quant_bits bits round exactly (ties aside);
    the default reciprocal (recip_frac = quant_bits + 8) does not."""
    g = np.random.default_rng(1)
    for bits, qb in ((16, 16), (24, 24)):
        z = g.integers(-(1 << bits), 1 << bits, size=20000)
        m = int(np.abs(z).max())
        exact = np.sign(z) * np.floor(np.abs(z) * 127 / m + 0.5)
        tie = (2 * 127 * np.abs(z)) % m == 0
        wide = im.quantise(z, m, dataclasses.replace(F, quant_bits=qb, recip_frac=2 * qb + 2))
        narrow = im.quantise(z, m, dataclasses.replace(F, quant_bits=qb, recip_frac=qb + 8))
        assert (wide[~tie] == exact[~tie]).all()
        assert (narrow[~tie] != exact[~tie]).sum() > 5


# -- the wide format set (issue 21) ------------------------------------------------------

WIDE = FORMAT_SETS["wide"]


def test_exact_quantiser_against_fractions():
    """quant_exact: q = round half up of 127 |z| / m (sign restored), checked with Fractions, for
    z up to 60 bits (past int64's 254 |z| + m) and with ties forced."""
    g = np.random.default_rng(7)
    for bits in (3, 16, 24, 47, 60):
        z = g.integers(-(1 << bits), 1 << bits, size=3000, dtype=np.int64)
        m = int(np.abs(z).max())
        z[:20] = [((2 * k + 1) * m) // 254 if ((2 * k + 1) * m) % 254 == 0 else z[k] for k in range(20)]
        q = im.quantise(z, m, WIDE)
        want = [int(np.sign(v)) * math.floor(Fraction(127 * abs(int(v)), m) + Fraction(1, 2)) for v in z]
        assert q.tolist() == want
        assert int(np.abs(q).max()) == 127
    # an exact tie rounds away from zero: 127 * 3 / 6 = 63.5 -> 64
    assert im.quantise(np.array([3, -3, 6]), 6, WIDE).tolist() == [64, -64, 127]


def test_mul_shift_is_exact_past_int64():
    g = np.random.default_rng(2)
    a = g.integers(-(1 << 39), 1 << 39, size=500)
    b = g.integers(-(1 << 39), 1 << 39, size=500)
    got = im.mul_shift(a, b, 24)
    assert [int(v) for v in got] == [(int(x) * int(y) + (1 << 23)) >> 24 for x, y in zip(a, b)]
    small = g.integers(-(1 << 20), 1 << 20, size=50)
    assert im.mul_shift(small, small, 5).dtype == np.int64


def test_wire_logits():
    """Q(x_frac) -> Q16 int32, rounding half up, saturating; the identity at x_frac 16."""
    s = WIDE.x_frac - 16
    assert s > 0
    logits = np.array([3 << WIDE.x_frac, -(5 << (WIDE.x_frac - 1)), (1 << s) - 1, 1 << (s - 1), -(1 << (s - 1)),
                       WIDE.x_max, WIDE.x_min])
    assert im.wire_logits(logits, WIDE).tolist() == [3 << 16, -(5 << 15), 1, 1, 0, (1 << 31) - 1, -(1 << 31)]
    # the narrow set (x_frac 16, x_bits 32): the identity on values of its range
    assert im.wire_logits(logits[2:5], F).tolist() == logits[2:5].tolist()


def _eps_case(kind, scale, seed, fmt=WIDE, n=384, eps=1e-6):
    """(E of the integer model, eps * n * ms_outer in S's units computed in float)."""
    from mmfree_fpga.reference.export import _bitlinear
    g = np.random.default_rng(seed)
    a = g.uniform(0.5, 1.5, n) if kind != "const" else np.ones(n)
    bl = _bitlinear(torch.randn(32, n) * 0.02, a, a * g.uniform(0.5, 1.5, n), fmt, kind, eps)
    v = np.round(g.normal(0, scale, n) * 2.0 ** fmt.x_frac).astype(np.int64)
    sh = im.norm_shift(v, fmt)
    units = 2.0 ** (2 * (fmt.x_frac - sh + bl.e_a - fmt.sumsq_shift))  # S per (float value)^2
    yg = None
    if kind == "input":
        outer = float(np.sum((v / 2.0 ** fmt.x_frac) ** 2))
    elif kind == "gsum":
        yg = np.round(g.normal(0, 1, n) * 2.0 ** fmt.x_frac).astype(np.int64)
        outer = float(np.sum((yg / 2.0 ** fmt.x_frac) ** 2))
    else:
        outer = float(n)
    return im.eps_term(bl, im.normalise(v, fmt), sh, fmt, yg), eps * outer * units


@pytest.mark.parametrize("kind", ["input", "gsum", "const"])
def test_eps_term_against_float(kind):
    """E = eps * n * ms_outer in S's units (ms_outer: the mean square of the outer norm's input; for
    down_proj, no outer norm, 1), within 1e-3 (or one unit of S, where E is below 1000 units and
    so far below S), for inputs from 2^-10 to 2^10."""
    for seed, scale in enumerate((2.0 ** -10, 0.01, 1.0, 37.0, 2.0 ** 10)):
        e, want = _eps_case(kind, scale, seed)
        assert e > 0 and abs(e - want) < max(1e-3 * want, 1), (kind, scale, e, want)
    assert _eps_case(kind, 1.0, 0, fmt=F)[0] == 0   # the narrow set has no eps term


def test_bitlinear_eps_matches_the_float_formula():
    """With norm_eps a BitLinear whose input is tiny (mean square ~ eps) follows the float formula
    with the inner eps; without it, it is off by the factor sqrt(1 + eps / ms)."""
    from mmfree_fpga.reference.export import _bitlinear
    from mmfree_fpga.reference.model import activation_quant
    g = np.random.default_rng(4)
    n, eps = 512, 1e-6
    w = torch.randn(64, n) * 0.05
    c = g.uniform(0.5, 1.5, n)
    v = g.normal(0, 1e-3, n)             # down_proj-like input: mean square 1e-6 = eps
    t, beta = weight_ternary(w.double())
    q, s = activation_quant(torch.tensor(v * c) / torch.tensor(v).pow(2).mean().add(eps).sqrt())
    want = ((t @ q) * beta / s).numpy()
    vi = np.round(v * 2.0 ** WIDE.x_frac).astype(np.int64)
    y = im.bitlinear(vi, _bitlinear(w, np.ones(n), c, WIDE, "const", eps), WIDE) / 2.0 ** WIDE.x_frac
    assert np.abs(y - want).max() < 1e-4 * np.abs(want).max()
    no_eps = dataclasses.replace(WIDE, norm_eps=False)
    y0 = im.bitlinear(vi, _bitlinear(w, np.ones(n), c, no_eps, "const", eps), no_eps) / 2.0 ** WIDE.x_frac
    assert np.abs(y0 - want).max() > 0.1 * np.abs(want).max()


def test_wide_formats_closer_to_float64():
    """A small random model (std 0.02 weights and embeddings): the wide integer model's logits are
    closer to float64 than the narrow one's (mean and min cosine over 16 positions)."""
    cfg = ModelConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, intermediate_size=384)
    model = randomize(HGRNBitForCausalLM(cfg), seed=11, embedding_std=0.02)
    ids = np.random.default_rng(11).integers(0, 256, 16).tolist()
    with torch.no_grad():
        f64 = model.double()(torch.tensor([ids]))[0][0].numpy()
    tensors = model.float().state_dict()
    cos = {}
    for name, fmt in FORMAT_SETS.items():
        m = im.IntegerModel(integer_weights(cfg, tensors, fmt))
        li = np.stack([m.logits_to_float(m.step(t)) for t in ids])
        c = (li * f64).sum(1) / (np.linalg.norm(li, axis=1) * np.linalg.norm(f64, axis=1))
        cos[name] = (c.mean(), c.min())
    assert cos["wide"][0] > cos["narrow"][0] and cos["wide"][1] > cos["narrow"][1], cos
    assert 1 - cos["wide"][0] < 0.25 * (1 - cos["narrow"][0]), cos


@pytest.mark.parametrize("formats", ["narrow", "wide"])
def test_block_positions_equals_token_by_token(formats):
    """The layer-major path (one matrix product per BitLinear for all positions) equals block()."""
    fmt = FORMAT_SETS[formats]
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=192)
    w = integer_weights(cfg, random_model(cfg, seed=4).state_dict(), fmt)
    xs = [im.embed(w, t) for t in (5, 17, 200, 5, 0)]
    xs[3] = np.zeros(cfg.d, dtype=np.int64)            # a zero input: the BitLinears' zero path
    for layer in w.layers:
        h = np.zeros(cfg.d, dtype=np.int64)
        want = []
        for x in xs:
            y, h = im.block(x, h, layer, cfg, fmt)
            want.append(y)
        got = im.block_positions(xs, layer, cfg, fmt)
        assert all((a == b).all() for a, b in zip(got, want))
        xs = got
