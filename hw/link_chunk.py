"""The Link's chunk forwarder: the ring addresses of a LOAD_CHUNK frame's data bytes.

A LOAD_CHUNK's data stays in the receive ring until the frame has checked out; then the Link
reads it from there, one byte after another, for ``engine.load``. This part holds the address
of the byte offered and knows which one is the last. Until a chunk begins it follows the frame
being parsed (its first data byte lies ``HEADER_LEN + LOAD_CHUNK_HEADER.size`` bytes after the
SYNC), so the address is a register that is settled when forwarding begins.

Two forms: :class:`CountedChunk` (the default form) counts the data bytes from LEN;
:class:`BoundedChunk` (the small form) compares the address with the ring address of the last
data byte, which it takes from the parse position standing after the frame (no counter).

Members (both forms)
--------------------
frame_start : In(ring_bits + 1)
    The ring position of the frame's SYNC (the parser's ``sp``).
begin : In(1)
    Forwarding begins (the frame checked out); ``active`` from the next cycle on.
step : In(1)
    The byte at ``addr`` was taken; ``addr`` moves on (``active`` ends after the last byte).
active : Out(1)
    A chunk is being forwarded: the Link reads the ring at ``addr``.
addr : Out(ring_bits)
    The ring address of the data byte offered.
last : Out(1)
    The byte at ``addr`` is the chunk's last.

Default form only: ``length : In(max(8, max_payload.bit_length()))``, the frame's LEN (at least
``LOAD_CHUNK_HEADER.size + 1`` when a chunk begins). Small form only: ``frame_end :
In(ring_bits + 1)``, the parse position, which stands after the frame's trailer from the
frame's check until the chunk has been forwarded. With ``residual=True`` (a Link with state
slots): ``residual : In(1)``, the frame is a WRITE_RESIDUAL, whose values are forwarded the same
way from the byte after its 7-byte header.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.protocol import HEADER_LEN, LOAD_CHUNK_HEADER, TRAILER_LEN, WRITE_RESIDUAL_HEADER

__all__ = ["CountedChunk", "BoundedChunk"]


class _ChunkForwarder(wiring.Component):
    """Parameters: ``ring_depth`` (a power of two) and ``max_payload`` (the longest frame)."""

    def __init__(self, *, ring_depth: int, max_payload: int, residual: bool = False):
        self.ring_bits = (ring_depth - 1).bit_length()
        self.max_payload = max_payload
        self.residual_too = residual
        super().__init__({
            "frame_start": In(self.ring_bits + 1), "begin": In(1), "step": In(1),
            "active": Out(1), "addr": Out(self.ring_bits), "last": Out(1),
            **self._form_members(),
            **({"residual": In(1)} if residual else {}),
        })

    def _header(self):
        """Bytes of the request's header before its data: LOAD_CHUNK's, or (``residual``)
        WRITE_RESIDUAL's."""
        if self.residual_too:
            return Mux(self.residual, WRITE_RESIDUAL_HEADER.size, LOAD_CHUNK_HEADER.size)
        return LOAD_CHUNK_HEADER.size

    def elaborate(self, platform):
        m = Module()
        with m.If(self.begin):
            m.d.sync += self.active.eq(1)
        with m.Elif(self.step & self.last):
            m.d.sync += self.active.eq(0)
        with m.If(~self.active):
            # set up for a LOAD_CHUNK until one starts: its first data byte
            m.d.sync += self.addr.eq(self.frame_start + HEADER_LEN + self._header())
        with m.Elif(self.step):
            m.d.sync += self.addr.eq(self.addr + 1)
        self._bound(m)
        return m


class CountedChunk(_ChunkForwarder):
    """The default form: the data bytes still to forward, less one, counted from LEN."""

    def _form_members(self):
        return {"length": In(max(8, self.max_payload.bit_length()))}

    def _bound(self, m):
        left = Signal(range(HEADER_LEN + self.max_payload + TRAILER_LEN + 1))
        with m.If(~self.active):
            m.d.sync += left.eq(self.length - (self._header() + 1))
        with m.Elif(self.step):
            m.d.sync += left.eq(left - 1)
        m.d.comb += self.last.eq(left == 0)


class BoundedChunk(_ChunkForwarder):
    """The small form: the ring address of the last data byte, the one before the trailer,
    which ends at ``frame_end`` (registered: settled from the first byte on)."""

    def _form_members(self):
        return {"frame_end": In(self.ring_bits + 1)}

    def _bound(self, m):
        stop = Signal(self.ring_bits)
        m.d.sync += stop.eq(self.frame_end[:self.ring_bits] - (TRAILER_LEN + 1))
        m.d.comb += self.last.eq(self.addr == stop)
