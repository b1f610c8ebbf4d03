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

__all__ = ["Ice40PLL", "Ecp5PLL", "ice40_pll", "ecp5_pll", "SyncDomain", "Ecp5DdrClocking", "DDR_DOMAINS",
           "DDR_INIT_HZ", "PLL_FAMILIES"]

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
    """EHXPLLL setting: f_out = f_in * clkfb_div / clki_div, VCO = f_out * clkop_div; with
    ``clkos_div``, a second output CLKOS = VCO / clkos_div (``f_secondary``)."""

    f_in: float
    clki_div: int
    clkfb_div: int
    clkop_div: int
    clkos_div: int | None = None

    @property
    def f_out(self) -> float:
        return self.f_in * self.clkfb_div / self.clki_div

    @property
    def f_vco(self) -> float:
        return self.f_out * self.clkop_div

    @property
    def f_secondary(self) -> float | None:
        return self.f_vco / self.clkos_div if self.clkos_div else None


def ecp5_pll(f_in: float, f_out: float, secondary_hz: float | None = None) -> Ecp5PLL:
    """The EHXPLLL setting closest to ``f_out`` (ValueError if none is within 1 %); with
    ``secondary_hz``, also a CLKOS divider for it (the closest among the settings of equal
    ``f_out``; ValueError if it is off by more than 1 %)."""
    best = None

    def error(cand):
        sec = abs(cand.f_secondary - secondary_hz) if secondary_hz else 0
        return abs(cand.f_out - f_out), sec

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
            clkos_div = None
            if secondary_hz:
                clkos_div = min(128, max(1, round(out * clkop_div / secondary_hz)))
            cand = Ecp5PLL(f_in, clki_div, clkfb_div, clkop_div, clkos_div)
            if best is None or error(cand) < error(best):
                best = cand
    _check(best, f_in, f_out, "ECP5 PLL", 3.125e6, 400e6)
    if secondary_hz and abs(best.f_secondary - secondary_hz) > PLL_TOLERANCE * secondary_hz:
        raise ValueError(f"the ECP5 PLL cannot make {secondary_hz / 1e6:g} MHz beside {f_out / 1e6:g} MHz from "
                         f"{f_in / 1e6:g} MHz (nearest: {best.f_secondary / 1e6:.3f} MHz)")
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
            m.submodules.clk_buf = clk_buf = io.Buffer("i", self.clk_port)
            m.submodules.pll = _ehxplll(self.pll, clk_buf.i, self.clk, locked)
        else:
            raise ValueError(f"no PLL support for FPGA family {self.family!r}")
        m.d.comb += self.rst.eq(~_power_on_reset(m, self.clk, locked, self.reset_port, self.por_cycles))
        return m


def _ehxplll(p: Ecp5PLL, clki, clkop, locked, clkos=None) -> Instance:
    """The ECP5 PLL for setting ``p``, CLKOP fed back (and CLKOS with ``p.clkos_div``)."""
    secondary = {}
    if p.clkos_div:
        secondary = dict(p_CLKOS_ENABLE="ENABLED", p_CLKOS_DIV=p.clkos_div, p_CLKOS_CPHASE=p.clkos_div - 1,
                         p_CLKOS_FPHASE=0, o_CLKOS=clkos, i_ENCLKOS=Const(0),
                         a_FREQUENCY_PIN_CLKOS=f"{p.f_secondary / 1e6:g}")
    return Instance(
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
        i_CLKI=clki, i_CLKFB=clkop, i_RST=Const(0), i_STDBY=Const(0),
        i_PHASESEL0=Const(0), i_PHASESEL1=Const(0), i_PHASEDIR=Const(1),
        i_PHASESTEP=Const(1), i_PHASELOADREG=Const(1), i_PLLWAKESYNC=Const(0),
        i_ENCLKOP=Const(0),
        o_CLKOP=clkop, o_LOCK=locked, **secondary)


def _power_on_reset(m, clk, locked, reset_port, delay):
    """A signal that rises ``delay`` cycles of ``clk`` after ``locked`` (and the button, if any:
    ``reset_port``, pressed = reset) and falls with either; counted on ``clk`` itself, so it runs
    once the PLL produces a clock."""
    m.domains.por = ClockDomain("por", reset_less=True, local=True)
    m.d.comb += ClockSignal("por").eq(clk)
    locked_s = Signal()
    m.submodules.lock_sync = FFSynchronizer(locked, locked_s, o_domain="por")
    pressed = Const(0)
    if reset_port is not None:
        m.submodules.rst_buf = rst_buf = io.Buffer("i", reset_port)
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
    return ready


# the clock domains Ecp5DdrClocking defines besides ``sync``: the PHY's edge clock (twice the
# ``sync`` clock, no reset) and the clock of its start-up sequencer (DDRDLLA lock, ECLK reset)
DDR_DOMAINS = ("sync2x", "dram_init")
DDR_INIT_HZ = 25e6


class Ecp5DdrClocking(Elaboratable):
    """Clocks for a design beside an ECP5 DDR3 PHY (LiteDRAM's ``ECP5DDRPHY``).

    The PHY's I/O cells run on an edge clock (ECLK) at twice the system clock and on the system
    clock, which must be that edge clock divided by two, so the PLL makes the edge clock and the
    system clock is derived from it::

        oscillator -> EHXPLLL -CLKOP-> ECLKSYNCB -> clk2x (sync2x domain, 2 f)
                              |          (STOP: eclk_stop)  -> CLKDIVF /2 -> clk (sync domain, f)
                              |                                (RST: eclk_reset)
                              -CLKOS-> init_clk (dram_init domain, 25 MHz)

    The PHY's start-up sequencer (``ECP5DDRPHYInit``, in the ``dram_init`` domain, inside the
    generated core) waits for its DDRDLLA to lock, then stops the edge clock, resets the divider,
    restarts the edge clock and updates the DLL; its ``stop`` and ``reset`` outputs come back
    here as ``eclk_stop`` / ``eclk_reset``. ``rst`` (the ``sync`` reset) is asserted while the
    PLL is unlocked, while ``eclk_reset`` is high (asynchronously: the clock stands still then)
    and while the reset button is pressed, and is released :attr:`por_cycles` later;
    ``init_rst`` while the PLL is unlocked. The parent defines the domains (``sync`` from
    ``clk``/``rst``, :data:`DDR_DOMAINS` from :meth:`domains`), synchronising each reset's
    release, and connects the design's ``eclk_stop``/``eclk_reset`` through :meth:`attach`.

    Parameters
    ----------
    clk_port : the oscillator pin, requested with ``dir="-"``
    pll : Ecp5PLL whose ``f_out`` is the edge clock (twice the ``sync`` clock) and whose
        ``f_secondary`` is the init clock
    reset_port : a button pin (pressed = reset), or None
    por_seconds : how long ``rst`` stays asserted after lock / button release
    """

    def __init__(self, *, clk_port, pll: Ecp5PLL, reset_port=None, por_seconds: float = 15e-6):
        if not pll.clkos_div:
            raise ValueError("the DDR clocking needs a PLL setting with a secondary output (the init clock)")
        self.clk_port = clk_port
        self.pll = pll
        self.reset_port = reset_port
        self.clock_hz = pll.f_out / 2
        self.por_cycles = max(2, int(por_seconds * self.clock_hz))
        self.clk = Signal()
        self.rst = Signal(init=1)
        self.clk2x = Signal()
        self.init_clk = Signal()
        self.init_rst = Signal(init=1)
        self.eclk_stop = Signal()
        self.eclk_reset = Signal()

    def domains(self) -> dict:
        """{domain: (clock, reset or None)} besides ``sync``."""
        return {"sync2x": (self.clk2x, None), "dram_init": (self.init_clk, self.init_rst)}

    def attach(self, m, design) -> None:
        """Take ``eclk_stop``/``eclk_reset`` from ``design``'s members of those names (a design
        that holds the PHY's core: :class:`~.dram.DramBoardDesign` for DDR3)."""
        members = design.signature.members
        if "eclk_stop" not in members or "eclk_reset" not in members:
            raise TypeError(f"{type(design).__name__} has no eclk_stop/eclk_reset: it holds no ECP5 DDR PHY")
        m.d.comb += [self.eclk_stop.eq(design.eclk_stop), self.eclk_reset.eq(design.eclk_reset)]

    def elaborate(self, platform):
        m = Module()
        locked = Signal()
        pll_clk = Signal()
        m.submodules.clk_buf = clk_buf = io.Buffer("i", self.clk_port)
        m.submodules.pll = _ehxplll(self.pll, clk_buf.i, pll_clk, locked, clkos=self.init_clk)
        m.submodules.eclksync = Instance("ECLKSYNCB", i_ECLKI=pll_clk, i_STOP=self.eclk_stop, o_ECLKO=self.clk2x)
        m.submodules.clkdiv = Instance("CLKDIVF", p_DIV="2.0", i_ALIGNWD=Const(0), i_CLKI=self.clk2x,
                                       i_RST=self.eclk_reset, o_CDIVX=self.clk)
        if platform is not None:
            platform.add_clock_constraint(self.clk2x, self.pll.f_out)
            platform.add_clock_constraint(self.init_clk, self.pll.f_secondary)
        ready = _power_on_reset(m, self.clk, locked, self.reset_port, self.por_cycles)
        m.d.comb += [self.rst.eq(~ready | ~locked | self.eclk_reset), self.init_rst.eq(~locked)]
        return m
