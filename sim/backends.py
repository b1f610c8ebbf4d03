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
the tests do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import UserError

if TYPE_CHECKING:
    from mmfree_fpga.host.image import WeightImage

__all__ = ["Backend", "BACKENDS", "make_backend"]


class Backend(Protocol):
    description: str

    def receive(self, data: bytes, now: float) -> bytes: ...

    def poll(self, now: float) -> bytes: ...

    def settle(self) -> int: ...

    def power_cycle(self) -> None: ...

    def close(self) -> None: ...


def _model_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None,
                   waves=None, **_options) -> Backend:
    if waves is not None:
        raise UserError("--waves traces the generated Verilog: it needs --backend rtl")
    from mmfree_fpga.host.device_model import DeviceModel
    device = DeviceModel(cfg, packing, seed=seed)
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
    closed. ``power_cycle`` starts a fresh simulation, and a fresh trace."""

    def __init__(self, cfg: ModelConfig, packing: str = "base3", lanes: int = 16, build_dir=None, log=None,
                 waves=None, waves_from: int = 0, waves_to: int | None = None):
        import hashlib
        import json
        from pathlib import Path

        from mmfree_fpga.hw.linked_engine import LinkedEngine
        from .pipe import PIPE_CLOCK_HZ, PipeSim, build_pipe_sim
        key = hashlib.sha256(json.dumps([cfg.as_dict(), packing, lanes]).encode()).hexdigest()[:12]
        build_dir = Path(build_dir) if build_dir else Path("out") / "cache" / f"rtl-{key}"
        design = LinkedEngine(cfg, lanes=lanes, packing=packing, clk_freq=PIPE_CLOCK_HZ, activity_ports=True)
        self.binary = build_pipe_sim(design, build_dir, log=log, waves=waves is not None)
        self._start = lambda: PipeSim(self.binary, clock_hz=PIPE_CLOCK_HZ, waves=waves, waves_from=waves_from,
                                      waves_to=waves_to)
        self.sim = self._start()
        self.lanes = lanes
        self.description = (f"the engine's generated Verilog in Verilator ({lanes} lanes, {packing}), "
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
                 **_options) -> Backend:
    if image is not None:
        raise UserError("the rtl backend starts without weights, like a board: the first 'run' loads them "
                        "(leave out --preload)")
    return RtlBackend(cfg, packing, lanes=lanes, log=log, waves=waves, waves_from=waves_from, waves_to=waves_to)


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
