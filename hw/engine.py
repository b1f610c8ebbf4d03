"""The engine: token id in, next token out, every layer of an HGRN-bit model on chip.

Bit-exact with :class:`mmfree_fpga.reference.integer.IntegerModel` (same tokens, same Q16
logits). One :class:`EngineCore` holds the datapath cores and a hard-wired sequencer; it reads
``weights.bin`` through the weight port (:mod:`.weight_port`). :class:`Engine` adds a
:class:`~.weight_port.WeightMemory`.

Sequencer: hard-wired, table driven
-----------------------------------
A token is a fixed list of *jobs*, one per BitLinear: for each layer ``f_proj, i_proj, g_proj,
o_proj, gate_proj, down_proj`` (in that order), then ``lm_head`` (``K = 6 L + 1`` jobs). Every
job is the same recipe (normalise/statistics/quantise passes, a matrix, an output scale, one
elementwise op streamed on the outputs); only the vectors it reads and writes and the op
differ, and those follow from the job type (7 cases, wired in). A microcode would buy nothing
here: the order never changes, and the variable parts (sizes, addresses) are run-time
*parameters*: geometry registers and a small parameter RAM of section addresses and lengths
(:func:`engine_params`, derived from ``mmfree_fpga.image.image_layout``). Its initial contents are the
build's geometry; ``SET_PARAM`` rewrites them, so a smaller model runs on a larger build, and
one simulator build serves several geometries.

The units walk the job list concurrently, each with its own job counter
(:class:`~.engine_common.JobCounter`); each is a component of its own, joined by
``amaranth.lib.stream`` interfaces where data flows and by documented progress signals (jobs
done, norms arrived) where one unit paces another:

* :class:`~.engine_fetch.Fetcher` issues weight-port requests: the embedding row and scale,
  then per job its norm vectors ``a`` and ``c`` and constant ``k`` (plus the lower bounds for
  ``f_proj``) into one of three norm slots, and its trits. Norms are fetched one job ahead of
  the trits (``N0 N1 T0 N2 T1 ...``), so the statistics of job k+1 run while matrix k streams;
* :class:`~.engine_fetch.ResponseRouter` sends the in-order response beats to the embedding,
  the norm slots and a trit FIFO (``trit_fifo_depth`` beats) that fills from the spare beats
  (base3 uses 4 beats in 5) and keeps the matrix unit busy while the next norms go by;
* :class:`~.engine_front.FrontSequencer` feeds :class:`~.bitlinear_front.BitLinearFront`: one
  MAX element (the OR of the input vector's magnitudes, tracked as the vector was written, has
  the bit length of its maximum), a STATS pass and a QUANT pass; :class:`~.engine_front.QPacker`
  packs q ``lanes`` wide into a FIFO that the matrix unit loads from with its first row;
* :class:`~.engine_front.MatrixIssuer` gives :class:`~.matvec.TernaryMatVec` one command per job;
* the output path (:mod:`.engine_output`): accumulators -> :class:`~.engine_output.ScaleStage`
  (:class:`~.output_scale.OutputScale`, scale from :class:`~.scalar_unit.ScalarUnit` through a
  FIFO) -> :class:`~.engine_output.OperandStage`, which reads the op's second operand from
  on-chip memory -> :class:`~.elementwise.ElementwiseUnit` -> :class:`~.engine_output.Writer`.
  ``f``: FORGET with the lower bound -> f; ``i``: RECUR with f and h[l] -> h[l];
  ``g``: SILU_MUL with h[l] -> p; ``o`` and ``down``: ADD to x; ``gate``: rows < I stored,
  rows >= I SILU_MUL with the stored gate -> v; ``lm_head``: -> logits and the argmax.

:class:`EngineCore` owns the on-chip memories (the units see read and write ports), the
parameter RAM and geometry registers, the command interface and the image loader. What differs
between the full build and the compact one is a :class:`~.engine_common.Variant`
(:data:`~.engine_common.FULL`, :data:`~.engine_common.COMPACT`) that the units take.

A front job waits only for its input vector (``f``, ``o``, ``gate``, ``down``, ``lm_head``
wait until the output path finished the job before; ``i`` and ``g`` read the same x as ``f``)
and for its norms. So per dependent BitLinear the exposed overhead is about two passes over its
input plus pipeline latencies; everything else overlaps with the matrices.

On-chip memories: x (max_d), h (max_L x max_d), f/gate and p/v (max(max_d, max_I)), three norm
slots (a and c, max(max_d, max_I) x norm_bits each), lower bounds (max_d x gate_bits), logits
(max_V), all x_bits wide unless noted, plus the q FIFO (2 max_in / lanes words of lanes bytes)
and the trit FIFO (about (4 max_in + 2 max_d) / beat_bytes beats with the narrow formats' 2-byte
norm elements).

Number formats: ``EngineCore(formats=...)`` (a :class:`~mmfree_fpga.config.Formats`, one of
``FORMAT_SETS``) sets every width and the arithmetic of the units, bit-exact with the integer
model of those formats, and the image's element sizes the engine reads (``image_layout`` of the
same formats). The "wide" set adds the exact quantiser (:class:`~.bitlinear_front.BitLinearFront`)
and the inner RMSNorm eps term (its constant from the 16-byte k section; G of the input
BitLinears from the front's statistics pass, o_proj's from the g_proj outputs as the operand
stage passes them; :class:`~.scalar_unit.ScalarUnit` adds E before the square root).

Control interface (:class:`~.control.ControlSignature`, all ``amaranth.lib.stream``)
-------------------------------------------------------------------------------------
``cmd`` (:func:`~.control.command_layout`: ``op`` 3 bits, ``index`` 8 bits, ``arg`` 32 bits), accepted only
while the engine is idle (not during a token, nor while a result waits):

* ``RESET_STATE``: h := 0 for every layer (also the state after reset);
* ``FEED_TOKEN(arg = token)``: runs one step; exactly one ``result`` follows;
* ``LOAD_RESET``: the image write pointer := 0;
* ``SET_PARAM(index, arg)``: parameter ``index`` := arg (:class:`Param`; see :func:`engine_params`);
* with state slots only (below): ``FEED_SLOT(index = slot, arg = token)`` runs one step of the
  slice on that slot's state (``FEED_TOKEN`` is slot 0); ``RESET_SLOT(index = slot)``: that
  slot's h := 0 (``RESET_STATE``: every slot's).

``load`` (8-bit stream, always ready; not to be used during a token): image bytes, stored at the
write pointer, which then advances. ``result`` (:func:`~.control.result_layout`): ``token`` (the argmax,
taken on the full-width logits), ``logit`` (its value as Q16 int32 whatever x_frac is:
:func:`wire_logit`, ``reference.integer.wire_logits``), ``cycles`` (clock cycles from accepting
FEED_TOKEN to offering the result). ``logit_req`` (32-bit index) -> ``logit_resp`` (that logit of
the last step as Q16 int32), one response per request, in order.

In the generated Verilog (ports named ``<member>__valid/ready/payload``): ``cmd__payload`` is
``{arg[31:0], index[7:0], op[2:0]}`` (op in bits 2:0, index 10:3, arg 42:11); ``result__payload``
is ``{cycles, logit, token}`` (token 31:0, logit 63:32, cycles 95:64); ``load__payload`` 8 bits;
``logit_req__payload`` and ``logit_resp__payload`` 32 bits. ``rst`` is synchronous, active high.
Parameter indices below 64 go to the parameter RAM, 64..70 (with slots 64..72) to registers; others
are ignored.

Layer slices and state slots (``EngineCore(slots=N)``, protocol 1.2's slice ops)
-------------------------------------------------------------------------------
With ``slots`` > 0 the engine runs a *slice* of a model, layers ``[first, end)`` with or without the
embedding and the head, from its *slice image* (:mod:`mmfree_fpga.image_slice`) in the weight
memory: :func:`engine_params` with ``sl=`` gives its parameters (``L`` the slice's layer count,
its sections' addresses, and the registers ``EMBEDDING`` and ``HEAD``), which ``SET_PARAM``
writes (the Link does after each LOAD_COMMIT); the job list is then ``6 L + HEAD`` jobs. A step
starts from the embedding (``EMBEDDING``) or from the *input buffer* (an x-sized memory the
``residual`` stream writes: ``index``, ``value``; read into x through the writer's embedding
path), and without the head stops after the last layer's down_proj: that result (the residual
out) is also stored to the logit memory, which is then the *output buffer* read through
``logit_req`` / ``logit_resp`` (raw Q16 int32: ``Formats.int32_residual`` sets only), and the result is
``token`` 0, ``logit`` 0 and the step's ``cycles``. h has ``slots`` copies (``max_L x max_d``
each) and its zero flags one set per slot. A slice of no layers runs lm_head alone (the head) or
no job at all (the embedding only: the embedding is the output). Without slots (the
default, every board build) none of this is built: the netlist is that of before (Yosys's cell
statistics of the full engine are identical).

``trace`` (:func:`trace_layout`, observational): valid for one cycle whenever the writer stores
a result: ``job`` (index in ``JOBS``), ``layer``, ``row`` (the output row of the job's matrix)
and ``value`` (what is stored: f, h[l], p, x, the GLU gate (rows < I) or v (rows >= I), a logit).
Its ``ready`` is ignored (nothing may stall the writer; a stream with ``always_ready`` cannot be
a top-level port in Amaranth 0.5); left unconnected, as on the boards, it is only wires of
signals the writer has anyway (the demo LinkedEngine's netlist after Yosys ``proc; flatten; opt;
opt_clean -purge`` is identical with and without it). Verilog: ``trace__valid``, ``trace__payload`` =
``{value, row, layer, job}`` from bit 0 up, widths from :func:`trace_layout`.

Constraints: ``lanes`` in {8, 16, 32, 64} (beats of lanes/4 bytes divide the image's 16-byte
section alignment); d and I multiples of ``lanes``, d >= 16.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.image import image_layout, image_size
from mmfree_fpga.packing import PACKINGS, TRITS_PER_BYTE
from mmfree_fpga.protocol import MAX_SLOTS

from .argmax import Argmax
from .bitlinear_front import BitLinearFront
from .control import ControlSignature, EngineOp, residual_layout, result_layout
from .elementwise import ElementwiseUnit, shared_products_fit
from .engine_common import (COMPACT, FULL, JOBS, JT_DOWN, JT_LM, JT_O, NORM_SLOTS, Param, attach_read_port,
                            geometry_layout, image_elements)
from .engine_fetch import Fetcher, ResponseRouter
from .engine_front import FrontSequencer, MatrixIssuer, QPacker, SkidBuffer
from .engine_output import OperandStage, ScaleStage, SharedScaleStage, Writer
from .matvec import TernaryMatVec
from .output_scale import embed_path_fits
from .ram import NO_RW_CHECK, address_registered_read_port, registered_read_port
from .scalar_unit import EpsKind, ScalarUnit
from .trits import packing_code
from .vector_common import vector_widths
from .weight_port import ADDR_BITS, ReadbackSignature, WeightMemory, WeightReader, weight_port_signature, write_layout

__all__ = ["Param", "JOBS", "trace_layout", "residual_layout", "beat_bytes",
           "engine_params", "check_geometry", "EngineCore", "Engine"]

LANES_SUPPORTED = (8, 16, 32, 64)


def beat_bytes(lanes: int) -> int:
    """Bytes per weight beat: one beat sustains ``lanes`` trits per cycle in either packing."""
    return -(-lanes // TRITS_PER_BYTE["2bit"])


def trace_layout(max_d: int, max_I: int, max_L: int, max_V: int, fmt: Formats = FORMATS) -> data.StructLayout:
    """What the ``trace`` port carries for each stored result (module docstring); ``value`` is
    signed ``fmt.x_bits``."""
    return data.StructLayout({"job": unsigned(3), "layer": unsigned(max(1, max_L.bit_length())),
                              "row": unsigned((2 * max(max_d, max_I) + max_V).bit_length()),
                              "value": signed(fmt.x_bits)})


def wire_logit(value, fmt: Formats):
    """A Q(x_frac) logit as the external interface carries it: Q16 in 32 bits,
    ``clip(rshift_round(value, x_frac - 16), int32)`` (``reference.integer.wire_logits``)."""
    from amaranth.hdl import Value
    value = Value.cast(value)
    k = fmt.x_frac - 16
    if k == 0 and len(value) <= 32:
        return value
    if k > 0:
        shifted = (value + (1 << (k - 1))) >> k
    else:
        shifted = value << -k
    lo, hi = -(1 << 31), (1 << 31) - 1
    return Mux(shifted > hi, hi, Mux(shifted < lo, lo, shifted))[:32].as_signed()


def check_geometry(cfg: ModelConfig, lanes: int, *, max_d=None, max_I=None, max_L=None, max_V=None) -> None:
    """DesignError unless ``cfg`` runs on an engine of these lanes and maxima."""
    if lanes not in LANES_SUPPORTED:
        raise DesignError(f"lanes must be one of {LANES_SUPPORTED}, got {lanes}")
    if cfg.d % lanes or cfg.I % lanes or cfg.d < 16:
        raise DesignError(f"hidden size {cfg.d} and intermediate size {cfg.I} must be multiples of "
                        f"lanes={lanes} (and d >= 16)")
    for name, v, mx in (("d", cfg.d, max_d), ("I", cfg.I, max_I), ("L", cfg.L, max_L), ("V", cfg.V, max_V)):
        if mx is not None and v > mx:
            raise DesignError(f"{name}={v} exceeds this engine build's maximum {mx}; generate a larger build")


def engine_params(cfg: ModelConfig, packing: str, lanes: int, fmt: Formats = FORMATS, sl=None) -> dict[int, int]:
    """Every parameter (index -> value) of a model: geometry and the image's section addresses
    (the image of ``fmt``). With ``sl`` (a :class:`~mmfree_fpga.image_slice.Slice` of at least one
    layer, or of none with the embedding or the head), those of its slice image
    (:func:`~mmfree_fpga.image_slice.slice_layout`): ``L`` is the slice's layer count, layer 0 its
    first layer, the absent parts' addresses 0, and the registers ``EMBEDDING`` and ``HEAD``
    (engines with state slots) say which parts it holds."""
    check_geometry(cfg, lanes)
    wb = beat_bytes(lanes)
    el = image_elements(fmt)
    if sl is None:
        first, n_layers, embedding, head = 0, cfg.L, True, True
        sec = {s.name: s for s in image_layout(cfg, packing, fmt)}
    else:
        from mmfree_fpga.image_slice import slice_layout
        first, n_layers, embedding, head = sl.first, sl.layers, sl.embedding, sl.head
        sec = {s.name: s for s in slice_layout(cfg, packing, sl, fmt)}

    def words(name):
        off = sec[name].offset
        assert off % wb == 0, (name, off, wb)
        return off // wb

    def beats(name):
        return -(-sec[name].size // wb)

    p = {}
    for jt, job in enumerate(JOBS):
        prefix = "lm_head" if jt == JT_LM else f"layers.{first}.{job}"
        base = Param.JOB_STRIDE * jt
        if prefix not in {n.rsplit(".", 1)[0] for n in sec}:
            for part in (Param.TRITS_OFF, Param.TRITS_BEATS, Param.A_OFF, Param.C_OFF, Param.NORM_BEATS, Param.K_OFF):
                p[base + part] = 0
            continue
        in_f = sec[f"{prefix}.trits"].shape[1]
        p[base + Param.TRITS_OFF] = words(f"{prefix}.trits")
        p[base + Param.TRITS_BEATS] = beats(f"{prefix}.trits")
        p[base + Param.A_OFF] = words(f"{prefix}.a")
        p[base + Param.C_OFF] = words(f"{prefix}.c")
        assert (el.norm * in_f) % wb == 0
        p[base + Param.NORM_BEATS] = el.norm * in_f // wb
        p[base + Param.K_OFF] = words(f"{prefix}.k")
    p[Param.LB_OFF] = words(f"layers.{first}.lower_bound") if n_layers else 0
    p[Param.LB_BEATS] = beats(f"layers.{first}.lower_bound") if n_layers else 0
    p[Param.EMB_Q_OFF] = words("embedding.q") if embedding else 0
    p[Param.EMB_ROW_BEATS] = el.emb * cfg.d // wb if embedding else 0
    p[Param.EMB_SCALE_OFF] = sec["embedding.scale"].offset if embedding else 0
    p[Param.D], p[Param.I], p[Param.V], p[Param.L] = cfg.d, cfg.I, cfg.V, n_layers
    p[Param.PACKING] = packing_code(packing)
    if n_layers > 1:
        p[Param.LAYER_STRIDE] = words(f"layers.{first + 1}.f_proj.trits") - words(f"layers.{first}.f_proj.trits")
        p[Param.LB_STRIDE] = words(f"layers.{first + 1}.lower_bound") - words(f"layers.{first}.lower_bound")
        for jt, job in enumerate(JOBS[:6]):
            for part in ("trits", "a", "c", "k"):
                assert (words(f"layers.{first + 1}.{job}.{part}") - words(f"layers.{first}.{job}.{part}")
                        == p[Param.LAYER_STRIDE]), "the image's layers are not evenly spaced"
    else:
        p[Param.LAYER_STRIDE] = 0
        p[Param.LB_STRIDE] = 0
    if sl is not None:
        p[Param.EMBEDDING], p[Param.HEAD] = int(embedding), int(head)
    return p


class EngineCore(wiring.Component):
    """The engine without its weight memory (see the module docstring).

    Parameters
    ----------
    cfg : ModelConfig
        The build's geometry: the initial parameters and, unless given, the maxima.
    lanes : int
        Trits per cycle of the matrix unit (16, 32 or 64).
    packing : str
        The initial trit packing; ``packings`` the packings decoded (both by default).
    max_d, max_I, max_L, max_V : int
        Synthesis maxima of the geometry (memory sizes).
    formats : Formats
        The number formats (``mmfree_fpga.config.FORMAT_SETS``): the arithmetic, bit-exact with
        the integer model of the same formats, and the image's element sizes. Formats wider than
        the narrow set need full builds (not ``compact``) and weight beats of 4 bytes or more
        (16 lanes or more) where the image has 4-byte elements.
    compact : bool
        The small-FPGA variant (:data:`~.engine_common.COMPACT`; ``variant`` is the one in use):
        the output scale and the elementwise unit share each multiplier between two products
        (one output element every two cycles, which a matrix of ``cols / lanes >= 2`` cycles per
        row never notices) and the embedding goes through the output scale (no EmbedScale):
        8 DSPs in all instead of 14.

    slots : int
        State slots for layer slices (module docstring, "Layer slices and state slots"); 0 (the
        default): none, the engine runs whole models only and its netlist is that of before.

    Members
    -------
    cmd, load, result, logit_req, logit_resp : the control interface (module docstring).
    trace : Out(stream.Signature(trace_layout(...))) : every stored result; ready is ignored.
    wport : Out(weight_port_signature(beat_bytes(lanes)))
    wwrite : Out(write_layout(beat_bytes(lanes))) : image words from ``load``.
    residual : In(stream.Signature(residual_layout(max_d, formats))), only with ``slots``
        The input buffer: ``value`` to element ``index`` (always ready; not during a token).
    """

    def __init__(self, cfg: ModelConfig, *, lanes: int = 16, packing: str = "base3", packings=PACKINGS,
                 max_d=None, max_I=None, max_L=None, max_V=None, compact: bool = False,
                 formats: Formats = FORMATS, slots: int = 0):
        if not isinstance(formats, Formats):
            raise TypeError(f"formats must be a Formats, not {formats!r}")
        if not (isinstance(slots, int) and 0 <= slots <= MAX_SLOTS):
            raise DesignError(f"slots must be an integer in [0, {MAX_SLOTS}], got {slots!r}")
        if slots and compact:
            raise DesignError("state slots need the full engine (compact=False)")
        if slots and not formats.int32_residual:
            raise DesignError("state slots need formats whose residual is a Q16 int32 (Formats.int32_residual): "
                              "the output buffer is read through the logit port unchanged")
        self.slots = slots
        self.cfg = cfg
        self.formats = formats
        self.compact = compact
        self.variant = COMPACT if compact else FULL
        self.lanes = lanes
        self.packing = packing
        self.packings = tuple(p for p in PACKINGS if p in packings)
        if packing not in self.packings:
            raise DesignError(f"packing {packing} is not among the build's packings {self.packings}")
        self.max_d = max_d or cfg.d
        self.max_I = max_I or cfg.I
        self.max_L = max_L or cfg.L
        self.max_V = max_V or cfg.V
        check_geometry(cfg, lanes, max_d=self.max_d, max_I=self.max_I, max_L=self.max_L, max_V=self.max_V)
        if self.max_d % lanes or self.max_I % lanes:
            raise DesignError("max_d and max_I must be multiples of lanes")
        self.beat_bytes = beat_bytes(lanes)
        self.elements = image_elements(formats)
        for kind in ("norm", "lb", "emb"):
            self.elements.per_beat(self.beat_bytes, kind)
        try:
            w = vector_widths(formats)
        except ValueError as e:
            raise DesignError(f"these formats do not fit the engine: {e}") from None
        if compact and not (shared_products_fit(w) and embed_path_fits(w)):
            raise DesignError("the compact engine's shared multipliers take the narrow formats only")
        self.params = engine_params(cfg, packing, lanes, formats)
        # the largest burst of non-trit beats between two trit requests: norms of down_proj (or
        # of a d-input matrix with the lower bounds), and the k constants
        el = self.elements
        burst = ((2 * el.norm * max(self.max_d, self.max_I) + el.lb * self.max_d) // self.beat_bytes
                 + 2 + (el.k - 8) // self.beat_bytes)
        self.trit_fifo_depth = 1 << (burst - 1).bit_length()
        super().__init__({
            **ControlSignature().members,
            "trace": Out(stream.Signature(self.trace_layout())),
            "wport": Out(weight_port_signature(self.beat_bytes)),
            "wwrite": Out(write_layout(self.beat_bytes)),
            **({"residual": In(stream.Signature(residual_layout(self.max_d, formats)))} if slots else {}),
        })

    def trace_layout(self) -> data.StructLayout:
        return trace_layout(self.max_d, self.max_I, self.max_L, self.max_V, self.formats)

    def elaborate(self, platform):
        m = Module()
        fmt = self.formats
        w = vector_widths(fmt)
        v = self.variant
        max_d, max_I, max_L, max_V = self.max_d, self.max_I, self.max_L, self.max_V
        max_in = max(max_d, max_I)
        maxima = dict(max_d=max_d, max_I=max_I, max_L=max_L, max_V=max_V)
        wb = self.beat_bytes

        # -- cores and units ------------------------------------------------------------------------
        m.submodules.front = front = BitLinearFront(fmt)
        m.submodules.scalar = scalar = ScalarUnit(fmt)
        m.submodules.matvec = mv = TernaryMatVec(lanes=self.lanes, packings=self.packings,
                                                 max_rows=max(2 * max_I, max_V, max_d), max_cols=max_in)
        m.submodules.ew = ew = ElementwiseUnit(fmt, share=v.share)
        m.submodules.argmax = amax = Argmax(max_V, fmt)
        u = SimpleNamespace(
            fetcher=Fetcher(beat_bytes=wb, variant=v, elements=self.elements, slices=bool(self.slots), **maxima),
            router=ResponseRouter(w, beat_bytes=wb, trit_fifo_depth=self.trit_fifo_depth, variant=v, **maxima),
            front_seq=FrontSequencer(w, beat_bytes=wb, variant=v, **maxima),
            qpack=QPacker(act_bits=w.act_bits, lanes=self.lanes, max_in=max_in, variant=v),
            issuer=MatrixIssuer(mv.cmd_layout, **maxima),
            scale=(SharedScaleStage if v.embed_via_output_scale else ScaleStage)(w, acc_layout=mv.out_layout),
            operands=OperandStage(w, beat_bytes=wb, variant=v, slots=self.slots, **maxima),
            writer=Writer(w, trace_layout=self.trace_layout(), slots=self.slots, **maxima),
        )
        for name, unit in vars(u).items():
            m.submodules[name] = unit

        pram, geom, regs = self._parameters(m, u)
        mem = self._memories(m, w)
        ctl = self._control(m, u, pram, regs)
        start, running = ctl.start, ctl.running
        self._loading(m)
        for unit in (u.fetcher, u.router, u.front_seq, u.issuer, u.operands, u.writer):
            m.d.comb += [unit.geom.eq(geom), unit.start.eq(start)]
        m.d.comb += [u.front_seq.running.eq(running), u.issuer.running.eq(running)]

        # weight traffic
        m.d.comb += [u.fetcher.token.eq(self.cmd.payload.arg), u.fetcher.front_done.eq(u.front_seq.done),
                     u.fetcher.writer_done.eq(u.writer.done)]
        wiring.connect(m, u.fetcher.req, wiring.flipped(self.wport.req))
        wiring.connect(m, u.fetcher.tags, u.router.tags)
        wiring.connect(m, wiring.flipped(self.wport.resp), u.router.resp)
        wiring.connect(m, u.router.trits, mv.weights)
        wiring.connect(m, u.router.a, mem.a.write_port())
        wiring.connect(m, u.router.c, mem.c.write_port())
        wiring.connect(m, u.router.lb, mem.lb.write_port())
        # the embedding
        wiring.connect(m, u.router.emb, u.scale.emb)
        if self.slots:
            self._slice_input(m, u, mem, ctl, regs)
        else:
            wiring.connect(m, u.scale.emb_o, u.writer.emb)
        m.d.comb += [u.scale.emb_scale.eq(u.router.emb_scale), u.scale.emb_done.eq(u.writer.emb_done)]
        # the front
        m.d.comb += [u.front_seq.norms_arrived.eq(u.router.norms_arrived), u.front_seq.k.eq(u.router.k),
                     u.front_seq.emb_done.eq(u.writer.emb_done), u.front_seq.writer_done.eq(u.writer.done),
                     u.front_seq.or_x.eq(u.writer.or_x), u.front_seq.or_u.eq(u.writer.or_u)]
        attach_read_port(m, mem.u, u.front_seq.u)
        attach_read_port(m, mem.a, u.front_seq.a)
        attach_read_port(m, mem.c, u.front_seq.c)
        if v.front_skid:
            m.submodules.front_skid = front_skid = SkidBuffer(front.i.payload.shape())
            wiring.connect(m, u.front_seq.o, front_skid.i)
            wiring.connect(m, front_skid.o, front.i)
        else:
            wiring.connect(m, u.front_seq.o, front.i)
        wiring.connect(m, front.stats, scalar.i)
        m.d.comb += [scalar.k_mant.eq(u.front_seq.k_cur[:32]), scalar.k_exp.eq(u.front_seq.k_cur[32:64].as_signed()),
                     u.front_seq.stats_taken.eq(scalar.i.valid & scalar.i.ready)]
        if w.norm_eps:
            # the eps term: its constant (the k section's last two words), its kind by job type,
            # and o_proj's sum over the g_proj outputs from the operand stage
            jt = u.front_seq.jt
            m.d.comb += [scalar.eps_mant.eq(u.front_seq.k_cur[64:96]),
                         scalar.eps_exp.eq(u.front_seq.k_cur[96:128].as_signed()),
                         scalar.eps_kind.eq(Mux(jt == JT_O, EpsKind.GSUM,
                                                Mux(jt == JT_DOWN, EpsKind.CONST, EpsKind.INPUT))),
                         scalar.gsum.eq(u.operands.gsum)]
        # the matrix
        wiring.connect(m, front.q, u.qpack.q)
        wiring.connect(m, u.qpack.act, mv.act)
        wiring.connect(m, u.issuer.cmd, mv.cmd)
        # the output path
        wiring.connect(m, mv.out, u.scale.acc)
        wiring.connect(m, scalar.o, u.scale.scale)
        wiring.connect(m, u.scale.o, u.operands.i)
        m.d.comb += [u.operands.writer_done.eq(u.writer.done), u.operands.writer_row.eq(u.writer.row),
                     u.operands.fresh.eq(u.writer.fresh)]
        attach_read_port(m, mem.lb, u.operands.lb)
        attach_read_port(m, mem.g, u.operands.g)
        attach_read_port(m, mem.h, u.operands.h)
        self._x_readers(m, mem.x, u.front_seq.x, u.operands.x, u.operands.x_owner)
        wiring.connect(m, u.operands.o, ew.i)
        wiring.connect(m, ew.o, u.writer.i)
        for name in ("x", "u", "g", "h", "logits"):
            wiring.connect(m, getattr(u.writer, name), getattr(mem, name).write_port())
        wiring.connect(m, u.writer.trace, wiring.flipped(self.trace))
        m.d.comb += [amax.i.payload.eq(u.writer.argmax.payload), amax.i.valid.eq(u.writer.argmax.valid),
                     amax.o.ready.eq(1)]
        self._result(m, ctl, amax.o)
        if self.slots:
            # a slice without the head: the token is done when the writer has stored the last
            # layer's down_proj (the residual out is in x and in the output buffer)
            with m.If(ctl.running & ~regs[Param.HEAD] & (u.writer.done == geom.n_jobs) & u.writer.emb_done):
                m.d.sync += [ctl.res.token.eq(0), ctl.res.logit.eq(0), ctl.res.cycles.eq(ctl.cycles),
                             ctl.res_valid.eq(1), ctl.running.eq(0)]
        self._logit_port(m, mem.logits)
        return m

    def _parameters(self, m, u):
        """The parameter RAM (read by the fetcher) and the geometry registers; returns the RAM,
        the geometry (geometry_layout) and the registers by parameter index."""
        pinit = [self.params.get(k, 0) for k in range(Param.RAM_SIZE)]
        # LUT RAM where the variant has it (its read is fast); iCE40 has none
        pattrs = {**NO_RW_CHECK, "ram_style": "distributed"} if self.variant.param_ram_distributed else NO_RW_CHECK
        m.submodules.pram = pram = Memory(shape=unsigned(32), depth=Param.RAM_SIZE, init=pinit, attrs=pattrs)
        # LUT RAM: the register on the address (SET_PARAM writes only while no token runs, so the
        # fetcher never reads a word being written)
        reader = address_registered_read_port if self.variant.param_ram_distributed else None
        attach_read_port(m, pram, u.fetcher.p0, reader)
        if self.variant.param_read_ports == 2:
            attach_read_port(m, pram, u.fetcher.p1, reader)
        P = self.params
        geom = Signal(geometry_layout(self.max_d, self.max_I, self.max_L, self.max_V))
        regs = {
            Param.D: Signal(range(self.max_d + 1), init=P[Param.D], name="g_d"),
            Param.I: Signal(range(self.max_I + 1), init=P[Param.I], name="g_I"),
            Param.V: Signal(range(self.max_V + 1), init=P[Param.V], name="g_V"),
            Param.L: Signal(range(self.max_L + 1), init=P[Param.L], name="g_L"),
            Param.PACKING: Signal(1, init=P[Param.PACKING], name="g_packing"),
            Param.LAYER_STRIDE: Signal(ADDR_BITS, init=P[Param.LAYER_STRIDE], name="g_lstride"),
            Param.LB_STRIDE: Signal(ADDR_BITS, init=P[Param.LB_STRIDE], name="g_lbstride"),
        }
        if self.slots:
            regs[Param.EMBEDDING] = Signal(init=1, name="g_embedding")
            regs[Param.HEAD] = Signal(init=1, name="g_head")
        r = regs
        n_jobs = Signal.like(geom.n_jobs, name="n_jobs")
        m.d.comb += n_jobs.eq(6 * r[Param.L] + (r[Param.HEAD] if self.slots else 1))
        # a slice of no layers starts with lm_head (or, without the head, runs no job at all)
        m.d.comb += geom.first_jt.eq(Mux(r[Param.L] == 0, JT_LM, 0) if self.slots else 0)
        m.d.comb += [geom.d.eq(r[Param.D]), geom.I.eq(r[Param.I]), geom.V.eq(r[Param.V]), geom.L.eq(r[Param.L]),
                     geom.n_jobs.eq(n_jobs), geom.packing.eq(r[Param.PACKING]),
                     geom.layer_stride.eq(r[Param.LAYER_STRIDE]), geom.lb_stride.eq(r[Param.LB_STRIDE])]
        return pram, geom, regs

    def _memories(self, m, w):
        """The on-chip vector memories (module docstring).

        No memory is read at an address written in the same cycle (the front and the operand
        stage read what the writer finished earlier, or elements ahead of it; norms go to a slot
        the front is not reading; parameters, logits and weights are written only while idle),
        so Yosys may leave out its read/write collision logic (NO_RW_CHECK), which otherwise puts
        an address comparator and a multiplexer behind each block RAM's output."""
        max_d, max_L = self.max_d, self.max_L
        max_in = max(max_d, self.max_I)
        hw_ = self.elements.per_beat(self.beat_bytes, "norm")        # norm values per beat
        lb_ = self.elements.per_beat(self.beat_bytes, "lb")
        mems = SimpleNamespace()

        def mem(name, sub, shape, depth):
            mm = Memory(shape=shape, depth=depth, init=[], attrs=NO_RW_CHECK)
            m.submodules[sub] = mm
            setattr(mems, name, mm)
        norm_word = data.ArrayLayout(signed(w.norm_bits), hw_)
        mem("a", "a_mem", norm_word, NORM_SLOTS * (max_in // hw_))
        mem("c", "c_mem", norm_word, NORM_SLOTS * (max_in // hw_))
        mem("lb", "lb_mem", data.ArrayLayout(unsigned(w.gate_bits), lb_), max_d // lb_)
        mem("x", "x_mem", w.x, max_d)
        mem("u", "u_mem", w.x, max_in)      # p (o_proj input) and v (down_proj input)
        mem("g", "g_mem", w.x, max_in)      # f (forget gate) and the GLU gate
        mem("h", "h_mem", w.x, max(self.slots, 1) * max_L * max_d)
        # with slots the logit memory is also the output buffer of a slice's residual
        mem("logits", "logit_mem", w.x, max(self.max_V, max_d) if self.slots else self.max_V)
        if self.slots:
            mem("x_in", "x_in_mem", w.x, max_d)     # the input buffer (a residual from the host)
        return mems

    def _x_readers(self, m, x_mem, front_x, operands_x, operands_own):
        """x has two readers, the front and (for o_proj and down_proj) the residual add of the
        operand stage. They are never busy at once: while the operand stage is at an o or down
        job, every front job up to it reads u, and later ones wait for its outputs. With
        ``x_read_ports == 1`` they share one port (one copy of x: 2 iCE40 EBRs fewer)."""
        if self.variant.x_read_ports == 2:
            attach_read_port(m, x_mem, front_x)
            attach_read_port(m, x_mem, operands_x)
        else:
            xr = registered_read_port(m, x_mem)
            m.d.comb += [xr.addr.eq(Mux(operands_own, operands_x.addr, front_x.addr)),
                         xr.en.eq(Mux(operands_own, operands_x.en, front_x.en)),
                         front_x.data.eq(xr.data), operands_x.data.eq(xr.data)]

    def _control(self, m, u, pram, regs):
        """Commands (module docstring); returns ``start`` (FEED_TOKEN accepted), ``running``,
        ``cycles`` and the result register ``res`` with its ``res_valid``."""
        running = Signal()
        start = Signal()
        cycles = Signal(32)
        if self.slots:
            # the slot a step runs on, and where its h starts (slot * max_L * max_d)
            slot = Signal(range(self.slots), name="slot")
            h_base = Signal(range(self.slots * self.max_L * self.max_d), name="h_base")
            m.d.comb += [u.writer.slot.eq(slot), u.writer.h_base.eq(h_base), u.operands.h_base.eq(h_base),
                         u.writer.head.eq(regs[Param.HEAD]), u.fetcher.embedding.eq(regs[Param.EMBEDDING])]
        res_valid = Signal()
        res = Signal(result_layout())
        m.d.comb += [self.result.valid.eq(res_valid), self.result.payload.eq(res)]
        with m.If(self.result.valid & self.result.ready):
            m.d.sync += res_valid.eq(0)
        with m.If(running):
            m.d.sync += cycles.eq(cycles + 1)
        pw = pram.write_port()
        cmd = self.cmd.payload
        m.d.comb += self.cmd.ready.eq(~running & ~res_valid)
        m.d.comb += [pw.addr.eq(cmd.index[:6]), pw.data.eq(cmd.arg)]
        with m.If(self.cmd.valid & self.cmd.ready):
            with m.Switch(cmd.op):
                with m.Case(EngineOp.RESET_STATE):
                    m.d.comb += u.writer.reset_state.eq(1)
                with m.Case(EngineOp.FEED_TOKEN):
                    m.d.sync += [running.eq(1), cycles.eq(1)]
                    m.d.comb += start.eq(1)
                    if self.slots:
                        m.d.sync += [slot.eq(0), h_base.eq(0)]
                if self.slots:
                    with m.Case(EngineOp.FEED_SLOT):
                        m.d.sync += [running.eq(1), cycles.eq(1), slot.eq(cmd.index),
                                     h_base.eq(cmd.index * (self.max_L * self.max_d))]
                        m.d.comb += start.eq(1)
                    with m.Case(EngineOp.RESET_SLOT):
                        m.d.comb += [u.writer.reset_slot.eq(1), u.writer.reset_index.eq(cmd.index)]
                with m.Case(EngineOp.SET_PARAM):
                    m.d.comb += pw.en.eq(cmd.index < Param.RAM_SIZE)
                    for idx, reg in regs.items():
                        with m.If(cmd.index == idx):
                            m.d.sync += reg.eq(cmd.arg)
        return SimpleNamespace(start=start, running=running, cycles=cycles, res=res, res_valid=res_valid)

    def _loading(self, m):
        """Image bytes from ``load`` into words for the weight memory (``wwrite``)."""
        wb = self.beat_bytes
        cmd = self.cmd.payload
        wptr = Signal(ADDR_BITS + 4)
        lword = Signal(8 * wb)
        lb_log = (wb - 1).bit_length()
        boff = wptr[:lb_log] if lb_log else Const(0, 1)
        merged = Signal(8 * wb)
        m.d.comb += self.load.ready.eq(1)
        byte_mask = Signal(8 * wb)
        m.d.comb += byte_mask.eq(Const(0xFF, 8 * wb) << (boff * 8))
        m.d.comb += merged.eq((lword & ~byte_mask) | ((self.load.payload << (boff * 8))[:8 * wb]))
        # registered: the load stream's valid comes from the Link's state machine at the other
        # end of the chip, and the write enable fans out to every block RAM of the weight store
        m.d.sync += self.wwrite.en.eq(self.load.valid)
        with m.If(self.load.valid):
            m.d.sync += [wptr.eq(wptr + 1), lword.eq(Mux(boff == wb - 1, 0, merged)),
                         self.wwrite.addr.eq(wptr >> lb_log), self.wwrite.data.eq(merged)]
        with m.If(self.cmd.valid & self.cmd.ready & (cmd.op == EngineOp.LOAD_RESET)):
            m.d.sync += [wptr.eq(0), lword.eq(0)]

    def _slice_input(self, m, u, mem, ctl, regs):
        """The writer's x input: the embedding (a slice with it) or the input buffer, read out
        from element 0 on after FEED_SLOT (a slice without it); and the input buffer's writes."""
        wp = mem.x_in.write_port()
        m.d.comb += [self.residual.ready.eq(1), wp.addr.eq(self.residual.payload.index),
                     wp.data.eq(self.residual.payload.value), wp.en.eq(self.residual.valid)]
        rp = registered_read_port(m, mem.x_in)
        reading = Signal()
        index = Signal(range(self.max_d))
        out_valid, out_last = Signal(), Signal()
        last = index == u.writer.geom.d - 1
        m.d.comb += [rp.addr.eq(index), rp.en.eq(1)]
        m.d.sync += [out_valid.eq(reading), out_last.eq(last)]
        with m.If(ctl.start & ~regs[Param.EMBEDDING]):
            m.d.sync += [reading.eq(1), index.eq(0)]
        with m.Elif(reading):
            m.d.sync += index.eq(index + 1)
            with m.If(last):
                m.d.sync += reading.eq(0)
        emb = u.writer.emb
        with m.If(regs[Param.EMBEDDING]):
            wiring.connect(m, u.scale.emb_o, emb)
        with m.Else():
            m.d.comb += [u.scale.emb_o.ready.eq(1), emb.valid.eq(out_valid), emb.payload.value.eq(rp.data),
                         emb.payload.last.eq(out_last)]

    def _result(self, m, ctl, amax_o):
        """The argmax becomes the result; the token is done."""
        with m.If(amax_o.valid):
            m.d.sync += [ctl.res.token.eq(amax_o.payload.index),
                         ctl.res.logit.eq(wire_logit(amax_o.payload.value, self.formats)),
                         ctl.res.cycles.eq(ctl.cycles), ctl.res_valid.eq(1), ctl.running.eq(0)]

    def _logit_port(self, m, logit_mem):
        """``logit_req`` -> ``logit_resp``: one logit of the last step per request (formats with
        x_frac above 16: rounded to Q16 into a register, two cycles later)."""
        lr = registered_read_port(m, logit_mem)
        lvalid = Signal()
        m.d.comb += [lr.addr.eq(self.logit_req.payload), lr.en.eq(self.logit_req.valid & self.logit_req.ready),
                     self.logit_resp.valid.eq(lvalid)]
        if self.formats.x_frac == 16 and self.formats.x_bits <= 32:
            m.d.comb += [self.logit_req.ready.eq(~lvalid), self.logit_resp.payload.eq(lr.data)]
            with m.If(self.logit_req.valid & self.logit_req.ready):
                m.d.sync += lvalid.eq(1)
            with m.Elif(self.logit_resp.ready):
                m.d.sync += lvalid.eq(0)
            return
        # the block RAM's output goes into a register first: from its slow clock-to-out through the
        # rounding carry chain and the saturation was the wide ULX3S build's critical path at 64
        # lanes (68.6 MHz)
        pending, loaded = Signal(), Signal()
        raw = Signal.like(lr.data)
        resp = Signal(signed(32))
        m.d.comb += [self.logit_req.ready.eq(~lvalid & ~pending & ~loaded), self.logit_resp.payload.eq(resp)]
        m.d.sync += [pending.eq(self.logit_req.valid & self.logit_req.ready), loaded.eq(pending)]
        with m.If(pending):
            m.d.sync += raw.eq(lr.data)
        with m.If(loaded):
            m.d.sync += [resp.eq(wire_logit(raw, self.formats)), lvalid.eq(1)]
        with m.Elif(self.logit_resp.ready):
            m.d.sync += lvalid.eq(0)


class Engine(wiring.Component):
    """:class:`EngineCore` with its :class:`~.weight_port.WeightMemory`.

    ``image`` (bytes) initialises on-chip RAM; ``readmemh=True`` uses the simulation store that
    reads ``+weights=FILE``; ``model=True`` adds the memory model, whose knobs become inputs
    ``mem_bandwidth``, ``mem_latency``, ``mem_stall_rate``, ``mem_synthetic``. ``mem_words``
    sizes the store (default: the build geometry's image). ``mem_spram`` builds the store from
    iCE40 SPRAM (None: on an iCE40 platform when ``image`` is None), ``mem_dp16kd`` a banked store
    from ECP5 DP16KD with output registers (None: on an ECP5 platform); ``mem_fifo_depth`` beats of
    response FIFO (None: :class:`~.weight_port.WeightMemory`'s choice, 64 with the model and
    ``STORE_FIFO_DEPTH`` without it).
    Other keywords (maxima, ``compact``, ``formats``) go to
    :class:`EngineCore`.

    ``readback=True`` adds the member ``readback : Out(ReadbackSignature())``
    (:class:`~.weight_port.ReadbackSignature`): a :class:`~.weight_port.WeightReader` between
    the core and the memory reads the stored image back while the engine is idle (between
    commands: its ``cmd.ready``); commands wait while it runs.
    """

    def __init__(self, cfg: ModelConfig, *, lanes: int = 16, packing: str = "base3", packings=PACKINGS,
                 image: bytes | None = None, readmemh: bool = False, model: bool = False,
                 mem_words: int | None = None, mem_fifo_depth: int | None = None, mem_spram: bool | None = None,
                 mem_dp16kd: bool | None = None, readback: bool = False, formats: Formats = FORMATS, **maxima):
        self.core = EngineCore(cfg, lanes=lanes, packing=packing, packings=packings, formats=formats, **maxima)
        self.reader = WeightReader(beat_bytes=self.core.beat_bytes) if readback else None
        wb = self.core.beat_bytes
        if mem_words is None:
            mem_words = -(-image_size(cfg, packing, formats) // wb)
        self.memory = WeightMemory(beat_bytes=wb, depth=mem_words, init=image, readmemh=readmemh,
                                   model=model, fifo_depth=mem_fifo_depth, spram=mem_spram,
                                   dp16kd=mem_dp16kd)
        self._model = model
        members = {
            **ControlSignature().members,
            "trace": Out(stream.Signature(self.core.trace_layout())),
        }
        if model:
            members.update({"mem_bandwidth": In(16), "mem_latency": In(16), "mem_stall_rate": In(8),
                            "mem_synthetic": In(1)})
        if readback:
            members["readback"] = Out(ReadbackSignature())
        if self.core.slots:
            members["residual"] = In(stream.Signature(residual_layout(self.core.max_d, formats)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self.core
        m.submodules.memory = memory = self.memory
        if self.reader is None:
            wiring.connect(m, core.wport, memory.port)
            wiring.connect(m, wiring.flipped(self.cmd), core.cmd)
        else:
            m.submodules.reader = reader = self.reader
            wiring.connect(m, core.wport, reader.engine)
            wiring.connect(m, reader.memory, memory.port)
            wiring.connect(m, reader.readback, wiring.flipped(self.readback))
            m.d.comb += [reader.idle.eq(core.cmd.ready),
                         core.cmd.payload.eq(self.cmd.payload), core.cmd.valid.eq(self.cmd.valid & ~reader.busy),
                         self.cmd.ready.eq(core.cmd.ready & ~reader.busy)]
        m.d.comb += memory.write.eq(core.wwrite)
        wiring.connect(m, wiring.flipped(self.load), core.load)
        wiring.connect(m, core.result, wiring.flipped(self.result))
        wiring.connect(m, wiring.flipped(self.logit_req), core.logit_req)
        wiring.connect(m, core.logit_resp, wiring.flipped(self.logit_resp))
        wiring.connect(m, core.trace, wiring.flipped(self.trace))
        if self.core.slots:
            wiring.connect(m, wiring.flipped(self.residual), core.residual)
        if self._model:
            m.d.comb += [memory.bandwidth.eq(self.mem_bandwidth), memory.latency.eq(self.mem_latency),
                         memory.stall_rate.eq(self.mem_stall_rate), memory.synthetic.eq(self.mem_synthetic)]
        return m
