"""The weight image as an engine receives it over the link.

An engine never reads ``manifest.json``: the order, alignment and size of every section of
``weights.bin`` follow from the geometry and the trit packing alone (``image_layout``), which
is what lets the hardware address its weight memory with constants. ``parse_image`` turns the
raw bytes back into the ``IntegerWeights`` the integer model runs, the way an engine reads
them. ``WeightImage`` is the host's view: the bytes, their CRC-32 and the manifest they came
with, checked against that layout.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.protocol import crc32_image, formats_id
from mmfree_fpga.reference.export import IMAGE_VERSION, SECTION_ALIGN
from mmfree_fpga.reference.integer import IntBitLinear, IntegerWeights, IntLayer
from mmfree_fpga.reference.packing import PACKINGS, packed_size, unpack_trits

__all__ = ["Section", "image_layout", "image_size", "parse_image", "WeightImage"]


@dataclass(frozen=True)
class Section:
    name: str
    kind: str
    offset: int
    size: int
    shape: tuple[int, ...]


def _bitlinear_shapes(cfg: ModelConfig):
    per_layer = {key.split(".", 1)[1]: shape for key, shape in cfg.bitlinear_shapes().items()}
    for layer in range(cfg.L):
        for name in IntLayer.MATRICES:
            yield f"layers.{layer}.{name}", per_layer[name]
    yield "lm_head", (cfg.V, cfg.d)


def image_layout(cfg: ModelConfig, packing: str) -> list[Section]:
    """Every section of ``weights.bin`` for this geometry, in image order (as export writes it)."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    entries: list[tuple[str, str, int, tuple[int, ...]]] = []
    for name, (out_f, in_f) in _bitlinear_shapes(cfg):
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


def parse_image(blob: bytes, cfg: ModelConfig, packing: str, fmt: Formats = FORMATS) -> IntegerWeights:
    """IntegerWeights from the raw image bytes, using only geometry and packing.

    The export-time exponents ``e_a``/``e_c`` are manifest metadata (folded into ``k``), so
    they come back as 0; the integer datapath does not read them.
    """
    layout = {s.name: s for s in image_layout(cfg, packing)}
    total = image_size(cfg, packing)
    if len(blob) != total:
        raise ValueError(f"image has {len(blob)} bytes; geometry and packing {packing} imply {total}")
    view = memoryview(blob)

    def raw(name: str):
        s = layout[name]
        return view[s.offset:s.offset + s.size]

    def vector(name: str, dtype: str) -> np.ndarray:
        return np.frombuffer(raw(name), dtype=dtype).astype(np.int64)

    def bitlinear(name: str) -> IntBitLinear:
        out_f, in_f = layout[f"{name}.trits"].shape
        trits = unpack_trits(bytes(raw(f"{name}.trits")), out_f * in_f, packing).reshape(out_f, in_f)
        k_mant, k_exp = (int(v) for v in np.frombuffer(raw(f"{name}.k"), dtype="<i4"))
        return IntBitLinear(trits=trits, a=vector(f"{name}.a", "<i2"), c=vector(f"{name}.c", "<i2"),
                            k_mant=k_mant, k_exp=k_exp)

    layers = [IntLayer(**{m: bitlinear(f"layers.{layer}.{m}") for m in IntLayer.MATRICES},
                       lower_bound=vector(f"layers.{layer}.lower_bound", "<u2"))
              for layer in range(cfg.L)]
    emb_q = np.frombuffer(raw("embedding.q"), dtype=np.int8).reshape(cfg.V, cfg.d).copy()
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=vector("embedding.scale", "<u4"),
                          layers=layers, lm_head=bitlinear("lm_head"), formats=fmt)


@dataclass(frozen=True)
class WeightImage:
    """``weights.bin`` with what a host checks before sending it to an engine."""

    blob: bytes
    cfg: ModelConfig
    packing: str
    formats_id: int
    image_version: int
    source: str = ""

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def crc32(self) -> int:
        return crc32_image(self.blob)

    @classmethod
    def from_bytes(cls, blob: bytes, cfg: ModelConfig, packing: str, source: str = "") -> "WeightImage":
        """An image made by this toolkit's export for ``cfg`` (its size is checked)."""
        want = image_size(cfg, packing)
        if len(blob) != want:
            raise UserError(f"{source or 'image'}: {len(blob)} bytes, but geometry and packing {packing} "
                            f"imply {want}; re-export it")
        return cls(blob=bytes(blob), cfg=cfg, packing=packing, formats_id=formats_id(FORMATS),
                   image_version=IMAGE_VERSION, source=source)

    @classmethod
    def from_directory(cls, directory) -> "WeightImage":
        """An exported image directory (weights.bin + manifest.json), checked against its manifest."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            blob = (directory / "weights.bin").read_bytes()
            cfg = ModelConfig(**manifest["geometry"])
            fmt = Formats(**{k: v for k, v in manifest["formats"].items() if k != "acc_bits"})
            packing, sections, version = manifest["packing"], manifest["sections"], manifest["version"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{directory}: not a weight image ({e}); run 'mmfree-fpga export'") from None
        if len(blob) != manifest.get("bytes") or hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise UserError(f"{directory}/weights.bin does not match its manifest (size or SHA-256); re-export")
        layout = [(s.name, s.offset, s.size) for s in image_layout(cfg, packing)]
        if layout != [(e["name"], e["offset"], e["size"]) for e in sections]:
            raise UserError(f"{directory}: the sections of this image are not where an engine of its "
                            "geometry reads them (written by another version of export?); re-export")
        return cls(blob=blob, cfg=cfg, packing=packing, formats_id=formats_id(fmt),
                   image_version=version, source=str(directory))

    @classmethod
    def from_checkpoint(cls, checkpoint, packing: str) -> "WeightImage":
        """Export a checkpoint (default: the demo model) with ``packing``, as ``mmfree-fpga export`` does."""
        from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
        from mmfree_fpga.reference.export import integer_weights, write_image
        cfg, tensors = load_checkpoint(checkpoint or DEMO_CHECKPOINT)
        with tempfile.TemporaryDirectory(prefix="mmfree-image-") as tmp:
            write_image(integer_weights(cfg, tensors), Path(tmp) / "image", packing)
            image = cls.from_directory(Path(tmp) / "image")
        return cls(blob=image.blob, cfg=image.cfg, packing=image.packing, formats_id=image.formats_id,
                   image_version=image.image_version, source=str(checkpoint or DEMO_CHECKPOINT))
