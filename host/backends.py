"""What ``mmfree-fpga serve`` puts behind its byte stream: the device backends.

A backend is the engine as its UART sees it, an object with

* ``description``: one line for humans;
* ``receive(data, now) -> bytes``: bytes from the host in, bytes for the host out;
* ``poll(now) -> bytes``: called when no bytes arrived for a while (idle timeouts);
* ``power_cycle()``: a reset (state, weights and the reply cache are lost);
* ``close()``.

``model`` is the Python device model (``host/device_model.py``); ``rtl`` is the generated
Verilog of the board design in Verilator, behind the same interface: the server, the driver and
the tests do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import UserError

if TYPE_CHECKING:
    from .image import WeightImage

__all__ = ["Backend", "BACKENDS", "make_backend"]


class Backend(Protocol):
    description: str

    def receive(self, data: bytes, now: float) -> bytes: ...

    def poll(self, now: float) -> bytes: ...

    def power_cycle(self) -> None: ...

    def close(self) -> None: ...


def _model_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None,
                   **_options) -> Backend:
    from .device_model import DeviceModel
    device = DeviceModel(cfg, packing, seed=seed)
    if image is not None:
        device.load_image(image.blob)
    return device


class RtlBackend:
    """The generated Verilog of the board design (:class:`~mmfree_fpga.hw.linked_engine.LinkedEngine`:
    protocol link + engine) compiled by Verilator, its byte streams on a subprocess's pipes
    (``sim/pipe.py``). It starts without weights, like a board after power-up."""

    def __init__(self, cfg: ModelConfig, packing: str = "base3", lanes: int = 16, build_dir=None, log=None):
        import hashlib
        import json
        from pathlib import Path

        from mmfree_fpga.hw.linked_engine import LinkedEngine
        from mmfree_fpga.sim.pipe import PipeSim, build_pipe_sim
        key = hashlib.sha256(json.dumps([cfg.as_dict(), packing, lanes]).encode()).hexdigest()[:12]
        build_dir = Path(build_dir) if build_dir else Path("out") / "cache" / f"rtl-{key}"
        self.binary = build_pipe_sim(LinkedEngine(cfg, lanes=lanes, packing=packing), build_dir, log=log)
        self._start = lambda: PipeSim(self.binary)
        self.sim = self._start()
        self.lanes = lanes
        self.description = (f"the engine's generated Verilog in Verilator ({lanes} lanes, {packing}), "
                            f"d={cfg.d} L={cfg.L} I={cfg.I} V={cfg.V}")

    def receive(self, data: bytes, now: float) -> bytes:
        self.sim.send(data)
        return self.sim.recv(0.0)

    def poll(self, now: float) -> bytes:
        return self.sim.recv(0.0)

    def power_cycle(self) -> None:
        self.sim.close()
        self.sim = self._start()

    def close(self) -> None:
        self.sim.close()


def _rtl_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None,
                 lanes: int = 16, log=None, **_options) -> Backend:
    if image is not None:
        raise UserError("the rtl backend starts without weights, like a board: the first 'run' loads them "
                        "(leave out --preload)")
    return RtlBackend(cfg, packing, lanes=lanes, log=log)


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
