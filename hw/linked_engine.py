"""The board design: the serial :class:`~.link.Link` in front of the compute :class:`~.engine.Engine`.

:class:`LinkedEngine` is a design as ``boards/top.py`` expects one (``i_stream``/``o_stream``
byte streams): the UART bytes go through the Link, and the Link's ``engine`` member (the flipped
:class:`~.control.ControlSignature`) is connected, member for member, to the same five members
of the engine (``cmd``, ``load``, ``result``, ``logit_req``, ``logit_resp``): one contract, no
field renaming.

Activity (``activity_ports=True``, for simulation: ``sim/pipe_harness.cpp`` paces its clock by
them; board tops leave them out):

* ``idle``: nothing happens until a byte arrives: the Link's parser waits for bytes with
  nothing to send (its ``idle`` observation point) and the engine takes commands (not
  computing, no result waiting; with ``memory="sdram"``: the DRAM is initialised and no loaded
  beat waits to be written);
* ``in_frame``: the Link holds a partial frame, whose idle timeout counts cycles.

Weights: without ``image`` the engine starts without weights (its RAM is written only through
``load``), as the Link reports after reset. With ``image`` (the exported weight image) the
engine's RAM is initialised with it (block RAM contents in the bitstream, e.g. on ECP5) and the
Link reports those weights loaded from the start, so a host that holds the same image need not
upload it; LOAD_BEGIN/CHUNK/COMMIT still overwrite them.

Memory (``memory``): ``"bram"`` (default) is :class:`~.engine.Engine`, its weights in on-chip
RAM. ``"sdram"`` is :class:`~.dram_engine.DramEngine`, its weights in DRAM behind a LiteDRAM
core that is not part of this design: the top instantiates the core (``boards/litedram.py``),
connects its native user port to ``native`` and its ``init_done`` to ``init_done``, and runs
this design on the core's clock. The Link's ``load`` writes the image into the DRAM (the
engine's ``load`` has backpressure; the Link waits on it), and commands wait for ``init_done``.
A DRAM starts without weights: ``image`` is refused.

State slots (``slots``, 0 by default): the Link and the engine both get them (``Link(slots=...)``,
``EngineCore(slots=...)``): protocol 1.2's slice ops, the Link's ``residual`` writes into the
engine's input buffer. The block-RAM and the DRAM engine have them (with ``memory="sdram"`` a
LOAD_SLICE's image goes into the DRAM through the same ``load`` as a whole image, and VERIFY_IMAGE
reads back the loaded slice image's bytes from it); the tiny engine (iCE40) has none (its Link's
small form answers the slice ops UNKNOWN_OP). Slots need the narrow formats (the Link carries
int32 residuals). SLICE_INFO's capacity (``capacity``) is, with ``memory="sdram"``, the DRAM's size
(``2**native_address_width`` words of ``native_data_width`` bits, unless given), so a host loads a
slice of a model whose whole image the DRAM could not hold; with block RAM, the whole image (the
RAM is sized for it).

Read-back (``readback``, the default except with ``tiny``): the engine's ``readback`` member
(a :class:`~.weight_port.WeightReader` in front of its weight memory or its DRAM adapter) is
connected to the Link's, which then answers VERIFY_IMAGE with the CRC-32 of the image read
back. The tiny engine has none (its Link's small form answers VERIFY_IMAGE with UNKNOWN_OP):
on the iCE40UP5K the logic cells are nearly all taken.
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.protocol import MAX_PAYLOAD

from .control import ControlSignature
from .engine import Engine
from .link import Link

__all__ = ["LinkedEngine", "MEMORIES"]

MEMORIES = ("bram", "sdram")        # where the engine's weights are (module docstring)


class LinkedEngine(wiring.Component):
    """Link + Engine for ``cfg`` / ``packing`` / ``lanes``.

    ``max_payload``, ``step_time_ms``, ``clk_freq``, ``idle_timeout_cycles`` and ``boot_id``
    go to the :class:`~.link.Link`; ``image`` (bytes of the weight image, or None) to both;
    other keywords (maxima, ``mem_words``, ...) to the :class:`~.engine.Engine`, or with ``tiny``
    (``spram``) to the :class:`~.tiny_engine.TinyEngine` (iCE40UP5K; ``lanes`` is then only
    reported by the Link), or with ``memory="sdram"`` (``native_data_width`` and
    ``native_address_width`` of the core, required; maxima, ``fifo_depth``) to the
    :class:`~.dram_engine.DramEngine`. ``formats``: the engine's number formats (and IDENTIFY's
    formats id; the tiny engine takes the narrow set only). ``readback`` (None: ``not tiny``) gives the Link
    VERIFY_IMAGE and the engine its reader (module docstring). ``capacity``: SLICE_INFO's, with
    ``memory="sdram"`` only (None: the DRAM's size from the native port's widths; module docstring).

    Members
    -------
    i_stream : In(stream.Signature(8))    bytes from the host
    o_stream : Out(stream.Signature(8))   bytes to the host
    idle : Out(1)                         (``activity_ports`` only) see the module docstring
    in_frame : Out(1)                     (``activity_ports`` only) see the module docstring
    native : Out(native_port_signature(native_data_width, native_address_width))
                                          (``memory="sdram"`` only) to the LiteDRAM core's
                                          native user port, as :class:`~.dram_engine.DramEngine`'s
    init_done : In(1)                     (``memory="sdram"`` only) the core's ``init_done``
    memory_error : In(1)                  (``memory="sdram"`` only) the DRAM failed to start (its
                                          read levelling): IDENTIFY's ``Status.MEMORY_ERROR``
    """

    def __init__(self, cfg: ModelConfig, *, lanes: int = 16, packing: str = "base3",
                 max_payload: int = MAX_PAYLOAD, step_time_ms: int = 0, clk_freq: float = 12e6,
                 idle_timeout_cycles: int | None = None, boot_id: int | None = None,
                 image: bytes | None = None, tiny: bool = False, activity_ports: bool = False,
                 memory: str = "bram", readback: bool | None = None, formats: Formats = FORMATS, slots: int = 0,
                 capacity: int | None = None, **engine_kw):
        if memory not in MEMORIES:
            raise ValueError(f"unknown memory {memory!r}; use one of {', '.join(MEMORIES)}")
        if memory != "bram" and tiny:
            raise ValueError(f"the tiny engine keeps its weights on chip: memory={memory!r} needs tiny=False")
        if memory != "bram" and image is not None:
            raise ValueError(f"memory={memory!r}: a DRAM starts empty, the image comes through the Link's "
                             "load (leave out image)")
        if tiny and formats != FORMATS:
            raise ValueError("the tiny engine computes in the narrow formats only")
        if slots and tiny:
            raise ValueError("the tiny engine has no state slots (the slice ops): slots needs tiny=False")
        if capacity is not None and memory == "bram":
            raise ValueError("capacity: the block-RAM engine's is its whole image (memory='sdram' only)")
        if capacity is None and memory == "sdram" and {"native_address_width", "native_data_width"} <= engine_kw.keys():
            dram_bytes = (1 << engine_kw["native_address_width"]) * engine_kw["native_data_width"] // 8
            capacity = min(dram_bytes, (1 << 32) - 1)     # (SLICE_INFO's field is a u32)
        readback = not tiny if readback is None else readback
        if tiny and readback:
            raise ValueError("the tiny engine cannot read its weights back: readback needs tiny=False")
        self.reads_back = readback
        # the tiny engine's boards (iCE40UP5K) also take the Link's small form (bit-serial CRCs,
        # a response ROM: fewer logic cells, same bytes on the wire)
        self.link = Link(cfg, packing=packing, lanes=lanes, max_payload=max_payload, step_time_ms=step_time_ms,
                         clk_freq=clk_freq, idle_timeout_cycles=idle_timeout_cycles, boot_id=boot_id,
                         image=image, small=tiny, readback=readback, formats=formats,
                         memory_status=memory != "bram", slots=slots, capacity=capacity)
        if tiny:
            from .tiny_engine import TinyEngine
            self.engine = TinyEngine(cfg, packing=packing, image=image, **engine_kw)
        elif memory == "sdram":
            from .dram_engine import DramEngine
            self.engine = DramEngine(cfg, lanes=lanes, packing=packing, readback=readback, formats=formats,
                                     slots=slots, **engine_kw)
        else:
            self.engine = Engine(cfg, lanes=lanes, packing=packing, image=image, readback=readback, formats=formats,
                                 slots=slots, **engine_kw)
        self.slots = slots
        members = {"i_stream": In(stream.Signature(8)), "o_stream": Out(stream.Signature(8))}
        if activity_ports:
            members |= {"idle": Out(1), "in_frame": Out(1)}
        if memory != "bram":
            members |= {"native": self.engine.signature.members["native"], "init_done": In(1),
                        "memory_error": In(1)}
        self.activity_ports = activity_ports
        self.memory = memory
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = link = self.link
        m.submodules.engine = engine = self.engine
        wiring.connect(m, wiring.flipped(self.i_stream), link.rx)
        wiring.connect(m, link.tx, wiring.flipped(self.o_stream))

        # the engine presents the control members at its top level, among others of its own
        for name in ControlSignature().members:
            wiring.connect(m, getattr(link.engine, name), getattr(engine, name))
        if self.reads_back:
            wiring.connect(m, link.readback, engine.readback)
        if self.slots:
            # (the engine's index is as wide as its max_d, the Link's as the geometry's d)
            m.d.comb += [engine.residual.valid.eq(link.residual.valid), link.residual.ready.eq(engine.residual.ready),
                         engine.residual.payload.index.eq(link.residual.payload.index),
                         engine.residual.payload.value.eq(link.residual.payload.value)]

        if self.memory != "bram":
            wiring.connect(m, engine.native, wiring.flipped(self.native))
            m.d.comb += [engine.init_done.eq(self.init_done), link.memory_error.eq(self.memory_error)]

        if self.activity_ports:
            if self.memory == "bram":
                engine_idle = engine.cmd.ready      # (low while a read-back runs)
            else:
                # the DramEngine's core takes commands, the controller is initialised and no
                # loaded beat waits for it (a partly assembled beat waits for bytes, as the Link
                # does; its own cmd.ready stays low until a command writes it out)
                engine_idle = engine.core.cmd.ready & self.init_done & ~engine.adapter.write.valid
            m.d.comb += [self.idle.eq(link.idle & engine_idle), self.in_frame.eq(link.in_frame)]
        return m
