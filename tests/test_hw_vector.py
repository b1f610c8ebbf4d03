"""Amaranth-simulator tests of the vector datapath cores against reference/integer.py.

Every core is driven through its streams with random idle cycles on the inputs and random
back-pressure on the outputs; a protocol checker on every output stream fails a test if valid
drops or the payload changes while a transfer is pending. Results are compared bit for bit with
the matching function of the integer model.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree_fpga.config import FORMATS as F
from mmfree_fpga.hw.argmax import Argmax
from mmfree_fpga.hw.bitlinear_front import BitLinearFront, FrontOp
from mmfree_fpga.hw.elementwise import ElementwiseOp, ElementwiseUnit
from mmfree_fpga.hw.embed_scale import EmbedScale
from mmfree_fpga.hw.output_scale import OutputScale
from mmfree_fpga.hw.scalar_unit import ScalarUnit
from mmfree_fpga.hw.vector_common import vector_widths
from mmfree_fpga.reference import integer as ref
from mmfree_fpga.sim.vector_tb import ref_elementwise
from stream_bench import CLOCK, one_item_latency, receive, send, simulate

W = vector_widths(F)


# -- stream harness: tests/stream_bench.py ------------------------------------------------


def value_last(v):
    return int(v.value), int(v.last)


def edge_values(lo, hi, rng, n):
    """n values in [lo, hi]: the ends, zero, small and random magnitudes of every bit length."""
    vals = [lo, hi, 0, 1, -1, lo + 1, hi - 1]
    span = max(abs(lo), abs(hi))
    for _ in range(n - len(vals)):
        b = rng.randrange(span.bit_length() + 1)
        v = rng.randrange(1 << b) if b else 0
        vals.append(v if rng.random() < 0.5 else -v)
    return [min(hi, max(lo, v)) for v in vals]


# -- OutputScale -----------------------------------------------------------------------

def ref_output_scale(acc, qt, shift):
    return min(F.x_max, max(F.x_min, int(ref.rshift_round(acc * qt, shift))))


OSC_VARIANTS = {"full": {}, "shared": {"share": 2}, "shared_embed": {"share": 2, "embed": True}}


@pytest.mark.parametrize("seed,variant", [(1, "full"), (2, "full"), (3, "shared"), (4, "shared_embed")])
def test_output_scale(seed, variant):
    rng = random.Random(seed)
    dut = OutputScale(**OSC_VARIANTS[variant])
    sh_lo, sh_hi = -(1 << (W.shift.width - 1)), (1 << (W.shift.width - 1)) - 1
    cases = []
    accs = edge_values(-W.acc_mag_max, W.acc_mag_max - 1, rng, 300)
    for acc in accs:
        qt = rng.choice([0, 1, (1 << W.scale_bits) - 1, 1 << (W.scale_bits - 2),
                         rng.randrange(1 << (W.scale_bits - 2), 1 << W.scale_bits)])
        shift = rng.choice([sh_lo, sh_hi, 0, 1, -1, W.shift_min, W.shift_max, W.shift_max - 1,
                            rng.randrange(sh_lo, sh_hi + 1), rng.randrange(-4, 40)])
        cases.append((acc, qt, shift))
    got = []

    async def drive(ctx):
        for acc, qt, shift in cases:
            while rng.random() < 0.3:
                await ctx.tick()
            ctx.set(dut.i.payload, {"acc": acc, "last": acc & 1})
            ctx.set(dut.scale, {"qt": qt, "shift": shift})
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            ctx.set(dut.scale, {"qt": 0, "shift": 0})  # sampled on acceptance only

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(cases), rng, convert=value_last))

    simulate(dut, drive, collect, max_cycles=40 * len(cases))
    want = [(ref_output_scale(*c), c[0] & 1) for c in cases]
    bad = [(c, g, x) for c, g, x in zip(cases, got, want) if g != x]
    assert not bad, f"{len(bad)} mismatches, first (acc, qt, shift), got, want: {bad[:3]}"


def test_output_scale_throughput_and_latency():
    dut = OutputScale()
    n = 64
    stamps = {}

    async def drive(ctx):
        ctx.set(dut.scale, {"qt": 1 << 16, "shift": 16})
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.valid, 1)
        for k in range(n):
            ctx.set(dut.i.payload, {"acc": k, "last": k == n - 1})
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def watch(ctx):
        out, cycle = [], 0
        while len(out) < n:
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            cycle += 1
            if valid:
                stamps.setdefault("first", cycle)
                out.append(value_last(payload))
        stamps["last"] = cycle
        assert out == [(k, int(k == n - 1)) for k in range(n)]

    simulate(dut, drive, watch, max_cycles=10 * n)
    assert stamps["first"] == OutputScale.LATENCY + 1
    assert stamps["last"] - stamps["first"] == n - 1, "not one element per cycle"


# -- ScalarUnit ---------------------------------------------------------------------------

def ref_scale(m, sumsq, k_mant, k_exp):
    """(qt, shift) as bitlinear uses them; qt = 0 stands for the all-zero output."""
    r = ref.isqrt(sumsq)
    if m == 0 or r == 0:
        return 0, None
    qt, t = ref.scale_mantissa(k_mant * m, r)
    return qt, min(W.shift_max, max(W.shift_min, t - k_exp))


def random_bits(rng, bits):
    b = rng.randrange(bits + 1)
    return rng.randrange(1 << b) if b else 0


def test_scalar_unit():
    rng = random.Random(3)
    dut = ScalarUnit()
    m_max, s_max = (1 << W.m_bits) - 1, (1 << W.sumsq_bits) - 1
    cases = [(0, 0, 1 << 15, 0), (1, 1, 1, 0), (W.z_mag_max, s_max, (1 << W.const_bits) - 1, -(1 << 31)),
             (m_max, 1, 1 << 15, (1 << 31) - 1), (1, s_max, (1 << W.const_bits) - 1, 7), (5, 0, 40000, -3),
             (0, 12345, 40000, -3), (123, 3, 0, 2), (W.z_mag_max, 4, 1 << 15, -40)]
    for _ in range(120):
        k_mant = rng.choice([rng.randrange(1 << 15, 1 << 16), random_bits(rng, W.const_bits)])
        k_exp = rng.choice([rng.randrange(-60, 20), rng.randrange(-(1 << 31), 1 << 31)])
        cases.append((random_bits(rng, W.m_bits), random_bits(rng, W.sumsq_bits), k_mant, k_exp))
    got = []

    async def drive(ctx):
        for m_, s_, km, ke in cases:
            while rng.random() < 0.3:
                await ctx.tick()
            ctx.set(dut.i.payload, {"m": m_, "sumsq": s_})
            ctx.set(dut.k_mant, km)
            ctx.set(dut.k_exp, ke)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            ctx.set(dut.k_mant, 0)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(cases), rng, stall=0.5,
                                 convert=lambda v: (int(v.qt), int(v.shift))))

    simulate(dut, drive, collect, max_cycles=(dut.max_latency + 5) * len(cases) * 2)
    assert len(got) == len(cases)
    for c, (qt, shift) in zip(cases, got):
        want_qt, want_shift = ref_scale(*c)
        assert qt == want_qt, (c, qt, want_qt)
        if want_qt:
            assert shift == want_shift, (c, shift, want_shift)
            assert 1 << (W.scale_bits - 2) <= qt < 1 << W.scale_bits


def test_scalar_unit_latency():
    # the longest case: r of r_bits bits, num of one bit
    dut = ScalarUnit()
    assert one_item_latency(dut, {"m": 1, "sumsq": (1 << W.sumsq_bits) - 1}, [("k_mant", 1)]) == dut.max_latency


# -- BitLinearFront -------------------------------------------------------------------------

def ref_front(v, a, c):
    """(m, sumsq, q) of bitlinear's steps 1, 2 and 4; q is zeros when m == 0."""
    v16 = ref.normalise(np.asarray(v, dtype=np.int64))
    z = v16 * np.asarray(c, dtype=np.int64)
    mm = int(np.abs(z).max(initial=0))
    pv = (v16 * np.asarray(a, dtype=np.int64)) >> F.sumsq_shift
    sumsq = int(np.dot(pv, pv))
    q = ref.quantise(z, mm) if mm else np.zeros_like(z)
    return mm, sumsq, [int(x) for x in q]


def front_items(v, a, c, passes):
    items = []
    for op in passes:
        for k in range(len(v)):
            items.append({"op": op, "last": int(k == len(v) - 1), "v": int(v[k]),
                          "a": int(a[k]) if op != FrontOp.MAX else 0,
                          "c": int(c[k]) if op != FrontOp.MAX else 0})
    return items


def random_vector(rng, n, bits):
    """n signed x_bits values whose largest magnitude has ``bits`` bits (0: all zero)."""
    if bits == 0:
        return [0] * n
    v = [rng.randrange(-(1 << bits) + 1, 1 << bits) for _ in range(n)]
    v[rng.randrange(n)] = rng.choice([1 << (bits - 1), -(1 << (bits - 1)), (1 << bits) - 1, -(1 << bits) + 1])
    if bits == W.x_bits:
        v[rng.randrange(n)] = rng.choice([W.x_min, W.x_max])
    return [min(W.x_max, max(W.x_min, x)) for x in v]


def random_norm(rng, n):
    lim = 1 << (W.norm_bits - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.randrange(-lim, lim) for _ in range(n)]
    if kind == 1:
        return [rng.choice([-lim, lim - 1]) for _ in range(n)]
    if kind == 2:
        return [rng.randrange(-4, 5) for _ in range(n)]
    return [rng.randrange(lim // 2, lim) for _ in range(n)]


def run_front(jobs, rng, idle=0.3, stall=0.3):
    """jobs: list of (v, [(a, c), ...]): one MAX pass, then STATS+QUANT per (a, c)."""
    dut = BitLinearFront()
    items, n_q, n_stats = [], 0, 0
    for v, acs in jobs:
        items += front_items(v, v, v, [FrontOp.MAX])
        for a, c in acs:
            items += front_items(v, a, c, [FrontOp.STATS, FrontOp.QUANT])
            n_q += len(v)
            n_stats += 1
    got_q, got_stats = [], []

    async def drive(ctx):
        await send(ctx, dut.i, items, rng, idle)

    async def take_q(ctx):
        got_q.extend(await receive(ctx, dut.q, n_q, rng, stall))

    async def take_stats(ctx):
        got_stats.extend(await receive(ctx, dut.stats, n_stats, rng, 0.6,
                                       convert=lambda s: (int(s.m), int(s.sumsq))))

    simulate(dut, drive, take_q, take_stats, max_cycles=10 * len(items) + 100 * n_stats)
    k = 0
    for j, (v, acs) in enumerate(jobs):
        for a, c in acs:
            mm, sumsq, q = ref_front(v, a, c)
            assert got_stats.pop(0) == (mm, sumsq), f"stats of job {j}"
            assert got_q[k:k + len(v)] == q, f"q of job {j}"
            k += len(v)


@pytest.mark.parametrize("seed", [4, 5])
def test_bitlinear_front(seed):
    rng = random.Random(seed)
    jobs = []
    for bits in [0, 1, 2, 3, 14, 15, 16, 17, 20, 31, 32]:
        n = rng.choice([1, 2, 5, 33])
        v = random_vector(rng, n, bits)
        jobs.append((v, [(random_norm(rng, n), random_norm(rng, n)) for _ in range(rng.choice([1, 3]))]))
    n = 40
    jobs.append(([W.x_min] * n, [([-(1 << 15)] * n, [-(1 << 15)] * n)]))
    jobs.append(([W.x_max] * n, [([0] * n, [0] * n)]))
    run_front(jobs, rng)


def test_bitlinear_front_max_length():
    """MAX and STATS passes over max_features elements at the largest magnitudes: m and sumsq
    reach their bounds (the three passes over a random max-length vector run on Verilator)."""
    n = F.max_features
    lim = 1 << (W.norm_bits - 1)
    # normalise floors negative values: -(2^k - 1) becomes -2^(norm_bits-1), the largest |v16|
    v, a, c = [-((lim << 2) - 1)] * n, [-lim] * n, [-lim] * n
    mm, sumsq, _ = ref_front(v, a, c)
    assert sumsq == F.max_features * W.p_mag_max ** 2 and sumsq.bit_length() == W.sumsq_bits
    assert mm == W.z_mag_max
    dut = BitLinearFront()
    got = []

    async def drive(ctx):
        for op in (FrontOp.MAX, FrontOp.STATS):
            ctx.set(dut.i.payload, {"op": op, "last": 0, "v": v[0], "a": a[0], "c": c[0]})
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            # the unit takes one element per cycle within a pass: let n - 2 more go in without
            # waking up every cycle (a lost element would show in sumsq), then the last one
            await ctx.delay((n - 1.5) * CLOCK)
            ctx.set(dut.i.payload.last, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            await ctx.tick().until(dut.i.ready)

    async def take_stats(ctx):
        got.extend(await receive(ctx, dut.stats, 1, random.Random(0), 0.0,
                                 convert=lambda s: (int(s.m), int(s.sumsq))))

    simulate(dut, drive, take_stats, max_cycles=2 * n + 200)
    assert got == [(mm, sumsq)]


# -- ElementwiseUnit -----------------------------------------------------------------------



def elementwise_values(rng, n):
    """x values: the ends of the range, the sigmoid table's ends and knots, small, random."""
    k = W.sig_in_log2
    step = 1 << W.sig_frac_bits
    special = [W.x_min, W.x_max, 0, 1, -1, 1 << k, (1 << k) - 1, -(1 << k), -(1 << k) - 1,
               -(1 << k) + 1, (1 << k) + 1, step, -step, step - 1, -step + 1, W.x_max - 1, W.x_min + 1]
    vals = list(special)
    while len(vals) < n:
        kind = rng.randrange(4)
        if kind == 0:
            vals.append(rng.randrange(-(1 << k) - step, (1 << k) + step))
        elif kind == 1:
            vals.append(rng.randrange(-(1 << 20), 1 << 20) // step * step + rng.choice([0, 1, -1, step // 2]))
        elif kind == 2:
            vals.append(rng.randrange(W.x_min, W.x_max + 1))
        else:
            b = rng.randrange(W.x_bits)
            vals.append(rng.choice([1, -1]) * rng.randrange(1 << b))
    return [min(W.x_max, max(W.x_min, v)) for v in vals]


def gate_values(rng, n):
    one = W.gate_one
    return [rng.choice([0, one, one - 1, 1, rng.randrange(one + 1), rng.randrange(one + 1)]) for _ in range(n)]


@pytest.mark.parametrize("seed,share", [(7, 1), (8, 1), (9, 2)])
def test_elementwise_unit(seed, share):
    rng = random.Random(seed)
    dut = ElementwiseUnit(share=share)
    n = 120
    items = []
    for op in ElementwiseOp:
        ys, as_, gs = elementwise_values(rng, n), elementwise_values(rng, n), gate_values(rng, n)
        rng.shuffle(as_)
        items += [{"op": op, "y": y, "a": a, "g": g, "last": rng.random() < 0.1} for y, a, g in zip(ys, as_, gs)]
    # rounding ties of negative products: g = 2^(gate_frac-1) makes (1 - g) |silu| and g |a|
    # odd multiples of 2^(gate_frac-1) for odd operands; a = odd 2^(x_frac-1) does so for a silu
    half_g, half_x = 1 << (F.gate_frac - 1), 1 << (F.x_frac - 1)
    for y in elementwise_values(rng, 60):
        odd = rng.randrange(-99, 100) | 1
        items.append({"op": ElementwiseOp.RECUR, "y": y, "a": odd, "g": half_g, "last": 0})
        items.append({"op": ElementwiseOp.SILU_MUL, "y": y, "a": odd * half_x, "g": 0, "last": 1})
    rng.shuffle(items)          # the op may change on every element
    got = []

    async def drive(ctx):
        await send(ctx, dut.i, items, rng)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, convert=value_last))

    simulate(dut, drive, collect, max_cycles=10 * share * len(items))
    want = [(ref_elementwise(it["op"], it["y"], it["a"], it["g"]), int(it["last"])) for it in items]
    bad = [(it, g_, w_) for it, g_, w_ in zip(items, got, want) if g_ != w_]
    assert len(got) == len(items) and not bad, f"{len(bad)} mismatches: {bad[:3]}"


def test_sigmoid_every_table_interval():
    """Every table interval at both its knot and a random point inside, and beyond both ends."""
    rng = random.Random(9)
    dut = ElementwiseUnit()
    step = 1 << W.sig_frac_bits
    ys = [(k - W.sig_n // 2) * step + off for k in range(W.sig_n + 1)
          for off in (0, rng.randrange(1, step))]
    ys += [-(W.sig_n // 2) * step - 1, W.x_min, W.x_max]
    ys = [min(W.x_max, y) for y in ys]
    items = [{"op": op, "y": y, "a": 0, "g": 0, "last": 0}
             for y in ys for op in (ElementwiseOp.SIGMOID, ElementwiseOp.SILU)]
    got = []

    async def drive(ctx):
        await send(ctx, dut.i, items, rng, idle=0.0)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, stall=0.0, convert=lambda v: int(v.value)))

    simulate(dut, drive, collect, max_cycles=4 * len(items))
    want = [ref_elementwise(it["op"], it["y"], 0, 0) for it in items]
    assert got == want


# -- EmbedScale ------------------------------------------------------------------------------

def test_embed_scale():
    rng = random.Random(10)
    dut = EmbedScale()
    smax = (1 << F.emb_scale_bits) - 1
    rows = []
    for scale in [0, 1, smax, smax - 1, 1 << F.emb_scale_frac, 1 << (F.emb_scale_frac - 8)] + \
            [rng.randrange(smax + 1) for _ in range(6)] + [random_bits(rng, F.emb_scale_bits) for _ in range(6)]:
        row = [W.act_min, W.act_max, 0, 1, -1] + [rng.randrange(W.act_min, W.act_max + 1) for _ in range(15)]
        rows.append((scale, row))
    items = [(scale, q, k == len(row) - 1) for scale, row in rows for k, q in enumerate(row)]
    got = []

    async def drive(ctx):
        for scale, q, last in items:
            while rng.random() < 0.3:
                await ctx.tick()
            ctx.set(dut.i.payload, {"q": q, "last": last})
            ctx.set(dut.scale, scale)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, convert=value_last))

    simulate(dut, drive, collect, max_cycles=10 * len(items))
    want = []
    for scale, row in rows:
        weights = SimpleNamespace(formats=F, emb_q=np.array([row], dtype=np.int8),
                                  emb_scale=np.array([scale], dtype=np.int64))
        want += [(int(x), int(k == len(row) - 1)) for k, x in enumerate(ref.embed(weights, 0))]
    assert got == want


@pytest.mark.parametrize("share", [1, 2])
def test_output_scale_embedding_mixed(share):
    """OutputScale(embed=True): embedding elements (embed high) mixed with accumulators, both exact."""
    rng = random.Random(11)
    dut = OutputScale(share=share, embed=True)
    smax = (1 << F.emb_scale_bits) - 1
    items = []
    for _ in range(150):
        if rng.random() < 0.5:
            scale = rng.choice([0, 1, smax, 1 << F.emb_scale_frac, rng.randrange(smax + 1),
                                random_bits(rng, F.emb_scale_bits)])
            q = rng.choice([W.act_min, W.act_max, 0, -1, rng.randrange(W.act_min, W.act_max + 1)])
            weights = SimpleNamespace(formats=F, emb_q=np.array([[q]], dtype=np.int8),
                                      emb_scale=np.array([scale], dtype=np.int64))
            items.append((1, q, scale, 0, int(ref.embed(weights, 0)[0])))
        else:
            acc = rng.randrange(-W.acc_mag_max, W.acc_mag_max)
            qt = rng.choice([(1 << W.scale_bits) - 1, rng.randrange(1 << W.scale_bits)])
            shift = rng.choice([W.shift_min, W.shift_max, rng.randrange(-4, 40)])
            items.append((0, acc, qt, shift, ref_output_scale(acc, qt, shift)))
    got = []

    async def drive(ctx):
        for emb, acc, qt, shift, _ in items:
            while rng.random() < 0.3:
                await ctx.tick()
            ctx.set(dut.i.payload, {"acc": acc, "last": 0})
            ctx.set(dut.embed, emb)
            ctx.set(dut.emb_scale, qt if emb else rng.randrange(smax + 1))
            ctx.set(dut.scale, {"qt": 0 if emb else qt, "shift": shift})
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, convert=lambda v: int(v.value)))

    simulate(dut, drive, collect, max_cycles=40 * len(items))
    assert got == [it[-1] for it in items]


# -- Argmax ----------------------------------------------------------------------------------

def run_argmax(dut, vectors, rng, idle=0.3, stall=0.5):
    got = []

    async def drive(ctx):
        for vec in vectors:
            await send(ctx, dut.i, [{"value": v, "last": k == len(vec) - 1} for k, v in enumerate(vec)], rng, idle)

    async def collect(ctx):
        got.extend(await receive(ctx, dut.o, len(vectors), rng, stall,
                                 convert=lambda r: (int(r.index), int(r.value))))

    simulate(dut, drive, collect, max_cycles=10 * sum(map(len, vectors)) + 100)
    want = [(ref.IntegerModel.argmax(np.array(v)), max(v)) for v in vectors]
    assert got == want


def test_argmax():
    rng = random.Random(11)
    max_length = 300
    dut = Argmax(max_length)
    vectors = [[5], [W.x_min], [W.x_max, W.x_max], [W.x_min] * 3, [0, 0, 1, 1, 0], [-1, -2, -1]]
    for _ in range(12):
        n = rng.choice([1, 2, 3, 17, 64])
        pool = [rng.randrange(W.x_min, W.x_max + 1) for _ in range(3)] + [W.x_min, W.x_max]
        vectors.append([rng.choice(pool) if rng.random() < 0.5 else rng.randrange(W.x_min, W.x_max + 1)
                        for _ in range(n)])
    # full length: the maximum at the last index, then (tied) at the first
    vectors.append([W.x_min] * (max_length - 1) + [W.x_min + 1])
    vectors.append([W.x_max] + [rng.randrange(W.x_min, W.x_max + 1) for _ in range(max_length - 2)] + [W.x_max])
    run_argmax(dut, vectors, rng)


# -- throughput, latency, pass overheads ------------------------------------------------------

async def stream_timing(ctx, dut, items, max_cycles=2000):
    """Offer items back to back with the output always ready; the cycles (edges) at which each
    input went in and each output came out."""
    ctx.set(dut.o.ready if hasattr(dut, "o") else dut.q.ready, 1)
    port_o = dut.o if hasattr(dut, "o") else dut.q
    accepted, produced = [], []
    k = 0
    for cycle in range(max_cycles):
        if k < len(items):
            ctx.set(dut.i.payload, items[k])
        ctx.set(dut.i.valid, k < len(items))
        _, _, iv, ir, ov = await ctx.tick().sample(dut.i.valid, dut.i.ready, port_o.valid)
        if iv and ir:
            accepted.append(cycle)
            k += 1
        if ov:
            produced.append(cycle)
        if k == len(items) and cycle > accepted[-1] + 60:
            break
    return accepted, produced


def _elementwise_items(n):
    return [{"op": ElementwiseOp(k % 6), "y": k * 977, "a": -k, "g": k % 100, "last": 0} for k in range(n)]


@pytest.mark.parametrize("make, items, latency, share", [
    (OutputScale, [{"acc": k, "last": 0} for k in range(50)], OutputScale.LATENCY, 1),
    (lambda: OutputScale(embed=True), [{"acc": k, "last": 0} for k in range(50)], OutputScale.LATENCY + 1, 1),
    (ElementwiseUnit, _elementwise_items(50), ElementwiseUnit.LATENCY, 1),
    (EmbedScale, [{"q": k - 25, "last": 0} for k in range(50)], EmbedScale.LATENCY, 1),
    (lambda: OutputScale(share=2, embed=True), [{"acc": k, "last": 0} for k in range(50)],
     2 * OutputScale.LATENCY, 2),
    (lambda: ElementwiseUnit(share=2), _elementwise_items(50), 2 * ElementwiseUnit.STAGES[2], 2),
], ids=["OutputScale", "OutputScale-embed", "ElementwiseUnit", "EmbedScale", "OutputScale-shared",
        "ElementwiseUnit-shared"])
def test_one_element_per_cycle(make, items, latency, share):
    """Full rate: one element per cycle; shared multipliers (share=2): one every two cycles."""
    dut = make()
    result = {}

    async def bench(ctx):
        result["t"] = await stream_timing(ctx, dut, items)

    simulate(dut, bench, max_cycles=3000)
    accepted, produced = result["t"]
    n = len(items)
    assert accepted == list(range(accepted[0], accepted[0] + share * n, share)), "input rate"
    assert produced == list(range(produced[0], produced[0] + share * n, share)), "output rate"
    assert produced[0] - accepted[0] == latency
    assert getattr(dut, "latency", latency) == latency


def test_argmax_one_element_per_cycle():
    dut = Argmax(64)
    n = 40
    vectors = 3
    items = [{"value": (k * 7919) % 1000, "last": k % n == n - 1} for k in range(n * vectors)]
    result = {}

    async def bench(ctx):
        result["t"] = await stream_timing(ctx, dut, items)

    simulate(dut, bench, max_cycles=1000)
    accepted, produced = result["t"]
    assert accepted == list(range(accepted[0], accepted[0] + n * vectors))
    assert [c - accepted[0] for c in produced] == [n * (j + 1) for j in range(vectors)]


def test_bitlinear_front_pass_timing():
    """QUANT: one q per cycle, LATENCY cycles after its element; the input is held off for
    MAX_GAP cycles after a MAX pass and stats_gap cycles after a STATS pass."""
    dut = BitLinearFront()
    n = 20
    v = [k * 1000 - 7000 for k in range(n)]
    items = front_items(v, v, [3] * n, [FrontOp.MAX, FrontOp.STATS, FrontOp.QUANT])
    result = {}

    async def bench(ctx):
        ctx.set(dut.stats.ready, 1)
        result["t"] = await stream_timing(ctx, dut, items)

    simulate(dut, bench, max_cycles=1000)
    accepted, produced = result["t"]
    passes = [accepted[k * n:(k + 1) * n] for k in range(3)]
    for p in passes:
        assert p == list(range(p[0], p[0] + n)), "a pass was not taken one element per cycle"
    assert passes[1][0] - passes[0][-1] - 1 == BitLinearFront.MAX_GAP
    assert passes[2][0] - passes[1][-1] - 1 == dut.stats_gap
    assert produced == [c + BitLinearFront.LATENCY for c in passes[2]]


def test_stream_layouts_connect():
    """front.stats -> scalar.i connect as they are; TernaryMatVec.out -> OutputScale.i too."""
    from amaranth.hdl import Module
    from amaranth.lib import wiring

    from mmfree_fpga.hw.matvec import TernaryMatVec
    m = Module()
    front, scalar, outscale = BitLinearFront(), ScalarUnit(), OutputScale()
    ew, argmax = ElementwiseUnit(), Argmax(8)
    matvec = TernaryMatVec(lanes=16, max_rows=64, max_cols=64)
    m.submodules += [front, scalar, outscale, ew, argmax, matvec]
    wiring.connect(m, front.stats, scalar.i)
    wiring.connect(m, matvec.out, outscale.i)
    wiring.connect(m, outscale.o, argmax.i)
    assert ew.o.signature == outscale.o.signature
    Simulator(m)    # elaborates everything


def test_msb_index_and_greater():
    """The LUT-only leading-one finder and the chunked comparator, exhaustively on small widths
    and randomly on the widths the cores use."""
    from amaranth.hdl import Module, Signal

    from mmfree_fpga.hw.vector_common import greater_unsigned, msb_index
    rng = random.Random(12)
    m = Module()
    cases = []
    for width in (1, 2, 3, 5, 8, W.m_bits, W.x_bits, W.num_bits):
        v, b = Signal(width), Signal(width)
        any_, idx = msb_index(v, width)
        o_any, o_idx, o_gt = Signal(), Signal(8), Signal()
        m.d.comb += [o_any.eq(any_), o_idx.eq(idx), o_gt.eq(greater_unsigned(v, b, chunk=3))]
        cases.append((width, v, b, o_any, o_idx, o_gt))

    async def bench(ctx):
        for width, v, b, o_any, o_idx, o_gt in cases:
            values = range(1 << width) if width <= 5 else [rng.getrandbits(rng.randrange(width + 1))
                                                           for _ in range(200)]
            for x in values:
                y = rng.choice([x, x + 1, x - 1, rng.getrandbits(width)]) % (1 << width)
                ctx.set(v, x)
                ctx.set(b, y)
                assert ctx.get(o_any) == (x != 0)
                assert ctx.get(o_idx) == max(x.bit_length() - 1, 0)
                assert ctx.get(o_gt) == (x > y)

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


# -- DSP budget of the compact (iCE40UP5K) variant -----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("make, dsps", [
    (lambda: OutputScale(share=2, embed=True), 1),
    (lambda: ElementwiseUnit(share=2), 4),
    (lambda: BitLinearFront(), 3),
    (lambda: OutputScale(), 2),
    (lambda: ElementwiseUnit(), 7),
], ids=["OutputScale-compact", "ElementwiseUnit-compact", "BitLinearFront", "OutputScale", "ElementwiseUnit"])
def test_ice40_dsp_count(make, dsps, tmp_path):
    """SB_MAC16 cells after synth_ice40 -dsp: the compact engine's vector cores use the UP5K's 8."""
    from mmfree_fpga.boards.resources import inclusive, synth_stats
    stats = synth_stats(make(), tmp_path)
    assert inclusive(stats)["top"]["DSP"] == dsps
