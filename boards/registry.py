"""The boards the flow knows by name, and ``module:Class`` for any other amaranth-boards platform."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from amaranth.build import Platform

from mmfree_fpga.errors import UserError

from .budget import device_resources

__all__ = ["Board", "Programmer", "BOARDS", "resolve_board", "known_boards_text", "dram_boards"]


@dataclass(frozen=True)
class Programmer:
    """How openFPGALoader (or iceprog) reaches a board."""

    ofl_board: str                 # openFPGALoader -b
    cable: str                     # what a person should look for, for messages
    sram: bool                     # volatile (SRAM) loading works on the stock board
    iceprog: bool = False          # iceprog (ICEPROG) can program it too
    note: str = ""
    usb_id: tuple[int, int] | None = None   # (vendor, product) of the USB bridge, also its serial port

    def describe_cable(self) -> str:
        """The cable for messages, with its USB id where known (``... (USB 0403:6010)``)."""
        return self.cable + (f" (USB {self.usb_id[0]:04x}:{self.usb_id[1]:04x})" if self.usb_id else "")


@dataclass(frozen=True)
class Board:
    """A board the flow can build for."""

    name: str
    platform_class: type
    description: str
    default_clock_hz: float | None       # the design clock when --clock-mhz is not given
    pll: bool = False                    # the top may put a PLL between oscillator and design
    leds: tuple = (0, 1, 2)              # LEDs (BoardTop): heartbeat, activity, error
    reset_button: tuple | None = None    # (resource name, number), pressed = reset
    programmer: Programmer | None = None
    generic: bool = False
    design: str = "echo"                 # what `mmfree-fpga build` puts on it (boards.designs.DESIGNS)
    dram: str | None = None              # its DRAM for --memory dram: a key of boards.litedram.CORES
    dram_clock_hz: float | None = None   # the design clock with --memory dram (the controller's tested clock)
    # the number formats (a name of config.FORMAT_SETS) of its on-chip engine unless --formats says
    # (engines with --slots build narrow): the widest set that meets its clock target at 64 lanes
    formats: str = "narrow"
    # ... and of its --memory dram engine: where the published models run, so the float32-level set
    # wherever it meets dram_clock_hz
    dram_formats: str = "narrow"
    # nextpnr's router for its --memory dram designs (None: nextpnr's own), where they need another
    dram_router: str | None = None
    status_leds: tuple = ()              # (design member, LED) pairs (BoardTop), e.g. the DRAM's calibration

    def platform(self) -> Platform:
        return self.platform_class()

    @property
    def device(self) -> str:
        return self.platform_class.device

    @property
    def resources(self):
        return device_resources(self.device)

    @property
    def family(self) -> str | None:
        r = self.resources
        return r.family if r is not None else None


def _known():
    from amaranth_boards.ecpix5 import ECPIX585Platform
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    return {
        "icebreaker": Board(
            name="icebreaker", platform_class=ICEBreakerPlatform,
            description="1BitSquared iCEBreaker (iCE40UP5K, 12 MHz oscillator)",
            default_clock_hz=36e6, pll=True, leds=(1, None, 0), reset_button=("button", 0),
            programmer=Programmer(
                ofl_board="ice40_generic", cable="the iCEBreaker's FTDI FT2232H",
                sram=False, iceprog=True, usb_id=(0x0403, 0x6010),
                note="the iCE40 boots from the board's SPI flash: programming always writes the flash"),
            design="engine"),
        "ulx3s-85f": Board(
            name="ulx3s-85f", platform_class=ULX3S_85F_Platform,
            description="Radiona ULX3S with LFE5U-85F (ECP5, 25 MHz oscillator)",
            default_clock_hz=60e6, pll=True, leds=(0, 1, 2), reset_button=("button_fire", 0),
            programmer=Programmer(ofl_board="ulx3s", cable="the ULX3S's FTDI FT231X on the US1 port",
                                  sram=True, usb_id=(0x0403, 0x6015)),
            design="engine", formats="medium", dram="ulx3s-85f", dram_clock_hz=50e6, dram_formats="wide",
            # router1 had not routed the wide DRAM design after 24 minutes of routing (stuck near 62,000
            # unrouted arcs); router2 routes it in 107 s (the build's nextpnr log), 57.4 MHz against 50. On
            # the ECPIX-5 router1 is the better one: 113.5 MHz against router2's 78.9 at 75. (Both with
            # the wide set's earlier 2^13-interval sigmoid table; with 2^15: 69.8 and 96.7 MHz.)
            dram_router="router2"),
        # The UART is the FT2232H's second channel (amaranth-boards' uart 0). No reset button:
        # amaranth-boards names only AB1 (GSRN) as "rst" while LiteX's ECPIX-5 target resets from
        # N5; which one the button drives is not settled here, so the design resets at configuration
        # and PLL lock only. LEDs: RGB LED 0 green = heartbeat, 1 blue = UART activity, 2 red =
        # UART error, 3 green = DRAM calibrated, 3 red = DRAM calibration failed (--memory dram).
        "ecpix5-85f": Board(
            name="ecpix5-85f", platform_class=ECPIX585Platform,
            description="LambdaConcept ECPIX-5 with LFE5UM5G-85F (ECP5, 100 MHz oscillator, 512 MiB DDR3)",
            default_clock_hz=75e6, pll=True,
            leds=(("rgb_led", 0, "g"), ("rgb_led", 1, "b"), ("rgb_led", 2, "r")), reset_button=None,
            programmer=Programmer(ofl_board="ecpix5", cable="the ECPIX-5's FTDI FT2232H on its micro-USB port",
                                  sram=True, usb_id=(0x0403, 0x6010)),
            design="engine", formats="medium", dram="ecpix5-85f", dram_clock_hz=75e6, dram_formats="wide",
            status_leds=(("dram_ready", ("rgb_led", 3, "g")), ("dram_error", ("rgb_led", 3, "r")))),
    }


BOARDS: dict[str, Board] = _known()


def dram_boards() -> list[str]:
    """The known boards that ``--memory dram`` builds for."""
    return [name for name, board in BOARDS.items() if board.dram is not None]


def known_boards_text() -> str:
    return (", ".join(BOARDS) + ", or module:Class for any amaranth-boards platform "
            "(e.g. amaranth_boards.icestick:ICEStickPlatform)")


def _generic(spec: str) -> Board:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UserError(f"unknown board {spec!r}; known boards: {known_boards_text()}")
    module = None
    for candidate in (module_name, f"amaranth_boards.{module_name}"):
        try:
            module = importlib.import_module(candidate)
            break
        except ModuleNotFoundError as e:
            if e.name is not None and not candidate.startswith(e.name):
                raise UserError(f"board module {candidate} needs {e.name}, which is not installed") from None
    if module is None:
        raise UserError(f"unknown board {spec!r}: no module {module_name} (nor amaranth_boards.{module_name}); "
                        f"known boards: {known_boards_text()}")
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise UserError(f"unknown board {spec!r}: {module.__name__} has no platform class {class_name}; "
                        f"known boards: {known_boards_text()}")
    try:
        platform = cls()
        clock = platform.default_clk_frequency
    except (TypeError, AttributeError) as e:
        raise UserError(f"board {spec}: {cls.__name__} cannot be used as a platform ({e})") from None
    try:
        platform.lookup("uart", 0)
    except Exception:  # amaranth raises ResourceError; a broken platform anything
        raise UserError(f"board {spec}: the platform has no 'uart' resource, which the board top "
                        "needs for the host link") from None
    return Board(name=spec, platform_class=cls, description=f"{cls.__module__}.{cls.__qualname__} ({cls.device})",
                 default_clock_hz=clock, generic=True)


def resolve_board(name: str) -> Board:
    """A known board by name, or an amaranth-boards platform as ``module:Class``; UserError otherwise."""
    if name in BOARDS:
        return BOARDS[name]
    if ":" in name:
        return _generic(name)
    raise UserError(f"unknown board {name!r}; known boards: {known_boards_text()}")
