# amaranth: UnusedElaboratable=no
"""cocotb testbench of the vector datapath's generated Verilog (all cores in one test top).

Run through :func:`mmfree_fpga.sim.runner.run_cocotb` (see ``tests/test_hw_vector_cocotb.py``),
which builds ``VectorTestTop``: every core of the vector datapath side by side, each with its
own ports (``front__i__payload``, ``scalar__k_mant``, ...). Every stream is driven with random
idle cycles and back-pressure; a protocol checker watches every output; results are compared
bit for bit with ``reference/integer.py``.

Environment: ``VECTOR_SEED``, ``VECTOR_ARGMAX_MAX`` (the Argmax core's max_length),
``VECTOR_FULL`` (1: ``long_vectors`` at max_features and max_length; for Verilator).
"""

from __future__ import annotations

import os
import random
from collections import deque

import cocotb
import numpy as np
from amaranth.hdl import Shape
from amaranth.lib import data
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from mmfree_fpga.config import FORMATS as F
from mmfree_fpga.hw.argmax import argmax_layout
from mmfree_fpga.hw.bitlinear_front import FrontOp, front_input_layout
from mmfree_fpga.hw.elementwise import ElementwiseOp, elementwise_input_layout
from mmfree_fpga.hw.vector_common import (K_EXP_BITS, acc_layout, scale_layout, stats_layout,
                                          value_layout, vector_widths)
from mmfree_fpga.reference import integer as ref

W = vector_widths(F)
SEED = int(os.environ.get("VECTOR_SEED", "1"))
FULL = os.environ.get("VECTOR_FULL", "0") == "1"
ARGMAX_MAX = int(os.environ.get("VECTOR_ARGMAX_MAX", "32000"))


# -- encoding --------------------------------------------------------------------------------

def encode(shape, value) -> int:
    """The bits of a payload (a dict for a struct layout, an int for a plain shape)."""
    if isinstance(shape, data.Layout):
        return shape.const(value).as_value().value
    width = Shape.cast(shape).width
    return int(value) & ((1 << width) - 1)


def decode(shape, raw: int):
    if isinstance(shape, data.Layout):
        return data.Const(shape, raw)
    shape = Shape.cast(shape)
    return raw - (1 << shape.width) if shape.signed and raw >> (shape.width - 1) else raw


# -- stream drivers, run one clock cycle at a time ------------------------------------------

class Source:
    """Drives an input stream; ``side`` values go to plain ports together with each payload."""

    def __init__(self, dut, name, shape, rng, idle=0.3):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.dut, self.shape, self.rng, self.idle = dut, shape, rng, idle
        self.queue = deque()
        self.cur = None
        self.valid_now = None

    def push(self, value, **side):
        self.queue.append((value, side))

    def drive(self):
        if self.cur is None and self.queue and (not self.idle or self.rng.random() >= self.idle):
            self.cur = self.queue.popleft()
            value, side = self.cur
            self.payload.value = encode(self.shape, value)
            for port, (shape, v) in side.items():
                getattr(self.dut, port).value = encode(shape, v)
        valid = self.cur is not None
        if valid != self.valid_now:
            self.valid.value = int(valid)
            self.valid_now = valid

    def sample(self):
        if self.cur is not None and int(self.ready.value):
            self.cur = None


class Sink:
    """Takes an output stream with random back-pressure, checking the stream rules."""

    def __init__(self, dut, name, shape, rng, stall=0.3, on_item=None):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.name, self.shape, self.rng, self.stall = name, shape, rng, stall
        self.items = []
        self.on_item = on_item
        self.pending = None
        self.ready_now = None

    def drive(self):
        ready = not self.stall or self.rng.random() >= self.stall
        if ready != self.ready_now:
            self.ready.value = int(ready)
            self.ready_now = ready

    def sample(self):
        valid = int(self.valid.value)
        if not valid:
            assert self.pending is None, f"{self.name}: valid dropped before the payload was taken"
            return
        raw = int(self.payload.value)
        if self.pending is not None:
            assert raw == self.pending, f"{self.name}: payload changed while waiting for ready"
        if self.ready_now:
            self.pending = None
            item = decode(self.shape, raw)
            self.items.append(item)
            if self.on_item:
                self.on_item(item)
        else:
            self.pending = raw


async def start(dut):
    Clock(dut.clk, 10, unit="ns", impl="gpi").start()
    for name in ("front__i", "scalar__i", "outscale__i", "ew__i", "embed__i", "argmax__i"):
        getattr(dut, f"{name}__valid").value = 0
    for name in ("front__q", "front__stats", "scalar__o", "outscale__o", "ew__o", "embed__o", "argmax__o"):
        getattr(dut, f"{name}__ready").value = 0
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


async def run(dut, ports, done, max_cycles):
    for _ in range(max_cycles):
        await FallingEdge(dut.clk)
        for port in ports:
            port.drive()
        await ReadOnly()
        for port in ports:
            port.sample()
        if done():
            return
    raise AssertionError(f"not finished after {max_cycles} cycles")


# -- reference-side helpers -------------------------------------------------------------------

def random_vector(rng, n, bits):
    if bits == 0:
        return np.zeros(n, dtype=np.int64)
    v = [rng.randrange(-(1 << bits) + 1, 1 << bits) for _ in range(n)]
    v[rng.randrange(n)] = rng.choice([1 << (bits - 1), -(1 << (bits - 1)), (1 << bits) - 1, -(1 << bits) + 1])
    if bits >= W.x_bits:
        v[rng.randrange(n)] = rng.choice([W.x_min, W.x_max])
    return np.clip(np.array(v, dtype=np.int64), W.x_min, W.x_max)


def random_norm(rng, n):
    lim = 1 << (W.norm_bits - 1)
    kind = rng.randrange(4)
    if kind == 0:
        v = [rng.randrange(-lim, lim) for _ in range(n)]
    elif kind == 1:
        v = [rng.choice([-lim, lim - 1]) for _ in range(n)]
    elif kind == 2:
        v = [rng.randrange(-3, 4) for _ in range(n)]
    else:
        v = [rng.randrange(lim // 2, lim) for _ in range(n)]
    return np.array(v, dtype=np.int64)


def random_bitlinear(rng, n, rows):
    trits = np.array([[rng.choice([-1, 0, 0, 1]) for _ in range(n)] for _ in range(rows)], dtype=np.int8)
    return ref.IntBitLinear(trits=trits, a=random_norm(rng, n), c=random_norm(rng, n),
                            k_mant=rng.randrange(1 << (F.const_bits - 1), 1 << F.const_bits),
                            k_exp=rng.choice([rng.randrange(-48, -20), rng.randrange(-80, 40)]))


def ref_elementwise(op, y, a, g, fmt=F):
    """The lines of sigmoid, silu, mlgru, glu and IntegerModel.step that each op stands for
    (products in Python integers: two x values of a wide format exceed int64)."""
    def sat(v):
        return min(fmt.x_max, max(fmt.x_min, int(v)))
    sig = int(ref.sigmoid(np.array([y], dtype=np.int64), fmt)[0])
    silu = int(ref.silu(np.array([y], dtype=np.int64), fmt)[0])
    y, a, g = int(y), int(a), int(g)
    one = 1 << fmt.gate_frac
    if op == ElementwiseOp.SIGMOID:
        return sig
    if op == ElementwiseOp.SILU:
        return silu
    if op == ElementwiseOp.FORGET:                      # mlgru: f = lb + ...
        return g + ref.rshift_round((one - g) * sig, fmt.gate_frac)
    if op == ElementwiseOp.RECUR:                       # mlgru: c = ...; h = ...
        c = ref.rshift_round(silu * (one - g), fmt.gate_frac)
        return sat(ref.rshift_round(g * a, fmt.gate_frac) + c)
    if op == ElementwiseOp.SILU_MUL:                    # mlgru: p = ...; glu: v = ...
        return sat(ref.rshift_round(a * silu, fmt.x_frac))
    return sat(y + a)                                   # step: x = saturate(x + o)


def x_values(rng, n):
    k, step = W.sig_in_log2, 1 << W.sig_frac_bits
    vals = [W.x_min, W.x_max, 0, 1, -1, 1 << k, (1 << k) - 1, -(1 << k), -(1 << k) - 1, step, -step]
    while len(vals) < n:
        kind = rng.randrange(3)
        if kind == 0:
            vals.append(rng.randrange(-(1 << k) - step, (1 << k) + step))
        elif kind == 1:
            vals.append(rng.randrange(W.x_min, W.x_max + 1))
        else:
            vals.append(rng.choice([1, -1]) * rng.randrange(1 << rng.randrange(W.x_bits)))
    return [min(W.x_max, max(W.x_min, v)) for v in vals]


# -- tests ----------------------------------------------------------------------------------

class BitLinearFlow:
    """One or more BitLinears through BitLinearFront -> ScalarUnit, q -> T @ q (reference) ->
    OutputScale; ``check`` compares y and q with ref.bitlinear. Jobs share a MAX pass the way
    i_proj, f_proj and g_proj share x."""

    def __init__(self, dut, rng, jobs, idle=0.3, stall=0.3):
        self.jobs = jobs
        self.flat = flat = [(v, layer) for v, layers in jobs for layer in layers]
        self.front_in = Source(dut, "front__i", front_input_layout(W), rng, idle)
        self.scalar_in = Source(dut, "scalar__i", stats_layout(W), rng, idle)
        self.out_in = Source(dut, "outscale__i", acc_layout(W), rng, idle)
        self.stats = Sink(dut, "front__stats", stats_layout(W), rng, stall, self._on_stats)
        self.q_sink = Sink(dut, "front__q", W.act, rng, stall, lambda q: self._feed())
        self.scale_sink = Sink(dut, "scalar__o", scale_layout(W), rng, stall, lambda s: self._feed())
        self.y_sink = Sink(dut, "outscale__o", value_layout(W), rng, stall)
        self.ports = [self.front_in, self.scalar_in, self.out_in, self.stats, self.q_sink,
                      self.scale_sink, self.y_sink]
        self.fed = 0
        self.q_start = np.cumsum([0] + [len(v) for v, _ in flat])
        self.rows = sum(layer.trits.shape[0] for _, layer in flat)
        self.cycles = 8 * int(self.q_start[-1]) * 3 + 200 * len(flat) + 10 * self.rows
        for v, layers in jobs:
            for k, x in enumerate(v):
                self.front_in.push({"op": FrontOp.MAX, "last": int(k == len(v) - 1), "v": int(x), "a": 0, "c": 0})
            for layer in layers:
                for op in (FrontOp.STATS, FrontOp.QUANT):
                    for k, x in enumerate(v):
                        self.front_in.push({"op": op, "last": int(k == len(v) - 1), "v": int(x),
                                            "a": int(layer.a[k]), "c": int(layer.c[k])})

    def _on_stats(self, s):
        layer = self.flat[len(self.stats.items) - 1][1]
        self.scalar_in.push({"m": int(s.m), "sumsq": int(s.sumsq)},
                            scalar__k_mant=(W.const_bits, layer.k_mant),
                            scalar__k_exp=(K_EXP_BITS, layer.k_exp))

    def _feed(self):
        # a job's accumulators go in once its q vector and its scale have both come out
        while (self.fed < len(self.flat) and len(self.scale_sink.items) > self.fed
               and len(self.q_sink.items) >= self.q_start[self.fed + 1]):
            v, layer = self.flat[self.fed]
            q = np.array(self.q_sink.items[self.q_start[self.fed]:self.q_start[self.fed + 1]], dtype=np.int64)
            acc = ref.matvec(layer.trits, q)
            sc = self.scale_sink.items[self.fed]
            for k, a in enumerate(acc):
                self.out_in.push({"acc": int(a), "last": int(k == len(acc) - 1)},
                                 outscale__scale=(scale_layout(W), {"qt": int(sc.qt), "shift": int(sc.shift)}))
            self.fed += 1

    def done(self):
        return len(self.y_sink.items) == self.rows

    def check(self):
        k = 0
        for j, (v, layer) in enumerate(self.flat):
            trace = {}
            want = ref.bitlinear(v, layer, trace=trace)
            rows = layer.trits.shape[0]
            got = [(int(y.value), int(y.last)) for y in self.y_sink.items[k:k + rows]]
            assert got == [(int(x), int(r == rows - 1)) for r, x in enumerate(want)], f"BitLinear {j}: y"
            if "q" in trace:
                q = self.q_sink.items[self.q_start[j]:self.q_start[j + 1]]
                assert q == [int(x) for x in trace["q"]], f"BitLinear {j}: q"
            k += rows


@cocotb.test()
async def bitlinear_end_to_end(dut):
    """BitLinears of every input magnitude, with random stalls on every stream."""
    rng = random.Random(SEED)
    await start(dut)
    jobs = []
    for bits in (0, 1, 2, 15, 16, 17, 24, 31, 32):
        n = rng.choice([1, 3, 16, 40])
        jobs.append((random_vector(rng, n, bits), [random_bitlinear(rng, n, rng.choice([1, 5, 12]))
                                                   for _ in range(rng.choice([1, 3]))]))
    n = 24
    jobs.append((np.full(n, W.x_min), [random_bitlinear(rng, n, 4)]))
    jobs.append((np.full(n, W.x_max), [random_bitlinear(rng, n, 4)]))
    flow = BitLinearFlow(dut, rng, jobs)
    await run(dut, flow.ports, flow.done, flow.cycles)
    flow.check()
    dut._log.info(f"{len(flow.flat)} BitLinears, {flow.rows} outputs bit-exact")


@cocotb.test()
async def long_vectors(dut):
    """A max_features BitLinear and a max_length argmax at once (shorter unless VECTOR_FULL)."""
    rng = random.Random(SEED + 6)
    await start(dut)
    n = F.max_features if FULL else 300
    flow = BitLinearFlow(dut, rng, [(random_vector(rng, n, W.x_bits), [random_bitlinear(rng, n, 3)])],
                         idle=0.02, stall=0.02)
    length = ARGMAX_MAX if FULL else 1000
    vec = [rng.randrange(W.x_min, 1 << 20) for _ in range(length)]
    vec[length - 2] = vec[length - 1] = 1 << 21
    src = Source(dut, "argmax__i", value_layout(W), rng, 0.0)
    sink = Sink(dut, "argmax__o", argmax_layout(W, ARGMAX_MAX), rng, 0.0)
    for k, x in enumerate(vec):
        src.push({"value": x, "last": int(k == length - 1)})
    await run(dut, flow.ports + [src, sink], lambda: flow.done() and sink.items, flow.cycles + 2 * length)
    flow.check()
    assert (int(sink.items[0].index), int(sink.items[0].value)) == (length - 2, 1 << 21)


@cocotb.test()
async def elementwise_ops(dut):
    rng = random.Random(SEED + 1)
    await start(dut)
    layout = elementwise_input_layout(W)
    src = Source(dut, "ew__i", layout, rng)
    sink = Sink(dut, "ew__o", value_layout(W), rng)
    one, half_g, half_x = W.gate_one, 1 << (F.gate_frac - 1), 1 << (F.x_frac - 1)
    items = []
    for op in ElementwiseOp:
        for y, a in zip(x_values(rng, 150), reversed(x_values(rng, 150))):
            g = rng.choice([0, one, one - 1, half_g, rng.randrange(one + 1)])
            if op == ElementwiseOp.SILU_MUL and rng.random() < 0.3:
                a = (rng.randrange(-99, 100) | 1) * half_x       # rounding ties
            items.append({"op": op, "y": y, "a": a, "g": g, "last": int(rng.random() < 0.1)})
    rng.shuffle(items)
    for it in items:
        src.push(it)
    await run(dut, [src, sink], lambda: len(sink.items) == len(items), 10 * len(items))
    for it, got in zip(items, sink.items):
        want = ref_elementwise(it["op"], it["y"], it["a"], it["g"])
        assert (int(got.value), int(got.last)) == (want, it["last"]), f"{it}: got {int(got.value)}, want {want}"


@cocotb.test()
async def scalar_unit(dut):
    rng = random.Random(SEED + 2)
    await start(dut)
    src = Source(dut, "scalar__i", stats_layout(W), rng)
    sink = Sink(dut, "scalar__o", scale_layout(W), rng, 0.5)
    s_max, k_max = (1 << W.sumsq_bits) - 1, (1 << F.const_bits) - 1
    cases = [(0, 0, 1 << 15, 0), (1, 1, 1, 0), (W.z_mag_max, s_max, k_max, -(1 << 31)),
             (1, s_max, 1, (1 << 31) - 1), (7, 0, 40000, 3)]
    for _ in range(60):
        cases.append((rng.randrange(1 << rng.randrange(W.m_bits + 1)),
                      rng.randrange(1 << rng.randrange(W.sumsq_bits + 1)),
                      rng.randrange(1 << F.const_bits), rng.randrange(-70, 30)))
    for m, s, km, ke in cases:
        src.push({"m": m, "sumsq": s}, scalar__k_mant=(W.const_bits, km), scalar__k_exp=(K_EXP_BITS, ke))
    await run(dut, [src, sink], lambda: len(sink.items) == len(cases), 100 * len(cases))
    for (m, s, km, ke), got in zip(cases, sink.items):
        r = ref.isqrt(s)
        if m == 0 or r == 0 or km == 0:
            assert int(got.qt) == 0
            continue
        qt, t = ref.scale_mantissa(km * m, r)
        assert (int(got.qt), int(got.shift)) == (qt, min(W.shift_max, max(W.shift_min, t - ke))), (m, s, km, ke)


@cocotb.test()
async def output_scale(dut):
    rng = random.Random(SEED + 3)
    await start(dut)
    src = Source(dut, "outscale__i", acc_layout(W), rng)
    sink = Sink(dut, "outscale__o", value_layout(W), rng)
    sh_lo, sh_hi = -(1 << (W.shift.width - 1)), (1 << (W.shift.width - 1)) - 1
    cases = []
    for _ in range(400):
        acc = rng.choice([-W.acc_mag_max, W.acc_mag_max - 1, 0, rng.randrange(-W.acc_mag_max, W.acc_mag_max),
                          rng.randrange(-300, 300)])
        qt = rng.choice([0, (1 << W.scale_bits) - 1, rng.randrange(1 << (W.scale_bits - 2), 1 << W.scale_bits)])
        shift = rng.choice([sh_lo, sh_hi, 0, -1, 1, rng.randrange(sh_lo, sh_hi + 1), rng.randrange(0, 40)])
        cases.append((acc, qt, shift))
        src.push({"acc": acc, "last": acc & 1}, outscale__scale=(scale_layout(W), {"qt": qt, "shift": shift}))
    await run(dut, [src, sink], lambda: len(sink.items) == len(cases), 10 * len(cases))
    for (acc, qt, shift), got in zip(cases, sink.items):
        want = min(F.x_max, max(F.x_min, int(ref.rshift_round(acc * qt, shift))))
        assert (int(got.value), int(got.last)) == (want, acc & 1), (acc, qt, shift)


@cocotb.test()
async def embed_scale(dut):
    rng = random.Random(SEED + 4)
    await start(dut)
    layout = data.StructLayout({"q": W.act, "last": 1})
    src = Source(dut, "embed__i", layout, rng)
    sink = Sink(dut, "embed__o", value_layout(W), rng)
    smax = (1 << F.emb_scale_bits) - 1
    rows = []
    for scale in [0, 1, smax] + [rng.randrange(smax + 1) for _ in range(9)]:
        row = [W.act_min, W.act_max, 0] + [rng.randrange(W.act_min, W.act_max + 1) for _ in range(20)]
        rows.append((scale, row))
        for k, q in enumerate(row):
            src.push({"q": q, "last": int(k == len(row) - 1)}, embed__scale=(F.emb_scale_bits, scale))
    total = sum(len(r) for _, r in rows)
    await run(dut, [src, sink], lambda: len(sink.items) == total, 10 * total)
    k = 0
    for scale, row in rows:
        want = ref.rshift_round(np.array(row, dtype=np.int64) * scale, F.emb_scale_frac - F.x_frac)
        got = [int(x.value) for x in sink.items[k:k + len(row)]]
        assert got == [int(x) for x in want], scale
        k += len(row)


@cocotb.test()
async def argmax(dut):
    rng = random.Random(SEED + 5)
    await start(dut)
    src = Source(dut, "argmax__i", value_layout(W), rng)
    sink = Sink(dut, "argmax__o", argmax_layout(W, ARGMAX_MAX), rng, 0.5)
    vectors = [[3], [W.x_min] * 4, [1, 5, 5, 2], [W.x_max, W.x_min, W.x_max]]
    for _ in range(10):
        pool = [rng.randrange(W.x_min, W.x_max + 1) for _ in range(3)]
        vectors.append([rng.choice(pool) for _ in range(rng.choice([2, 9, 50]))])
    for vec in vectors:
        for k, x in enumerate(vec):
            src.push({"value": x, "last": int(k == len(vec) - 1)})
    await run(dut, [src, sink], lambda: len(sink.items) == len(vectors), 4 * sum(map(len, vectors)) + 100)
    for vec, got in zip(vectors, sink.items):
        assert (int(got.index), int(got.value)) == (ref.IntegerModel.argmax(np.array(vec)), max(vec))
