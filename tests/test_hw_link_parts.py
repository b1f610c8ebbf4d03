"""The Link's parts on their own (hw/link_timers.py, hw/link_crc.py, hw/link_ring.py): both forms
of each behave alike, cycle for cycle where the Link relies on it."""

from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from mmfree_fpga.hw.link_crc import ByteCrcs, SerialCrcs
from mmfree_fpga.hw.link_ring import ReceiveRing
from mmfree_fpga.hw.link_timers import (CountingBootId, CountingIdleTimer, FixedBootId, LfsrBootId, LfsrIdleTimer,
                                        lfsr_jump, lfsr_step)
from mmfree_fpga.protocol import crc8_header, crc16_frame, crc32_image


def run(dut, body, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-6)
    sim.add_testbench(body)
    sim.run()


@pytest.mark.parametrize("timer", [CountingIdleTimer, LfsrIdleTimer])
@pytest.mark.parametrize("cycles", [1, 2, 7, 300])
def test_idle_timer_expires_exactly_after_cycles(timer, cycles):
    """expired rises exactly ``cycles`` clock edges after the last restart (and after reset),
    and stays up until the next restart."""
    dut = timer(cycles)

    async def body(ctx):
        for gap in (cycles + 5, 3, cycles + 2):
            for k in range(gap):
                assert ctx.get(dut.expired) == (k >= cycles), (gap, k)
                await ctx.tick()
            ctx.set(dut.restart, 1)
            await ctx.tick()
            ctx.set(dut.restart, 0)

    run(dut, body)


def test_idle_timer_rejects_zero():
    with pytest.raises(ValueError):
        CountingIdleTimer(0)


@pytest.mark.parametrize("form", [CountingBootId, LfsrBootId])
def test_boot_id_depends_on_the_first_byte_only(form):
    """A counted boot id is fixed by the cycle of the first byte (the count, or the LFSR state
    after that many steps) and differs for a different cycle."""
    ids = []
    for wait in (5, 9):
        dut = form()

        async def body(ctx):
            await ctx.tick().repeat(wait)
            ctx.set(dut.byte, 1)
            await ctx.tick()
            ctx.set(dut.byte, 0)
            first = ctx.get(dut.boot_id)
            await ctx.tick().repeat(10)
            ctx.set(dut.byte, 1)
            await ctx.tick()
            assert ctx.get(dut.boot_id) == first
            ids.append(first)

        run(dut, body)
    if form is CountingBootId:
        assert ids == [5, 9]
    else:
        assert ids == [lfsr_jump(1, 32, 5), lfsr_jump(1, 32, 9)]
    assert lfsr_jump(1, 32, 2) == lfsr_step(lfsr_step(1, 32), 32)


def test_fixed_boot_id():
    dut = FixedBootId(0x1_2345_6789)

    async def body(ctx):
        assert ctx.get(dut.boot_id) == 0x2345_6789

    run(dut, body, clock=False)


@pytest.mark.parametrize("form", [ByteCrcs, SerialCrcs])
def test_crcs_match_the_protocol(form):
    """Header and frame bytes, then image bytes, given whenever ``busy`` is low: the three CRCs
    are the protocol's, and the frame CRC's residue is detected after its trailer."""
    rng = random.Random(4)
    header = bytes(rng.randrange(256) for _ in range(4))
    payload = bytes(rng.randrange(256) for _ in range(9))
    image = bytes(rng.randrange(256) for _ in range(13))
    dut = form()

    async def give(ctx, byte, **flags):
        while ctx.get(dut.busy) or not ctx.get(dut.settled):
            await ctx.tick()
        ctx.set(dut.data, byte)
        for name, value in flags.items():
            ctx.set(getattr(dut, name), value)
        await ctx.tick()
        for name in flags:
            ctx.set(getattr(dut, name), 0)

    async def settle(ctx):
        while ctx.get(dut.busy) or not ctx.get(dut.settled):
            await ctx.tick()

    async def body(ctx):
        ctx.set(dut.start, 1)
        ctx.set(dut.image_start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.image_start, 0)
        for byte in header:
            await give(ctx, byte, header=1, frame=1)
        await settle(ctx)
        assert ctx.get(dut.header_crc) == crc8_header(header)
        hcrc = crc8_header(header)
        await give(ctx, hcrc, frame=1)
        for byte in payload:
            await give(ctx, byte, frame=1)
        await settle(ctx)
        fcrc = crc16_frame(header + bytes([hcrc]) + payload)
        assert ctx.get(dut.frame_crc) == fcrc and not ctx.get(dut.frame_match)
        for byte in fcrc.to_bytes(2, "big"):
            await give(ctx, byte, frame=1)
        await settle(ctx)
        assert ctx.get(dut.frame_match)
        for byte in image:
            await give(ctx, byte, image=1)
        await settle(ctx)
        assert ctx.get(dut.image_crc) == crc32_image(image)

    run(dut, body)


def test_receive_ring_keeps_unread_bytes():
    """Bytes are written at wp until the ring is full (``ready``, a register, falls once fewer
    than two places are free behind ``keep``, so the byte taken meanwhile fills the last one);
    none is overwritten; a byte is read one cycle after its address is given."""
    depth = 8
    dut = ReceiveRing(depth)

    async def body(ctx):
        written = []
        for n in range(20):
            ctx.set(dut.incoming.valid, 1)
            ctx.set(dut.incoming.payload, 0x40 + n)
            ready = ctx.get(dut.incoming.ready)
            assert ctx.get(dut.wrote) == ready
            await ctx.tick()
            if ready:
                written.append(0x40 + n)
        ctx.set(dut.incoming.valid, 0)
        assert written == [0x40 + n for n in range(depth)] and ctx.get(dut.wp) == depth
        assert not ctx.get(dut.incoming.ready)
        for i, byte in enumerate(written):
            ctx.set(dut.addr, i)
            await ctx.tick()
            assert ctx.get(dut.data) == byte
        ctx.set(dut.keep, 4)                 # the first four bytes are read: room for four more
        await ctx.tick().repeat(2)
        assert ctx.get(dut.incoming.ready)

    run(dut, body)
