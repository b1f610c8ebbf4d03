"""Co-simulation with the weights in DRAM: a generated LiteDRAM core (its ``sim`` variant:
LiteDRAM's controller with LiteDRAM's SDRAM model) in one Verilator build with
:class:`~mmfree_fpga.hw.dram_port.DramWeightPort` alone (:class:`DramSimTop`, driven by the
cocotb test below), with the whole engine (:class:`DramEngineSimTop`, driven by the engine's
C++ harness through :func:`mmfree_fpga.sim.engine_sim.run_engine` with ``memory="sdram"``), or
with the board design (:class:`DramLinkedSimTop`: the Link and the engine, driven by the pipe
harness behind ``mmfree-fpga serve --memory sdram``, ``sim/pipe.py``).

:class:`DramSimTop` joins the core (an ``Instance``, run on the design clock) and the adapter;
:func:`build_sources` writes its Verilog beside the core's. The cocotb test
(``test_module="mmfree_fpga.sim.dram_sim"``) waits for the core's init sequence, writes a random
image through ``write``, reads it back through random requests with random stalls on both the
requests and the response, checks every beat against the image bytes, then times one long
sequential read of the whole image (``DRAM_RESULT_FILE`` receives ``{"init_cycles", "beats", "cycles",
"efficiency"}``: beats per cycle over the span from the first to the last beat, against the
native port's peak).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from amaranth.hdl import ClockSignal, Instance, Module, Mux, ResetSignal, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.control import ControlSignature
from ..hw.dram_engine import DramEngine
from ..hw.dram_port import DramWeightPort, dram_write_layout
from ..hw.weight_port import weight_port_signature

__all__ = ["DramSimTop", "build_sources", "DramEngineSimTop", "DramLinkedSimTop", "COUNTER_BITS"]

COUNTER_BITS = 48           # the weight-traffic counters of DramEngineSimTop


def _core_ports(core, native, init_done) -> dict:
    """The Instance ports of a generated core, its user port on ``native`` (the master's side)."""
    ports = {"i_clk": ClockSignal(), "i_rst": ResetSignal(), "o_init_done": init_done}
    for name, (direction, _width) in core.user_port_signals().items():
        ports[("i_" if direction == "in" else "o_") + "user_port_" + name] = getattr(native, name)
    return ports


class DramSimTop(wiring.Component):
    """A generated LiteDRAM core (``core``: a :class:`~mmfree_fpga.boards.litedram.DramCore`
    of the ``sim`` variant, or its fields as a dict) behind a :class:`DramWeightPort`.

    Members: ``port`` (the weight port, In), ``write`` (beats to store, In), ``init_done`` (Out).
    """

    def __init__(self, core, *, beat_bytes: int, fifo_depth: int = 32):
        self._core = core
        self._beat_bytes = beat_bytes
        self._fifo_depth = fifo_depth
        super().__init__({
            "port": In(weight_port_signature(beat_bytes)),
            "write": In(stream.Signature(dram_write_layout(beat_bytes))),
            "init_done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        core = self._core
        m.submodules.adapter = adapter = DramWeightPort(
            beat_bytes=self._beat_bytes, data_width=core.data_width, address_width=core.address_width,
            fifo_depth=self._fifo_depth)
        wiring.connect(m, wiring.flipped(self.port), adapter.port)
        wiring.connect(m, wiring.flipped(self.write), adapter.write)
        m.submodules.dram = Instance(core.name, **_core_ports(core, adapter.native, self.init_done))
        return m


def build_sources(core, folder, *, beat_bytes: int, fifo_depth: int = 32) -> list[Path]:
    """Verilog of :class:`DramSimTop` (module ``dram_top``) in ``folder``, and the core's file."""
    from .runner import write_verilog
    top = write_verilog(DramSimTop(core, beat_bytes=beat_bytes, fifo_depth=fifo_depth),
                        Path(folder) / "dram_top.v", name="dram_top")
    return [top, Path(core.verilog)]


class DramEngineSimTop(wiring.Component):
    """The engine with its weights in a generated LiteDRAM core of the ``sim`` variant
    (``core``: a :class:`~mmfree_fpga.boards.litedram.DramCore` or its fields), with counters of
    the weight traffic between engine and adapter. ``engine_args`` go to
    :class:`~mmfree_fpga.hw.dram_engine.DramEngine` (cfg, lanes, packing, packings, maxima,
    fifo_depth, formats).

    Members: the control interface (``cmd``, ``load``, ``result``, ``logit_req``,
    ``logit_resp``) and ``trace`` as :class:`~mmfree_fpga.hw.engine.Engine` has them;
    ``init_done`` (Out): the core's init sequence has run; and three counters from reset
    (Out, :data:`COUNTER_BITS` bits):

    * ``weight_beats``: weight beats the engine took;
    * ``weight_cycles``: cycles in which beats were owed to the engine (requested, not yet
      taken): the cycles spent streaming weights;
    * ``weight_wait_cycles``: those of them with the engine's ``resp.ready`` low (it would not
      have taken a beat): time the memory was not the limit.
    """

    def __init__(self, core, **engine_args):
        self._core = core
        self.engine = DramEngine(native_data_width=core.data_width, native_address_width=core.address_width,
                                 probe=True, **engine_args)
        super().__init__({
            **ControlSignature().members,
            "trace": Out(stream.Signature(self.engine.core.trace_layout())),
            "init_done": Out(1),
            "weight_beats": Out(COUNTER_BITS),
            "weight_cycles": Out(COUNTER_BITS),
            "weight_wait_cycles": Out(COUNTER_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.engine = engine = self.engine
        for name in ("cmd", "load", "logit_req"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(engine, name))
        for name in ("result", "logit_resp", "trace"):
            wiring.connect(m, getattr(engine, name), wiring.flipped(getattr(self, name)))
        m.d.comb += engine.init_done.eq(self.init_done)
        m.submodules.dram = Instance(self._core.name, **_core_ports(self._core, engine.native, self.init_done))

        probe = engine.probe
        owed = Signal(len(probe.req_length) + 8)
        m.d.sync += owed.eq(owed + Mux(probe.req_taken, probe.req_length, 0) - probe.beat_taken)
        m.d.sync += self.weight_beats.eq(self.weight_beats + probe.beat_taken)
        with m.If(owed != 0):
            m.d.sync += self.weight_cycles.eq(self.weight_cycles + 1)
            with m.If(~probe.beat_ready):
                m.d.sync += self.weight_wait_cycles.eq(self.weight_wait_cycles + 1)
        return m


class DramLinkedSimTop(wiring.Component):
    """The board design with its weights in DRAM: :class:`~mmfree_fpga.hw.linked_engine.LinkedEngine`
    (``memory="sdram"``, ``activity_ports=True``) and a generated LiteDRAM core of the ``sim``
    variant (``core``: a :class:`~mmfree_fpga.boards.litedram.DramCore` or its fields) as an
    ``Instance`` on the same clock. ``cfg`` and ``linked_args`` go to the LinkedEngine (lanes,
    packing, clk_freq, formats, ...); the core's widths are added.

    Members, as :class:`~mmfree_fpga.sim.pipe.build_pipe_sim` expects them: ``i_stream``
    (In(stream.Signature(8)), bytes from the host), ``o_stream`` (Out, bytes to the host),
    ``idle`` and ``in_frame`` (Out(1), the LinkedEngine's activity ports: the engine counts as
    busy until the core's init sequence has run).
    """

    def __init__(self, core, cfg, **linked_args):
        from ..hw.linked_engine import LinkedEngine
        self._core = core
        self.linked = LinkedEngine(cfg, memory="sdram", activity_ports=True, native_data_width=core.data_width,
                                   native_address_width=core.address_width, **linked_args)
        super().__init__({"i_stream": In(stream.Signature(8)), "o_stream": Out(stream.Signature(8)),
                          "idle": Out(1), "in_frame": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.linked = linked = self.linked
        wiring.connect(m, wiring.flipped(self.i_stream), linked.i_stream)
        wiring.connect(m, linked.o_stream, wiring.flipped(self.o_stream))
        m.d.comb += [self.idle.eq(linked.idle), self.in_frame.eq(linked.in_frame)]
        init_done = Signal()
        m.d.comb += linked.init_done.eq(init_done)
        m.submodules.dram = Instance(self._core.name, **_core_ports(self._core, linked.native, init_done))
        return m


# -- the cocotb test (runs inside the simulator) ------------------------------------------------------

try:
    import cocotb
except ImportError:                     # the module is also imported for DramSimTop alone
    cocotb = None

if cocotb is not None:
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, RisingEdge, with_timeout

    # Inputs change at the falling edge; ReadOnly then shows what the next rising edge samples,
    # so a transfer is counted when valid and ready are both high there.

    @cocotb.test()
    async def dram_roundtrip(dut):
        beat_bytes = int(os.environ.get("DRAM_BEAT_BYTES", "4"))
        image_bytes = int(os.environ.get("DRAM_IMAGE_BYTES", "4096"))
        native_bytes = int(os.environ.get("DRAM_NATIVE_BYTES", "2"))
        rng = random.Random(int(os.environ.get("DRAM_SEED", "1")))
        image = rng.randbytes(image_bytes)
        beats = image_bytes // beat_bytes

        Clock(dut.clk, 10, unit="ns").start()
        dut.rst.value = 1
        dut.port__req__valid.value = 0
        dut.port__resp__ready.value = 0
        dut.write__valid.value = 0
        await ClockCycles(dut.clk, 4)
        await FallingEdge(dut.clk)
        dut.rst.value = 0
        start = cocotb.utils.get_sim_time("ns")
        await with_timeout(RisingEdge(dut.init_done), 2, "ms")
        init_cycles = round((cocotb.utils.get_sim_time("ns") - start) / 10)

        # the image, beat by beat, in a random order, with random gaps
        order = list(range(beats))
        rng.shuffle(order)
        k = 0
        offering = False
        while k < len(order):
            await FallingEdge(dut.clk)
            if not offering and rng.random() < 0.8:
                n = order[k]
                dut.write__payload.value = n | int.from_bytes(image[n * beat_bytes:(n + 1) * beat_bytes],
                                                              "little") << 28
                offering = True
            dut.write__valid.value = offering
            await ReadOnly()
            if offering and dut.write__ready.value:
                k += 1
                offering = False
        await FallingEdge(dut.clk)
        dut.write__valid.value = 0
        await ClockCycles(dut.clk, 200)            # the last writes reach the memory

        # random requests, both sides stalling at random
        reqs = []
        for _ in range(60):
            length = rng.choice([1, 2, 3, rng.randrange(1, 40)])
            reqs.append((rng.randrange(beats - length + 1), length))
        want = [image[(a + j) * beat_bytes:(a + j + 1) * beat_bytes] for a, n in reqs for j in range(n)]
        got = []
        k = 0
        offering = False
        while len(got) < len(want):
            await FallingEdge(dut.clk)
            if not offering and k < len(reqs) and rng.random() < 0.7:
                dut.port__req__payload.value = reqs[k][0] | reqs[k][1] << 28
                offering = True
            dut.port__req__valid.value = offering
            ready = rng.random() < 0.6
            dut.port__resp__ready.value = ready
            await ReadOnly()
            if offering and dut.port__req__ready.value:
                k += 1
                offering = False
            if ready and dut.port__resp__valid.value:
                got.append(int(dut.port__resp__payload.value).to_bytes(beat_bytes, "little"))
        for j, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"beat {j}: {g.hex()} != {w.hex()}"

        # the whole image in one sequential read, the consumer always ready
        await FallingEdge(dut.clk)
        dut.port__req__valid.value = 0
        dut.port__resp__ready.value = 1
        await ClockCycles(dut.clk, 20)
        await FallingEdge(dut.clk)
        dut.port__req__payload.value = 0 | beats << 28
        dut.port__req__valid.value = 1
        await FallingEdge(dut.clk)
        dut.port__req__valid.value = 0
        first = last = None
        count = cycle = 0
        while count < beats:
            await ReadOnly()
            if dut.port__resp__valid.value:
                value = int(dut.port__resp__payload.value).to_bytes(beat_bytes, "little")
                assert value == image[count * beat_bytes:(count + 1) * beat_bytes], f"stream beat {count}"
                first = cycle if first is None else first
                last = cycle
                count += 1
            await FallingEdge(dut.clk)
            cycle += 1
        span = last - first + 1
        peak = min(1.0, native_bytes / beat_bytes)        # beats per cycle the native port can give
        result = {"init_cycles": init_cycles, "beats": count, "cycles": span,
                  "efficiency": count / (span * peak)}
        dut._log.info(f"sequential read: {result}")
        if os.environ.get("DRAM_RESULT_FILE"):
            Path(os.environ["DRAM_RESULT_FILE"]).write_text(json.dumps(result))
