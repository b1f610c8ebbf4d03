"""The engine built for a format set (``mmfree_fpga.config.FORMAT_SETS``), bit for bit against
the integer model of the same set: the vector cores in the "wide" formats (Amaranth's simulator,
driven through their streams with idle cycles and back-pressure), the new pieces on their own
(the exact quantiser with its ties and the largest element; the eps term of each kind), and the
whole engine on small models in the "medium" and "wide" sets (Amaranth, Verilator and Icarus).
The narrow set's tests are ``test_hw_vector.py`` and ``test_engine.py``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmfree_fpga.config import FORMAT_SETS, ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.hw.argmax import Argmax
from mmfree_fpga.hw.bitlinear_front import BitLinearFront, FrontOp
from mmfree_fpga.hw.elementwise import ElementwiseOp, ElementwiseUnit
from mmfree_fpga.hw.embed_scale import EmbedScale
from mmfree_fpga.hw.engine import JOBS, EngineCore
from mmfree_fpga.hw.output_scale import OutputScale
from mmfree_fpga.hw.scalar_unit import EpsKind, ScalarUnit
from mmfree_fpga.hw.vector_common import vector_widths
from mmfree_fpga.reference import integer as ref
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, save_checkpoint
from mmfree_fpga.sim.engine_sim import (EngineBuild, default_build, load_image, reference_tokens, run_amaranth,
                                        run_engine)
from mmfree_fpga.sim.runner import simulator_missing
from mmfree_fpga.sim.vector_tb import ref_elementwise

from conftest import random_model
from stream_bench import one_item_latency, receive, send, simulate

WIDE = FORMAT_SETS["wide"]
W = vector_widths(WIDE)
TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
LANES = 16
READ_BACK = (0, 1, 37)


def random_bits(rng, bits):
    b = rng.randrange(bits + 1)
    return rng.randrange(1 << b) if b else 0


def x_values(rng, n):
    """x values of the wide set: the range's ends, the sigmoid table's ends, small, random."""
    k = W.sig_in_log2
    vals = [W.x_min, W.x_max, 0, 1, -1, 1 << k, (1 << k) - 1, -(1 << k), -(1 << k) - 1]
    while len(vals) < n:
        kind = rng.randrange(3)
        if kind == 0:
            vals.append(rng.randrange(W.x_min, W.x_max + 1))
        elif kind == 1:
            vals.append(rng.randrange(-(1 << k) - 9, (1 << k) + 9))
        else:
            vals.append(rng.choice([1, -1]) * rng.randrange(1 << rng.randrange(W.x_bits)))
    return [min(W.x_max, max(W.x_min, v)) for v in vals]


# -- the vector cores in the wide formats ----------------------------------------------------

def test_wide_elementwise_unit():
    """Every op, operands of the wide set's x width (50 bits), Q30 gates."""
    rng = random.Random(21)
    dut = ElementwiseUnit(WIDE)
    items = []
    for op in ElementwiseOp:
        ys, as_ = x_values(rng, 90), x_values(rng, 90)
        rng.shuffle(as_)
        gs = [rng.choice([0, W.gate_one, 1, W.gate_one - 1, 1 << (WIDE.gate_frac - 1), rng.randrange(W.gate_one + 1)])
              for _ in ys]
        items += [{"op": op, "y": y, "a": a, "g": g, "last": rng.random() < 0.1} for y, a, g in zip(ys, as_, gs)]
    # rounding ties of negative products (as in test_hw_vector)
    for y in x_values(rng, 30):
        odd = rng.randrange(-99, 100) | 1
        items.append({"op": ElementwiseOp.RECUR, "y": y, "a": odd, "g": 1 << (WIDE.gate_frac - 1), "last": 0})
        items.append({"op": ElementwiseOp.SILU_MUL, "y": y, "a": odd << (WIDE.x_frac - 1), "g": 0, "last": 1})
    rng.shuffle(items)
    got = []

    async def drive(ctx):
        await send(ctx, dut.i, items, rng)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, convert=lambda v: (int(v.value), int(v.last))))

    simulate(dut, drive, collect, max_cycles=10 * len(items))
    want = [(ref_elementwise(it["op"], it["y"], it["a"], it["g"], WIDE), int(it["last"])) for it in items]
    bad = [(it, g, w) for it, g, w in zip(items, got, want) if g != w]
    assert len(got) == len(items) and not bad, f"{len(bad)} mismatches: {bad[:3]}"


def test_wide_output_scale_embed_scale_argmax():
    """OutputScale (23-bit accumulators times 25-bit Qt), EmbedScale (24-bit mantissas times a
    Q48 scale) and Argmax (40-bit values)."""
    rng = random.Random(22)
    osc = OutputScale(WIDE)
    cases = []
    for _ in range(150):
        acc = rng.choice([-W.acc_mag_max, W.acc_mag_max - 1, 0, rng.randrange(-W.acc_mag_max, W.acc_mag_max)])
        qt = rng.choice([0, 1, (1 << W.scale_bits) - 1, rng.randrange(1 << W.scale_bits)])
        shift = rng.choice([W.shift_min, W.shift_max, 0, 1, -1, rng.randrange(-45, 60)])
        cases.append((acc, qt, shift))
    got = []

    async def drive(ctx):
        for acc, qt, shift in cases:
            ctx.set(osc.i.payload, {"acc": acc, "last": 0})
            ctx.set(osc.scale, {"qt": qt, "shift": shift})
            ctx.set(osc.i.valid, 1)
            await ctx.tick().until(osc.i.ready)
            ctx.set(osc.i.valid, 0)

    async def collect(ctx):
        got.extend(await receive(ctx, osc.o, len(cases), rng, convert=lambda v: int(v.value)))

    simulate(osc, drive, collect, max_cycles=40 * len(cases))
    assert got == [min(W.x_max, max(W.x_min, ref.rshift_round(a * q, s))) for a, q, s in cases]

    emb = EmbedScale(WIDE)
    qmax, smax = (1 << (WIDE.emb_bits - 1)) - 1, (1 << WIDE.emb_scale_bits) - 1
    rows = [(rng.choice([0, 1, smax, rng.randrange(smax + 1)]),
             [-qmax, qmax, 0, 1, -1] + [rng.randrange(-qmax, qmax + 1) for _ in range(11)]) for _ in range(8)]
    items = [(scale, q, k == len(row) - 1) for scale, row in rows for k, q in enumerate(row)]
    got = []

    async def drive_emb(ctx):
        for scale, q, last in items:
            ctx.set(emb.i.payload, {"q": q, "last": last})
            ctx.set(emb.scale, scale)
            ctx.set(emb.i.valid, 1)
            await ctx.tick().until(emb.i.ready)
            ctx.set(emb.i.valid, 0)

    async def collect_emb(ctx):
        got.extend(await receive(ctx, emb.o, len(items), rng, convert=lambda v: int(v.value)))

    simulate(emb, drive_emb, collect_emb, max_cycles=20 * len(items))
    want = []
    for scale, row in rows:
        w = ref.IntegerWeights(cfg=None, emb_q=np.array([row], dtype=np.int32), emb_scale=np.array([scale]),
                               layers=[], lm_head=None, formats=WIDE)
        want += [int(x) for x in ref.embed(w, 0)]
    assert got == want

    amax = Argmax(100, WIDE)
    vectors = [[W.x_min] * 3, [W.x_max, W.x_max], [W.x_min, W.x_min + 1, -1 << 35, 1 << 35, (1 << 35) - 1]]
    vectors += [[rng.randrange(W.x_min, W.x_max + 1) for _ in range(rng.choice([1, 7, 60]))] for _ in range(6)]
    got = []

    async def drive_amax(ctx):
        for vec in vectors:
            await send(ctx, amax.i, [{"value": v, "last": k == len(vec) - 1} for k, v in enumerate(vec)], rng)

    async def collect_amax(ctx):
        got.extend(await receive(ctx, amax.o, len(vectors), rng, convert=lambda r: (int(r.index), int(r.value))))

    simulate(amax, drive_amax, collect_amax, max_cycles=4000)
    assert got == [(ref.IntegerModel.argmax(np.array(v)), max(v)) for v in vectors]


# -- BitLinearFront: statistics, the eps sum G, the exact quantiser --------------------------

def ref_front(v, a, c):
    """(m, sumsq, G, sh, q) of bitlinear's steps 1, 2, 4 and the input kind's eps sum."""
    v = np.asarray(v, dtype=np.int64)
    v16 = ref.normalise(v, WIDE)
    z = v16 * np.asarray(c, dtype=np.int64)
    m = int(np.abs(z).max(initial=0))
    p = (v16 * np.asarray(a, dtype=np.int64)) >> WIDE.sumsq_shift
    g = np.abs(v16) >> (WIDE.norm_bits - 16)
    q = ref.quantise(z, m, WIDE) if m else np.zeros_like(z)
    return m, sum(int(x) ** 2 for x in p), int(np.dot(g, g)), ref.norm_shift(v, WIDE), [int(x) for x in q]


def run_front(jobs, rng):
    """jobs: (v, [(a, c), ...]): a MAX pass, then STATS + QUANT per (a, c); checks every result."""
    dut = BitLinearFront(WIDE)
    items, n_q, n_stats = [], 0, 0

    def pass_items(v, a, c, op):
        return [{"op": op, "last": int(k == len(v) - 1), "v": int(v[k]), "a": int(a[k]), "c": int(c[k])}
                for k in range(len(v))]
    for v, acs in jobs:
        items += pass_items(v, [0] * len(v), [0] * len(v), FrontOp.MAX)
        for a, c in acs:
            items += pass_items(v, a, c, FrontOp.STATS) + pass_items(v, a, c, FrontOp.QUANT)
            n_q += len(v)
            n_stats += 1
    got_q, got_stats = [], []

    async def drive(ctx):
        await send(ctx, dut.i, items, rng, 0.3)

    async def take_q(ctx):
        got_q.extend(await receive(ctx, dut.q, n_q, rng, 0.3))

    async def take_stats(ctx):
        got_stats.extend(await receive(ctx, dut.stats, n_stats, rng, 0.6,
                                       convert=lambda s: (int(s.m), int(s.sumsq), int(s.g), int(s.sh))))

    simulate(dut, drive, take_q, take_stats, max_cycles=10 * len(items) + 200 * n_stats)
    k = 0
    for j, (v, acs) in enumerate(jobs):
        for a, c in acs:
            m, sumsq, g, sh, q = ref_front(v, a, c)
            stats = got_stats.pop(0)
            # a zero vector's shift is not used (m = 0: the BitLinear's output is zero)
            assert stats == (m, sumsq, g, sh if any(v) else stats[3]), f"stats of job {j}"
            assert got_q[k:k + len(v)] == q, f"q of job {j}"
            k += len(v)


def test_wide_bitlinear_front():
    """Vectors of every magnitude up to x_bits, 24-bit norms at their ends: m, sumsq, the eps
    sum G, normalise's shift and the exactly rounded q."""
    rng = random.Random(23)
    lim = 1 << (W.norm_bits - 1)
    jobs = []
    for bits in [0, 1, 2, 3, 14, 17, 23, 24, 25, 31, 39, 40]:
        n = rng.choice([1, 2, 5, 33])
        v = [min(W.x_max, max(W.x_min, rng.randrange(-(1 << bits) + 1, 1 << bits))) if bits else 0 for _ in range(n)]
        if bits == W.x_bits:
            v[0] = W.x_min
        norms = [[rng.randrange(-lim, lim) for _ in range(n)], [rng.choice([-lim, lim - 1]) for _ in range(n)],
                 [rng.randrange(-4, 5) for _ in range(n)]]
        jobs.append((v, [(rng.choice(norms), rng.choice(norms)) for _ in range(2)]))
    run_front(jobs, rng)


def test_exact_quantiser_ties_and_largest():
    """q = sign(z) floor((254 |z| + m) / 2m): every tie 127 |z| / m = j + 1/2 rounds away from
    zero, the largest |z| gives +-127, and values next to each tie fall on either side (the
    reciprocal's candidate is corrected by one either way)."""
    rng = random.Random(24)
    jobs = []
    # v16 = v << (norm_bits - 17) (max |v| has 16 bits), c = 1: z = v16 = k 2^(norm_bits - 9) and
    # m = 254 2^(norm_bits - 9): 127 z / m = k / 2 for
    # v = k * 2^8, a tie for every odd k
    n = 40
    for sign in (1, -1):
        ks = [254] + [sign * k for k in range(1, 254, 7)] + [-254 * sign]
        v = [k << 8 for k in ks][:n]
        jobs.append((v, [([1] * len(v), [1] * len(v))]))
    # next to the ties: odd multiples of 2^7 plus or minus one
    ks = [254] + [rng.randrange(1, 254) | 1 for _ in range(20)]
    v = [ks[0] << 8] + [(k << 8) + rng.choice([-1, 1]) for k in ks[1:]]
    jobs.append((v, [([1] * len(v), [1] * len(v))]))
    # random z over the whole range, the largest element negative
    for _ in range(4):
        v = [rng.randrange(W.x_min // 4, W.x_max // 4) for _ in range(30)]
        v[rng.randrange(30)] = -(1 << 37)
        c = [rng.randrange(-(1 << 23), 1 << 23) for _ in range(30)]
        jobs.append((v, [(c, c)]))
    run_front(jobs, rng)
    # the ties are what the test says they are
    for v, _ in jobs[:2]:
        z = ref.normalise(np.asarray(v, dtype=np.int64), WIDE)
        m = int(np.abs(z).max())
        q = ref.quantise(z, m, WIDE)
        assert [abs(int(x)) for x in q] == [(abs(k) + 1) // 2 for k in (x >> (WIDE.norm_bits - 9) for x in z.tolist())]


# -- ScalarUnit: the eps term of each kind ---------------------------------------------------

def ref_scale(c):
    g = {EpsKind.INPUT: c["g"], EpsKind.GSUM: c["gsum"], EpsKind.CONST: 1}[c["kind"]]
    e = ref.shift(c["eps_mant"] * g, c["eps_exp"] - (0 if c["kind"] == EpsKind.INPUT else 2 * c["sh"]))
    r = ref.isqrt(min(c["sumsq"] + e, (1 << W.se_bits) - 1))
    if c["m"] == 0 or r == 0 or c["k_mant"] == 0:
        return 0, None
    qt, t = ref.scale_mantissa(c["k_mant"] * c["m"], r, WIDE)
    return qt, min(W.shift_max, max(W.shift_min, t - c["k_exp"]))


def test_scalar_unit_eps_term_per_kind():
    """r = isqrt(sumsq + E): E = shift(eps_mant G, eps_exp) with the statistics' G ("input"),
    shift(eps_mant G, eps_exp - 2 sh) with o_proj's G ("gsum"), shift(eps_mant, eps_exp - 2 sh)
    ("const"); right shifts rounding half up (ties included), left shifts up to E beyond sumsq,
    and a sum past 2^se_bits (taken as 2^se_bits - 1)."""
    rng = random.Random(25)
    dut = ScalarUnit(WIDE)
    base = dict(m=1 << 40, sumsq=1 << 50, k_mant=(1 << 23) + 5, k_exp=-30, eps_mant=(1 << 23) + 1,
                g=3 << 40, gsum=5 << 50, sh=3)
    cases = [dict(base, kind=EpsKind.INPUT, eps_exp=-1, g=3),                # a tie: 3 * mant odd, >> 1
             dict(base, kind=EpsKind.CONST, eps_exp=6, sh=3),              # shift 0
             dict(base, kind=EpsKind.CONST, eps_exp=-40, sh=-22),          # left by 4
             dict(base, kind=EpsKind.GSUM, eps_exp=-21, sh=-22, gsum=5 << 30),  # left by 23: E >> sumsq
             dict(base, kind=EpsKind.GSUM, eps_exp=30, sh=-22),            # past 2^se_bits
             dict(base, kind=EpsKind.INPUT, eps_exp=-200),                 # shifted out
             dict(base, kind=EpsKind.CONST, eps_exp=0, sh=0, eps_mant=0)]  # E = 0
    for _ in range(140):
        cases.append(dict(kind=rng.choice(list(EpsKind)), m=random_bits(rng, W.m_bits),
                          sumsq=random_bits(rng, W.sumsq_bits), k_mant=random_bits(rng, W.const_bits),
                          k_exp=rng.randrange(-80, 20), eps_mant=random_bits(rng, W.const_bits),
                          eps_exp=rng.choice([rng.randrange(-120, 60), rng.randrange(-40, 20)]),
                          g=random_bits(rng, W.eps_g_bits), gsum=random_bits(rng, W.eps_gsum_bits),
                          sh=rng.randrange(W.sh_min, W.sh_max + 1)))
    got = []

    async def drive(ctx):
        for c in cases:
            while rng.random() < 0.3:
                await ctx.tick()
            ctx.set(dut.i.payload, {"m": c["m"], "sumsq": c["sumsq"], "g": c["g"], "sh": c["sh"]})
            for port in ("k_mant", "k_exp", "eps_mant", "eps_exp", "eps_kind", "gsum"):
                ctx.set(getattr(dut, port), c["kind" if port == "eps_kind" else port])
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            ctx.set(dut.eps_mant, 0)            # sampled on acceptance only

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(cases), rng, stall=0.5,
                                 convert=lambda v: (int(v.qt), int(v.shift))))

    simulate(dut, drive, collect, max_cycles=(dut.max_latency + 5) * len(cases) * 2)
    assert len(got) == len(cases)
    for c, (qt, shift) in zip(cases, got):
        want_qt, want_shift = ref_scale(c)
        assert qt == want_qt, c
        if want_qt:
            assert shift == want_shift, c
    # the fixed cases cover what they claim
    e = [ref.shift(c["eps_mant"] * (c["g"] if c["kind"] == EpsKind.INPUT else c["gsum"] if c["kind"] == EpsKind.GSUM
                                    else 1), c["eps_exp"] - (0 if c["kind"] == EpsKind.INPUT else 2 * c["sh"]))
         for c in cases[:7]]
    assert (3 * base["eps_mant"]) & 1 and e[0] == (3 * base["eps_mant"] + 1) >> 1
    assert e[3] > 1 << 60 and base["sumsq"] + e[4] >= 1 << W.se_bits and e[5] == 0 and e[6] == 0


# -- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_checkpoint(random_model(TINY, seed=4), tmp_path_factory.mktemp("tiny") / "ckpt")


def _check(cfg, blob, packing, prompt, steps, run, formats):
    tokens, logits = reference_tokens(cfg, blob, packing, prompt, steps, formats)
    fmt = FORMAT_SETS[formats]
    assert run.tokens == tokens
    assert run.argmax_logits == [int(ref.wire_logits(lg[ref.IntegerModel.argmax(lg)], fmt)) for lg in logits]
    for t, got in run.read_logits.items():
        assert got == {i: int(ref.wire_logits(logits[t][i], fmt)) for i in got}, f"read-back logits of step {t}"


def test_engine_refuses_formats_it_cannot_build():
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    with pytest.raises(DesignError, match="lanes"):
        EngineCore(cfg, lanes=8, formats=WIDE)          # 2-byte beats, 4-byte norm elements
    with pytest.raises(DesignError, match="compact"):
        EngineCore(cfg, lanes=16, formats=WIDE, compact=True)
    with pytest.raises(TypeError):
        EngineCore(cfg, lanes=16, formats="wide")


@pytest.mark.parametrize("formats, load_stream", [("wide", False), ("wide", True), ("medium", False)],
                         ids=["wide-ram-init", "wide-load-stream", "medium-ram-init"])
def test_engine_amaranth_tiny(tiny_checkpoint, formats, load_stream):
    """The engine in a wider set on a small random model: tokens, the Q16 wire logits of the
    argmax and read back, and every value the writer stores (the trace) equal to the integer
    model's of the same set."""
    cfg, blob = load_image(tiny_checkpoint, "2bit", formats)
    prompt, steps = [3, 60, 7], 2
    run = run_amaranth(cfg=cfg, blob=blob, packing="2bit", lanes=LANES, prompt=prompt, steps=steps,
                       read_logits=READ_BACK, load_stream=load_stream, trace=not load_stream, formats=formats)
    _check(cfg, blob, "2bit", prompt, steps, run, formats)
    if load_stream:
        return
    model = ref.IntegerModel(ref.parse_image(blob, cfg, "2bit", FORMAT_SETS[formats]))
    stored = {"f_proj": "forget", "i_proj": "h", "g_proj": "o_in", "o_proj": "x_attn", "down_proj": "x"}
    for t, token in enumerate(run.tokens[:len(prompt) + steps - 1]):
        layers = []
        logits = model.step(token, trace=layers)
        hw = run.trace[t]
        for job, key in stored.items():
            for layer, want in enumerate(layers):
                got = [v for j, l, _, v in hw if JOBS[j] == job and l == layer]
                assert got == [int(x) for x in want[key]], f"step {t} layer {layer} {job}"
        assert [v for j, _, _, v in hw if JOBS[j] == "lm_head"] == [int(x) for x in logits]


def test_wide_engine_amaranth_64_lanes(tmp_path):
    """16-byte beats: several int32 norms, lower bounds and embedding values per beat, the k
    section in one beat."""
    cfg = ModelConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, intermediate_size=128)
    ck = save_checkpoint(random_model(cfg, seed=9), tmp_path / "ckpt")
    cfg, blob = load_image(ck, "base3", "wide")
    prompt, steps = [3, 60, 7], 2
    run = run_amaranth(cfg=cfg, blob=blob, packing="base3", lanes=64, prompt=prompt, steps=steps,
                       read_logits=READ_BACK, formats="wide")
    _check(cfg, blob, "base3", prompt, steps, run, "wide")


def _skip_if_missing(simulator):
    reason = simulator_missing(simulator)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("formats", ["medium", "wide"])
def test_engine_verilator_demo(formats):
    """The demo model in a wider set on Verilator (its own build), memory stalls."""
    _skip_if_missing("verilator")
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3", formats)
    prompt = list(b"def")
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=prompt, steps=3,
                     simulator="verilator", build=default_build(cfg, LANES, len(blob), formats=formats),
                     stall_rate=0.2, mem_latency=5, read_logits=READ_BACK)
    _check(cfg, blob, "base3", prompt, 3, run, formats)


@pytest.mark.parametrize("formats", ["medium", "wide"])
def test_engine_icarus_tiny(tiny_checkpoint, formats):
    _skip_if_missing("icarus")
    cfg, blob = load_image(tiny_checkpoint, "base3", formats)
    build = EngineBuild(lanes=LANES, max_d=32, max_I=64, max_L=2, max_V=64, mem_words=8192, formats=formats)
    prompt = [5, 9, 63]
    run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=LANES, prompt=prompt, steps=2,
                     simulator="icarus", build=build, stall_rate=0.3, cmd_stall_rate=0.3, mem_latency=5,
                     read_logits=READ_BACK)
    _check(cfg, blob, "base3", prompt, 2, run, formats)


def test_scalar_unit_eps_latency():
    """The longest case takes ``max_latency`` cycles: r of se_bits / 2 bits (the sum saturated),
    num of one bit."""
    dut = ScalarUnit(WIDE)
    ports = (("k_mant", 1), ("eps_mant", 1), ("eps_exp", 200), ("eps_kind", EpsKind.INPUT))
    assert one_item_latency(dut, {"m": 1, "sumsq": (1 << W.sumsq_bits) - 1, "g": 1, "sh": 0}, ports) == dut.max_latency
