"""The Link's counters: the idle timeout of a partial frame and the boot id, each in two forms.

The default form counts with adders; the small form (iCE40) steps maximal-length LFSRs, a shift
register and a few XORs with no carry chain, and compares with the state the count would reach.
:func:`make_idle_timer` and :func:`make_boot_id` pick the form.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["LFSR_TAPS", "lfsr_step", "lfsr_jump", "lfsr_signal", "CountingIdleTimer", "LfsrIdleTimer",
           "make_idle_timer", "CountingBootId", "LfsrBootId", "FixedBootId", "make_boot_id"]

# Maximal-length LFSR taps (XAPP052), by width: bit numbers from 1, Fibonacci form (shift left,
# the XOR of the tapped bits enters at bit 0); tests/test_hw_link.py proves each maximal.
LFSR_TAPS = {
    2: (2, 1), 3: (3, 2), 4: (4, 3), 5: (5, 3), 6: (6, 5), 7: (7, 6), 8: (8, 6, 5, 4), 9: (9, 5),
    10: (10, 7), 11: (11, 9), 12: (12, 6, 4, 1), 13: (13, 4, 3, 1), 14: (14, 5, 3, 1), 15: (15, 14),
    16: (16, 15, 13, 4), 17: (17, 14), 18: (18, 11), 19: (19, 6, 2, 1), 20: (20, 17), 21: (21, 19),
    22: (22, 21), 23: (23, 18), 24: (24, 23, 22, 17), 25: (25, 22), 26: (26, 6, 2, 1), 27: (27, 5, 2, 1),
    28: (28, 25), 29: (29, 27), 30: (30, 6, 4, 1), 31: (31, 28), 32: (32, 22, 2, 1),
}


def lfsr_step(state: int, width: int) -> int:
    """The LFSR of ``width`` bits one step on from ``state``."""
    feedback = 0
    for tap in LFSR_TAPS[width]:
        feedback ^= (state >> (tap - 1)) & 1
    return ((state << 1) | feedback) & ((1 << width) - 1)


def lfsr_jump(state: int, width: int, steps: int) -> int:
    """The LFSR of ``width`` bits ``steps`` steps on from ``state`` (the step is linear over
    GF(2): its matrix, as the images of the unit vectors, is raised to ``steps`` by squaring)."""
    def apply(columns, x):
        y = 0
        for i, column in enumerate(columns):
            if x >> i & 1:
                y ^= column
        return y
    power = [lfsr_step(1 << i, width) for i in range(width)]
    while steps:
        if steps & 1:
            state = apply(power, state)
        power = [apply(power, column) for column in power]
        steps >>= 1
    return state


def lfsr_signal(m, width: int, *, restart, run, name: str):
    """An LFSR register of ``width`` bits (state 1 after reset and ``restart``) that steps
    while ``run``; a counter made of a shift register and a few XORs, without a carry chain."""
    state = Signal(width, init=1, name=name)
    feedback = 0
    for tap in LFSR_TAPS[width]:
        feedback ^= state[tap - 1]
    with m.If(restart):
        m.d.sync += state.eq(1)
    with m.Elif(run):
        m.d.sync += state.eq(Cat(feedback, state[:-1]))
    return state


class _IdleTimer(wiring.Component):
    """Cycles since the last byte, up to ``cycles``.

    Members
    -------
    restart : In(1)
        A byte is received in this cycle: the count restarts from 0 at the next edge.
    expired : Out(1)
        ``cycles`` cycles have passed since the last ``restart`` (combinational from the count,
        which then stops); also ``cycles`` cycles after reset without one.
    """

    def __init__(self, cycles: int):
        if cycles < 1:
            raise ValueError(f"cycles must be at least 1, got {cycles}")
        self.cycles = cycles
        super().__init__({"restart": In(1), "expired": Out(1)})


class CountingIdleTimer(_IdleTimer):
    """The default form: a counter."""

    def elaborate(self, platform):
        m = Module()
        count = Signal(range(self.cycles + 1))
        m.d.comb += self.expired.eq(count == self.cycles)
        with m.If(self.restart):
            m.d.sync += count.eq(0)
        with m.Elif(~self.expired):
            m.d.sync += count.eq(count + 1)
        return m


class LfsrIdleTimer(_IdleTimer):
    """The small form: an LFSR, expired in the state ``cycles`` steps after 1 (fewer states than
    the LFSR's period: each state is met once)."""

    def elaborate(self, platform):
        m = Module()
        width = max(2, (self.cycles + 1).bit_length())
        state = lfsr_signal(m, width, restart=self.restart, run=~self.expired, name="idle_lfsr")
        m.d.comb += self.expired.eq(state == lfsr_jump(1, width, self.cycles))
        return m


def make_idle_timer(cycles: int, *, small: bool) -> _IdleTimer:
    return (LfsrIdleTimer if small else CountingIdleTimer)(cycles)


class _BootId(wiring.Component):
    """The boot id IDENTIFY reports.

    Members
    -------
    byte : In(1)
        A byte is received in this cycle (the first one fixes a counted id).
    boot_id : Out(32)
        The id: constant from the first byte received on.
    """

    def __init__(self):
        super().__init__({"byte": In(1), "boot_id": Out(32)})


class _CountedBootId(_BootId):
    def _booted(self, m):
        """A register: a byte has been received since reset."""
        booted = Signal()
        with m.If(self.byte):
            m.d.sync += booted.eq(1)
        return booted


class CountingBootId(_CountedBootId):
    """The default form: the cycles from reset to the first byte received (the host's timing
    makes it differ from one reset to the next)."""

    def elaborate(self, platform):
        m = Module()
        booted = self._booted(m)
        count = Signal(32)
        with m.If(~booted & ~self.byte):
            m.d.sync += count.eq(count + 1)
        m.d.comb += self.boot_id.eq(count)
        return m


class LfsrBootId(_CountedBootId):
    """The small form: the state of a 32-bit LFSR stepped from reset to the first byte received."""

    def elaborate(self, platform):
        m = Module()
        booted = self._booted(m)
        m.d.comb += self.boot_id.eq(lfsr_signal(m, 32, restart=0, run=~booted & ~self.byte, name="boot_lfsr"))
        return m


class FixedBootId(_BootId):
    """A boot id given as a parameter (``value`` modulo 2**32)."""

    def __init__(self, value: int):
        self.value = value & 0xFFFFFFFF
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.boot_id.eq(self.value)
        return m


def make_boot_id(value: int | None, *, small: bool) -> _BootId:
    """``value`` fixed, or (None) counted in the form's way."""
    if value is not None:
        return FixedBootId(value)
    return LfsrBootId() if small else CountingBootId()
