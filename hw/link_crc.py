"""The Link's three CRCs (header CRC-8, frame CRC-16, image CRC-32), in two forms.

One header CRC and one frame CRC serve both directions: a frame is parsed and a response sent
at different times. :class:`ByteCrcs` takes a byte per cycle (the default form);
:class:`SerialCrcs` shifts a byte into bit-serial CRCs one bit per cycle (the small form).
:func:`make_crcs` picks the form.

Members (both forms)
--------------------
data : In(8)
    The byte for the CRCs flagged by ``header``, ``frame``, ``image`` (in wire order; the
    image CRC's reflection is the component's business).
header, frame, image : In(1)
    ``data`` enters that CRC in this cycle (``header`` and ``frame`` together or alone;
    ``image`` never with them).
start : In(1)
    Restart the header and frame CRCs (a SYNC; it enters neither).
image_start : In(1)
    Restart the image CRC.
header_crc : Out(8), frame_crc : Out(16), frame_match : Out(1), image_crc : Out(32)
    The CRCs of the bytes taken (``frame_match``: the frame CRC's residue, a frame whose
    trailer checked out).
busy : Out(1)
    A byte is still being taken: the CRCs are not final; take no byte. Always 0 in the
    default form.
settled : Out(1)
    ``busy`` was 0 in the previous cycle too (a comparison with a CRC registered in the cycle
    before sees its final value). Always 1 in the default form.

Latency: the default form's CRCs hold a byte's result at the next clock edge; the small form's
eight cycles after the byte was given (``busy`` meanwhile), ``settled`` one cycle later.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.protocol import FRAME_CRC, HEADER_CRC, IMAGE_CRC

__all__ = ["ByteCrcs", "SerialCrcs", "make_crcs"]


class _Crcs(wiring.Component):
    data_width = 8

    def __init__(self):
        super().__init__({
            "data": In(8), "header": In(1), "frame": In(1), "image": In(1),
            "start": In(1), "image_start": In(1),
            "header_crc": Out(8), "frame_crc": Out(16), "frame_match": Out(1), "image_crc": Out(32),
            "busy": Out(1), "settled": Out(1),
        })

    def _processors(self, m):
        m.submodules.hcrc = hcrc = HEADER_CRC(data_width=self.data_width).create()
        m.submodules.fcrc = fcrc = FRAME_CRC(data_width=self.data_width).create()
        m.submodules.img_crc = img_crc = IMAGE_CRC(data_width=self.data_width).create()
        m.d.comb += [hcrc.start.eq(self.start), fcrc.start.eq(self.start), img_crc.start.eq(self.image_start),
                     self.header_crc.eq(hcrc.crc), self.frame_crc.eq(fcrc.crc),
                     self.frame_match.eq(fcrc.match_detected), self.image_crc.eq(img_crc.crc)]
        return hcrc, fcrc, img_crc


class ByteCrcs(_Crcs):
    """The default form: byte-wide CRC processors (module docstring)."""

    def elaborate(self, platform):
        m = Module()
        hcrc, fcrc, img_crc = self._processors(m)
        m.d.comb += [hcrc.data.eq(self.data), fcrc.data.eq(self.data), img_crc.data.eq(self.data),
                     hcrc.valid.eq(self.header), fcrc.valid.eq(self.frame), img_crc.valid.eq(self.image),
                     self.busy.eq(0), self.settled.eq(1)]
        return m


class SerialCrcs(_Crcs):
    """The small form: bit-serial CRC processors fed by one shifter (module docstring).

    A byte is loaded into the shifter with the flags of the CRCs it goes to and shifted into
    them one bit per cycle, most significant first (the image CRC is reflected: its byte is
    loaded reversed); ``busy`` for those eight cycles."""
    data_width = 1

    def elaborate(self, platform):
        m = Module()
        hcrc, fcrc, img_crc = self._processors(m)
        bits = Signal(8)
        left = Signal(range(9))
        to_h, to_f, to_i = Signal(), Signal(), Signal()
        busy = Signal()          # a register (left != 0), so no comparison starts the users' paths
        settled = Signal()
        m.d.sync += settled.eq(~busy)
        with m.If(busy):
            m.d.sync += [bits.eq(bits << 1), left.eq(left - 1)]
            with m.If(left == 1):
                m.d.sync += busy.eq(0)
        with m.If(self.header | self.frame | self.image):
            m.d.sync += [bits.eq(self.data), left.eq(8), busy.eq(1),
                         to_h.eq(self.header), to_f.eq(self.frame), to_i.eq(self.image)]
            with m.If(self.image):
                m.d.sync += bits.eq(self.data[::-1])
        m.d.comb += [hcrc.data.eq(bits[7]), fcrc.data.eq(bits[7]), img_crc.data.eq(bits[7]),
                     hcrc.valid.eq(busy & to_h), fcrc.valid.eq(busy & to_f), img_crc.valid.eq(busy & to_i),
                     self.busy.eq(busy), self.settled.eq(settled)]
        return m


def make_crcs(*, small: bool) -> _Crcs:
    return SerialCrcs() if small else ByteCrcs()
