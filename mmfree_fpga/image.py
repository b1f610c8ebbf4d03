"""The weight image's contract: version, sections and their layout (no torch, no reference).

``weights.bin`` is what an engine's weight memory holds. The order, alignment and size of every
section follow from the geometry, the trit packing and the number formats the engine is built
with (:func:`image_layout`), which is what lets the hardware address its weight memory with
constants and never read ``manifest.json``. The gateware (``hw/``), the host driver (``host/``) and the board flow
(``boards/``) read the layout here; ``reference/export.py`` writes images in it and
:func:`mmfree_fpga.reference.integer.parse_image` reads one back into the integer model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FORMATS, LAYER_BITLINEARS, Formats, ModelConfig
from .errors import UserError
from .packing import PACKINGS, packed_size

__all__ = ["IMAGE_VERSION", "SECTION_ALIGN", "LAYER_MATRICES", "KIND_DTYPES", "Section", "element_kinds",
           "k_words", "image_layout", "image_size"]

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


# the little-endian NumPy dtype of each section kind's elements (trits are packed bytes)
KIND_DTYPES = {"int8": "i1", "int16": "<i2", "int32": "<i4", "uint16": "<u2", "uint32": "<u4", "k": "<i4"}


def element_kinds(fmt: Formats = FORMATS) -> dict[str, str]:
    """The kind of each vector section's elements under ``fmt`` (a key of :data:`KIND_DTYPES`):
    ``norm`` (a and c of every BitLinear): int16 when ``norm_bits <= 16``, else int32;
    ``lower_bound``: uint16 when ``gate_frac <= 16``, else uint32; ``embedding.q``: int8 when
    ``emb_bits <= 8``, else int32; ``embedding.scale``: uint32."""
    return {"norm": "int16" if fmt.norm_bits <= 16 else "int32",
            "lower_bound": "uint16" if fmt.gate_frac <= 16 else "uint32",
            "embedding.q": "int8" if fmt.emb_bits <= 8 else "int32",
            "embedding.scale": "uint32"}


def _size(kind: str) -> int:
    return int(KIND_DTYPES[kind][-1])


def k_words(fmt: Formats = FORMATS) -> int:
    """int32 words of a BitLinear's ``k`` section: k_mant, k_exp, and with ``norm_eps`` eps_mant, eps_exp."""
    return 4 if fmt.norm_eps else 2


def image_layout(cfg: ModelConfig, packing: str, fmt: Formats = FORMATS) -> list[Section]:
    """Every section of ``weights.bin``, in image order: a function of geometry, packing and the
    number formats alone, so an engine addresses its weight memory with constants and never reads
    the manifest.

    Per BitLinear (layer by layer in :data:`LAYER_MATRICES` order, then ``lm_head``): ``trits``
    (packed), ``a`` and ``c`` (``element_kinds(fmt)["norm"]``, in_features each), ``k``
    (:func:`k_words` int32); then every layer's ``lower_bound`` (d each), ``embedding.q``
    (V x d) and ``embedding.scale`` (V uint32). Each section starts at a multiple of
    :data:`SECTION_ALIGN`. The narrow set (:data:`~mmfree_fpga.config.FORMATS`) gives the
    original layout byte for byte."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    kinds = element_kinds(fmt)
    norm, lb, emb_q = kinds["norm"], kinds["lower_bound"], kinds["embedding.q"]
    kw = k_words(fmt)
    entries: list[tuple[str, str, int, tuple[int, ...]]] = []
    for name, (out_f, in_f) in _bitlinear_names(cfg):
        entries += [(f"{name}.trits", "trits", packed_size(out_f * in_f, packing), (out_f, in_f)),
                    (f"{name}.a", norm, _size(norm) * in_f, (in_f,)),
                    (f"{name}.c", norm, _size(norm) * in_f, (in_f,)),
                    (f"{name}.k", "k", 4 * kw, (kw,))]
    entries += [(f"layers.{layer}.lower_bound", lb, _size(lb) * cfg.d, (cfg.d,)) for layer in range(cfg.L)]
    entries += [("embedding.q", emb_q, _size(emb_q) * cfg.V * cfg.d, (cfg.V, cfg.d)),
                ("embedding.scale", "uint32", 4 * cfg.V, (cfg.V,))]
    out, offset = [], 0
    for name, kind, size, shape in entries:
        offset += (-offset) % SECTION_ALIGN
        out.append(Section(name, kind, offset, size, shape))
        offset += size
    return out


def image_size(cfg: ModelConfig, packing: str, fmt: Formats = FORMATS) -> int:
    last = image_layout(cfg, packing, fmt)[-1]
    return last.offset + last.size
