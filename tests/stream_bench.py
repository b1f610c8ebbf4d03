"""Stream testbench helpers for Amaranth-simulator tests of stream components.

``send`` offers items with random idle cycles, ``receive`` takes them under random
back-pressure and checks the stream rules (an offered payload stays offered, unchanged, until
taken), ``simulate`` runs testbenches with a watchdog.
"""

from __future__ import annotations

from amaranth.sim import Simulator

CLOCK = 1e-8


def simulate(dut, *benches, background=(), max_cycles: int):
    """Run testbenches to completion; fail if they have not finished after max_cycles."""
    sim = Simulator(dut)
    sim.add_clock(CLOCK)
    for bench in benches:
        sim.add_testbench(bench)
    for bench in background:
        sim.add_testbench(bench, background=True)

    async def watchdog(ctx):
        await ctx.delay(max_cycles * CLOCK)
        raise AssertionError(f"testbenches still running after {max_cycles} cycles")
    sim.add_testbench(watchdog, background=True)
    sim.run()


def as_int(payload) -> int:
    """A sampled payload (a plain value or a data.Const view) as an integer."""
    return payload.as_value().value if hasattr(payload, "as_value") else payload


async def send(ctx, port, items, rng, idle=0.3):
    """Offer items on a stream, idling before each with probability ``idle``; an item is what
    the payload can be set to (a struct payload takes a mapping, or an integer of its bits)."""
    bits = port.payload.as_value() if hasattr(port.payload, "as_value") else port.payload
    for item in items:
        while rng.random() < idle:
            await ctx.tick()
        ctx.set(bits if isinstance(item, int) else port.payload, item)
        ctx.set(port.valid, 1)
        await ctx.tick().until(port.ready)
        ctx.set(port.valid, 0)


async def receive(ctx, port, n, rng, stall=0.3, convert=None):
    """Take n items from a stream with random back-pressure (probability ``stall`` per cycle),
    checking the stream rules; items are ``convert(payload)`` (default: the payload as sampled)."""
    out = []
    pending = None
    while len(out) < n:
        ready = rng.random() >= stall
        ctx.set(port.ready, ready)
        _, _, valid, payload = await ctx.tick().sample(port.valid, port.payload)
        raw = as_int(payload)
        if pending is not None:
            assert valid, "valid dropped while the payload was not yet taken"
            assert raw == pending, "payload changed while valid and not ready"
        pending = raw if (valid and not ready) else None
        if valid and ready:
            out.append(convert(payload) if convert else payload)
    ctx.set(port.ready, 0)
    return out


def one_item_latency(dut, payload, ports=(), max_cycles: int = 500) -> int:
    """Cycles from ``dut.i`` accepting one item (``payload``, with ``ports``: (name, value) pairs set
    on the component first) to its result on ``dut.o``, the output always ready."""
    seen = {}

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.payload, payload)
        for port, value in ports:
            ctx.set(getattr(dut, port), value)
        ctx.set(dut.i.valid, 1)
        await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)
        cycles = 0
        while True:
            cycles += 1
            _, _, valid = await ctx.tick().sample(dut.o.valid)
            if valid:
                break
        seen["latency"] = cycles - 1

    simulate(dut, bench, max_cycles=max_cycles)
    return seen["latency"]
