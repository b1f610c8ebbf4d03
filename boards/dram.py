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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal
from amaranth.lib import io, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["DramBudget", "dram_budget", "board_core", "DramBoardDesign", "SDRAM_PINS", "MEMORY_KINDS"]

# core port -> amaranth-boards SDRAMResource subsignal (the board top drives "clk" itself)
SDRAM_PINS = {"sdram_a": "a", "sdram_ba": "ba", "sdram_cs_n": "cs", "sdram_ras_n": "ras", "sdram_cas_n": "cas",
              "sdram_we_n": "we", "sdram_cke": "clk_en", "sdram_dm": "dqm", "sdram_dq": "dq"}
# LiteDRAM memory type -> (what messages call it, LinkedEngine's memory)
MEMORY_KINDS = {"SDR": ("SDRAM", "sdram")}


@dataclass(frozen=True)
class DramBudget:
    """A board's DRAM, which holds the weight image with ``--memory dram``.

    ``kind``: "SDRAM" (what messages call it); ``module``: the memory part (a class of
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
    config = _config(board)
    module = getattr(modules, config.module)(config.clk_freq, "1:1")
    geom = module.geom_settings
    kind = MEMORY_KINDS.get(module.memtype, (module.memtype, None))[0]
    return DramBudget(kind=kind, module=config.module,
                      size_bytes=(1 << (geom.bankbits + geom.rowbits + geom.colbits)) * config.chips_bytes)


def board_core(board, clock_hz: float, cache_dir=None):
    """The :class:`~.litedram.DramCore` of ``board``'s DRAM for a controller clocked at
    ``clock_hz``, generated unless cached (:func:`~.litedram.generate_core`). ValueError as that."""
    from .litedram import generate_core
    return generate_core(replace(_config(board), clk_freq=clock_hz), cache_dir)


class DramBoardDesign(wiring.Component):
    """The engine and its link with their weights in the board's DRAM, beside the LiteDRAM core.

    Parameters
    ----------
    design : wiring.Component
        Members ``i_stream`` (In(stream.Signature(8))), ``o_stream`` (Out(stream.Signature(8))),
        ``native`` (Out: the master side of ``core``'s native user port, member names as the
        core's ports without ``user_port_``) and ``init_done`` (In(1)).
    core : DramCore
        The generated core (:func:`board_core`), generated for the ``sync`` domain's clock.

    Members
    -------
    i_stream : In(stream.Signature(8))    bytes from the host, to ``design``
    o_stream : Out(stream.Signature(8))   bytes to the host, from ``design``

    Elaboration requests the platform's ``sdram`` resource 0 (an amaranth-boards
    ``SDRAMResource``) and adds the core's Verilog to the platform (module docstring).
    """

    def __init__(self, design, core):
        members = design.signature.members
        for name in ("i_stream", "o_stream", "native", "init_done"):
            if name not in members:
                raise TypeError(f"{type(design).__name__} has no member {name!r}: it cannot hold its weights in DRAM")
        native = set(members["native"].signature.members)
        ports = set(core.user_port_signals())
        if native != ports:
            raise ValueError(f"the design's native port ({', '.join(sorted(native))}) does not match the core's "
                             f"user port ({', '.join(sorted(ports))})")
        missing = sorted(set(SDRAM_PINS) - set(core.ports))
        if missing:
            raise ValueError(f"core {core.name} has no ports {', '.join(missing)}: not an SDR SDRAM core")
        self.design = design
        self.dram_core = core
        super().__init__({"i_stream": In(stream.Signature(8)), "o_stream": Out(stream.Signature(8))})

    @property
    def engine(self):
        """The design's engine (for the build report's lanes)."""
        return getattr(self.design, "engine", None)

    def elaborate(self, platform):
        if platform is None:
            raise ValueError("DramBoardDesign needs a platform with an 'sdram' resource (it drives the pins)")
        m = Module()
        m.submodules.design = design = self.design
        wiring.connect(m, wiring.flipped(self.i_stream), design.i_stream)
        wiring.connect(m, design.o_stream, wiring.flipped(self.o_stream))

        core = self.dram_core
        platform.add_file(f"{core.name}.v", Path(core.verilog).read_text())
        pins = platform.request("sdram", 0, dir="-")
        ports = {"i_clk": ClockSignal("sync"), "i_rst": ResetSignal("sync"), "o_init_done": design.init_done}
        for name, (direction, _width) in core.user_port_signals().items():
            ports[("i_" if direction == "in" else "o_") + "user_port_" + name] = getattr(design.native, name)
        for port, pin in SDRAM_PINS.items():
            # the raw pads: the core's registers and buffers drive them with the pins' own polarity
            prefix = {"in": "i_", "out": "o_", "inout": "io_"}[core.ports[port][0]]
            ports[prefix + port] = getattr(pins, pin).io
        m.submodules.dram = Instance(core.name, **ports)

        m.submodules.sdram_clk = clk = io.DDRBuffer("o", pins.clk, o_domain="sync")
        m.d.comb += [clk.o[0].eq(0), clk.o[1].eq(1)]
        return m
