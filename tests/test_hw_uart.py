"""UART core (hw/uart.py) in the Amaranth simulator: divider, loopback, baud tolerance, errors."""

import random

import pytest
from amaranth.hdl import Fragment, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from mmfree_fpga.hw.uart import UARTReceiver, UARTTransmitter, baud_error, uart_divisor


# -- divider ----------------------------------------------------------------------------

@pytest.mark.parametrize("clk_mhz, divisor", [(12, 4), (24, 8), (48, 16), (60, 20), (75, 25)])
def test_3mbaud_is_exact_at_multiples_of_3mhz(clk_mhz, divisor):
    assert uart_divisor(clk_mhz * 1e6, 3_000_000) == divisor
    assert baud_error(clk_mhz * 1e6, 3_000_000, divisor) == 0


def test_divider_accepts_small_rounding_error():
    assert uart_divisor(50e6, 3_000_000) == 17          # -1.96 %
    assert uart_divisor(12e6, 115_200) == 104           # +0.16 %


@pytest.mark.parametrize("clk_hz, baud, words", [
    (40e6, 3_000_000, ["divisor 13", "+2.56 %", "limit 2.5 %"]),
    (10e6, 3_000_000, ["at least 4 clock cycles per bit", "at most 2500000"]),
    (0, 3_000_000, ["must be positive"]),
])
def test_divider_refuses_with_numbers(clk_hz, baud, words):
    with pytest.raises(ValueError) as e:
        uart_divisor(clk_hz, baud)
    for w in words:
        assert w in str(e.value)


def test_cores_take_baud_and_clock():
    tx, rx = UARTTransmitter(clk_freq=24e6, baud=3e6), UARTReceiver(clk_freq=24e6, baud=1e6)
    assert (tx.divisor, rx.divisor) == (8, 24)
    Fragment.get(tx, None), Fragment.get(rx, None)
    with pytest.raises(ValueError):
        UARTReceiver(clk_freq=40e6, baud=3e6)


# -- helpers ----------------------------------------------------------------------------

class Link(wiring.Component):
    """A transmitter at one baud rate wired to a receiver at another, on one clock."""

    def __init__(self, clk_freq, tx_baud, rx_baud):
        self.clk_freq = clk_freq
        self.tx = UARTTransmitter(clk_freq=clk_freq, baud=tx_baud)
        self.rx = UARTReceiver(clk_freq=clk_freq, baud=rx_baud)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx = self.tx
        m.submodules.rx = self.rx
        m.d.comb += self.rx.rx.eq(self.tx.tx)
        return m


async def send(ctx, s, byte):
    ctx.set(s.payload, byte)
    ctx.set(s.valid, 1)
    await ctx.tick().until(s.ready)
    ctx.set(s.valid, 0)


# Background testbenches wait with plain `await ctx.tick()`: a coroutine left suspended inside
# `.until()`/`.repeat()` when the simulation ends raises from its `finally` (Amaranth 0.5.10).

async def idle(ctx, cycles):
    for _ in range(cycles):
        await ctx.tick()


async def receive(ctx, s):
    ctx.set(s.ready, 1)
    while True:
        _, _, valid, payload = await ctx.tick().sample(s.valid, s.payload)
        if valid:
            break
    ctx.set(s.ready, 0)
    return payload


def observer(rx, counts, violations):
    """Background testbench: counts error pulses and checks the stream rule on ``rx.data``
    (payload holds and valid stays high while valid and not ready)."""
    async def observe(ctx):
        held = None
        async for _, _, valid, ready, payload, framing, overrun in ctx.tick().sample(
                rx.data.valid, rx.data.ready, rx.data.payload, rx.framing_error, rx.overrun):
            if held is not None and (not valid or payload != held):
                violations.append((valid, payload, held))
            held = payload if valid and not ready else None
            counts["framing"] += framing
            counts["overrun"] += overrun
    return observe


def run_link(link, data, *, tx_stall=0, rx_stall=0, seed=0):
    """Send ``data`` through the link with random stalls; returns (received, errors, violations)."""
    rng = random.Random(seed)
    received, violations = [], []
    counts = {"framing": 0, "overrun": 0}

    async def producer(ctx):
        for b in data:
            if tx_stall:
                await ctx.tick().repeat(rng.randrange(tx_stall + 1) or 1)
            await send(ctx, link.tx.data, b)

    async def consumer(ctx):
        local = random.Random(seed + 1)
        while len(received) < len(data):
            if rx_stall:
                await idle(ctx, local.randrange(rx_stall + 1))
            received.append(await receive(ctx, link.rx.data))

    sim = Simulator(link)
    sim.add_clock(1 / link.clk_freq)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(consumer, background=True)
    sim.add_testbench(observer(link.rx, counts, violations), background=True)
    # enough time for every frame with its stalls; a lost byte leaves `received` short
    cycles = len(data) * (11 * max(link.rx.divisor, link.tx.divisor) + tx_stall + rx_stall + 4) + 100
    sim.run_until(cycles / link.clk_freq)
    return received, counts, violations


# -- loopback ---------------------------------------------------------------------------

@pytest.mark.parametrize("tx_stall, rx_stall", [(0, 0), (30, 0), (0, 30), (25, 25)])
def test_loopback_random_bytes_with_stalls(tx_stall, rx_stall):
    rng = random.Random(tx_stall * 100 + rx_stall)
    data = [rng.randrange(256) for _ in range(48)] + [0x00, 0xFF, 0x55, 0xAA]
    link = Link(12e6, 3e6, 3e6)  # 4 clocks per bit
    received, counts, violations = run_link(link, data, tx_stall=tx_stall, rx_stall=rx_stall,
                                            seed=tx_stall + rx_stall)
    assert received == data
    assert counts == {"framing": 0, "overrun": 0}
    assert violations == []


def test_transmitter_waveform_and_back_to_back_rate():
    """Start bit, 8 data bits LSB first, stop bit; each bit exactly `divisor` cycles; no gap."""
    tx = UARTTransmitter(clk_freq=8e6, baud=1e6)
    d = tx.divisor
    frames = [0b1011_0010, 0x00, 0xFF]
    line = []

    async def producer(ctx):
        for b in frames:
            await send(ctx, tx.data, b)

    async def recorder(ctx):
        async for _, _, value in ctx.tick().sample(tx.tx):
            line.append(value)

    sim = Simulator(tx)
    sim.add_clock(1 / 8e6)
    sim.add_testbench(producer)
    sim.add_testbench(recorder, background=True)

    async def wait(ctx):
        await ctx.tick().repeat(len(frames) * 10 * d + 3 * d)
    sim.add_testbench(wait)
    sim.run()

    start = line.index(0)
    expected = []
    for b in frames:
        bits = [0] + [(b >> i) & 1 for i in range(8)] + [1]
        expected += [bit for bit in bits for _ in range(d)]
    assert line[start:start + len(expected)] == expected
    assert all(v == 1 for v in line[:start]) and all(v == 1 for v in line[start + len(expected):])


# -- baud-rate tolerance ------------------------------------------------------------------

@pytest.mark.parametrize("error", [-0.025, 0.025])
def test_receiver_tolerates_baud_error(error):
    """The far end may be off by as much as the divider itself allows (2.5 %)."""
    rng = random.Random(7)
    data = [0x00, 0xFF, 0x80, 0x01] + [rng.randrange(256) for _ in range(4)]
    link = Link(4e6, 100_000 * (1 + error), 100_000)  # 40 clocks per bit at the receiver
    assert abs(baud_error(4e6, 100_000, link.tx.divisor) - error) < 0.001
    received, counts, _ = run_link(link, data)
    assert received == data
    assert counts == {"framing": 0, "overrun": 0}


@pytest.mark.parametrize("error", [-0.10, 0.10])
def test_receiver_fails_far_outside_tolerance(error):
    """Sanity check of the tolerance test: a 10 % error does corrupt the bytes."""
    data = [0x00, 0xFF, 0x80, 0x01, 0x55, 0xAA]
    link = Link(4e6, 100_000 * (1 + error), 100_000)
    received, counts, _ = run_link(link, data)
    assert received != data or counts["framing"] > 0


# -- framing errors, breaks, glitches, overrun -------------------------------------------------

def bitbang_frame(byte, stop=1):
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


def run_rx_waveform(levels_and_lengths, *, divisor=16, ready=True, extra=64):
    """Drive rx with (level, cycles) pieces; returns (bytes, pulse counts, final (valid, payload))."""
    rx = UARTReceiver(clk_freq=16e6, baud=16e6 / divisor)
    got, counts, final = [], {"framing": 0, "overrun": 0}, []

    async def driver(ctx):
        for level, cycles in levels_and_lengths:
            ctx.set(rx.rx, level)
            await ctx.tick().repeat(cycles)
        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(extra)
        final.extend((ctx.get(rx.data.valid), ctx.get(rx.data.payload)))

    async def sink(ctx):
        while True:
            if ready:
                got.append(await receive(ctx, rx.data))
            else:
                await ctx.tick()

    sim = Simulator(rx)
    sim.add_clock(1 / 16e6)
    sim.add_testbench(driver)
    sim.add_testbench(sink, background=True)
    sim.add_testbench(observer(rx, counts, []), background=True)
    sim.run()
    return got, counts, tuple(final)


def frames(*byte_stop, divisor=16, gap=0):
    pieces = []
    for byte, stop in byte_stop:
        pieces += [(bit, divisor) for bit in bitbang_frame(byte, stop)]
        if gap:
            pieces.append((1, gap))
    return pieces


def test_framing_error_drops_the_byte_and_recovers():
    got, counts, _ = run_rx_waveform(frames((0x5A, 0), (0xC3, 1), gap=16))
    assert got == [0xC3]
    assert counts == {"framing": 1, "overrun": 0}


def test_break_gives_one_framing_error():
    got, counts, _ = run_rx_waveform([(1, 20), (0, 16 * 30), (1, 40)] + frames((0x42, 1)))
    assert got == [0x42]
    assert counts["framing"] == 1


def test_glitch_shorter_than_half_a_bit_is_ignored():
    got, counts, _ = run_rx_waveform([(1, 10), (0, 5), (1, 50)] + frames((0x99, 1)))
    assert got == [0x99]
    assert counts == {"framing": 0, "overrun": 0}


def test_overrun_keeps_the_first_byte():
    got, counts, final = run_rx_waveform(frames((0x11, 1), (0x22, 1), gap=4), ready=False)
    assert got == []
    assert counts == {"framing": 0, "overrun": 1}
    assert final == (1, 0x11)
