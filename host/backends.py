"""What ``mmfree-fpga serve`` puts behind its byte stream: the device backends.

A backend is the engine as its UART sees it, an object with

* ``description``: one line for humans;
* ``receive(data, now) -> bytes``: bytes from the host in, bytes for the host out;
* ``poll(now) -> bytes``: called when no bytes arrived for a while (idle timeouts);
* ``power_cycle()``: a reset (state, weights and the reply cache are lost);
* ``close()``.

``model`` is the Python device model (``host/device_model.py``). An RTL-simulator backend
(the generated engine in Verilator, its UART driven byte by byte) is added by one more entry
in ``BACKENDS`` with the same signature; the server, the driver and the tests do not change.
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


def _model_backend(cfg: ModelConfig, packing: str, image: "WeightImage | None", seed: int | None) -> Backend:
    from .device_model import DeviceModel
    device = DeviceModel(cfg, packing, seed=seed)
    if image is not None:
        device.load_image(image.blob)
    return device


# name -> factory(cfg, packing, image or None, seed) -> Backend
BACKENDS: dict[str, Callable[..., Backend]] = {
    "model": _model_backend,
}


def make_backend(name: str, cfg: ModelConfig, packing: str = "base3", image: "WeightImage | None" = None,
                 seed: int | None = None) -> Backend:
    """A backend for an engine of geometry ``cfg``, optionally with ``image`` already loaded."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None
    return factory(cfg, packing, image, seed)
