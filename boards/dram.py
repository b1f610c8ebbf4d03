"""The board side of ``--memory dram``: a board's DRAM budget, its generated LiteDRAM core, and the
design that puts the core beside the engine.

A board with a DRAM names its core's settings (``Board.dram``, a key of
:data:`~.litedram.CORES`); :func:`dram_budget` gives the memory's size from those settings alone
(no core is generated), for the size check before any tool runs; :func:`board_core` generates
(or takes from the cache) the core for the build's clock. :class:`DramBoardDesign` is the design
the board top gets: the engine and its link (a design with ``native`` and ``init_done``
members, :class:`~mmfree_fpga.hw.linked_engine.LinkedEngine` with ``memory="sdram"``) and the core
as an ``Instance`` on the SDRAM pins, everything in the ``sync`` domain::

    sync clock/reset ---------> core clk/rst
    design.native <-----------> core user_port_*        (LiteDRAM's native port)
    core init_done -----------> design.init_done
    core sdram_* <------------> pins a, ba, cs, ras, cas, we, clk_en, dqm, dq (raw, no buffer:
                                the core holds the I/O registers and the dq tristate buffers)
    sync clock, inverted -----> pin clk (an output DDR register with 0 then 1)

The SDRAM samples commands and write data on its clock's rising edge, half a cycle after the
core's output registers change them; the core's input registers take read data on the next rising
edge of the core's clock (LiteX's ULX3S target clocks the SDRAM the same way, from a PLL output
shifted by 180 degrees).

A DDR3 core (LiteDRAM's ``ECP5DDRPHY``, the ECPIX-5) needs more around it: its I/O cells run on
the ``sync2x`` edge clock and its start-up sequencer on the ``dram_init`` clock, which the
board's clocking makes (:class:`~.clocks.Ecp5DdrClocking`; the sequencer's ``eclk_stop`` /
``eclk_reset`` go back to it), and its read capture must be levelled before use: a
:class:`~mmfree_fpga.hw.dram_calibration.DramCalibration` sits between the design's native port
and the core's, drives the PHY's read-levelling ports, and tells the design the DRAM is ready
only once calibrated::

    design.native <-> DramCalibration.user ... DramCalibration.native <-> NativeCommandSlice
                  <-> core user_port_*   (the slice registers the command handshake)
    core init_done -> DramCalibration.init_done;  DramCalibration.ready -> design.init_done
    DramCalibration.phy <-> core dly_sel, rdly_dq_*, burstdet_*
    sync2x / dram_init clocks -> core clk2x / init_clk, init_rst
    core eclk_stop, eclk_reset -> members eclk_stop, eclk_reset (to the clocking)
    core ddram_* <-> pins a, ba, ras, cas, we, clk_en, odt, dm, dq, dqs.p, clk.p (raw: the core
                     holds the DDR I/O registers, delays and buffers; a differential pin is
                     placed by its P pad)
    DramCalibration.ready / .error -> members dram_ready / dram_error (the board's status LEDs)

Read levelling is done in hardware rather than with a fixed per-board setting: the right
bitslip and read delay depend on the chip, the board's traces and the clock, and drift with
temperature; a fixed setting measured on one board is not known to hold on the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal, Signal
from amaranth.lib import io, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["DramBudget", "dram_budget", "board_core", "DramBoardDesign", "NativeCommandSlice", "SDRAM_PINS",
           "DDR3_PINS", "MEMORY_KINDS", "is_ddr_phy"]

# core port -> amaranth-boards SDRAMResource subsignal (the board top drives "clk" itself)
SDRAM_PINS = {"sdram_a": "a", "sdram_ba": "ba", "sdram_cs_n": "cs", "sdram_ras_n": "ras", "sdram_cas_n": "cas",
              "sdram_we_n": "we", "sdram_cke": "clk_en", "sdram_dm": "dqm", "sdram_dq": "dq"}
# core port -> amaranth-boards "ddr3" resource subsignal (and the P pad of a differential one)
DDR3_PINS = {"ddram_a": ("a",), "ddram_ba": ("ba",), "ddram_ras_n": ("ras",), "ddram_cas_n": ("cas",),
             "ddram_we_n": ("we",), "ddram_cke": ("clk_en",), "ddram_odt": ("odt",), "ddram_dm": ("dm",),
             "ddram_dq": ("dq",), "ddram_dqs_p": ("dqs", "p"), "ddram_clk_p": ("clk", "p")}
# LiteDRAM memory type -> (what messages call it, LinkedEngine's memory)
MEMORY_KINDS = {"SDR": ("SDRAM", "sdram"), "DDR3": ("DDR3", "sdram")}
# the PHYs whose cores need the DDR clocking and read levelling
_DDR_PHYS = ("ECP5DDRPHY",)


def is_ddr_phy(phy: str) -> bool:
    """Whether a core with this PHY needs :class:`~.clocks.Ecp5DdrClocking` and read levelling."""
    return phy in _DDR_PHYS


@dataclass(frozen=True)
class DramBudget:
    """A board's DRAM, which holds the weight image with ``--memory dram``.

    ``kind``: "SDRAM" or "DDR3" (what messages call it); ``module``: the memory part (a class of
    ``litedram.modules``); ``size_bytes``: its capacity.
    """

    kind: str
    module: str
    size_bytes: int

    def text(self) -> str:
        return f"{self.size_bytes:,} B of {self.kind} ({self.module}, {self.size_bytes / 2 ** 20:g} MiB)"


def _config(board):
    from .litedram import CORES
    if board.dram is None:
        raise ValueError(f"board {board.name} has no DRAM in this flow")
    return CORES[board.dram]


def dram_budget(board) -> DramBudget:
    """The DRAM of ``board`` (a :class:`~.registry.Board` with ``dram``), from its core's settings
    (the memory module's geometry; no core is generated). ValueError for a board without one."""
    from litedram import modules
    from .litedram import PHY_RATES
    config = _config(board)
    module = getattr(modules, config.module)(config.clk_freq, PHY_RATES[config.phy])
    geom = module.geom_settings
    kind = MEMORY_KINDS.get(module.memtype, (module.memtype, None))[0]
    return DramBudget(kind=kind, module=config.module,
                      size_bytes=(1 << (geom.bankbits + geom.rowbits + geom.colbits)) * config.chips_bytes)


def board_core(board, clock_hz: float, cache_dir=None):
    """The :class:`~.litedram.DramCore` of ``board``'s DRAM for a controller clocked at
    ``clock_hz``, generated unless cached (:func:`~.litedram.generate_core`). ValueError as that."""
    from .litedram import generate_core
    return generate_core(replace(_config(board), clk_freq=clock_hz), cache_dir)


class NativeCommandSlice(wiring.Component):
    """A register slice on the command channel of a LiteDRAM native port (``cmd_valid``,
    ``cmd_ready``, ``cmd_we``, ``cmd_addr``); the write and read data channels pass through.

    Both sides of the command handshake come from registers: ``user.cmd_ready`` is a flip-flop,
    and ``native.cmd_valid``/``cmd_we``/``cmd_addr`` are too, so the controller's combinational
    path from a command to its ``cmd_ready`` ends here instead of running on into the user's
    logic (on the ECPIX-5 the core sits by the DDR3 pins on one edge of the die, the engine
    elsewhere). Two entries (an output register and a skid register): one command per cycle,
    in order, each one cycle later than without the slice.

    Members
    -------
    user : In(native_port_signature(data_width, address_width))    from the port's user
    native : Out(native_port_signature(data_width, address_width)) to the core
    """

    def __init__(self, data_width: int, address_width: int):
        from mmfree_fpga.hw.dram_port import native_port_signature
        self._address_width = address_width
        super().__init__({"user": In(native_port_signature(data_width, address_width)),
                          "native": Out(native_port_signature(data_width, address_width))})

    def elaborate(self, platform):
        m = Module()
        user, native = self.user, self.native
        for name in ("wdata_valid", "wdata_we", "wdata_data", "rdata_ready"):
            m.d.comb += getattr(native, name).eq(getattr(user, name))
        for name in ("wdata_ready", "rdata_valid", "rdata_data"):
            m.d.comb += getattr(user, name).eq(getattr(native, name))
        skid_valid = Signal()
        skid_we = Signal()
        skid_addr = Signal(self._address_width)
        ready = Signal(init=1)
        m.d.comb += user.cmd_ready.eq(ready)
        with m.If(~native.cmd_valid | native.cmd_ready):
            with m.If(skid_valid):
                m.d.sync += [native.cmd_valid.eq(1), native.cmd_we.eq(skid_we), native.cmd_addr.eq(skid_addr),
                             skid_valid.eq(0), ready.eq(1)]
            with m.Else():
                m.d.sync += [native.cmd_valid.eq(user.cmd_valid), native.cmd_we.eq(user.cmd_we),
                             native.cmd_addr.eq(user.cmd_addr)]
        with m.Elif(user.cmd_valid & ready):
            m.d.sync += [skid_valid.eq(1), skid_we.eq(user.cmd_we), skid_addr.eq(user.cmd_addr), ready.eq(0)]
        return m


class DramBoardDesign(wiring.Component):
    """The engine and its link with their weights in the board's DRAM, beside the LiteDRAM core.

    Parameters
    ----------
    design : wiring.Component
        Members ``i_stream`` (In(stream.Signature(8))), ``o_stream`` (Out(stream.Signature(8))),
        ``native`` (Out: the master side of ``core``'s native user port, member names as the
        core's ports without ``user_port_``) and ``init_done`` (In(1)).
    core : DramCore
        The generated core (:func:`board_core`), generated for the ``sync`` domain's clock: an
        SDR core (``GENSDRPHY``) or a DDR3 one (``ECP5DDRPHY``).
    calibration : dict
        Keywords for the DDR3 core's :class:`~mmfree_fpga.hw.dram_calibration.DramCalibration`
        (``words``, ``settle_cycles``, ...; the widths, lanes, bitslips and delays come from the
        core).

    Members
    -------
    i_stream : In(stream.Signature(8))    bytes from the host, to ``design``
    o_stream : Out(stream.Signature(8))   bytes to the host, from ``design``
    eclk_stop, eclk_reset : Out(1)        (DDR3) the PHY's start-up sequencer, to the clocking
                                          (:class:`~.clocks.Ecp5DdrClocking`)
    dram_ready : Out(1)                   (DDR3) read levelling done, the engine may use the DRAM
    dram_error : Out(1)                   (DDR3) read levelling failed (stays high; the engine
                                          never gets the DRAM; the Link's IDENTIFY reports
                                          ``Status.MEMORY_ERROR``)

    Elaboration requests the platform's ``sdram`` resource 0 (an amaranth-boards
    ``SDRAMResource``) or, for DDR3, its ``ddr3`` resource 0, and adds the core's Verilog to the
    platform (module docstring); the DDR3 core also uses the ``sync2x`` and ``dram_init``
    domains.
    """

    def __init__(self, design, core, *, calibration: dict | None = None):
        members = design.signature.members
        for name in ("i_stream", "o_stream", "native", "init_done"):
            if name not in members:
                raise TypeError(f"{type(design).__name__} has no member {name!r}: it cannot hold its weights in DRAM")
        native = set(members["native"].signature.members)
        ports = set(core.user_port_signals())
        if native != ports:
            raise ValueError(f"the design's native port ({', '.join(sorted(native))}) does not match the core's "
                             f"user port ({', '.join(sorted(ports))})")
        self.ddr = is_ddr_phy(core.phy["phytype"])
        pins = DDR3_PINS if self.ddr else SDRAM_PINS
        missing = sorted(set(pins) - set(core.ports))
        if missing:
            kind = "a DDR3" if self.ddr else "an SDR SDRAM"
            raise ValueError(f"core {core.name} has no ports {', '.join(missing)}: not {kind} core")
        self.design = design
        self.dram_core = core
        signature = {"i_stream": In(stream.Signature(8)), "o_stream": Out(stream.Signature(8))}
        if self.ddr:
            from mmfree_fpga.hw.dram_calibration import DramCalibration
            self.calibration = DramCalibration(
                data_width=core.data_width, address_width=core.address_width, lanes=core.phy["databits"] // 8,
                bitslips=core.phy["bitslips"], delays=core.phy["delays"], **(calibration or {}))
            signature |= {"eclk_stop": Out(1), "eclk_reset": Out(1), "dram_ready": Out(1), "dram_error": Out(1)}
        elif calibration:
            raise ValueError(f"core {core.name} ({core.phy['phytype']}) has no read levelling to calibrate")
        super().__init__(signature)

    @property
    def engine(self):
        """The design's engine (for the build report's lanes)."""
        return getattr(self.design, "engine", None)

    def elaborate(self, platform):
        if platform is None:
            raise ValueError("DramBoardDesign needs a platform with the DRAM's pins (it drives them)")
        m = Module()
        m.submodules.design = design = self.design
        wiring.connect(m, wiring.flipped(self.i_stream), design.i_stream)
        wiring.connect(m, design.o_stream, wiring.flipped(self.o_stream))

        core = self.dram_core
        platform.add_file(f"{core.name}.v", Path(core.verilog).read_text())
        ports = {"i_clk": ClockSignal("sync"), "i_rst": ResetSignal("sync")}
        if self.ddr:
            native = self._ddr3(m, platform, ports)
        else:
            native = design.native
            ports["o_init_done"] = design.init_done
            self._sdr(m, platform, ports)
        for name, (direction, _width) in core.user_port_signals().items():
            ports[("i_" if direction == "in" else "o_") + "user_port_" + name] = getattr(native, name)
        m.submodules.dram = Instance(core.name, **ports)
        return m

    def _pin_ports(self, ports, table, pins):
        core = self.dram_core
        for port, path in table.items():
            pad = pins
            for step in path if isinstance(path, tuple) else (path,):
                pad = getattr(pad, step)
            # the raw pads: the core's registers and buffers drive them with the pins' own polarity
            prefix = {"in": "i_", "out": "o_", "inout": "io_"}[core.ports[port][0]]
            ports[prefix + port] = pad.io if hasattr(pad, "io") else pad

    def _sdr(self, m, platform, ports):
        pins = platform.request("sdram", 0, dir="-")
        self._pin_ports(ports, SDRAM_PINS, pins)
        m.submodules.sdram_clk = clk = io.DDRBuffer("o", pins.clk, o_domain="sync")
        m.d.comb += [clk.o[0].eq(0), clk.o[1].eq(1)]

    def _ddr3(self, m, platform, ports):
        """The DDR3 core's clocks, read levelling and pins; returns the native port the core's
        user port connects to (the calibration's)."""
        pins = platform.request("ddr3", 0, dir="-")
        self._pin_ports(ports, DDR3_PINS, pins)
        m.submodules.calibration = cal = self.calibration
        m.submodules.command_slice = cmd_slice = NativeCommandSlice(self.dram_core.data_width,
                                                                    self.dram_core.address_width)
        wiring.connect(m, self.design.native, cal.user)
        wiring.connect(m, cal.native, cmd_slice.user)
        m.d.comb += [self.design.init_done.eq(cal.ready), self.dram_ready.eq(cal.ready),
                     self.dram_error.eq(cal.error), self.design.memory_error.eq(cal.error)]
        ports.update({"i_clk2x": ClockSignal("sync2x"), "i_init_clk": ClockSignal("dram_init"),
                      "i_init_rst": ResetSignal("dram_init"), "o_eclk_stop": self.eclk_stop,
                      "o_eclk_reset": self.eclk_reset, "o_init_done": cal.init_done})
        for name, member in cal.phy.signature.members.items():
            ports[("o_" if member.flow == In else "i_") + name] = getattr(cal.phy, name)
        return cmd_slice.native
