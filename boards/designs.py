"""The designs the board flow can build: the engine (the real one) and the framed echo.

A design factory takes the board's :class:`~.top.DesignContext` and returns the component
that goes between the UART streams (see :mod:`.top`). :func:`linked_engine` is the engine with
its serial link (:class:`~mmfree_fpga.hw.linked_engine.LinkedEngine`) for the context's
checkpoint; :func:`~.placeholder.frame_echo` a small echo that exercises the board path alone.
"""

from __future__ import annotations

from pathlib import Path

from mmfree_fpga.config import FORMATS, Formats, slots_formats_error
from mmfree_fpga.errors import UserError

from .placeholder import frame_echo
from .top import DEFAULT_FIFO_DEPTH, DesignContext, DesignFactory

__all__ = ["DESIGNS", "DEFAULT_LANES", "FAMILY_LANES", "engine_perf_model", "PRELOAD_FAMILIES", "linked_engine", "design_factory", "weight_image"]

DEFAULT_LANES = 16
# The iCE40UP5K gets the tiny engine (hw/tiny_engine.py: one sequential datapath, one trit per
# cycle), its weights in the SPRAMs; boards/resources.py prints where its logic goes.
FAMILY_LANES = {"ice40": 1}
TINY_FAMILIES = ("ice40",)
# Families whose block RAM takes initial contents from the bitstream, so the weight image can be
# part of the configuration (iCE40 SPRAM has no initial contents: weights come over the UART).
PRELOAD_FAMILIES = ("ecp5",)


def weight_image(checkpoint, packing: str | None, fmt: Formats = FORMATS):
    """The :class:`~mmfree_fpga.host.image.WeightImage` of an export directory or a checkpoint
    (exported in the number formats ``fmt``)."""
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    directory = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
    if (directory / "manifest.json").is_file():
        image = WeightImage.from_directory(directory)
        if packing is not None and packing != image.packing:
            raise UserError(f"{directory} is a {image.packing} weight image, but --packing {packing} was asked for")
        return image
    return WeightImage.from_checkpoint(directory, packing or "base3", fmt)


def engine_perf_model(family: str):
    """The analytic cycle model of the engine variant :func:`linked_engine` builds for ``family``."""
    from mmfree_fpga.config import PERF_MODEL
    from mmfree_fpga.hw.tiny_program import TINY_PERF_MODEL
    return TINY_PERF_MODEL if family in TINY_FAMILIES else PERF_MODEL


def linked_engine(*, lanes: int | None = None, preload: bool | None = None, slots: int = 0) -> DesignFactory:
    """Factory of the engine + link for the context's checkpoint, ``lanes`` trits per cycle
    (default: :data:`FAMILY_LANES` for the board's family, else :data:`DEFAULT_LANES`).

    On an iCE40 it is the tiny engine (:class:`~mmfree_fpga.hw.tiny_engine.TinyEngine`, one lane,
    base3 images) with its weights in SPRAM; elsewhere the full engine.

    ``preload`` puts the weight image into the engine's RAM through the bitstream (default: on
    families in :data:`PRELOAD_FAMILIES`); the link then reports the weights loaded from
    configuration on, and the host uploads nothing when it holds the same image.

    With ``context.memory == "dram"`` the weights are in the board's DRAM instead: the design is
    a :class:`~.dram.DramBoardDesign`, the engine's LiteDRAM core (``context.dram``) beside a
    ``LinkedEngine(memory="sdram")``; the host uploads the image over the UART (a DRAM starts
    empty: nothing is preloaded). Only the geometry and packing of the model are needed
    (``context.image``), not its weights.

    ``slots``: state slots (protocol 1.2's slice ops, layer-pipelined runs over several boards;
    ``LinkedEngine(slots=...)``); 0, the default, builds none. With either memory (a slice image
    goes into the DRAM as a whole image would); not the tiny engine, not the wide formats.
    """
    from mmfree_fpga.hw.engine import check_geometry
    from mmfree_fpga.hw.linked_engine import LinkedEngine

    def factory(context: DesignContext):
        if slots and context.family in TINY_FAMILIES:
            raise UserError(f"--slots needs the block-RAM engine or the DRAM engine: the {context.family} build "
                            "runs the tiny engine, which has no state slots")
        if slots and not context.formats.int32_residual:
            raise UserError(slots_formats_error())
        if context.memory == "dram":
            return _dram_engine(context, lanes, preload, slots)
        packing = context.image.packing if context.image is not None else None
        image = weight_image(context.checkpoint, packing, context.formats)
        tiny = context.family in TINY_FAMILIES
        if tiny and context.formats != FORMATS:
            raise UserError(f"the {context.family} build runs the tiny engine, which computes in the narrow formats "
                            "only; leave out --formats")
        if tiny and lanes not in (None, 1):
            raise UserError(f"the {context.family} build runs the tiny engine, which has one lane; leave out --lanes")
        n = lanes or FAMILY_LANES.get(context.family, DEFAULT_LANES)
        if not tiny:
            check_geometry(image.cfg, n)
        with_image = context.family in PRELOAD_FAMILIES if preload is None else preload
        kw = dict(tiny=True, spram=True, max_payload=256) if tiny else {}
        cycles = engine_perf_model(context.family).cycles_per_token(image.cfg, n)
        step_ms = max(1, int(-(-cycles * 1000 // context.clock_hz)))
        if not tiny:
            kw["formats"] = context.formats
        if slots:
            kw["slots"] = slots
        return LinkedEngine(image.cfg, lanes=n, packing=image.packing, clk_freq=context.clock_hz,
                            step_time_ms=step_ms, image=image.blob if with_image else None, **kw)

    def uart_fifo_depth(family: str) -> int:
        """No UART FIFOs on the tiny engine's iCE40: the Link's receive ring holds a whole frame
        (the host waits for each response) and the Link waits for the transmitter byte by byte,
        so the FIFOs would only add logic and block RAM to a device whose logic cells are nearly all used."""
        return 0 if family in TINY_FAMILIES else DEFAULT_FIFO_DEPTH

    factory.lanes = lanes
    factory.slots = slots
    factory.uart_fifo_depth = uart_fifo_depth
    return factory


# a fraction of the native port's peak that sequential weight reads sustain (tests/test_dram.py
# measures them above it); the step-time bound divides by it
DRAM_EFFICIENCY_BOUND = 0.9


def _dram_engine(context: DesignContext, lanes: int | None, preload: bool | None, slots: int = 0):
    """The engine with its weights in the board's DRAM (see :func:`linked_engine`)."""
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.hw.engine import check_geometry
    from mmfree_fpga.hw.linked_engine import LinkedEngine

    from .dram import MEMORY_KINDS, DramBoardDesign
    core = context.dram
    if core is None or context.image is None:
        raise ValueError("a DRAM design needs the board's core (context.dram) and the model's sizes (context.image)")
    if context.family in TINY_FAMILIES:
        raise UserError(f"the {context.family} build runs the tiny engine, which keeps its weights on chip")
    if preload:
        raise UserError("a DRAM starts empty: the weight image cannot be part of the bitstream (preload)")
    kind = MEMORY_KINDS.get(core.phy["memtype"], (None, None))[1]
    if kind is None:
        raise UserError(f"no engine for {core.phy['memtype']} memory yet (SDR SDRAM and DDR3 only)")
    cfg = ModelConfig(**context.image.geometry)
    packing = context.image.packing
    n = lanes or FAMILY_LANES.get(context.family, DEFAULT_LANES)
    check_geometry(cfg, n)
    # an upper bound of a token's time: the compute cycles plus every weight byte at the native
    # port's rate (the two overlap in the engine)
    perf = engine_perf_model(context.family)
    native_bytes = core.peak_bytes_per_cycle
    cycles = (perf.cycles_per_token(cfg, n)
              + perf.bytes_per_token(cfg, packing, context.formats) / (native_bytes * DRAM_EFFICIENCY_BOUND))
    step_ms = max(1, int(-(-cycles * 1000 // context.clock_hz)))
    engine = LinkedEngine(cfg, lanes=n, packing=packing, clk_freq=context.clock_hz, step_time_ms=step_ms,
                          memory=kind, native_data_width=core.data_width, native_address_width=core.address_width,
                          formats=context.formats, slots=slots, capacity=min(core.size_bytes, (1 << 32) - 1))
    return DramBoardDesign(engine, core)


DESIGNS = {"engine": "the engine with its serial link (hw/linked_engine.py)",
           "echo": "a framed echo with a CRC-8 (boards/placeholder.py): the board path without the engine"}


def design_factory(name: str, *, lanes: int | None = None, slots: int = 0) -> DesignFactory:
    """The factory of a design by name (:data:`DESIGNS`); ``lanes`` and ``slots`` only for the engine."""
    if name == "engine":
        return linked_engine(lanes=lanes, slots=slots)
    if name == "echo":
        if lanes is not None:
            raise UserError("--lanes applies to the engine design only (--design engine)")
        if slots:
            raise UserError("--slots applies to the engine design only (--design engine)")
        return frame_echo
    raise UserError(f"unknown design {name!r}; use one of {', '.join(DESIGNS)}")
