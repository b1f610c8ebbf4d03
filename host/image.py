"""The host's view of a weight image: the bytes, their CRC-32 and the manifest they came with.

The layout itself (sections, order, alignment: a function of geometry and packing alone) is
:mod:`mmfree_fpga.image`; :class:`WeightImage` checks an exported image against it before a host
sends it to an engine.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path


from mmfree_fpga.config import FORMAT_SETS, FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.protocol import crc32_image, formats_id
from mmfree_fpga.image import IMAGE_VERSION, image_layout, image_size
from mmfree_fpga.image_slice import Slice, cut_image

__all__ = ["WeightImage"]


@dataclass(frozen=True)
class WeightImage:
    """``weights.bin`` with what a host checks before sending it to an engine. ``slice``: None for
    the whole image, else the :class:`~mmfree_fpga.image_slice.Slice` whose slice image ``blob``
    is (:meth:`cut`; loaded with LOAD_SLICE). ``cfg`` is the whole model's either way."""

    blob: bytes
    cfg: ModelConfig
    packing: str
    formats_id: int
    image_version: int
    source: str = ""
    slice: Slice | None = None

    def cut(self, sl: Slice) -> "WeightImage":
        """The slice image of ``sl`` (of a whole image)."""
        if self.slice is not None:
            raise ValueError("cut() takes a whole image, not a slice image")
        try:
            blob = cut_image(self.blob, self.cfg, self.packing, sl, self.formats)
        except ValueError as e:
            raise UserError(f"{self.source or 'image'}: cannot cut {sl.text()} from it ({e})") from None
        return WeightImage(blob=blob, cfg=self.cfg, packing=self.packing, formats_id=self.formats_id,
                           image_version=self.image_version, source=f"{self.source or 'image'} ({sl.text()})",
                           slice=sl)

    @property
    def formats(self) -> Formats:
        """The format set of ``config.FORMAT_SETS`` the image was exported in (by its formats id)."""
        for fmt in FORMAT_SETS.values():
            if formats_id(fmt) == self.formats_id:
                return fmt
        raise UserError(f"{self.source or 'image'}: exported in formats this version does not build "
                        f"(id {self.formats_id:08x}); re-export it with --formats")

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def crc32(self) -> int:
        return crc32_image(self.blob)

    @classmethod
    def from_bytes(cls, blob: bytes, cfg: ModelConfig, packing: str, source: str = "",
                   fmt: Formats = FORMATS) -> "WeightImage":
        """An image made by this toolkit's export for ``cfg`` in formats ``fmt`` (its size is checked)."""
        want = image_size(cfg, packing, fmt)
        if len(blob) != want:
            raise UserError(f"{source or 'image'}: {len(blob)} bytes, but geometry and packing {packing} "
                            f"imply {want}; re-export it")
        return cls(blob=bytes(blob), cfg=cfg, packing=packing, formats_id=formats_id(fmt),
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
        layout = [(s.name, s.offset, s.size) for s in image_layout(cfg, packing, fmt)]
        if layout != [(e["name"], e["offset"], e["size"]) for e in sections]:
            raise UserError(f"{directory}: the sections of this image are not where an engine of its "
                            "geometry reads them (written by another version of export?); re-export")
        return cls(blob=blob, cfg=cfg, packing=packing, formats_id=formats_id(fmt),
                   image_version=version, source=str(directory))

    @classmethod
    def from_checkpoint(cls, checkpoint, packing: str, fmt: Formats = FORMATS) -> "WeightImage":
        """Export a checkpoint (default: the demo model) with ``packing`` in formats ``fmt``, as
        ``mmfree-fpga export`` does."""
        from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
        from mmfree_fpga.reference.export import integer_weights, write_image
        cfg, tensors = load_checkpoint(checkpoint or DEMO_CHECKPOINT)
        with tempfile.TemporaryDirectory(prefix="mmfree-image-") as tmp:
            write_image(integer_weights(cfg, tensors, fmt), Path(tmp) / "image", packing)
            image = cls.from_directory(Path(tmp) / "image")
        return cls(blob=image.blob, cfg=image.cfg, packing=image.packing, formats_id=image.formats_id,
                   image_version=image.image_version, source=str(checkpoint or DEMO_CHECKPOINT))
