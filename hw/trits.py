"""Trit decoding and the trit gearbox that feed :class:`~mmfree_fpga.hw.matvec.TernaryMatVec`.

Inside the hardware a trit is a 2-bit *trit code*, the same code as the ``2bit`` packing:
``00`` = 0, ``01`` = +1, ``11`` = -1 (``10`` never occurs and means 0). So bit 0 says
"non-zero" and bit 1 says "negative", and a ``2bit`` byte is already four codes.

A weight beat of ``weight_bytes`` bytes carries ``weight_bytes * TRITS_PER_BYTE[packing]``
trits (the *beat trits*). The gearbox turns beats into groups of ``lanes`` trits, one group
per cycle, whatever the ratio of the two.
"""

from __future__ import annotations

from math import gcd

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.packing import BASE3_DECODE, PACKINGS, TRITS_PER_BYTE
from mmfree_fpga.protocol import Packing

__all__ = ["TRIT_CODE", "trit_code", "base3_decode_table", "packing_code", "beat_trits",
           "select_by_packing", "check_packings", "check_beats",
           "TritDecoder", "TritGearbox"]

#: Shape of one trit inside the hardware (see the module docstring).
TRIT_CODE = unsigned(2)


def trit_code(t: int) -> int:
    """The 2-bit code of trit ``t`` in {-1, 0, 1}."""
    return t & 0b11


def base3_decode_table() -> list[int]:
    """The base3 decode ROM: byte -> its five trits as 2-bit codes (:func:`trit_code`), trit 0 in
    bits 1:0 (the matrix unit's decoder and the tiny engine's ROM)."""
    bits = TRIT_CODE.width
    return [sum(trit_code(int(t)) << (bits * k) for k, t in enumerate(row)) for row in BASE3_DECODE]


def packing_code(packing: str) -> int:
    """Value of a runtime packing select: the packing's wire code (:class:`~mmfree_fpga.protocol.Packing`)."""
    return int(Packing.from_export_name(packing))


def beat_trits(weight_bytes: int, packing: str) -> int:
    """Trits carried by one weight beat."""
    return weight_bytes * TRITS_PER_BYTE[packing]


def select_by_packing(select, values: dict):
    """``values[p]`` for the packing whose ``packing_code`` is ``select``, as a Mux chain.

    Deliberately an expression, not a ``Switch``: Verilog gets a continuous assignment, which
    Icarus evaluates at time 0 even if ``select`` never changes (an ``always @*`` block would
    stay X until one of its inputs moves).
    """
    (*others, last) = values.items()
    value = last[1]
    for name, v in reversed(others):
        value = Mux(select == packing_code(name), v, value)
    return value


def check_packings(packings) -> tuple[str, ...]:
    """The packings in ``PACKINGS`` order; ValueError unless distinct known names."""
    packings = tuple(packings)
    if not packings or len(set(packings)) != len(packings) or not set(packings) <= set(PACKINGS):
        raise ValueError(f"packings must be distinct names from {PACKINGS}, got {packings!r}")
    return tuple(p for p in PACKINGS if p in packings)


def check_beats(lanes: int, weight_bytes: int, packings) -> dict[str, int]:
    """Beat trits per packing; ValueError if a beat carries fewer than ``lanes`` trits."""
    beats = {p: beat_trits(weight_bytes, p) for p in check_packings(packings)}
    for p, k in beats.items():
        if k < lanes:
            raise ValueError(f"a {weight_bytes}-byte beat carries {k} {p} trits, fewer than "
                             f"{lanes} lanes; use weight_bytes >= {-(-lanes // TRITS_PER_BYTE[p])}")
    return beats


class TritDecoder(wiring.Component):
    """Combinational decoder of one weight beat into trit codes.

    Parameters
    ----------
    weight_bytes : int
        Bytes per beat.
    packings : tuple of str
        The packings it decodes; with more than one, ``packing`` selects at run time.

    Members
    -------
    data : In(ArrayLayout(unsigned(8), weight_bytes))
        The beat; byte 0 comes first in the packed stream.
    packing : In(1)
        ``packing_code`` of the packing (only with more than one packing).
    codes : Out(ArrayLayout(TRIT_CODE, max beat trits))
        Trit ``j * TRITS_PER_BYTE[packing] + k`` is trit ``k`` of byte ``j``; codes past the beat
        trits of a narrower packing are 0.

    ``base3`` bytes go through one 256-entry ROM (``BASE3_DECODE``, asynchronous read ports, one
    per byte): it simulates as an array lookup and synthesises to LUTs.
    """

    def __init__(self, *, weight_bytes: int, packings=PACKINGS):
        self._packings = check_packings(packings)
        self._weight_bytes = weight_bytes
        self._width = max(beat_trits(weight_bytes, p) for p in self._packings)
        members = {
            "data": In(data.ArrayLayout(unsigned(8), weight_bytes)),
            "codes": Out(data.ArrayLayout(TRIT_CODE, self._width)),
        }
        if len(self._packings) > 1:
            members["packing"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        decoded = {}
        if "2bit" in self._packings:
            decoded["2bit"] = Cat(*(self.data[j] for j in range(self._weight_bytes)))
        if "base3" in self._packings:
            bits = TRIT_CODE.width
            table = base3_decode_table()
            rom = m.submodules.base3_rom = Memory(shape=unsigned(bits * TRITS_PER_BYTE["base3"]),
                                                  depth=len(table), init=table)
            parts = []
            for j in range(self._weight_bytes):
                port = rom.read_port(domain="comb")
                m.d.comb += port.addr.eq(self.data[j])
                parts.append(port.data)
            decoded["base3"] = Cat(*parts)
        select = self.packing if len(self._packings) > 1 else 0
        m.d.comb += self.codes.eq(select_by_packing(select, decoded))
        return m


class TritGearbox(wiring.Component):
    """Rate converter from beats of trit codes to groups of ``lanes`` trit codes.

    Beats go into a ring of three slots; the head slot, the slot after it and an offset into
    the head form the window, and a group is ``window[offset : offset + lanes]``. A group is
    available when the head and, if the group crosses into it, the next beat are present.
    Taking a group that reaches the end of the head releases the head slot. ``i.ready`` is
    "a slot is free", a register: slot writes never wait for the consumer's decision, which
    keeps the consumer's issue logic off the wide slot registers' enables. With the input
    always valid, a group is available every cycle: at most one slot is released per cycle
    (a beat carries at least ``lanes`` trits) and refilled the cycle after, so at least two
    beats, i.e. ``lanes`` or more trits, are always in the window.

    The offset only takes multiples of ``g = gcd(lanes, every beat trits)``, so it is kept in
    units of g trits and the output is a shifter of ``ceil(log2(beat / g))`` stages. With the
    default ``weight_bytes = lanes / 4``, g = lanes / 4: no shifter for ``2bit`` (the offset
    stays 0) and a 5-position one for ``base3``.

    Parameters
    ----------
    lanes : int
        Trits per group.
    weight_bytes : int
        Bytes per beat; each supported packing's beat must carry at least ``lanes`` trits.
    packings : tuple of str
        Supported packings; with more than one, ``packing`` selects at run time.

    Members
    -------
    i : In(stream.Signature(ArrayLayout(TRIT_CODE, max beat trits)))
        Decoded beats (from :class:`TritDecoder`). ``ready`` is a register.
    o : Out(stream.Signature(ArrayLayout(TRIT_CODE, lanes)))
        Groups. ``valid`` depends on registers only.
    packing : In(1)
        ``packing_code`` of the packing (only with more than one packing); hold it while
        trits are buffered.
    flush : In(1)
        Discard every buffered trit at the next clock edge (a group taken in the same cycle is
        still delivered; a beat offered in the same cycle is dropped too).
    """

    def __init__(self, *, lanes: int, weight_bytes: int, packings=PACKINGS):
        self._packings = check_packings(packings)
        self._lanes = lanes
        self._beat = check_beats(lanes, weight_bytes, self._packings)
        self._width = max(self._beat.values())
        self._unit = gcd(lanes, *self._beat.values())
        members = {
            "i": In(stream.Signature(data.ArrayLayout(TRIT_CODE, self._width))),
            "o": Out(stream.Signature(data.ArrayLayout(TRIT_CODE, lanes))),
            "flush": In(1),
        }
        if len(self._packings) > 1:
            members["packing"] = In(1)
        super().__init__(members)

    @property
    def offsets(self) -> dict[str, int]:
        """Number of offsets a group can start at, per packing (the shifter's positions)."""
        return {p: k // self._unit for p, k in self._beat.items()}

    def elaborate(self, platform):
        m = Module()
        g = self._unit
        lanes_g = self._lanes // g
        # Slot contents need no reset: `count` says which slots hold a beat.
        slots = [Signal(data.ArrayLayout(TRIT_CODE, self._width), name=f"slot{k}", reset_less=True)
                 for k in range(3)]
        head = Signal(range(3))                                  # slot of the head beat
        count = Signal(range(4))                                 # beats held
        # in units of g trits; at least 1 bit, so that Verilog gets no zero-width vector
        offset = Signal(range(max(2, *self.offsets.values())))
        select = self.packing if len(self._packings) > 1 else 0
        # Expressions, not Switch: see select_by_packing.
        beat = select_by_packing(select, {p: Const(n, range(n + 1)) for p, n in self.offsets.items()})

        end = offset + lanes_g
        # end <= beat (the group fits in the head) and end >= beat (it reaches the head's end)
        # for the current offset, registers computed with the next offset: the offset's
        # comparisons stay off the paths from the consumer's ready to the head's enable (Yosys
        # would otherwise share their LUTs with the wide output shifter, a long path at 64 lanes)
        fits = Signal(init=1)
        at_end = Signal()
        m.d.comb += self.o.valid.eq((count != 0) & (fits | (count >= 2)))
        take = self.o.valid & self.o.ready
        release = take & at_end
        m.d.comb += self.i.ready.eq(count != 3)
        accept = self.i.valid & self.i.ready

        tail = Signal(range(3))                                  # slot the next beat goes to
        m.d.comb += tail.eq(Mux(head + count >= 3, head + count - 3, head + count))
        for k, slot in enumerate(slots):
            with m.If(accept & (tail == k)):
                m.d.sync += slot.eq(self.i.payload)
        next_offset = Signal.like(offset)
        m.d.comb += next_offset.eq(offset)
        with m.If(self.flush):
            m.d.sync += count.eq(0)
            m.d.comb += next_offset.eq(0)
        with m.Else():
            m.d.sync += count.eq(count + accept - release)
            with m.If(take):
                m.d.comb += next_offset.eq(Mux(release, end - beat, end))
            with m.If(release):
                m.d.sync += head.eq(Mux(head == 2, 0, head + 1))
        m.d.sync += [offset.eq(next_offset), fits.eq(next_offset + lanes_g <= beat),
                     at_end.eq(next_offset + lanes_g >= beat)]

        bits = TRIT_CODE.width
        raw = [slot.as_value() for slot in slots]
        first = Mux(head == 0, raw[0], Mux(head == 1, raw[1], raw[2]))
        second = Mux(head == 0, raw[1], Mux(head == 1, raw[2], raw[0]))
        groups = {}
        for p, k in self._beat.items():
            window = Cat(first[:bits * k], second[:bits * k])
            groups[p] = window.bit_select(offset * (bits * g), bits * self._lanes)
        m.d.comb += self.o.payload.eq(select_by_packing(select, groups))
        return m
