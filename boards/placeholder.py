"""The design the board flow builds until the engine exists: a framed echo with a CRC.

It has the engine's interface (a byte stream in, a byte stream out, see
:mod:`mmfree_fpga.boards.top`), so the whole board path (UART, clocking, reset, build,
report parsing, programming) is exercised by real hardware behaviour a host can check.
"""

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.crc import catalog
from amaranth.lib.wiring import In, Out

__all__ = ["FrameEcho", "frame_echo", "frame_echo_reply", "ECHO_CRC"]

# CRC-8/AUTOSAR (poly 0x2F), the header CRC of the host protocol
ECHO_CRC = catalog.CRC8_AUTOSAR


def frame_echo_reply(frame: bytes) -> bytes:
    """What :class:`FrameEcho` answers to ``frame`` = bytes([n]) + n payload bytes."""
    if not frame or len(frame) != frame[0] + 1:
        raise ValueError("a frame is a length byte n followed by n bytes")
    return bytes(frame) + bytes([ECHO_CRC().compute(frame)])


class FrameEcho(wiring.Component):
    """Placeholder design: echoes length-prefixed frames and appends their CRC-8.

    A frame is a length byte ``n`` followed by ``n`` bytes; the reply is the frame itself
    followed by the CRC-8/AUTOSAR of the frame (length byte included). Latency one cycle,
    one byte per cycle.

    Members
    -------
    i_stream : In(stream.Signature(8))
    o_stream : Out(stream.Signature(8))
    """

    i_stream: In(stream.Signature(unsigned(8)))
    o_stream: Out(stream.Signature(unsigned(8)))

    def elaborate(self, platform):
        m = Module()
        m.submodules.crc = crc = ECHO_CRC(data_width=8).create()
        remaining = Signal(8)
        out_free = ~self.o_stream.valid | self.o_stream.ready
        take = self.i_stream.valid & self.i_stream.ready

        with m.If(self.o_stream.ready):
            m.d.sync += self.o_stream.valid.eq(0)
        with m.If(take):
            m.d.sync += [self.o_stream.payload.eq(self.i_stream.payload), self.o_stream.valid.eq(1)]
        m.d.comb += [crc.data.eq(self.i_stream.payload), crc.valid.eq(take)]

        with m.FSM():
            with m.State("LENGTH"):
                m.d.comb += [self.i_stream.ready.eq(out_free), crc.start.eq(1)]
                with m.If(take):
                    m.d.sync += remaining.eq(self.i_stream.payload)
                    with m.If(self.i_stream.payload == 0):
                        m.next = "CRC"
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += self.i_stream.ready.eq(out_free)
                with m.If(take):
                    m.d.sync += remaining.eq(remaining - 1)
                    with m.If(remaining == 1):
                        m.next = "CRC"
            with m.State("CRC"):
                with m.If(out_free):
                    m.d.sync += [self.o_stream.payload.eq(crc.crc), self.o_stream.valid.eq(1)]
                    m.next = "LENGTH"
        return m


def frame_echo(context) -> FrameEcho:
    """Design factory of the placeholder (takes the board's DesignContext, needs nothing of it)."""
    return FrameEcho()
