"""The engine's units on their own (Amaranth's simulator): the q packer, the matrix issuer and the
weight-response router. The whole engine is tested against the integer model in test_engine.py."""

from __future__ import annotations

import random

import pytest

from mmfree_fpga.config import FORMATS
from mmfree_fpga.hw.engine_common import COMPACT, FULL, JOBS, Tag
from mmfree_fpga.hw.engine_fetch import ResponseRouter
from mmfree_fpga.hw.engine_front import MatrixIssuer, QPacker, SkidBuffer
from mmfree_fpga.hw.matvec import TernaryMatVec
from mmfree_fpga.hw.vector_common import vector_widths
from stream_bench import as_int, receive, send, simulate

W = vector_widths(FORMATS)


def pack(values, bits):
    return sum((v & ((1 << bits) - 1)) << (bits * k) for k, v in enumerate(values))


@pytest.mark.parametrize("variant", [FULL, COMPACT], ids=lambda v: v.name)
@pytest.mark.parametrize("lanes", [8, 16])
def test_qpacker_packs_lanes_wide_in_order(variant, lanes):
    """q values, several jobs' worth, come out ``lanes`` to a word, first value lowest, whatever
    the back-pressure on either side (the FIFO holds two inputs of max_in)."""
    rng = random.Random(lanes)
    dut = QPacker(act_bits=W.act_bits, lanes=lanes, max_in=4 * lanes, variant=variant)
    lo, hi = -(1 << (W.act_bits - 1)), (1 << (W.act_bits - 1)) - 1
    qs = [rng.randint(lo, hi) for _ in range(lanes * 11)]
    got = []

    async def source(ctx):
        await send(ctx, dut.q, qs, rng)

    async def sink(ctx):
        got.extend(await receive(ctx, dut.act, len(qs) // lanes, rng, stall=0.5, convert=as_int))
    simulate(dut, source, sink, max_cycles=4000)
    assert got == [pack(qs[k:k + lanes], W.act_bits) for k in range(0, len(qs), lanes)]


@pytest.mark.parametrize("idle,stall", [(0.3, 0.5), (0.0, 0.0), (0.0, 0.7)])
def test_skid_buffer_keeps_order_and_cuts_ready(idle, stall):
    """Every item comes out once, in order, under back-pressure on either side; ``i.ready`` does
    not follow ``o.ready`` within a cycle (it is a register); with neither side stalling, one item
    a cycle (no bubble, no added latency)."""
    rng = random.Random(int(10 * idle + 100 * stall))
    dut = SkidBuffer(16)
    items = [rng.randrange(1 << 16) for _ in range(300)]
    got, cycles = [], []

    async def source(ctx):
        await send(ctx, dut.i, items, rng, idle=idle)

    async def sink(ctx):
        got.extend(await receive(ctx, dut.o, len(items), rng, stall=stall, convert=as_int))

    async def ready_is_registered(ctx):
        n = 0
        while True:
            before = ctx.get(dut.i.ready)
            ctx.set(dut.o.ready, not ctx.get(dut.o.ready))
            assert ctx.get(dut.i.ready) == before
            ctx.set(dut.o.ready, not ctx.get(dut.o.ready))
            await ctx.tick()
            n += 1
            cycles[:] = [n]
    simulate(dut, source, sink, background=[ready_is_registered], max_cycles=3000)
    assert got == items
    if idle == stall == 0:
        assert cycles[0] <= len(items) + 2


def test_matrix_issuer_one_command_per_job():
    """K = 6 L + 1 commands with each job's rows and columns, then nothing until the next start."""
    max_d, max_I, max_L, max_V = 64, 128, 3, 200
    mv = TernaryMatVec(lanes=16, max_rows=max(2 * max_I, max_V, max_d), max_cols=max(max_d, max_I))
    dut = MatrixIssuer(mv.cmd_layout, max_d=max_d, max_I=max_I, max_L=max_L, max_V=max_V)
    d, I, L, V = 32, 96, 2, 150
    rows = {"f_proj": d, "i_proj": d, "g_proj": d, "o_proj": d, "gate_proj": 2 * I, "down_proj": d, "lm_head": V}
    cols = {"down_proj": I}
    jobs = [j for _ in range(L) for j in JOBS[:6]] + ["lm_head"]
    rng = random.Random(1)

    async def bench(ctx):
        for field, value in (("d", d), ("I", I), ("V", V), ("L", L), ("n_jobs", 6 * L + 1), ("packing", 1)):
            ctx.set(getattr(dut.geom, field), value)
        for _ in range(2):          # two tokens: start resets the job counter
            ctx.set(dut.start, 1)
            ctx.set(dut.running, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            got = await receive(ctx, dut.cmd, len(jobs), rng, convert=as_int)
            layout = mv.cmd_layout
            got = [layout.from_bits(g) for g in got]
            assert [(int(c.rows), int(c.cols), int(c.load), int(c.packing)) for c in got] == \
                   [(rows[j], cols.get(j, d), 1, 1) for j in jobs]
            for _ in range(5):
                await ctx.tick()
                assert not ctx.get(dut.cmd.valid)
    simulate(dut, bench, max_cycles=2000)


@pytest.mark.parametrize("variant", [FULL, COMPACT], ids=lambda v: v.name)
@pytest.mark.parametrize("beat_bytes", [2, 4])
def test_response_router_routes_by_tag(variant, beat_bytes):
    """Beats of in-order responses reach their destinations: the embedding scale and row (one
    signed byte per element, ``last`` on element d - 1), k into its slot (``norms_arrived``
    counts), norm words into their slot's address, trits out unchanged and in order."""
    wb = beat_bytes
    max_d, max_I, max_L, max_V = 32, 64, 2, 64
    d = 16
    dut = ResponseRouter(W, beat_bytes=wb, max_d=max_d, max_I=max_I, max_L=max_L, max_V=max_V,
                         trit_fifo_depth=8, variant=variant)
    rng = random.Random(wb)
    nw = max(max_d, max_I) // (wb // 2)

    def beats(nbytes):
        blob = bytes(rng.randrange(256) for _ in range(nbytes))
        return blob, [int.from_bytes(blob[k:k + wb], "little") for k in range(0, nbytes, wb)]
    scale_blob, scale_beats = beats(max(4, wb))
    row_blob, row_beats = beats(d)
    k0_blob, k0_beats = beats(8)
    trit_blob, trit_beats = beats(6 * wb)
    a_blob, a_beats = beats(2 * wb)
    k2_blob, k2_beats = beats(8)
    requests = [(Tag.EMBS, 0, scale_beats), (Tag.EMBR, 0, row_beats), (Tag.K, 0, k0_beats),
                (Tag.TRITS, 0, trit_beats), (Tag.A, 1, a_beats), (Tag.K, 2, k2_beats)]
    writes = []

    async def tags(ctx):
        ctx.set(dut.geom.d, d)
        for kind, slot, bs in requests:
            ctx.set(dut.tags.payload, {"kind": kind, "slot": slot, "count": len(bs), "boff": 0,
                                       "single": len(bs) == 1})
            ctx.set(dut.tags.valid, 1)
            await ctx.tick().until(dut.tags.ready)
        ctx.set(dut.tags.valid, 0)

    async def responses(ctx):
        await send(ctx, dut.resp, [b for _, _, bs in requests for b in bs], rng)

    async def trits(ctx):
        assert await receive(ctx, dut.trits, len(trit_beats), rng, convert=as_int) == trit_beats

    async def embedding(ctx):
        got = await receive(ctx, dut.emb, d, rng, convert=as_int)
        q_bits = W.act_bits
        elems = [(g & ((1 << q_bits) - 1), g >> q_bits) for g in got]
        signed_q = [q - (1 << q_bits) if q >> (q_bits - 1) else q for q, _ in elems]
        assert signed_q == [b - 256 if b > 127 else b for b in row_blob]
        assert [last for _, last in elems] == [0] * (d - 1) + [1]

    async def observe(ctx):
        async for _clk, _rst, en, addr, data in ctx.tick().sample(dut.a.en, dut.a.addr, dut.a.data):
            if en:
                writes.append((addr, data.as_value().value))

    async def finish(ctx):
        await ctx.tick().until(dut.norms_arrived == 2)
        for _ in range(3):
            await ctx.tick()
        assert ctx.get(dut.emb_scale) == int.from_bytes(scale_blob[:4], "little")
        assert ctx.get(dut.k[0]) == int.from_bytes(k0_blob, "little")
        assert ctx.get(dut.k[2]) == int.from_bytes(k2_blob, "little")
        assert writes == [(1 * nw + k, b) for k, b in enumerate(a_beats)]
    simulate(dut, tags, responses, trits, embedding, finish, background=(observe,), max_cycles=3000)
