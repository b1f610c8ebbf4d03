"""FPGA resource budgets (one table) and the check that a model's weight image fits a board.

The engine keeps the weight image (``weights.bin`` as ``mmfree-fpga export`` writes it) and
the recurrent state in on-chip RAM, so a model fits a board when the image plus the state fit
the device's block RAM (and SPRAM on iCE40 UltraPlus) left after the board top's own FIFOs.
:func:`check_fits` refuses a model before synthesis, with needed and available bytes. With
``--memory dram`` (a board with a DRAM, :mod:`.dram`) the weight image goes to the DRAM and only
the recurrent state stays on chip: :func:`check_fits_dram` checks both. With state slots as
well (``--slots N``: the board holds a layer slice of a model split over several boards),
:func:`check_fits_slices` asks the planner whether the model splits over boards of this kind
instead of whether the whole image fits one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError

__all__ = ["DeviceResources", "DEVICES", "device_resources", "ImageSummary", "image_summary",
           "check_fits", "check_fits_dram", "check_fits_slices", "MemoryBudget", "memory_budget"]


@dataclass(frozen=True)
class DeviceResources:
    """Logic and memory of one FPGA device (datasheet figures)."""

    device: str
    family: str            # "ice40" or "ecp5"
    luts: int              # 4-input LUTs
    ffs: int
    dsps: int              # iCE40 SB_MAC16 / ECP5 18x18 multipliers
    bram_blocks: int       # iCE40 EBR (4 kbit) / ECP5 EBR (18 kbit)
    bram_kbit: int         # per block
    spram_blocks: int = 0  # iCE40 UltraPlus SPRAM (256 kbit, 16 bits wide)
    spram_kbit: int = 0

    @property
    def bram_bytes_per_block(self) -> int:
        """Bytes one block holds at a power-of-two data width (18 kbit EBR: 16 kbit usable)."""
        return (1 << (self.bram_kbit * 1024).bit_length() - 1) // 8

    @property
    def bram_bytes(self) -> int:
        return self.bram_blocks * self.bram_bytes_per_block

    @property
    def spram_bytes(self) -> int:
        return self.spram_blocks * self.spram_kbit * 1024 // 8

    @property
    def memory_text(self) -> str:
        parts = []
        if self.spram_blocks:
            parts.append(f"{self.spram_blocks} x {self.spram_kbit // 8} KiB SPRAM")
        parts.append(f"{self.bram_blocks} x {self.bram_kbit} kbit EBR of {self.bram_bytes_per_block} B")
        return " + ".join(parts)


def _ice40(device, luts, ebr, dsps=0, spram=0):
    return DeviceResources(device, "ice40", luts=luts, ffs=luts, dsps=dsps, bram_blocks=ebr, bram_kbit=4,
                           spram_blocks=spram, spram_kbit=256 if spram else 0)


def _ecp5(device, kluts, ebr, mults):
    luts = {12: 12288, 25: 24288, 45: 43848, 85: 83640}[kluts]
    return DeviceResources(device, "ecp5", luts=luts, ffs=luts, dsps=mults, bram_blocks=ebr, bram_kbit=18)


# Lattice datasheets: iCE40 UltraPlus (FPGA-DS-02008), iCE40 LP/HX (FPGA-DS-02029), ECP5 (FPGA-DS-02012)
DEVICES = {d.device: d for d in [
    _ice40("iCE40UP5K", 5280, 30, dsps=8, spram=4),
    _ice40("iCE40HX1K", 1280, 16), _ice40("iCE40LP1K", 1280, 16),
    _ice40("iCE40HX4K", 3520, 20), _ice40("iCE40LP4K", 3520, 20),
    _ice40("iCE40HX8K", 7680, 32), _ice40("iCE40LP8K", 7680, 32),
    *[_ecp5(f"LFE5U{m}-{k}F", k, ebr, mults)
      for k, ebr, mults in ((12, 32, 28), (25, 56, 28), (45, 108, 72), (85, 208, 156))
      for m in ("", "M", "M5G")],
]}


def device_resources(device: str) -> DeviceResources | None:
    """The table entry for an amaranth platform's ``device`` string, or None if unknown."""
    return DEVICES.get(device)


@dataclass(frozen=True)
class ImageSummary:
    """Sizes of a weight image (``weights.bin``) and of the recurrent state, in bytes."""

    source: str
    packing: str
    geometry: dict
    image_bytes: int        # weights.bin as written: sections plus alignment
    ternary_bytes: int
    embedding_bytes: int
    vector_bytes: int       # norms, scale constants, lower bounds
    state_bytes: int        # the MLGRU state h: L * d values of x_bits
    sha256: str | None      # of weights.bin; None when only a lower bound was computed
    exact: bool = True

    @property
    def needed_bytes(self) -> int:
        return self.image_bytes + self.state_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["needed_bytes"] = self.needed_bytes
        return d

    def text(self) -> str:
        at_least = "" if self.exact else "at least "
        return (f"{at_least}{self.needed_bytes:,} B (weight image {self.image_bytes:,} B: {self._parts()}; "
                f"recurrent state {self.state_bytes:,} B)")

    def image_text(self) -> str:
        """The weight image alone: ``[at least ]N B (ternary ..., embeddings ..., vectors ...)``."""
        at_least = "" if self.exact else "at least "
        return f"{at_least}{self.image_bytes:,} B ({self._parts()})"

    def _parts(self) -> str:
        vectors = f", vectors {self.vector_bytes:,} B" if self.exact else ", vectors not counted"
        return f"ternary {self.ternary_bytes:,} B {self.packing}, embeddings {self.embedding_bytes:,} B{vectors}"


def _state_bytes(cfg: ModelConfig, fmt: Formats = FORMATS) -> int:
    return cfg.L * cfg.d * fmt.x_bits // 8


def _from_sections(source, packing, cfg, sections, image_bytes, sha256, fmt: Formats = FORMATS) -> ImageSummary:
    """sections: (name, kind, size) of every section of the image."""
    ternary = sum(size for _, kind, size in sections if kind == "trits")
    embedding = sum(size for name, _, size in sections if name.startswith("embedding."))
    return ImageSummary(source=str(source), packing=packing, geometry=cfg.as_dict(),
                        image_bytes=image_bytes, ternary_bytes=ternary, embedding_bytes=embedding,
                        vector_bytes=sum(s for _, _, s in sections) - ternary - embedding,
                        state_bytes=_state_bytes(cfg, fmt), sha256=sha256)


def _lower_bound(source, cfg: ModelConfig, packing: str, fmt: Formats = FORMATS) -> ImageSummary:
    """Trits and the embedding table alone, from config.json: enough to refuse a large model fast."""
    from mmfree_fpga.packing import packed_size
    shapes = list(cfg.bitlinear_shapes().values()) * cfg.L + [(cfg.V, cfg.d)]
    ternary = sum(packed_size(o * i, packing) for o, i in shapes)
    emb = cfg.V * cfg.d * (1 if fmt.emb_bits <= 8 else 4)
    return ImageSummary(source=str(source), packing=packing, geometry=cfg.as_dict(),
                        image_bytes=ternary + emb, ternary_bytes=ternary, embedding_bytes=emb,
                        vector_bytes=0, state_bytes=_state_bytes(cfg, fmt), sha256=None, exact=False)


def image_summary(checkpoint, packing: str | None = None, *, limit_bytes: int | None = None,
                  fmt: Formats = FORMATS) -> ImageSummary:
    """Sizes of the weight image of ``checkpoint``: an export (manifest.json + weights.bin) or a
    checkpoint directory (config.json + weights), exported in memory with ``packing`` in the
    number formats ``fmt``.

    With ``limit_bytes``, a checkpoint whose trits and embeddings alone exceed it is not
    exported: the lower bound (``exact=False``) is returned at once.
    """
    from mmfree_fpga.packing import PACKINGS
    directory = Path(checkpoint)
    if packing is not None and packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            cfg = ModelConfig(**manifest["geometry"])
            sections = [(e["name"], e["kind"], e["size"]) for e in manifest["sections"]]
            image_bytes, sha, image_packing = manifest["bytes"], manifest["sha256"], manifest["packing"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{manifest_path}: not a weight image manifest ({e}); "
                            "re-run 'mmfree-fpga export'") from None
        if packing is not None and packing != image_packing:
            raise UserError(f"{directory} is a {image_packing} weight image, but --packing {packing} "
                            f"was asked for; re-export with --packing {packing} or drop --packing")
        image_fmt = manifest.get("formats")
        if image_fmt is not None and {k: v for k, v in image_fmt.items() if k != "acc_bits"} != asdict(fmt):
            raise UserError(f"{directory} was exported in other number formats than the engine is built for; "
                            "re-export it with the same --formats as the build")
        return _from_sections(directory, image_packing, cfg, sections, image_bytes, sha, fmt)

    from mmfree_fpga.reference.checkpoint import load_checkpoint
    from mmfree_fpga.image import SECTION_ALIGN
    from mmfree_fpga.reference.export import image_sections, integer_weights
    packing = packing or "base3"
    cfg = ModelConfig.from_checkpoint(directory) if directory.is_dir() else None
    if cfg is not None and limit_bytes is not None:
        bound = _lower_bound(directory, cfg, packing, fmt)
        if bound.needed_bytes > limit_bytes:
            return bound
    cfg, tensors = load_checkpoint(directory)
    sections = image_sections(integer_weights(cfg, tensors, fmt), packing)
    blob = bytearray()
    for _, _, data, _ in sections:
        blob += b"\0" * ((-len(blob)) % SECTION_ALIGN)
        blob += data
    return _from_sections(directory, packing, cfg, [(n, k, len(d)) for n, k, d, _ in sections],
                          len(blob), hashlib.sha256(blob).hexdigest(), fmt)


@dataclass(frozen=True)
class MemoryBudget:
    """On-chip RAM of a device, less the blocks the board top uses itself."""

    device: DeviceResources
    reserved_blocks: int    # EBR blocks of the board top (UART FIFOs)

    @property
    def available_bytes(self) -> int:
        return self.device.spram_bytes + self.device.bram_bytes - self.reserved_blocks * self.device.bram_bytes_per_block

    def text(self) -> str:
        total = self.device.spram_bytes + self.device.bram_bytes
        reserved = f", less {self.reserved_blocks} EBR for the UART FIFOs" if self.reserved_blocks else ""
        return f"{self.available_bytes:,} B ({self.device.memory_text} = {total:,} B{reserved})"


def memory_budget(device: DeviceResources, fifo_depths=()) -> MemoryBudget:
    """Budget with one EBR group per FIFO of ``depth`` bytes (Amaranth maps it to block RAM)."""
    blocks = sum(math.ceil(depth / device.bram_bytes_per_block) for depth in fifo_depths if depth > 0)
    return MemoryBudget(device, blocks)


def check_fits(summary: ImageSummary, budget: MemoryBudget, board: str, dram=None) -> dict:
    """UserError with needed and available bytes if the model does not fit; else a summary dict.

    ``dram`` (a :class:`~.dram.DramBudget`, for a board that can hold the weights in DRAM): the
    refusal also says whether the weight image fits the DRAM (``--memory dram``), with its size.
    """
    available = budget.available_bytes
    if summary.needed_bytes > available:
        if dram is not None and summary.image_bytes <= dram.size_bytes:
            other = f"; its weight image fits the board's {dram.text()}: build with --memory dram"
        elif dram is not None:
            other = f"; nor does its weight image fit the board's {dram.text()}"
        else:
            other = ""
        raise UserError(
            f"the model does not fit the {board} ({budget.device.device}): it needs {summary.text()} "
            f"of on-chip RAM, the board has {budget.text()}{other}; use a smaller model"
            + (" or --packing base3" if summary.packing == "2bit" else "")
            + " or a larger board")
    return {"memory": "bram", "needed_bytes": summary.needed_bytes, "available_bytes": available,
            "percent": round(100 * summary.needed_bytes / available, 1), "image": summary.as_dict()}


def check_fits_dram(summary: ImageSummary, dram, budget: MemoryBudget | None, board: str) -> dict:
    """The weight image against the board's DRAM (``dram``, a :class:`~.dram.DramBudget`), the
    recurrent state against the on-chip RAM (``budget``; None: not checked). UserError with the
    sizes if either does not fit; else a summary dict (``needed_bytes``/``available_bytes``: the
    image and the DRAM; ``on_chip_bytes``/``on_chip_available_bytes``: the state and the RAM)."""
    if summary.image_bytes > dram.size_bytes:
        raise UserError(
            f"the model does not fit the {board}'s DRAM: its weight image is {summary.image_text()}, "
            f"the board has {dram.text()}; use a smaller model"
            + (" or --packing base3" if summary.packing == "2bit" else "")
            + " or a board with more DRAM")
    if budget is not None and summary.state_bytes > budget.available_bytes:
        raise UserError(
            f"the model's recurrent state ({summary.state_bytes:,} B) does not fit the {board}'s on-chip RAM "
            f"({budget.text()}), even with the weights in DRAM; use a smaller model")
    return {"memory": "dram", "needed_bytes": summary.image_bytes, "available_bytes": dram.size_bytes,
            "percent": round(100 * summary.image_bytes / dram.size_bytes, 1), "dram": dram.text(),
            "on_chip_bytes": summary.state_bytes,
            "on_chip_available_bytes": budget.available_bytes if budget is not None else None,
            "image": summary.as_dict()}


def _model_name(cfg: ModelConfig) -> str | None:
    """The published name of ``cfg``'s geometry (``370M``), or None."""
    from mmfree_fpga.config import PUBLISHED
    return next((name for name, c in PUBLISHED.items() if c.as_dict() == cfg.as_dict()), None)


def check_fits_slices(summary: ImageSummary, dram, budget: MemoryBudget | None, board: str, *, slots: int,
                      lanes: int, clock_hz: float | None = None) -> dict:
    """The fit of an engine with ``slots`` state slots and its weights in DRAM: a board that holds
    a layer slice of a model split over several boards of its kind.

    On chip: the engine's recurrent state, ``slots`` copies of the whole model's (the engine is
    built for the model's geometry, so every slot has room for all its layers), against
    ``budget``. In DRAM: the whole image if it fits (:func:`check_fits_dram`'s dict, the split
    then optional); else the planner's split over as few boards of this kind as hold it
    (:func:`mmfree_fpga.planner.plan`: each slice's image in the DRAM), whose board count and
    slices the dict reports (``split``). UserError with the sizes when the state does not fit, or
    no split does (a single layer's slice beyond the DRAM)."""
    from dataclasses import replace

    from mmfree_fpga import planner
    cfg = ModelConfig(**summary.geometry)
    state = slots * summary.state_bytes
    if budget is not None and state > budget.available_bytes:
        raise UserError(
            f"the recurrent state of {slots} state slots ({slots} x {summary.state_bytes:,} B = {state:,} B) does not "
            f"fit the {board}'s on-chip RAM ({budget.text()}), even with the weights in DRAM; use fewer --slots "
            "or a smaller model")
    on_chip = {"on_chip_bytes": state, "on_chip_available_bytes": budget.available_bytes if budget else None,
               "slots": slots}
    if summary.image_bytes <= dram.size_bytes:
        return {**check_fits_dram(summary, dram, budget, board), **on_chip}
    name = _model_name(cfg)
    try:
        device = planner.device_spec(board, "dram", clock_hz)
        # the build's own DRAM and on-chip budget (its UART FIFOs)
        device = replace(device, weight_bytes=dram.size_bytes,
                         state_bytes=budget.available_bytes if budget is not None else device.state_bytes)
        split = planner.plan(cfg, summary.packing, device, lanes=lanes, model=name or "the model")
    except ValueError as e:
        raise UserError(f"the model does not fit the {board}'s DRAM, nor does it split over several: {e}") from None
    source = f"--model {name}" if name else f"--checkpoint {summary.source}"
    command = (f"mmfree-fpga plan {source} --board {board}" + (f" --lanes {lanes}" if lanes != 16 else "")
               + (f" --packing {summary.packing}" if summary.packing != "base3" else ""))
    largest = max(st.bytes for st in split.stages)
    return {"memory": "dram", "needed_bytes": largest, "available_bytes": dram.size_bytes,
            "percent": round(100 * largest / dram.size_bytes, 1), "dram": dram.text(),
            "split": {"model": name or summary.source, "image_bytes": split.image_bytes, "boards": split.devices,
                      "slices": [{"holds": st.layers_text, "bytes": st.bytes} for st in split.stages],
                      "plan_command": command},
            **on_chip, "image": summary.as_dict()}
