"""The board top: a design between a UART and the board's clock, reset and LEDs.

A *design* is what a *design factory* returns: ``factory(context: DesignContext)`` gives a
``wiring.Component`` with (at least) these members, both byte streams by
``amaranth.lib.stream`` rules, clocked by the ``sync`` domain at ``context.clock_hz``::

    i_stream: In(stream.Signature(8))    bytes from the host (UART RX)
    o_stream: Out(stream.Signature(8))   bytes to the host (UART TX)

The factory gets the board, device, clock, baud rate, checkpoint, memory budget and where the
weights go (on-chip RAM, or the board's DRAM with its generated controller core) in the
:class:`DesignContext`, so a design can size itself to the board. Structure of the top::

    pin rx -> io.Buffer -> UARTBridge: UARTReceiver -> FIFO -> design.i_stream
    pin tx <- io.Buffer <- UARTBridge: UARTTransmitter <- FIFO <- design.o_stream
    oscillator -> PLL (SyncDomain) -> sync domain, reset until lock + por delay, reset button
    LEDs: heartbeat (~1 Hz), UART activity, sticky error (framing error or RX overrun), and
          status outputs of the design (e.g. a DRAM design's calibration result)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from amaranth.build import ResourceError
from amaranth.hdl import ClockDomain, ClockSignal, Elaboratable, Module, Shape, Signal
from amaranth.lib import fifo, io, stream, wiring
from amaranth.lib.cdc import ResetSynchronizer
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats
from mmfree_fpga.hw.uart import UARTReceiver, UARTTransmitter
from mmfree_fpga.protocol import DEFAULT_BAUD

from .budget import DeviceResources, ImageSummary, MemoryBudget

__all__ = ["DesignContext", "DesignFactory", "UARTBridge", "BoardTop", "check_design", "DEFAULT_BAUD",
           "DEFAULT_FIFO_DEPTH"]

# one iCE40 EBR (512 x 8) per direction; lets the host send a command while the design is busy
DEFAULT_FIFO_DEPTH = 512


@dataclass(frozen=True)
class DesignContext:
    """What a design factory learns about the board it is built for."""

    board: str
    device: str
    family: str | None               # "ice40", "ecp5" or None (generic board of another family)
    clock_hz: float                  # the sync domain's frequency
    baud: int
    checkpoint: Path | None
    image: ImageSummary | None       # sizes of the weight image the engine will hold
    resources: DeviceResources | None
    budget: MemoryBudget | None      # on-chip RAM left for the design
    memory: str = "bram"             # where the weights go: "bram" (on chip) or "dram" (the board's DRAM)
    dram: object | None = None       # with memory "dram": the board's LiteDRAM core (litedram.DramCore)
    formats: Formats = FORMATS       # the engine's number formats (config.FORMAT_SETS)


DesignFactory = Callable[[DesignContext], wiring.Component]


def check_design(design) -> None:
    """TypeError unless ``design`` has the i_stream/o_stream byte-stream members."""
    sig = getattr(design, "signature", None)
    if not isinstance(sig, wiring.Signature):
        raise TypeError(f"the design factory returned {design!r}, not a wiring.Component")
    for name, flow in (("i_stream", In), ("o_stream", Out)):
        member = sig.members[name] if name in sig.members else None
        ok = (member is not None and member.is_signature and member.flow == flow
              and isinstance(member.signature, stream.Signature)
              and Shape.cast(member.signature.members["payload"].shape) == Shape.cast(8))
        if not ok:
            raise TypeError(f"design {type(design).__name__} needs a member "
                            f"{name}: {flow.name}(stream.Signature(8)); its signature is {sig!r}")


def _request_optional(platform, name, number):
    try:
        return platform.request(name, number, dir="-")
    except ResourceError:
        return None


def _register_stage(m, name, source_fifo, sink):
    """``source_fifo``'s read side into the stream ``sink`` through a register (full throughput;
    ``sink.ready`` reaches the FIFO's ``r_en`` combinationally)."""
    valid = Signal(name=f"{name}_valid")
    payload = Signal(source_fifo.width, name=f"{name}_payload")
    take = ~valid | sink.ready
    with m.If(take):
        m.d.sync += [valid.eq(source_fifo.r_rdy), payload.eq(source_fifo.r_data)]
    m.d.comb += [source_fifo.r_en.eq(take), sink.valid.eq(valid), sink.payload.eq(payload)]


class UARTBridge(wiring.Component):
    """A design between a UART receiver and transmitter, with a FIFO on each side.

    Platform-independent (simulate it with the serial lines as plain signals).

    Members
    -------
    rx : In(1, init=1)       serial line from the host
    tx : Out(1, init=1)      serial line to the host
    activity : Out(1)        a byte went in or out the cycle before (registered)
    error : Out(1)           a framing error or an RX overrun happened the cycle before
    """

    def __init__(self, design, *, clock_hz: float, baud: int = DEFAULT_BAUD, fifo_depth: int = DEFAULT_FIFO_DEPTH):
        check_design(design)
        self.design = design
        self.fifo_depth = fifo_depth
        # constructed now so a bad clock/baud pair fails before elaboration
        self.uart_rx = UARTReceiver(clk_freq=clock_hz, baud=baud)
        self.uart_tx = UARTTransmitter(clk_freq=clock_hz, baud=baud)
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1), "activity": Out(1), "error": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart_rx = rx = self.uart_rx
        m.submodules.uart_tx = tx = self.uart_tx
        m.submodules.design = design = self.design
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx)]
        if self.fifo_depth:
            m.submodules.rx_fifo = rx_fifo = fifo.SyncFIFOBuffered(width=8, depth=self.fifo_depth)
            m.submodules.tx_fifo = tx_fifo = fifo.SyncFIFOBuffered(width=8, depth=self.fifo_depth)
            m.d.comb += [
                rx_fifo.w_data.eq(rx.data.payload), rx_fifo.w_en.eq(rx.data.valid),
                rx.data.ready.eq(rx_fifo.w_rdy),
                tx_fifo.w_data.eq(design.o_stream.payload), tx_fifo.w_en.eq(design.o_stream.valid),
                design.o_stream.ready.eq(tx_fifo.w_rdy),
            ]
            # each FIFO's output is registered once more before it leaves: the FIFOs are block
            # RAMs whose data comes straight from the RAM (ECP5: ~6 ns clock-to-out), and the
            # transmitter sits by its pin, far from where the placer puts the RAM
            _register_stage(m, "rx_out", rx_fifo, design.i_stream)
            _register_stage(m, "tx_out", tx_fifo, tx.data)
        else:
            wiring.connect(m, rx.data, design.i_stream)
            wiring.connect(m, design.o_stream, tx.data)
        # registered: the LEDs sit far from the UART, and the handshakes are already late in the
        # cycle
        m.d.sync += [
            self.activity.eq((rx.data.valid & rx.data.ready) | (tx.data.valid & tx.data.ready)),
            self.error.eq(rx.framing_error | rx.overrun),
        ]
        return m


class BoardTop(Elaboratable):
    """Pins, clocking and LEDs around a :class:`UARTBridge` (see the module docstring).

    An LED is named by a platform ``led`` number, or by ``(resource, number, subsignal)`` for
    LEDs of other resources (``("rgb_led", 0, "g")``: the green part of RGB LED 0).

    Parameters
    ----------
    design : the component from the design factory
    clock_hz : frequency of the sync domain (drives the UART divider)
    baud : UART bit rate
    sync_domain : the clocking (a :class:`SyncDomain`: PLL / reset; or an
        :class:`~.clocks.Ecp5DdrClocking`, whose extra domains (``domains()``) are defined
        here too and which takes what it needs from the design (``attach(m, design)``)), or
        None to let the platform create the sync domain from its default clock (generic boards)
    leds : LEDs for (heartbeat, activity, error); None or missing ones are skipped
    status_leds : ``(member, LED)`` pairs: the design's 1-bit output ``member`` lights the LED
        (members the design does not have are skipped)
    fifo_depth : bytes of FIFO on each side of the design (0: none)
    """

    def __init__(self, design, *, clock_hz: float, baud: int = DEFAULT_BAUD, sync_domain=None,
                 leds=(0, 1, 2), status_leds=(), fifo_depth: int = DEFAULT_FIFO_DEPTH):
        self.bridge = UARTBridge(design, clock_hz=clock_hz, baud=baud, fifo_depth=fifo_depth)
        self.clock_hz = clock_hz
        self.sync_domain = sync_domain
        self.leds = leds
        self.status_leds = status_leds

    def elaborate(self, platform):
        m = Module()
        if self.sync_domain is not None:
            m.submodules.clocking = clocking = self.sync_domain
            m.domains.sync = ClockDomain("sync")
            m.d.comb += ClockSignal("sync").eq(clocking.clk)
            m.submodules.reset_sync = ResetSynchronizer(clocking.rst, domain="sync")
            platform.add_clock_constraint(clocking.clk, self.clock_hz)
            for name, (clk, rst) in getattr(clocking, "domains", dict)().items():
                m.domains += ClockDomain(name, reset_less=rst is None)
                m.d.comb += ClockSignal(name).eq(clk)
                if rst is not None:
                    m.submodules[f"reset_sync_{name}"] = ResetSynchronizer(rst, domain=name)
            if hasattr(clocking, "attach"):
                clocking.attach(m, self.bridge.design)

        m.submodules.bridge = bridge = self.bridge
        uart = platform.request("uart", 0, dir="-")
        # plain buffers: the receiver synchronises rx itself, and tx must idle high from
        # configuration on (an I/O-cell register would hold it low until the PLL locks)
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [bridge.rx.eq(rx_buf.i), tx_buf.o.eq(bridge.tx)]

        heartbeat = Signal(max(1, int(self.clock_hz).bit_length()))
        m.d.sync += heartbeat.eq(heartbeat + 1)
        # a byte in or out lights the activity LED for ~20 ms, so single bytes are visible
        stretch = max(2, int(self.clock_hz / 50))
        activity = Signal(range(stretch))
        with m.If(bridge.activity):
            m.d.sync += activity.eq(stretch - 1)
        with m.Elif(activity != 0):
            m.d.sync += activity.eq(activity - 1)
        error = Signal()
        with m.If(bridge.error):
            m.d.sync += error.eq(1)

        heartbeat_led, activity_led, error_led = self.leds
        lights = [(heartbeat_led, heartbeat[-1]), (activity_led, activity != 0), (error_led, error)]
        members = self.bridge.design.signature.members
        lights += [(spec, getattr(self.bridge.design, member)) for member, spec in self.status_leds
                   if member in members]
        requested = {}
        for spec, value in lights:
            if spec is None:
                continue
            if isinstance(spec, int):
                name, port = f"led{spec}", _request_optional(platform, "led", spec)
            else:
                resource, number, subsignal = spec
                name = f"{resource}{number}_{subsignal}"
                if (resource, number) not in requested:
                    requested[resource, number] = _request_optional(platform, resource, number)
                group = requested[resource, number]
                port = getattr(group, subsignal) if group is not None else None
            if port is not None:
                m.submodules[name] = led = io.Buffer("o", port)
                m.d.comb += led.o.eq(value)
        return m
