"""What ``mmfree-fpga serve`` puts behind its byte stream: the device backends.

A backend is the engine as its UART sees it, an object with

* ``description``: one line for humans;
* ``receive(data, now) -> bytes``: bytes from the host in, bytes for the host out;
* ``poll(now) -> bytes``: called when no bytes arrived for a while (idle timeouts);
* ``settle() -> int``: the host went away: finish what it left (a partial frame times out,
  answers still being computed are sent) and discard the bytes, so that the next host hears
  nothing it did not ask for. A board does the same when nobody listens: its transmitter sends
  into the void, its state (weights, position, reply cache) stays. Returns the bytes discarded;
* ``power_cycle()``: a reset (state, weights and the reply cache are lost);
* ``close()``;
* optionally ``fileno()``: a descriptor that becomes readable when the backend has bytes to
  send, for ``select`` (the server then need not poll on a timer), or None.

``model`` is the Python device model (``host/device_model.py``); ``rtl`` is the generated
Verilog of the board design in Verilator, behind the same interface: the server, the driver and
the tests do not change. The ``rtl`` backend's ``memory`` (:data:`MEMORIES`) says where the
engine's weights are: ``"bram"`` on-chip RAM, ``"sdram"`` a simulated SDRAM behind a generated
LiteDRAM core (the ULX3S's IS42S16160 controller with LiteDRAM's SDRAM model), ``"ddr3"`` the
ECPIX-5's DDR3 the same way; the model backend has no memory type and refuses both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from mmfree_fpga.config import FORMATS, Formats, ModelConfig, slots_formats_error
from mmfree_fpga.errors import UserError

if TYPE_CHECKING:
    from mmfree_fpga.host.image import WeightImage

__all__ = ["Backend", "BACKENDS", "MEMORIES", "MODEL_SLOTS", "make_backend"]

MEMORIES = ("bram", "sdram", "ddr3")        # the rtl backend's weight memories (module docstring)
# the fraction of the native port's peak that sequential weight reads sustain at least (the
# co-simulation of the generated SDR core measures 0.96): the DRAM step-time bound divides by it
DRAM_EFFICIENCY_BOUND = 0.9


def dram_step_time_ms(cfg: ModelConfig, packing: str, lanes: int, native_bytes: int,
                      formats: Formats = FORMATS) -> int:
    """An upper bound of one token's time, in ms of the pipe harness's nominal clock, for the
    engine with its weights in DRAM (``native_bytes`` per cycle at the port's peak): the compute
    cycles plus every weight byte of the image in ``formats`` at :data:`DRAM_EFFICIENCY_BOUND` of
    the peak (the two overlap).
    The Link reports it (IDENTIFY's ``step_time_ms``); the host waits that long for a token
    before it retransmits. A model the size of the ULX3S's block RAM and more takes seconds per
    token in Verilator, so the bound matters here (the block-RAM engine reports 0: unknown)."""
    from mmfree_fpga.config import PERF_MODEL
    from .pipe import PIPE_CLOCK_HZ
    cycles = (PERF_MODEL.cycles_per_token(cfg, lanes)
              + PERF_MODEL.bytes_per_token(cfg, packing, formats) / (native_bytes * DRAM_EFFICIENCY_BOUND))
    return max(1, int(-(-cycles * 1000 // PIPE_CLOCK_HZ)))


class Backend(Protocol):
    description: str

    def receive(self, data: bytes, now: float) -> bytes: ...

    def poll(self, now: float) -> bytes: ...

    def settle(self) -> int: ...

    def power_cycle(self) -> None: ...

    def close(self) -> None: ...


MODEL_SLOTS = 4      # the model backend's state slots (protocol 1.2's slice ops) unless told otherwise


def _model_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None,
                   waves=None, memory: str = "bram", slots: int | None = None, cycle_model: bool = False,
                   lanes: int = 16, formats: Formats = FORMATS, **_options) -> Backend:
    """The device model (in ``formats``) with ``slots`` state slots (default :data:`MODEL_SLOTS`: it runs layer
    slices; 0: a device without the slice ops). ``cycle_model``: each feed reports the
    performance model's cycles of an engine of ``lanes`` lanes for the slice it runs."""
    if waves is not None:
        raise UserError("--waves traces the generated Verilog: it needs --backend rtl")
    if memory != "bram":
        raise UserError(f"--memory {memory} simulates the engine's DRAM in the generated Verilog: it needs "
                        "--backend rtl (the model backend has no memory type)")
    from mmfree_fpga.host.device_model import DeviceModel
    from mmfree_fpga.config import PERF_MODEL
    if cycle_model:
        device = DeviceModel(cfg, packing, seed=seed, slots=MODEL_SLOTS if slots is None else slots,
                             lanes=lanes, cycle_model=PERF_MODEL, formats=formats)
    else:
        device = DeviceModel(cfg, packing, seed=seed, slots=MODEL_SLOTS if slots is None else slots,
                             formats=formats)
    if image is not None:
        device.load_image(image.blob)
    return device


class RtlBackend:
    """The generated Verilog of the board design (:class:`~mmfree_fpga.hw.linked_engine.LinkedEngine`:
    protocol link + engine) compiled by Verilator, its byte streams on a subprocess's pipes
    (``sim/pipe.py``). It starts without weights, like a board after power-up.

    The design's clock is ``sim.pipe.PIPE_CLOCK_HZ`` (the Link's idle timeout is
    FRAME_IDLE_TIMEOUT_S of it, and the harness paces the clock to it while a partial frame
    waits, so the timeout takes that long in wall time). ``waves``: a Verilator build with FST
    tracing (a separate binary, built when first asked for) dumps cycles [``waves_from``,
    ``waves_to``) into that file; it is complete once the window has passed or the backend
    closed. ``power_cycle`` starts a fresh simulation, and a fresh trace.

    ``memory="sdram"`` or ``"ddr3"`` (the ULX3S's or the ECPIX-5's memory,
    ``sim.engine_sim.DRAM_BOARDS``): the engine is :class:`~mmfree_fpga.hw.dram_engine.DramEngine` and the
    Verilator build holds a generated LiteDRAM core in its ``sim`` variant
    (:class:`~mmfree_fpga.sim.dram_sim.DramLinkedSimTop`; the core is generated once and cached
    with the engine simulations' builds). The image the host uploads goes through the Link's
    ``load`` into the simulated SDRAM; the engine takes commands once the core's init sequence
    has run (the first bytes wait for it). UserError if the model's image does not fit the
    SDRAM. A power cycle empties the SDRAM. ``slots``: state slots (protocol 1.2's slice ops) in
    either memory; a slice image goes where a whole image would."""

    def __init__(self, cfg: ModelConfig, packing: str = "base3", lanes: int = 16, build_dir=None, log=None,
                 waves=None, waves_from: int = 0, waves_to: int | None = None, memory: str = "bram",
                 formats: Formats = FORMATS, slots: int = 0):
        import hashlib
        import json
        from pathlib import Path

        from mmfree_fpga.hw.linked_engine import LinkedEngine
        from .pipe import PIPE_CLOCK_HZ, PipeSim, build_pipe_sim
        if memory not in MEMORIES:
            raise UserError(f"unknown memory {memory!r}; use one of {', '.join(MEMORIES)}")
        if slots and not formats.int32_residual:
            raise UserError(slots_formats_error())
        settings = [cfg.as_dict(), packing, lanes] + ([] if formats == FORMATS else [formats.as_dict()])
        if slots:
            settings.append({"slots": slots})
        sources = []
        if memory == "bram":
            design = LinkedEngine(cfg, lanes=lanes, packing=packing, clk_freq=PIPE_CLOCK_HZ, activity_ports=True,
                                  formats=formats, slots=slots)
        else:
            from mmfree_fpga.image import image_size
            from .dram_sim import DramLinkedSimTop
            from .engine_sim import dram_core
            core = dram_core(memory)
            size = image_size(cfg, packing, formats)
            if size > core.size_bytes:
                raise UserError(f"the weight image ({size:,} bytes) does not fit the simulated {memory} "
                                f"({core.size_bytes:,} bytes)")
            design = DramLinkedSimTop(core, cfg, lanes=lanes, packing=packing, clk_freq=PIPE_CLOCK_HZ,
                                      formats=formats, slots=slots,
                                      step_time_ms=dram_step_time_ms(cfg, packing, lanes, core.peak_bytes_per_cycle,
                                                                     formats))
            sources = [core.verilog]
            settings += [memory, core.name]
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
        build_dir = Path(build_dir) if build_dir else Path("out") / "cache" / f"rtl-{key}"
        self.binary = build_pipe_sim(design, build_dir, log=log, waves=waves is not None, sources=sources)
        self._start = lambda: PipeSim(self.binary, clock_hz=PIPE_CLOCK_HZ, waves=waves, waves_from=waves_from,
                                      waves_to=waves_to)
        self.sim = self._start()
        self.lanes = lanes
        self.memory = memory
        self.slots = slots
        where = "" if memory == "bram" else f", weights in a simulated {memory.upper()} behind LiteDRAM"
        where += f", {slots} state slots (layer slices)" if slots else ""
        self.description = (f"the engine's generated Verilog in Verilator ({lanes} lanes, {packing}{where}), "
                            f"d={cfg.d} L={cfg.L} I={cfg.I} V={cfg.V}")

    def receive(self, data: bytes, now: float) -> bytes:
        self.sim.send(data)
        return self.sim.recv(0.0)

    def poll(self, now: float) -> bytes:
        return self.sim.recv(0.0)

    def settle(self) -> int:
        return self.sim.settle()

    def fileno(self) -> int | None:
        return self.sim.fileno()

    def power_cycle(self) -> None:
        self.sim.close()
        self.sim = self._start()

    def close(self) -> None:
        self.sim.close()


def _rtl_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None,
                 lanes: int = 16, log=None, waves=None, waves_from: int = 0, waves_to: int | None = None,
                 memory: str = "bram", slots: int | None = None, cycle_model: bool = False,
                 formats: Formats = FORMATS, **_options) -> Backend:
    if cycle_model:
        raise UserError("--cycle-model is the device model's: the rtl backend counts the engine's own cycles")
    if image is not None:
        raise UserError("the rtl backend starts without weights, like a board: the first 'run' loads them "
                        "(leave out --preload)")
    # state slots only when asked for (the default build, as the boards', has none)
    return RtlBackend(cfg, packing, lanes=lanes, log=log, waves=waves, waves_from=waves_from, waves_to=waves_to,
                      memory=memory, formats=formats, slots=slots or 0)


# name -> factory(cfg, packing, image or None, seed) -> Backend
BACKENDS: dict[str, Callable[..., Backend]] = {
    "model": _model_backend,
    "rtl": _rtl_backend,
}


def make_backend(name: str, cfg: ModelConfig, packing: str = "base3", image: "WeightImage | None" = None,
                 seed: int | None = None, **options) -> Backend:
    """A backend for an engine of geometry ``cfg``, optionally with ``image`` already loaded."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    return factory(cfg, packing, image, seed, **options)
