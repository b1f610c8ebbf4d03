"""The Link's receive ring: incoming bytes wait here until the parser and the chunk forwarder
have read them.

:class:`ReceiveRing` ``(depth)`` (a power of two). Pointers count modulo ``2 * depth``, so a
full ring and an empty one differ.

Members
-------
incoming : In(stream.Signature(8))
    Bytes from the host. ``ready`` is a register: set while at least two places are free
    (behind ``keep``), so a byte taken in the cycle it is computed still leaves room for one
    in the next.
keep : In(ring_bits + 1)
    The oldest byte still needed (the start of the frame being parsed); bytes from it on are
    never overwritten.
wp : Out(ring_bits + 1)
    Where the next byte goes; a byte at ``p`` has arrived while ``p != wp`` (from ``keep`` on).
wrote : Out(1)
    A byte is taken from ``incoming`` in this cycle (``wp`` moves at the clock edge).
addr : In(ring_bits)
    The read address (drive it from a register: it starts the block RAM's read).
data : Out(8)
    The byte at the ``addr`` of the previous cycle (one cycle of latency). Never read where
    the same cycle writes: the reader keeps off ``wp``, so the RAM has no read-during-write
    logic (NO_RW_CHECK, hw/ram.py), which would put a multiplexer after its slow output.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .ram import NO_RW_CHECK, registered_read_port

__all__ = ["ReceiveRing"]


class ReceiveRing(wiring.Component):
    """A ring of ``depth`` bytes (module docstring)."""

    def __init__(self, depth: int):
        if depth < 2 or depth & (depth - 1):
            raise ValueError(f"depth must be a power of two, at least 2, got {depth}")
        self.depth = depth
        self.bits = (depth - 1).bit_length()
        super().__init__({
            "incoming": In(stream.Signature(8)),
            "keep": In(self.bits + 1), "wp": Out(self.bits + 1), "wrote": Out(1),
            "addr": In(self.bits), "data": Out(8),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.store = ring = Memory(shape=8, depth=self.depth, init=[], attrs=NO_RW_CHECK)
        wr = ring.write_port()
        rd = registered_read_port(m, ring)
        wp = Signal(self.bits + 1)
        rx_ready = Signal(init=1)
        m.d.sync += rx_ready.eq(wp - self.keep < self.depth - 1)
        m.d.comb += [
            self.incoming.ready.eq(rx_ready),
            wr.addr.eq(wp[:self.bits]), wr.data.eq(self.incoming.payload),
            wr.en.eq(self.incoming.valid & rx_ready), self.wrote.eq(wr.en), self.wp.eq(wp),
            rd.addr.eq(self.addr), self.data.eq(rd.data),
        ]
        with m.If(wr.en):
            m.d.sync += wp.eq(wp + 1)
        return m
