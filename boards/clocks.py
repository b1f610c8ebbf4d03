"""Clock generation for the board tops: PLL settings for iCE40 and ECP5, and the ``sync`` domain.

:func:`ice40_pll` and :func:`ecp5_pll` search the divider space the way ``icepll`` and
``ecppll`` do and return the setting closest to the requested frequency; :class:`SyncDomain`
makes the clock of the ``sync`` domain with a PLL (or takes the oscillator) and a power-on
reset that is held until the PLL locks, for a few microseconds more (iCE40 block RAMs read as
zero for ~3 us after configuration), and while the reset button is pressed; the board top
turns them into the ``sync`` domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import FFSynchronizer

__all__ = ["Ice40PLL", "Ecp5PLL", "ice40_pll", "ecp5_pll", "SyncDomain", "PLL_FAMILIES"]

# a requested clock the PLL cannot make within this relative error is refused
PLL_TOLERANCE = 0.01


@dataclass(frozen=True)
class Ice40PLL:
    """SB_PLL40 setting: f_out = f_in * (divf + 1) / ((divr + 1) * 2**divq), SIMPLE feedback."""

    f_in: float
    divr: int
    divf: int
    divq: int

    @property
    def f_pfd(self) -> float:
        return self.f_in / (self.divr + 1)

    @property
    def f_vco(self) -> float:
        return self.f_pfd * (self.divf + 1)

    @property
    def f_out(self) -> float:
        return self.f_vco / 2 ** self.divq

    @property
    def filter_range(self) -> int:
        """Loop filter setting for the PFD frequency (icepll's table)."""
        mhz = self.f_pfd / 1e6
        for limit, value in ((17, 1), (26, 2), (44, 3), (66, 4), (101, 5)):
            if mhz < limit:
                return value
        return 6


def ice40_pll(f_in: float, f_out: float) -> Ice40PLL:
    """The SB_PLL40 setting closest to ``f_out`` (ValueError if none is within 1 %)."""
    best = None
    for divr in range(16):
        pfd = f_in / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533e6 <= vco <= 1066e6:
                continue
            for divq in range(1, 7):
                cand = Ice40PLL(f_in, divr, divf, divq)
                if best is None or abs(cand.f_out - f_out) < abs(best.f_out - f_out):
                    best = cand
    _check(best, f_in, f_out, "iCE40 PLL", 16e6, 275e6)
    return best


@dataclass(frozen=True)
class Ecp5PLL:
    """EHXPLLL setting: f_out = f_in * clkfb_div / clki_div, VCO = f_out * clkop_div."""

    f_in: float
    clki_div: int
    clkfb_div: int
    clkop_div: int

    @property
    def f_out(self) -> float:
        return self.f_in * self.clkfb_div / self.clki_div

    @property
    def f_vco(self) -> float:
        return self.f_out * self.clkop_div


def ecp5_pll(f_in: float, f_out: float) -> Ecp5PLL:
    """The EHXPLLL setting closest to ``f_out`` (ValueError if none is within 1 %)."""
    best = None
    for clki_div in range(1, 129):
        if f_in / clki_div < 3.125e6:
            break
        for clkfb_div in range(1, 81):
            out = f_in * clkfb_div / clki_div
            if not 3.125e6 <= out <= 400e6:
                continue
            # the highest VCO in range (400-800 MHz) has the least jitter
            clkop_div = min(128, int(800e6 // out))
            if clkop_div < 1 or out * clkop_div < 400e6:
                continue
            cand = Ecp5PLL(f_in, clki_div, clkfb_div, clkop_div)
            if best is None or abs(cand.f_out - f_out) < abs(best.f_out - f_out):
                best = cand
    _check(best, f_in, f_out, "ECP5 PLL", 3.125e6, 400e6)
    return best


def _check(best, f_in, f_out, what, lo, hi):
    if best is None or abs(best.f_out - f_out) > PLL_TOLERANCE * f_out:
        near = f" (nearest: {best.f_out / 1e6:.3f} MHz)" if best is not None else ""
        raise ValueError(f"the {what} cannot make {f_out / 1e6:g} MHz from {f_in / 1e6:g} MHz{near}; "
                         f"it makes {lo / 1e6:g}-{hi / 1e6:g} MHz in steps set by its dividers")


PLL_FAMILIES = {"ice40": ice40_pll, "ecp5": ecp5_pll}


class SyncDomain(Elaboratable):
    """Clock and reset for the ``sync`` domain at ``pll.f_out`` (or the oscillator's frequency).

    ``clk`` is the clock net; ``rst`` stays high until the PLL has locked and ``por_seconds``
    have passed, and while the button is held. The parent defines the ``sync`` domain from
    them (Amaranth wants a domain defined where it is used).

    Parameters
    ----------
    family : "ice40" or "ecp5"
    clk_port : the oscillator pin, requested with ``dir="-"``
    clock_hz : the resulting clock (``pll.f_out``, or the oscillator's frequency)
    pll : Ice40PLL, Ecp5PLL or None
    reset_port : a button pin requested with ``dir="-"`` (pressed = reset), or None
    por_seconds : how long the reset stays asserted after lock / button release
    """

    def __init__(self, *, family: str, clk_port, clock_hz: float, pll=None, reset_port=None,
                 por_seconds: float = 15e-6):
        self.family = family
        self.clk_port = clk_port
        self.pll = pll
        self.reset_port = reset_port
        self.por_cycles = max(2, int(por_seconds * clock_hz))
        self.clk = Signal()  # the design clock net: clock constraints attach here
        self.rst = Signal(init=1)

    def elaborate(self, platform):
        m = Module()
        locked = Signal()
        if self.pll is None:
            m.submodules.clk_buf = clk_buf = io.Buffer("i", self.clk_port)
            m.d.comb += [self.clk.eq(clk_buf.i), locked.eq(1)]
        elif self.family == "ice40":
            p = self.pll
            # the iCE40 PLL takes its reference straight from the pad (no SB_IO in between)
            m.submodules.pll = Instance(
                "SB_PLL40_PAD",
                p_FEEDBACK_PATH="SIMPLE",
                p_DIVR=p.divr, p_DIVF=p.divf, p_DIVQ=p.divq, p_FILTER_RANGE=p.filter_range,
                i_PACKAGEPIN=self.clk_port.io,
                i_RESETB=Const(1), i_BYPASS=Const(0),
                o_PLLOUTGLOBAL=self.clk, o_LOCK=locked)
        elif self.family == "ecp5":
            p = self.pll
            m.submodules.clk_buf = clk_buf = io.Buffer("i", self.clk_port)
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{p.f_in / 1e6:g}",
                a_FREQUENCY_PIN_CLKOP=f"{p.f_out / 1e6:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8",
                a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
                p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA",
                p_CLKI_DIV=p.clki_div, p_CLKFB_DIV=p.clkfb_div,
                p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=p.clkop_div,
                p_CLKOP_CPHASE=p.clkop_div - 1, p_CLKOP_FPHASE=0,
                p_FEEDBK_PATH="CLKOP",
                i_CLKI=clk_buf.i, i_CLKFB=self.clk, i_RST=Const(0), i_STDBY=Const(0),
                i_PHASESEL0=Const(0), i_PHASESEL1=Const(0), i_PHASEDIR=Const(1),
                i_PHASESTEP=Const(1), i_PHASELOADREG=Const(1), i_PLLWAKESYNC=Const(0),
                i_ENCLKOP=Const(0),
                o_CLKOP=self.clk, o_LOCK=locked)
        else:
            raise ValueError(f"no PLL support for FPGA family {self.family!r}")

        # power-on reset, counted on the design clock itself: runs once the PLL produces a clock
        m.domains.por = ClockDomain("por", reset_less=True, local=True)
        m.d.comb += ClockSignal("por").eq(self.clk)
        delay = self.por_cycles
        locked_s = Signal()
        m.submodules.lock_sync = FFSynchronizer(locked, locked_s, o_domain="por")
        pressed = Const(0)
        if self.reset_port is not None:
            m.submodules.rst_buf = rst_buf = io.Buffer("i", self.reset_port)
            pressed = Signal()
            m.submodules.rst_sync = FFSynchronizer(rst_buf.i, pressed, o_domain="por")
        hold = Signal()
        m.d.comb += hold.eq(~locked_s | pressed)
        timer = Signal(range(delay + 1))
        ready = Signal()
        with m.If(hold):
            m.d.por += [timer.eq(0), ready.eq(0)]
        with m.Elif(timer == delay):
            m.d.por += ready.eq(1)
        with m.Else():
            m.d.por += timer.eq(timer + 1)
        m.d.comb += self.rst.eq(~ready)
        return m
