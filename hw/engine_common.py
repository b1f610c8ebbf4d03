"""What the engine's units share: the job list, parameter indices, job counters, the geometry
they read, the build variant, and how a unit's memory ports reach the engine's memories.

The units (:mod:`.engine_fetch`, :mod:`.engine_front`, :mod:`.engine_output`) each walk the job
list with their own :class:`JobCounter`; :class:`~.engine.EngineCore` owns the on-chip memories
and the run-time geometry registers and wires the units together.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Mux, Signal, Value, unsigned
from amaranth.lib import data
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.utils import ceil_log2

from mmfree_fpga.errors import DesignError

from .ram import registered_read_port
from .weight_port import ADDR_BITS

__all__ = ["JOBS", "JT_F", "JT_I", "JT_G", "JT_O", "JT_GATE", "JT_DOWN", "JT_LM", "NORM_SLOTS",
           "Param", "Tag", "JobCounter", "geometry_layout", "job_count_shape", "Variant", "FULL",
           "COMPACT", "read_port_signature", "write_port_signature", "attach_read_port", "magnitude",
           "ImageElements", "image_elements"]

JOBS = ("f_proj", "i_proj", "g_proj", "o_proj", "gate_proj", "down_proj", "lm_head")
JT_F, JT_I, JT_G, JT_O, JT_GATE, JT_DOWN, JT_LM = range(7)
# Norm slots: job k's norms go to slot k mod 3, so the norms of job k+2 can be fetched right
# behind the trits of job k (the front is done with job k-1 by then).
NORM_SLOTS = 3


class Param:
    """Parameter indices. Per job type ``jt`` (index in JOBS) at ``JOB_STRIDE * jt``: word offsets
    (layer 0 for layer matrices, the layer stride added per layer) and lengths in beats."""
    JOB_STRIDE = 8
    TRITS_OFF, TRITS_BEATS, A_OFF, C_OFF, NORM_BEATS, K_OFF = range(6)
    LB_OFF = 56            # words, layer 0
    LB_BEATS = 57
    EMB_Q_OFF = 58         # words
    EMB_ROW_BEATS = 59
    EMB_SCALE_OFF = 60     # bytes
    RAM_SIZE = 64
    # registers
    D, I, V, L, PACKING, LAYER_STRIDE, LB_STRIDE = range(64, 71)
    # registers of engines with state slots only (EngineCore(slots=...)): the slice's parts
    EMBEDDING, HEAD = 71, 72


class Tag:
    """What a weight request fetches (the ``kind`` of its tag): its response beats' destination."""
    TRITS, A, C, K, LB, EMBS, EMBR = range(7)


def job_count_shape(max_L: int):
    """Shape of a job index, 0 .. K (``K = 6 max_L + 1`` jobs)."""
    return range(6 * max_L + 2)


def geometry_layout(max_d: int, max_I: int, max_L: int, max_V: int) -> data.StructLayout:
    """The run-time geometry every unit reads (the engine's registers, :class:`Param`):
    ``d``, ``I``, ``V``, ``L``, ``n_jobs`` (``6 L + 1``), ``packing`` (its code), the word
    strides ``layer_stride`` (one layer's matrices and norms) and ``lb_stride`` (lower bounds),
    ``first_jt``: the first job's type (``JT_F``; ``JT_LM`` for a slice of no layers but the head)."""
    return data.StructLayout({
        "d": range(max_d + 1), "I": range(max_I + 1), "V": range(max_V + 1), "L": range(max_L + 1),
        "n_jobs": job_count_shape(max_L), "packing": 1,
        "layer_stride": unsigned(ADDR_BITS), "lb_stride": unsigned(ADDR_BITS), "first_jt": unsigned(3),
    })


class JobCounter:
    """A job counter: global index ``k``, job type ``jt``, layer ``l``, norm ``slot``
    (``k mod NORM_SLOTS``) and, per ``(name, stride)`` in ``strides``, ``base[name] = l * stride``
    kept as a running sum (no multiplier). :meth:`reset` (to job 0 of the geometry ``geom``: its
    ``first_jt``) and :meth:`step` return statements."""

    def __init__(self, name: str, max_L: int, strides=()):
        self.k = Signal(job_count_shape(max_L), name=f"{name}_k")
        self.jt = Signal(3, name=f"{name}_jt")
        self.l = Signal(range(max_L + 1), name=f"{name}_l")
        self.slot = Signal(range(NORM_SLOTS), name=f"{name}_slot")
        self._strides = tuple(strides)
        self.base = {n: Signal(ADDR_BITS, name=f"{name}_{n}_base") for n, _ in self._strides}

    def reset(self, geom=None):
        return ([self.k.eq(0), self.jt.eq(0 if geom is None else geom.first_jt), self.l.eq(0), self.slot.eq(0)]
                + [b.eq(0) for b in self.base.values()])

    def step(self, n_layers):
        last_layer = self.l == n_layers - 1
        return [self.k.eq(self.k + 1), self.slot.eq(Mux(self.slot == NORM_SLOTS - 1, 0, self.slot + 1)),
                self.jt.eq(Mux(self.jt == JT_DOWN, Mux(last_layer, JT_LM, JT_F), self.jt + 1)),
                self.l.eq(Mux(self.jt == JT_DOWN, self.l + 1, self.l))] + [
                self.base[n].eq(Mux(self.jt == JT_DOWN, self.base[n] + stride, self.base[n]))
                for n, stride in self._strides]


@dataclass(frozen=True)
class Variant:
    """A build family of the engine: the choices that trade resources for clock speed.

    ``share``: products per multiplier in the output scale and the elementwise unit (2: one
    output element every two cycles, which a matrix of ``cols / lanes >= 2`` cycles per row never
    notices). ``embed_via_output_scale``: the embedding goes through the output scale (idle from
    FEED_TOKEN until the embedding is in x) instead of its own EmbedScale. ``param_read_ports``:
    1 or 2 read ports on the parameter RAM; ``param_ram_distributed``: the parameter RAM in LUT
    RAM (its read is fast) rather than block RAM. ``register_beats``: the response router
    registers norm, lower-bound, k and embedding-scale beats before their destinations (the
    transfer logic then drives registers, not block RAM enables). ``register_stage_inputs``: the
    front's and the elementwise unit's inputs are registered after the block RAM reads (stage B).
    ``front_skid``: a :class:`~.engine_front.SkidBuffer` between the front sequencer and the front
    (the sequencer's advance then sees a register, not the front's stall chain). ``q_skid``: a small
    FIFO between the front's q output and the packer, and a one-hot packer slot; ``q_split``: the q FIFO's words are ``lanes / q_split`` wide (reassembled in front of the
    matrix unit). ``x_read_ports``: 2, or 1 shared by the front and the operand stage.
    ``hold_operands``: the operand stage holds an element whose operand the writer has not stored
    yet (short rows and few rows); without it the geometry must leave enough slack.
    """
    name: str
    share: int
    embed_via_output_scale: bool
    param_read_ports: int
    param_ram_distributed: bool
    register_beats: bool
    register_stage_inputs: bool
    front_skid: bool
    q_skid: bool
    q_split: int
    x_read_ports: int
    hold_operands: bool

    def q_split_for(self, lanes: int) -> int:
        """The q FIFO's split for ``lanes`` (1 where ``lanes`` does not divide)."""
        return self.q_split if lanes % self.q_split == 0 else 1


# Full builds (ECP5): every register that cuts a path from a block RAM's clock-to-out.
FULL = Variant("full", share=1, embed_via_output_scale=False, param_read_ports=2, param_ram_distributed=True,
               register_beats=True, register_stage_inputs=True, front_skid=True, q_skid=True, q_split=1, x_read_ports=2,
               hold_operands=True)
# The small-FPGA variant (iCE40UP5K: 8 DSPs, no LUT RAM): shared multipliers, no EmbedScale,
# fewer block RAM copies, the pipelines as short as the slower clock allows.
COMPACT = Variant("compact", share=2, embed_via_output_scale=True, param_read_ports=1, param_ram_distributed=False,
                  register_beats=False, register_stage_inputs=False, front_skid=False, q_skid=False, q_split=4, x_read_ports=1,
                  hold_operands=False)


def read_port_signature(shape, depth: int):
    """A memory read port seen from its reader (``In`` of it): ``addr`` and ``en`` out, ``data``
    in one cycle after ``en`` (held while ``en`` is low)."""
    return ReadPort.Signature(addr_width=ceil_log2(depth), shape=shape)


def write_port_signature(shape, depth: int):
    """A memory write port seen from its writer (``In`` of it): ``addr``, ``data``, ``en`` out."""
    return WritePort.Signature(addr_width=ceil_log2(depth), shape=shape)


def attach_read_port(m, memory, port, reader=None):
    """Serve a unit's read-port member ``port`` from ``memory`` through a
    :func:`~.ram.registered_read_port` (or ``reader``, e.g.
    :func:`~.ram.address_registered_read_port`); returns that port (whose ``data`` the unit sees)."""
    rp = (reader or registered_read_port)(m, memory)
    m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en), port.data.eq(rp.data)]
    return rp


def magnitude(v):
    """``|v|`` as an unsigned value of v's width (|x_min| = 2^(width-1) fits)."""
    v = Value.cast(v)
    return Mux(v < 0, -v, v)[:len(v)]


@dataclass(frozen=True)
class ImageElements:
    """Bytes per element of the image sections a format set changes (``mmfree_fpga.image``):
    ``norm`` (a, c), ``lb`` (lower bounds), ``emb`` (embedding values), ``k`` (a BitLinear's
    constants: k, plus the eps term's with ``norm_eps``)."""
    norm: int
    lb: int
    emb: int
    k: int

    def per_beat(self, beat_bytes: int, kind: str) -> int:
        """Elements of section ``kind`` in one weight beat (DesignError if a beat holds none)."""
        size = getattr(self, kind)
        if beat_bytes % size:
            raise DesignError(f"weight beats of {beat_bytes} bytes do not hold whole {size}-byte "
                              f"{kind} elements of these formats; use more lanes")
        return beat_bytes // size


def image_elements(fmt) -> ImageElements:
    """The element sizes of ``fmt``'s image (:func:`mmfree_fpga.image.element_kinds`, ``k_words``)."""
    from mmfree_fpga.image import KIND_DTYPES, element_kinds, k_words
    kinds = element_kinds(fmt)

    def size(kind):
        return int(KIND_DTYPES[kinds[kind]][-1])
    return ImageElements(norm=size("norm"), lb=size("lower_bound"), emb=size("embedding.q"), k=4 * k_words(fmt))
