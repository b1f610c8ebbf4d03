"""The argmax over a stream: the next token of greedy decoding."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats

from .vector_common import greater_unsigned, value_layout, vector_widths

__all__ = ["Argmax", "argmax_layout"]


def argmax_layout(w, max_length: int) -> data.StructLayout:
    return data.StructLayout({"index": unsigned(max(1, (max_length - 1).bit_length())), "value": w.x})


class Argmax(wiring.Component):
    """The first index of the largest value of a vector, as ``IntegerModel.argmax`` (np.argmax).

    Members
    -------
    i : In(stream of value_layout)
        The vector (the logits from :class:`OutputScale`), element by element, ``last`` on its
        final element; at most ``max_length`` elements (longer vectors wrap the index).
    o : Out(stream of argmax_layout)
        ``index`` and ``value`` of the first maximum, one per vector.

    Throughput one element per cycle (a vector's last element waits only while the previous
    result is still in ``o``); the result is valid the cycle after the last element went in.
    One signed x_bits comparator (as parallel 16-bit ones); no multiplier.
    """

    def __init__(self, max_length: int, fmt: Formats = FORMATS):
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self._w = w = vector_widths(fmt)
        self._max_length = max_length
        super().__init__({
            "i": In(stream.Signature(value_layout(w))),
            "o": Out(stream.Signature(argmax_layout(w, max_length))),
        })

    def elaborate(self, platform):
        w = self._w
        m = Module()
        index = Signal.like(self.o.payload.index)
        best_i = Signal.like(self.o.payload.index)
        best_v = Signal(w.x)
        last = self.i.payload.last
        m.d.comb += self.i.ready.eq(~last | ~self.o.valid | self.o.ready)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        value = self.i.payload.value
        flip = 1 << (w.x_bits - 1)          # signed order = unsigned order with the sign bit flipped
        better = (index == 0) | greater_unsigned(value.as_unsigned() ^ flip, best_v.as_unsigned() ^ flip)
        new_i = Mux(better, index, best_i)
        new_v = Mux(better, value, best_v)
        with m.If(self.i.valid & self.i.ready):
            with m.If(last):
                m.d.sync += [
                    self.o.payload.index.eq(new_i), self.o.payload.value.eq(new_v),
                    self.o.valid.eq(1), index.eq(0),
                ]
            with m.Else():
                m.d.sync += [best_i.eq(new_i), best_v.eq(new_v), index.eq(index + 1)]
        return m
