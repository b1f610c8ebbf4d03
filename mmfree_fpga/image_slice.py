"""Slice images: the part of the weight image one device of a multi-device run holds.

A model split over several devices gives each a contiguous run of layers ``[first, end)``; the
first device also holds the embedding table, the last the final norm and ``lm_head`` (the norm
is folded into lm_head's ``a``/``c`` sections). A :class:`Slice` names that part. Its *slice
image* is :func:`mmfree_fpga.image.image_layout`'s layout restricted to the slice's sections, in
the same order and with the same section alignment, packed from offset 0:

* every BitLinear of layers ``first .. end - 1`` (layer by layer, ``LAYER_MATRICES`` order:
  ``trits``, ``a``, ``c``, ``k`` each), then ``lm_head``'s four sections if ``head``;
* the ``lower_bound`` of layers ``first .. end - 1``;
* ``embedding.q`` and ``embedding.scale`` if ``embedding``.

Section names (and so the layer numbers in them) are those of the whole image. The slice of
every layer with both parts is the whole image, byte for byte. An engine addresses a slice image
with constants of the geometry times the slice's layer count, as it does the whole image; it
never reads a manifest. The whole-image layout itself is unchanged (``mmfree_fpga/image.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FORMATS, Formats, ModelConfig
from .image import SECTION_ALIGN, Section, image_layout

__all__ = ["Slice", "PART_EMBEDDING", "PART_HEAD", "whole_slice", "slice_layout", "slice_image_size",
           "cut_image", "chain_error"]

PART_EMBEDDING = 0x01     # the slice holds the embedding table (it starts from a token)
PART_HEAD = 0x02          # the slice holds the final norm + lm_head (it ends with the logits)


@dataclass(frozen=True)
class Slice:
    """Layers ``first .. end - 1`` of a model, with or without the ``embedding`` and the ``head``
    (final norm + lm_head). ``parts`` is the protocol's byte for the two flags."""

    first: int
    end: int
    embedding: bool
    head: bool

    def __post_init__(self):
        for name in ("first", "end"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
                raise ValueError(f"slice {name} must be an integer in [0, 65535], got {value!r}")
        if self.end < self.first:
            raise ValueError(f"slice end {self.end} is before its first layer {self.first}")
        if self.end == self.first and not (self.embedding or self.head):
            raise ValueError("an empty slice: no layers, no embedding, no head")

    @property
    def layers(self) -> int:
        return self.end - self.first

    @property
    def parts(self) -> int:
        return (PART_EMBEDDING if self.embedding else 0) | (PART_HEAD if self.head else 0)

    @classmethod
    def from_parts(cls, first: int, end: int, parts: int) -> "Slice":
        if parts & ~(PART_EMBEDDING | PART_HEAD):
            raise ValueError(f"unknown slice part bits {parts:#x}")
        return cls(first, end, bool(parts & PART_EMBEDDING), bool(parts & PART_HEAD))

    def check(self, cfg: ModelConfig) -> None:
        """ValueError unless the slice lies within ``cfg``'s layers."""
        if self.end > cfg.L:
            raise ValueError(f"slice layers {self.first}..{self.end - 1} run past the model's {cfg.L} layers")

    def is_whole(self, cfg: ModelConfig) -> bool:
        return self.first == 0 and self.end == cfg.L and self.embedding and self.head

    def text(self) -> str:
        """'embedding, layers 0-3, norm + lm_head' (the planner's wording)."""
        parts = []
        if self.embedding:
            parts.append("embedding")
        if self.layers:
            last = self.end - 1
            parts.append(f"layer {last}" if self.layers == 1 else f"layers {self.first}-{last}")
        if self.head:
            parts.append("norm + lm_head")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"first_layer": self.first, "end_layer": self.end, "embedding": self.embedding, "head": self.head}


def whole_slice(cfg: ModelConfig) -> Slice:
    """The slice that is the whole model."""
    return Slice(0, cfg.L, True, True)


def _in_slice(name: str, sl: Slice) -> bool:
    if name.startswith("layers."):
        return sl.first <= int(name.split(".")[1]) < sl.end
    if name.startswith("lm_head."):
        return sl.head
    if name.startswith("embedding."):
        return sl.embedding
    raise ValueError(f"image section {name} belongs to no slice part")


def slice_layout(cfg: ModelConfig, packing: str, sl: Slice, fmt: Formats = FORMATS) -> list[Section]:
    """The sections of ``sl``'s slice image, in image order, each at a multiple of SECTION_ALIGN
    (module docstring). ValueError for a slice outside the model."""
    sl.check(cfg)
    out, offset = [], 0
    for s in image_layout(cfg, packing, fmt):
        if not _in_slice(s.name, sl):
            continue
        offset += (-offset) % SECTION_ALIGN
        out.append(Section(s.name, s.kind, offset, s.size, s.shape))
        offset += s.size
    return out


def slice_image_size(cfg: ModelConfig, packing: str, sl: Slice, fmt: Formats = FORMATS) -> int:
    last = slice_layout(cfg, packing, sl, fmt)[-1]
    return last.offset + last.size


def cut_image(blob: bytes, cfg: ModelConfig, packing: str, sl: Slice, fmt: Formats = FORMATS) -> bytes:
    """The slice image of ``sl`` from a whole image ``blob`` (padding bytes zero). ValueError if
    ``blob`` is not an image of ``cfg``, ``packing`` and ``fmt``."""
    whole = {s.name: s for s in image_layout(cfg, packing, fmt)}
    last = max(whole.values(), key=lambda s: s.offset)
    if len(blob) != last.offset + last.size:
        raise ValueError(f"image has {len(blob)} bytes, geometry and packing {packing} imply "
                         f"{last.offset + last.size}")
    layout = slice_layout(cfg, packing, sl, fmt)
    out = bytearray(layout[-1].offset + layout[-1].size)
    for s in layout:
        src = whole[s.name]
        out[s.offset:s.offset + s.size] = blob[src.offset:src.offset + src.size]
    return bytes(out)


def chain_error(slices: list[Slice], cfg: ModelConfig) -> str | None:
    """Why ``slices`` (device 0 first) do not run ``cfg`` as a pipeline, or None if they do: the
    first holds the embedding and starts at layer 0, each starts where the one before ends, the
    last holds the head and ends at the last layer, and no device between holds either part."""
    if not slices:
        return "no devices"
    for i, sl in enumerate(slices):
        if sl.end > cfg.L:
            return f"device {i} holds layers up to {sl.end - 1}, the model has {cfg.L}"
        if i == 0:
            if not sl.embedding or sl.first != 0:
                return "device 0 does not start the model (the embedding and layer 0)"
        elif sl.embedding:
            return f"device {i} holds the embedding, which belongs to device 0"
        elif sl.first != slices[i - 1].end:
            return f"device {i} starts at layer {sl.first}, device {i - 1} ends before layer {slices[i - 1].end}"
        if i < len(slices) - 1 and sl.head:
            return f"device {i} holds the head (norm + lm_head), which belongs to the last device"
    if not slices[-1].head or slices[-1].end != cfg.L:
        return f"device {len(slices) - 1} does not end the model (layer {cfg.L - 1} and the head)"
    return None
