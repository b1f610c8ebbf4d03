"""Standalone LiteDRAM cores, generated at build time: the DRAM controller behind the weight port.

:func:`generate_core` builds, from LiteDRAM's Python API (no CPU, no SoC, no CSR bus), one Verilog
module that holds LiteDRAM's controller (``litedram.core.LiteDRAMCore``: bank machines,
refresher, multiplexer, crossbar), its PHY and a hardware init sequencer, and offers one
*native* user port of the crossbar. It writes ``<name>.v`` and ``core.json`` (the description,
:class:`DramCore`) into ``<cache>/litedram/<key>/``, ``key`` a hash of the settings
(:class:`LiteDRAMConfig`) and of the litedram/litex/migen versions; a second call with the same
settings reads ``core.json`` and generates nothing.

Two variants of one controller (the same module class, timings, PHY settings, controller
settings):

* ``sim=False``: the board's PHY (``GENSDRPHY`` for SDR SDRAM: ECP5 ``IFS1P3BX``/``OFS1P3BX``
  input/output registers from LiteX's Trellis lowering) and the SDRAM pins as ports
  (``sdram_a``, ``sdram_ba``, ``sdram_dq`` (inout), ``sdram_dm``, ``sdram_ras_n``, ``sdram_cas_n``,
  ``sdram_we_n``, ``sdram_cs_n``, ``sdram_cke``). The SDRAM clock pin is *not* driven by the
  core: the board top drives it from the core's clock (LiteX's ULX3S target uses the system
  clock shifted by 180 degrees). For DDR3 (``ECP5DDRPHY``) the pins are ``ddram_a``, ``ddram_ba``,
  ``ddram_ras_n``, ``ddram_cas_n``, ``ddram_we_n``, ``ddram_cke``, ``ddram_odt``, ``ddram_dm``,
  ``ddram_dq`` and ``ddram_dqs_p`` (inout), ``ddram_clk_p`` (the ECPIX-5's wiring: no CS#, no
  RESET# at the FPGA; a differential pin by its P pad), driven through the PHY's own DDR I/O
  primitives (``ODDRX2F``, ``IDDRX2DQA``, ``DQSBUFM``, ...), and the core has more ports (below);
* ``sim=True``: LiteDRAM's SDRAM model (``litedram.phy.model.SDRAMPHYModel``) in place of PHY and
  chips, built with the board PHY's own settings (CAS latency, read latency, DFI phases), so the
  controller is the one the board runs; the memory array is a Verilog memory (Verilator).

PHYs: ``GENSDRPHY`` (SDR, 1:1; both variants) and ``ECP5DDRPHY`` (DDR3, 1:2 with BL8: a 16-bit
chip gives one 128-bit native word per read command, and with tCCD of two system cycles at most
8 bytes per cycle, :attr:`DramCore.peak_bytes_per_cycle`; both variants).

The ``ECP5DDRPHY`` board variant's ports beyond those below: ``clk2x`` (in: the PHY's edge clock,
twice ``clk``, from an ``ECLKSYNCB``; ``clk`` must be it divided by two by a ``CLKDIVF``),
``init_clk``/``init_rst`` (in: the clock and reset of the PHY's start-up sequencer,
``ECP5DDRPHYInit``, which waits for its ``DDRDLLA`` to lock and then sequences the edge clock),
``eclk_stop``/``eclk_reset`` (out, ``init_clk`` domain: that sequencer's requests to stop the
``ECLKSYNCB`` and to reset the ``CLKDIVF``; the board's clocking obeys them,
``boards/clocks.py``), and the PHY's read-levelling CSRs as ports (``clk`` domain): ``dly_sel``
(in, one bit per byte lane: the lanes the pulses act on), the pulses ``rdly_dq_rst``,
``rdly_dq_inc``, ``rdly_dq_bitslip_rst``, ``rdly_dq_bitslip``, ``burstdet_clr`` (in) and
``burstdet_seen`` (out, per lane), for a calibration outside the core
(``hw/dram_calibration.py``). ``core.json``'s ``phy`` then also holds ``bitslips`` and
``delays``.

The generated module's ports (``N`` = ``data_width``, ``A`` = ``address_width``, all in the
``clk`` domain; the native port is LiteDRAM's, seen from the user):

=====================  ====  =====  ===========================================================
``clk``, ``rst``       in    1      the controller's clock (``clk_freq``); synchronous reset
``init_done``          out   1      the init sequence has run: commands are accepted from now
``user_port_cmd_valid`` in   1      a command: ``we`` (1 write, 0 read) and ``addr``, a word
``user_port_cmd_ready`` out  1      address in units of ``N`` bits; held until ``ready``
``user_port_cmd_we``   in    1      (``ready`` is low until ``init_done``)
``user_port_cmd_addr`` in    A
``user_port_wdata_valid`` in 1      one data word per write command, in command order; the
``user_port_wdata_ready`` out 1     controller takes it when it issues the write (after the
``user_port_wdata_we`` in    N/8    command, some cycles later); ``we``: byte enables
``user_port_wdata_data`` in  N
``user_port_rdata_valid`` out 1     one word per read command, in command order, a fixed-ish
``user_port_rdata_ready`` in 1      number of cycles after the command (``read_latency`` of the
``user_port_rdata_data`` out N      PHY plus the controller's pipeline); ``ready`` is *ignored*:
                                    a word not taken is lost, so a reader must have room for
                                    every read it has commanded (``hw/dram_port.py`` does)
=====================  ====  =====  ===========================================================

Word ``n`` of the native port holds bytes ``[n N/8, (n + 1) N/8)`` of the memory, byte 0 in the
low bits (LiteDRAM's ``ROW_BANK_COL`` mapping: consecutive words are consecutive columns of a
row, then the next bank, so sequential reads stay in open rows).

The init sequence is LiteDRAM's own (``litedram.init.get_sdram_phy_init_sequence``: CKE high,
precharge all, mode registers, auto refreshes), which LiteX SoCs run from the CPU's BIOS through
the DFI injector's CSRs; here a small state machine replays it on the injector's external DFI
port (``ext_dfi``), each step's delay taken as clock cycles (at least :data:`MIN_STEP_CYCLES`),
then hands the DFI to the controller and raises ``init_done``. For DDR3 the sequence is LiteDRAM's
DDR3 one (reset and CKE release, MR2/MR3/MR1/MR0, ZQ calibration); the read levelling a board
needs after it is not part of the core (the board variant offers the PHY's controls as ports;
SDRAMPHYModel needs none).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["LiteDRAMConfig", "DramCore", "CORES", "generate_core", "litedram_available",
           "MIN_STEP_CYCLES", "GENERATOR_VERSION", "PHY_RATES"]

GENERATOR_VERSION = 3          # bump when the generated module changes for the same settings
MIN_STEP_CYCLES = 16           # cycles after each init command (covers tRP, tRFC, tMRD at <= 200 MHz)
# the PHYs generated, with the memory type each drives and its clock ratio (DFI phases per cycle)
_PHYS = {"GENSDRPHY": ("SDR", 1), "ECP5DDRPHY": ("DDR3", 2)}
PHY_RATES = {phy: f"1:{nphases}" for phy, (_, nphases) in _PHYS.items()}   # LiteDRAM's rate argument
_VERSIONED = ("litedram", "litex", "migen")


@dataclass(frozen=True)
class LiteDRAMConfig:
    """The settings of one generated core (the cache key).

    Parameters
    ----------
    module : str
        A module class of ``litedram.modules`` (``IS42S16160``: the ULX3S's 32 MB SDR SDRAM).
    chips_bytes : int
        Data bus width in bytes (2: one 16-bit chip).
    phy : str
        The board PHY (``GENSDRPHY``); its settings also configure the ``sim`` variant.
    clk_freq : float
        The controller's clock in Hz (timings are derived from it).
    device : str
        The FPGA (for the PHY's I/O primitives).
    sim : bool
        LiteDRAM's SDRAM model instead of PHY and pins.
    data_width : int or None
        The user port's width in bits (LiteDRAM converts); None: the controller's native width.
    cmd_buffer_depth : int
        Commands each bank machine buffers (LiteDRAM's ``ControllerSettings``).
    """

    module: str = "IS42S16160"
    chips_bytes: int = 2
    phy: str = "GENSDRPHY"
    clk_freq: float = 50e6
    device: str = "LFE5U-85F-6BG381C"
    sim: bool = False
    data_width: int | None = None
    cmd_buffer_depth: int = 8

    def key(self) -> str:
        """A hash of the settings, the generator and the LiteDRAM/LiteX/Migen versions."""
        stamp = {"config": asdict(self), "generator": GENERATOR_VERSION,
                 "versions": {d: importlib.metadata.version(d) for d in _VERSIONED}}
        return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


# Named settings for the boards that have a DRAM; ``dataclasses.replace(CORES[b], sim=True)``
# is the co-simulation variant of the same controller. The ECPIX-5's DDR3 (MT41K256M16, 512 MiB,
# 16 bits) runs at LiteX's ecpix5 target's default system clock, 75 MHz (sys2x 150 MHz, DDR3-300).
CORES = {
    "ulx3s-85f": LiteDRAMConfig(module="IS42S16160", chips_bytes=2, device="LFE5U-85F-6BG381C"),
    "ecpix5-85f": LiteDRAMConfig(module="MT41K256M16", chips_bytes=2, phy="ECP5DDRPHY", clk_freq=75e6,
                                 device="LFE5UM5G-85F-8BG554I"),
}


@dataclass(frozen=True)
class DramCore:
    """A generated core (what ``core.json`` holds).

    ``name``: the Verilog module; ``verilog``: its file (a path in the cache; ``core.json`` holds
    the bare name); ``data_width`` / ``address_width``: the
    user port's word width in bits and word-address width; ``size_bytes``: the memory;
    ``clk_freq``: the clock it was generated for; ``ports``: every port of the module as
    ``name -> [direction, width]`` (``"in"``, ``"out"``, ``"inout"``); ``init_cycles``: cycles
    from reset to ``init_done``; ``phy``: the PHY's settings (``cl``, ``read_latency``, ...);
    ``config``: the :class:`LiteDRAMConfig` fields; ``versions``: litedram, litex, migen.
    """

    name: str
    verilog: str
    data_width: int
    address_width: int
    size_bytes: int
    clk_freq: float
    ports: dict
    init_cycles: int
    phy: dict
    config: dict
    versions: dict = field(default_factory=dict)

    @property
    def peak_bytes_per_cycle(self) -> int:
        """Bytes per ``clk`` cycle the memory's data bus carries at most: ``databits / 8`` per
        transfer, one transfer per DFI phase (SDR) or two (DDR). Less than the native port's
        ``data_width / 8`` where a command's burst takes several cycles (``ECP5DDRPHY``: BL8 on
        16 bits is one 128-bit word per two cycles, 8 bytes per cycle)."""
        per_phase = 1 if self.phy["memtype"] == "SDR" else 2
        return self.phy["databits"] // 8 * self.phy["nphases"] * per_phase

    def user_port_signals(self) -> dict:
        """``{short name: (direction, width)}`` of the native port (``cmd_valid``, ...)."""
        prefix = "user_port_"
        return {k[len(prefix):]: tuple(v) for k, v in self.ports.items() if k.startswith(prefix)}


def litedram_available() -> bool:
    """Whether LiteDRAM (with LiteX and Migen) can be imported."""
    try:
        import litedram.core  # noqa: F401
        import migen  # noqa: F401
    except ImportError:
        return False
    return True


def _check(config: LiteDRAMConfig):
    from litedram import modules
    cls = getattr(modules, config.module, None)
    if not (isinstance(cls, type) and issubclass(cls, modules.SDRAMModule) and hasattr(cls, "memtype")):
        known = sorted(n for n, c in vars(modules).items()
                       if isinstance(c, type) and issubclass(c, modules.SDRModule) and c is not modules.SDRModule)
        raise ValueError(f"unknown LiteDRAM module {config.module!r}: name a class of litedram.modules "
                         f"(SDR ones: {', '.join(known)})")
    if config.phy not in _PHYS:
        raise ValueError(f"unknown PHY {config.phy!r}: use one of {', '.join(_PHYS)}")
    memtype = _PHYS[config.phy][0]
    if cls.memtype != memtype:
        raise ValueError(f"{config.module} is {cls.memtype}: the {config.phy} drives only {memtype} memories "
                         f"(PHYs: {', '.join(f'{p} {t}' for p, (t, _) in _PHYS.items())})")
    if config.chips_bytes < 1:
        raise ValueError("chips_bytes must be at least 1")
    if config.data_width is not None and (config.data_width < 8 or config.data_width & (config.data_width - 1)):
        raise ValueError(f"data_width {config.data_width} is not a power of two >= 8 bits")
    if not 1e6 <= config.clk_freq <= 200e6:
        raise ValueError(f"clk_freq {config.clk_freq:g} Hz is outside 1-200 MHz")
    return cls


def _init_steps(phy_settings, timing_settings):
    """LiteDRAM's init sequence as (control flags or None, command bits or None, address, bank,
    cycles to wait after the step)."""
    from litedram.init import get_sdram_phy_init_sequence
    sequence, _ = get_sdram_phy_init_sequence(phy_settings, timing_settings)
    steps = []
    for _comment, a, ba, cmd, delay in sequence:
        flags = set(cmd.split("|")) if cmd else set()
        wait = max(int(delay), MIN_STEP_CYCLES)
        if any(f.startswith("DFII_CONTROL_") for f in flags):
            steps.append(({f[len("DFII_CONTROL_"):].lower() for f in flags}, None, a, ba, wait))
        else:
            steps.append((None, {f[len("DFII_COMMAND_"):].lower() for f in flags}, a, ba, wait))
    return steps


class _BidirTristate:
    """Tristate lowering to one ``TRELLIS_IO`` per bit with the pad connected as an *inout*
    (LiteX's Trellis lowering connects it as an input, so the generated module's pin port would
    be declared ``input`` and could not be driven through the module boundary)."""

    @staticmethod
    def lower(dr):
        from migen import Instance, Module
        from migen.fhdl.bitcontainer import value_bits_sign
        m = Module()
        nbits, _ = value_bits_sign(dr.target)
        for bit in range(nbits):
            m.specials += Instance("TRELLIS_IO", p_DIR="BIDIR", io_B=dr.target[bit] if nbits > 1 else dr.target,
                                   i_I=dr.o[bit] if nbits > 1 else dr.o, o_O=dr.i[bit] if nbits > 1 else dr.i,
                                   i_T=~dr.oe)
        return m


# the ECP5DDRPHY board variant's ports beyond the SDR core's (module docstring)
_DDR3_DIRECTIONS = {"clk2x": "in", "init_clk": "in", "init_rst": "in", "eclk_stop": "out", "eclk_reset": "out",
                    "dly_sel": "in", "rdly_dq_rst": "in", "rdly_dq_inc": "in", "rdly_dq_bitslip_rst": "in",
                    "rdly_dq_bitslip": "in", "burstdet_clr": "in", "burstdet_seen": "out",
                    "ddram_dq": "inout", "ddram_dqs_p": "inout"}


def _ecp5ddrphy_board(top, platform, geom, config):
    """LiteDRAM's ECP5DDRPHY on the DDR3 pins, with its sys2x and init clocks and its read-levelling
    controls as ports: (phy, the ports added)."""
    from migen import ClockDomain, Signal
    from litedram.phy import ECP5DDRPHY
    from litex.build.generic_platform import Pins, Subsignal

    lanes = config.chips_bytes
    platform.add_extension([("ddram", 0,
        Subsignal("a", Pins(geom.addressbits)), Subsignal("ba", Pins(geom.bankbits)),
        Subsignal("ras_n", Pins(1)), Subsignal("cas_n", Pins(1)), Subsignal("we_n", Pins(1)),
        Subsignal("dm", Pins(lanes)), Subsignal("dq", Pins(8 * lanes)), Subsignal("dqs_p", Pins(lanes)),
        Subsignal("clk_p", Pins(1)), Subsignal("cke", Pins(1)), Subsignal("odt", Pins(1)))])
    pads = platform.request("ddram")
    top.clock_domains.cd_sys2x = cd_sys2x = ClockDomain("sys2x", reset_less=True)
    top.clock_domains.cd_init = cd_init = ClockDomain("init")
    cd_sys2x.clk.name_override = "clk2x"
    cd_init.clk.name_override = "init_clk"
    cd_init.rst.name_override = "init_rst"
    phy = ECP5DDRPHY(pads, sys_clk_freq=config.clk_freq)
    ports = {name: Signal(lanes if name in ("dly_sel", "burstdet_seen") else 1, name_override=name)
             for name in ("eclk_stop", "eclk_reset", "dly_sel", "rdly_dq_rst", "rdly_dq_inc",
                          "rdly_dq_bitslip_rst", "rdly_dq_bitslip", "burstdet_clr", "burstdet_seen")}
    # the PHY's CSRs, driven from ports (no CSR bank: their storage and strobes are plain signals)
    top.comb += [
        ports["eclk_stop"].eq(phy.init.stop), ports["eclk_reset"].eq(phy.init.reset),
        phy._dly_sel.storage.eq(ports["dly_sel"]),
        phy._rdly_dq_rst.re.eq(ports["rdly_dq_rst"]), phy._rdly_dq_inc.re.eq(ports["rdly_dq_inc"]),
        phy._rdly_dq_bitslip_rst.re.eq(ports["rdly_dq_bitslip_rst"]),
        phy._rdly_dq_bitslip.re.eq(ports["rdly_dq_bitslip"]),
        phy._burstdet_clr.re.eq(ports["burstdet_clr"]),
        ports["burstdet_seen"].eq(phy._burstdet_seen.status),
    ]
    return phy, {cd_sys2x.clk, cd_init.clk, cd_init.rst, *ports.values(), *pads.flatten()}


def _build(config: LiteDRAMConfig, name: str):
    """(Verilog text, description fields) of the core."""
    from migen import ClockDomain, If, Module, Record, Signal, Case
    from migen.fhdl.specials import Tristate
    from litedram import modules
    from litedram.core import LiteDRAMCore
    from litedram.core.controller import ControllerSettings
    from litedram.phy import ECP5DDRPHY, GENSDRPHY
    from litedram.phy.model import SDRAMPHYModel
    from litex.build.generic_platform import Pins, Subsignal
    from litex.build.lattice import LatticePlatform
    from litex.gen.fhdl.verilog import convert

    module_cls = getattr(modules, config.module)
    memtype, nphases = _PHYS[config.phy]
    sdram_module = module_cls(config.clk_freq, f"1:{nphases}")
    geom = sdram_module.geom_settings
    databits = 8 * config.chips_bytes

    platform = LatticePlatform(config.device, io=[], toolchain="trellis")
    platform.add_extension([("sdram", 0,
        Subsignal("a", Pins(geom.addressbits)), Subsignal("ba", Pins(geom.bankbits)),
        Subsignal("ras_n", Pins(1)), Subsignal("cas_n", Pins(1)), Subsignal("we_n", Pins(1)),
        Subsignal("cs_n", Pins(1)), Subsignal("dm", Pins(config.chips_bytes)),
        Subsignal("dq", Pins(databits)), Subsignal("cke", Pins(1)))])

    top = Module()
    top.clock_domains.cd_sys = cd_sys = ClockDomain("sys")
    cd_sys.clk.name_override = "clk"
    cd_sys.rst.name_override = "rst"
    ios = {cd_sys.clk, cd_sys.rst}

    if config.sim:
        # the board PHY's settings, from a PHY built on stand-in pads and then dropped
        pins = [("a", geom.addressbits), ("ba", geom.bankbits), ("ras_n", 1), ("cas_n", 1),
                ("we_n", 1), ("cs_n", 1), ("dm", config.chips_bytes), ("dq", databits), ("cke", 1)]
        if memtype == "SDR":
            settings = GENSDRPHY(Record(pins), sys_clk_freq=config.clk_freq).settings
        else:
            pins += [("dqs_p", config.chips_bytes), ("clk_p", 1), ("odt", 1), ("reset_n", 1)]
            settings = ECP5DDRPHY(Record(pins), sys_clk_freq=config.clk_freq).settings
        phy = SDRAMPHYModel(sdram_module, settings, clk_freq=config.clk_freq)
    elif memtype == "SDR":
        pads = platform.request("sdram")
        phy = GENSDRPHY(pads, sys_clk_freq=config.clk_freq)
        ios |= set(pads.flatten())
    else:
        phy, extra = _ecp5ddrphy_board(top, platform, geom, config)
        ios |= extra
    top.submodules.phy = phy
    controller = ControllerSettings(cmd_buffer_depth=config.cmd_buffer_depth)
    top.submodules.core = core = LiteDRAMCore(phy, geom, sdram_module.timing_settings, config.clk_freq,
                                              controller_settings=controller)
    port = core.crossbar.get_port(data_width=config.data_width)

    # -- init sequencer on the DFI injector's external port -----------------------------------
    steps = _init_steps(phy.settings, sdram_module.timing_settings)
    init_done = Signal(name_override="init_done")
    ios.add(init_done)
    step = Signal(max=len(steps) + 1)
    timer = Signal(max=max(s[4] for s in steps) + 1)
    cke, odt, reset_n = Signal(), Signal(), Signal()
    issue, cs, ras, cas, we = Signal(), Signal(), Signal(), Signal(), Signal()
    address = Signal(len(core.dfii.ext_dfi.phases[0].address))
    bank = Signal(len(core.dfii.ext_dfi.phases[0].bank))
    cases = {}
    for k, (control, command, a, ba, wait) in enumerate(steps):
        actions = [timer.eq(wait - 1), address.eq(a), bank.eq(ba)]
        if control is not None:
            actions += [cke.eq("cke" in control), odt.eq("odt" in control), reset_n.eq("reset_n" in control)]
        else:
            actions += [issue.eq(1), cs.eq("cs" in command), ras.eq("ras" in command),
                        cas.eq("cas" in command), we.eq("we" in command)]
        cases[k] = actions
    top.sync += [
        issue.eq(0),
        If(timer != 0,
            timer.eq(timer - 1),
        ).Elif(step != len(steps),
            step.eq(step + 1),
            Case(step, cases),
        ).Else(
            init_done.eq(1),
        ),
    ]
    top.comb += core.dfii.ext_dfi_sel.eq(~init_done)
    for n, phase in enumerate(core.dfii.ext_dfi.phases):
        top.comb += [phase.cke.eq(cke), phase.cs_n.eq(~(issue & cs) if n == 0 else 1),
                     phase.ras_n.eq(~(issue & ras) if n == 0 else 1),
                     phase.cas_n.eq(~(issue & cas) if n == 0 else 1),
                     phase.we_n.eq(~(issue & we) if n == 0 else 1),
                     phase.address.eq(address), phase.bank.eq(bank)]
        if hasattr(phase, "odt"):
            top.comb += phase.odt.eq(odt)
        if hasattr(phase, "reset_n"):
            top.comb += phase.reset_n.eq(reset_n)
    init_cycles = sum(s[4] for s in steps) + 1          # each step: its cycle, then wait - 1 more

    # -- the native user port, closed until the init sequence has run --------------------------
    dw, aw = port.data_width, port.address_width
    user = {}
    user_ports = [("cmd_valid", 1, "in"), ("cmd_ready", 1, "out"), ("cmd_we", 1, "in"), ("cmd_addr", aw, "in"),
                  ("wdata_valid", 1, "in"), ("wdata_ready", 1, "out"), ("wdata_we", dw // 8, "in"),
                  ("wdata_data", dw, "in"), ("rdata_valid", 1, "out"), ("rdata_ready", 1, "in"),
                  ("rdata_data", dw, "out")]
    for sig, width, _ in user_ports:
        user[sig] = Signal(width, name_override=f"user_port_{sig}")
        ios.add(user[sig])
    top.comb += [
        port.cmd.valid.eq(user["cmd_valid"] & init_done),
        user["cmd_ready"].eq(port.cmd.ready & init_done),
        port.cmd.we.eq(user["cmd_we"]),
        port.cmd.addr.eq(user["cmd_addr"]),
        port.wdata.valid.eq(user["wdata_valid"] & init_done),
        user["wdata_ready"].eq(port.wdata.ready & init_done),
        port.wdata.we.eq(user["wdata_we"]),
        port.wdata.data.eq(user["wdata_data"]),
        user["rdata_valid"].eq(port.rdata.valid),
        port.rdata.ready.eq(user["rdata_ready"]),
        user["rdata_data"].eq(port.rdata.data),
    ]

    overrides = dict(platform.toolchain.special_overrides)
    overrides[Tristate] = _BidirTristate
    out = convert(top, ios=ios, name=name, platform=platform, special_overrides=overrides,
                  attr_translate=platform.toolchain.attr_translate)
    directions = {"clk": "in", "rst": "in", "init_done": "out", "sdram_dq": "inout", **_DDR3_DIRECTIONS}
    directions.update({f"user_port_{sig}": d for sig, _, d in user_ports})
    ports = {}
    for sig in ios:
        pname = out.ns.get_name(sig)
        ports[pname] = [directions.get(pname, "out"), len(sig)]     # the other pins: outputs
    ports = dict(sorted(ports.items()))
    phy_fields = {k: getattr(phy.settings, k) for k in ("phytype", "memtype", "nphases", "cl", "read_latency",
                                                        "write_latency", "databits", "dfi_databits")}
    if memtype != "SDR" and not config.sim:
        phy_fields.update(bitslips=phy.settings.bitslips, delays=phy.settings.delays)
    size = (1 << (geom.bankbits + geom.rowbits + geom.colbits)) * databits // 8
    return str(out), dict(data_width=dw, address_width=aw, size_bytes=size, clk_freq=config.clk_freq,
                          ports=ports, init_cycles=init_cycles, phy=phy_fields)


def generate_core(config: LiteDRAMConfig, cache_dir=None) -> DramCore:
    """The core for ``config``, generated into ``<cache_dir>/litedram/<key>/`` unless it is there.

    ``cache_dir`` defaults to the builds' cache (``$MMFREE_FPGA_CACHE`` or ``out/cache``).
    ValueError for settings LiteDRAM cannot build (unknown module or PHY, a module the PHY does not
    drive) and when LiteDRAM is not installed.
    """
    if not litedram_available():
        raise ValueError("LiteDRAM is not installed: pip install litedram==2024.12 litex==2024.12 migen==0.10.0 "
                         "(the project's dependencies)")
    _check(config)
    if cache_dir is None:
        from .build import default_cache_dir
        cache_dir = default_cache_dir()
    key = config.key()
    folder = Path(cache_dir) / "litedram" / key
    described = folder / "core.json"
    if described.is_file():
        try:
            core = DramCore(**json.loads(described.read_text()))
            if (folder / core.verilog).is_file():
                return replace(core, verilog=str(folder / core.verilog))
        except (OSError, ValueError, TypeError):
            pass
    name = f"mmfree_litedram_{key}"
    verilog, fields = _build(config, name)
    folder.mkdir(parents=True, exist_ok=True)
    core = DramCore(name=name, verilog=f"{name}.v", config=asdict(config),
                    versions={d: importlib.metadata.version(d) for d in _VERSIONED}, **fields)
    for path, text in [(folder / core.verilog, verilog), (described, json.dumps(asdict(core), indent=1))]:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return replace(core, verilog=str(folder / core.verilog))
