"""The weight image's contract: version, sections and their layout (no torch, no reference).

``weights.bin`` is what an engine's weight memory holds. The order, alignment and size of every
section follow from the geometry and the trit packing alone (:func:`image_layout`), which is
what lets the hardware address its weight memory with constants and never read
``manifest.json``. The gateware (``hw/``), the host driver (``host/``) and the board flow
(``boards/``) read the layout here; ``reference/export.py`` writes images in it and
:func:`mmfree_fpga.reference.integer.parse_image` reads one back into the integer model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LAYER_BITLINEARS, ModelConfig
from .errors import UserError
from .packing import PACKINGS, packed_size

__all__ = ["IMAGE_VERSION", "SECTION_ALIGN", "LAYER_MATRICES", "Section", "image_layout", "image_size"]

IMAGE_VERSION = 1
SECTION_ALIGN = 16
# the BitLinears of one layer by matrix name, in image order
LAYER_MATRICES = tuple(name.split(".")[1] for name in LAYER_BITLINEARS)


@dataclass(frozen=True)
class Section:
    name: str
    kind: str
    offset: int
    size: int
    shape: tuple[int, ...]


def _bitlinear_names(cfg: ModelConfig):
    per_layer = {key.split(".", 1)[1]: shape for key, shape in cfg.bitlinear_shapes().items()}
    for layer in range(cfg.L):
        for name in LAYER_MATRICES:
            yield f"layers.{layer}.{name}", per_layer[name]
    yield "lm_head", (cfg.V, cfg.d)


def image_layout(cfg: ModelConfig, packing: str) -> list[Section]:
    """Every section of ``weights.bin``, in image order: a function of geometry and packing alone,
    so an engine addresses its weight memory with constants and never reads the manifest."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    entries: list[tuple[str, str, int, tuple[int, ...]]] = []
    for name, (out_f, in_f) in _bitlinear_names(cfg):
        entries += [(f"{name}.trits", "trits", packed_size(out_f * in_f, packing), (out_f, in_f)),
                    (f"{name}.a", "int16", 2 * in_f, (in_f,)),
                    (f"{name}.c", "int16", 2 * in_f, (in_f,)),
                    (f"{name}.k", "k", 8, (2,))]
    entries += [(f"layers.{layer}.lower_bound", "uint16", 2 * cfg.d, (cfg.d,)) for layer in range(cfg.L)]
    entries += [("embedding.q", "int8", cfg.V * cfg.d, (cfg.V, cfg.d)),
                ("embedding.scale", "uint32", 4 * cfg.V, (cfg.V,))]
    out, offset = [], 0
    for name, kind, size, shape in entries:
        offset += (-offset) % SECTION_ALIGN
        out.append(Section(name, kind, offset, size, shape))
        offset += size
    return out


def image_size(cfg: ModelConfig, packing: str) -> int:
    last = image_layout(cfg, packing)[-1]
    return last.offset + last.size
