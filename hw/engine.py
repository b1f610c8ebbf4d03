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

Four units walk the job list concurrently, each with its own job counter:

* the *fetcher* issues weight-port requests: the embedding row and scale, then per job its norm
  vectors ``a`` and ``c`` and constant ``k`` (plus the lower bounds for ``f_proj``) into one of
  three norm slots, and its trits. Norms are fetched one job ahead of the trits
  (``N0 N1 T0 N2 T1 ...``), so the statistics of job k+1 run while matrix k streams. Responses
  come in request order, so trits pass through a FIFO (``trit_fifo_depth`` beats) that fills
  from the spare beats (base3 uses 4 beats in 5) and keeps the matrix unit busy while the next
  norms go by;
* the *front* feeds :class:`~.bitlinear_front.BitLinearFront`: one MAX element (the OR of the
  input vector's magnitudes, tracked as the vector was written, has the bit length of its
  maximum), a STATS pass and a QUANT pass; q is packed ``lanes`` wide into a FIFO that the
  matrix unit loads from with its first row;
* the *matrix issuer* gives :class:`~.matvec.TernaryMatVec` one command per job;
* the *output path*: accumulators -> :class:`~.output_scale.OutputScale` (scale from
  :class:`~.scalar_unit.ScalarUnit` through a FIFO) -> an operand stage that reads the op's
  second operand from on-chip memory -> :class:`~.elementwise.ElementwiseUnit` -> a writer.
  ``f``: FORGET with the lower bound -> f; ``i``: RECUR with f and h[l] -> h[l];
  ``g``: SILU_MUL with h[l] -> p; ``o`` and ``down``: ADD to x; ``gate``: rows < I stored,
  rows >= I SILU_MUL with the stored gate -> v; ``lm_head``: -> logits and the argmax.

A front job waits only for its input vector (``f``, ``o``, ``gate``, ``down``, ``lm_head``
wait until the output path finished the job before; ``i`` and ``g`` read the same x as ``f``)
and for its norms. So per dependent BitLinear the exposed overhead is about two passes over its
input plus pipeline latencies; everything else overlaps with the matrices.

On-chip memories: x (max_d), h (max_L x max_d), f/gate and p/v (max(max_d, max_I)), three norm
slots (a and c, max(max_d, max_I) x 16 bits each), lower bounds (max_d x 16), logits (max_V),
all 32-bit unless noted, plus the q FIFO (2 max_in / lanes words of lanes bytes) and the trit
FIFO (about (4 max_in + 2 max_d) / beat_bytes beats).

Control interface (:class:`~.control.ControlSignature`, all ``amaranth.lib.stream``)
-------------------------------------------------------------------------------------
``cmd`` (:func:`~.control.command_layout`: ``op`` 3 bits, ``index`` 8 bits, ``arg`` 32 bits), accepted only
while the engine is idle (not during a token, nor while a result waits):

* ``RESET_STATE``: h := 0 for every layer (also the state after reset);
* ``FEED_TOKEN(arg = token)``: runs one step; exactly one ``result`` follows;
* ``LOAD_RESET``: the image write pointer := 0;
* ``SET_PARAM(index, arg)``: parameter ``index`` := arg (:class:`Param`; see :func:`engine_params`).

``load`` (8-bit stream, always ready; not to be used during a token): image bytes, stored at the
write pointer, which then advances. ``result`` (:func:`~.control.result_layout`): ``token`` (the argmax), ``logit`` (its Q16 value,
signed), ``cycles`` (clock cycles from accepting FEED_TOKEN to offering the result).
``logit_req`` (32-bit index) -> ``logit_resp`` (signed 32-bit Q16 logit of the last step), one
response per request, in order.

In the generated Verilog (ports named ``<member>__valid/ready/payload``): ``cmd__payload`` is
``{arg[31:0], index[7:0], op[2:0]}`` (op in bits 2:0, index 10:3, arg 42:11); ``result__payload``
is ``{cycles, logit, token}`` (token 31:0, logit 63:32, cycles 95:64); ``load__payload`` 8 bits;
``logit_req__payload`` and ``logit_resp__payload`` 32 bits. ``rst`` is synchronous, active high.
Parameter indices below 64 go to the parameter RAM, 64..70 to registers; others are ignored.

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

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.packing import PACKINGS, TRITS_PER_BYTE

from .argmax import Argmax
from .bitlinear_front import BitLinearFront, FrontOp
from .control import ControlSignature, EngineOp, result_layout
from .elementwise import ElementwiseOp, ElementwiseUnit
from .embed_scale import EmbedScale
from .matvec import TernaryMatVec
from .output_scale import OutputScale
from .scalar_unit import ScalarUnit
from .trits import packing_code
from .vector_common import vector_widths
from .ram import NO_RW_CHECK, registered_read_port
from .weight_port import ADDR_BITS, LEN_BITS, WeightMemory, weight_port_signature, write_layout
from .engine_common import (COMPACT, FULL, JOBS, JT_DOWN, JT_F, JT_GATE, JT_I, JT_G, JT_LM, JT_O, NORM_SLOTS,
                            JobCounter, Param, Tag, attach_read_port, geometry_layout, magnitude)
from .engine_fetch import Fetcher, ResponseRouter
from .engine_output import OperandStage, Writer

__all__ = ["Param", "JOBS", "trace_layout", "beat_bytes",
           "engine_params", "check_geometry", "EngineCore", "Engine"]

LANES_SUPPORTED = (8, 16, 32, 64)


def beat_bytes(lanes: int) -> int:
    """Bytes per weight beat: one beat sustains ``lanes`` trits per cycle in either packing."""
    return -(-lanes // TRITS_PER_BYTE["2bit"])


def trace_layout(max_d: int, max_I: int, max_L: int, max_V: int) -> data.StructLayout:
    """What the ``trace`` port carries for each stored result (module docstring)."""
    return data.StructLayout({"job": unsigned(3), "layer": unsigned(max(1, max_L.bit_length())),
                              "row": unsigned((2 * max(max_d, max_I) + max_V).bit_length()),
                              "value": signed(32)})


def check_geometry(cfg: ModelConfig, lanes: int, *, max_d=None, max_I=None, max_L=None, max_V=None) -> None:
    """UserError unless ``cfg`` runs on an engine of these lanes and maxima."""
    if lanes not in LANES_SUPPORTED:
        raise UserError(f"lanes must be one of {LANES_SUPPORTED}, got {lanes}")
    if cfg.d % lanes or cfg.I % lanes or cfg.d < 16:
        raise UserError(f"hidden size {cfg.d} and intermediate size {cfg.I} must be multiples of "
                        f"lanes={lanes} (and d >= 16)")
    for name, v, mx in (("d", cfg.d, max_d), ("I", cfg.I, max_I), ("L", cfg.L, max_L), ("V", cfg.V, max_V)):
        if mx is not None and v > mx:
            raise UserError(f"{name}={v} exceeds this engine build's maximum {mx}; generate a larger build")


def engine_params(cfg: ModelConfig, packing: str, lanes: int) -> dict[int, int]:
    """Every parameter (index -> value) of a model: geometry and the image's section addresses."""
    from mmfree_fpga.image import image_layout
    check_geometry(cfg, lanes)
    wb = beat_bytes(lanes)
    sec = {s.name: s for s in image_layout(cfg, packing)}

    def words(name):
        off = sec[name].offset
        assert off % wb == 0, (name, off, wb)
        return off // wb

    def beats(name):
        return -(-sec[name].size // wb)

    p = {}
    for jt, job in enumerate(JOBS):
        prefix = "lm_head" if jt == JT_LM else f"layers.0.{job}"
        base = Param.JOB_STRIDE * jt
        in_f = sec[f"{prefix}.trits"].shape[1]
        p[base + Param.TRITS_OFF] = words(f"{prefix}.trits")
        p[base + Param.TRITS_BEATS] = beats(f"{prefix}.trits")
        p[base + Param.A_OFF] = words(f"{prefix}.a")
        p[base + Param.C_OFF] = words(f"{prefix}.c")
        assert (2 * in_f) % wb == 0
        p[base + Param.NORM_BEATS] = 2 * in_f // wb
        p[base + Param.K_OFF] = words(f"{prefix}.k")
    p[Param.LB_OFF] = words("layers.0.lower_bound")
    p[Param.LB_BEATS] = beats("layers.0.lower_bound")
    p[Param.EMB_Q_OFF] = words("embedding.q")
    p[Param.EMB_ROW_BEATS] = cfg.d // wb
    p[Param.EMB_SCALE_OFF] = sec["embedding.scale"].offset
    p[Param.D], p[Param.I], p[Param.V], p[Param.L] = cfg.d, cfg.I, cfg.V, cfg.L
    p[Param.PACKING] = packing_code(packing)
    if cfg.L > 1:
        p[Param.LAYER_STRIDE] = words("layers.1.f_proj.trits") - words("layers.0.f_proj.trits")
        p[Param.LB_STRIDE] = words("layers.1.lower_bound") - words("layers.0.lower_bound")
        for jt, job in enumerate(JOBS[:6]):
            for part in ("trits", "a", "c", "k"):
                assert (words(f"layers.1.{job}.{part}") - words(f"layers.0.{job}.{part}")
                        == p[Param.LAYER_STRIDE]), "the image's layers are not evenly spaced"
    else:
        p[Param.LAYER_STRIDE] = 0
        p[Param.LB_STRIDE] = 0
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
    compact : bool
        The small-FPGA variant (iCE40UP5K: 8 DSPs): the output scale and the elementwise unit
        share each multiplier between two products (one output element every two cycles,
        which a matrix of ``cols / lanes >= 2`` cycles per row never notices) and the embedding
        goes through the output scale (no EmbedScale): 8 DSPs in all instead of 14.

    Members
    -------
    cmd, load, result, logit_req, logit_resp : the control interface (module docstring).
    trace : Out(stream.Signature(trace_layout(...))) : every stored result; ready is ignored.
    wport : Out(weight_port_signature(beat_bytes(lanes)))
    wwrite : Out(write_layout(beat_bytes(lanes))) : image words from ``load``.
    """

    def __init__(self, cfg: ModelConfig, *, lanes: int = 16, packing: str = "base3", packings=PACKINGS,
                 max_d=None, max_I=None, max_L=None, max_V=None, compact: bool = False):
        self.cfg = cfg
        self.compact = compact
        self.lanes = lanes
        self.packing = packing
        self.packings = tuple(p for p in PACKINGS if p in packings)
        if packing not in self.packings:
            raise UserError(f"packing {packing} is not among the build's packings {self.packings}")
        self.max_d = max_d or cfg.d
        self.max_I = max_I or cfg.I
        self.max_L = max_L or cfg.L
        self.max_V = max_V or cfg.V
        check_geometry(cfg, lanes, max_d=self.max_d, max_I=self.max_I, max_L=self.max_L, max_V=self.max_V)
        if self.max_d % lanes or self.max_I % lanes:
            raise UserError("max_d and max_I must be multiples of lanes")
        self.beat_bytes = beat_bytes(lanes)
        self.params = engine_params(cfg, packing, lanes)
        # the largest burst of non-trit beats between two trit requests: norms of down_proj (or
        # of a d-input matrix with the lower bounds), and the k constant
        burst = (4 * max(self.max_d, self.max_I) + 2 * self.max_d) // self.beat_bytes + 2
        self.trit_fifo_depth = 1 << (burst - 1).bit_length()
        super().__init__({
            **ControlSignature().members,
            "trace": Out(stream.Signature(self.trace_layout())),
            "wport": Out(weight_port_signature(self.beat_bytes)),
            "wwrite": Out(write_layout(self.beat_bytes)),
        })

    def trace_layout(self) -> data.StructLayout:
        return trace_layout(self.max_d, self.max_I, self.max_L, self.max_V)

    def elaborate(self, platform):
        m = Module()
        w = vector_widths(FORMATS)
        lanes, wb = self.lanes, self.beat_bytes
        hw_ = wb // 2                                     # int16 per beat
        max_d, max_I, max_L, max_V = self.max_d, self.max_I, self.max_L, self.max_V
        max_in = max(max_d, max_I)
        nw = max_in // hw_                                # norm words per slot
        x_shape = w.x

        # -- cores --------------------------------------------------------------------------
        m.submodules.front = front = BitLinearFront(FORMATS)
        m.submodules.scalar = scalar = ScalarUnit(FORMATS)
        m.submodules.matvec = mv = TernaryMatVec(lanes=lanes, packings=self.packings,
                                                 max_rows=max(2 * max_I, max_V, max_d), max_cols=max_in)
        compact = self.compact
        share = 2 if compact else 1
        m.submodules.oscale = osc = OutputScale(FORMATS, share=share, embed=compact)
        m.submodules.ew = ew = ElementwiseUnit(FORMATS, share=share)
        # the embedding: its own EmbedScale, or (compact) through the output scale, which is
        # idle from FEED_TOKEN until the embedding is in x
        variant = COMPACT if compact else FULL
        m.submodules.fetcher = fetcher = Fetcher(beat_bytes=wb, max_d=max_d, max_I=max_I, max_L=max_L,
                                                 max_V=max_V, variant=variant)
        m.submodules.router = router = ResponseRouter(w, beat_bytes=wb, max_d=max_d, max_I=max_I, max_L=max_L,
                                                      max_V=max_V, trit_fifo_depth=self.trit_fifo_depth,
                                                      variant=variant)
        emb_i = router.emb
        emb_o = stream.Signature(data.StructLayout({"value": x_shape, "last": 1})).create()
        emb_scale = router.emb_scale
        if not compact:
            m.submodules.embed = emb = EmbedScale(FORMATS)
            wiring.connect(m, emb_i, emb.i)
            wiring.connect(m, emb.o, wiring.flipped(emb_o))
            m.d.comb += emb.scale.eq(emb_scale)
        m.submodules.argmax = amax = Argmax(max_V, FORMATS)
        m.submodules.operands = opnd = OperandStage(w, beat_bytes=wb, max_d=max_d, max_I=max_I, max_L=max_L,
                                                    max_V=max_V, variant=variant)
        m.submodules.writer = writer = Writer(w, max_d=max_d, max_I=max_I, max_L=max_L, max_V=max_V,
                                              trace_layout=self.trace_layout())

        # -- parameters ------------------------------------------------------------------------
        pinit = [self.params.get(k, 0) for k in range(Param.RAM_SIZE)]
        # (full builds: in LUT RAM, whose read is fast; on ECP5 a block RAM's output took about 10
        # ns to the register behind it. iCE40 has no LUT RAM: compact builds keep a block RAM)
        pattrs = NO_RW_CHECK if self.compact else {**NO_RW_CHECK, "ram_style": "distributed"}
        m.submodules.pram = pram = Memory(shape=unsigned(32), depth=Param.RAM_SIZE, init=pinit, attrs=pattrs)
        # the fetcher's reads (compact: one read port, one copy of the RAM: 2 iCE40 EBRs fewer)
        attach_read_port(m, pram, fetcher.p0)
        if variant.param_read_ports == 2:
            attach_read_port(m, pram, fetcher.p1)
        pw = pram.write_port()
        P = self.params
        g_d = Signal(range(max_d + 1), init=P[Param.D])
        g_I = Signal(range(max_I + 1), init=P[Param.I])
        g_V = Signal(range(max_V + 1), init=P[Param.V])
        g_L = Signal(range(max_L + 1), init=P[Param.L])
        g_packing = Signal(1, init=P[Param.PACKING])
        g_lstride = Signal(ADDR_BITS, init=P[Param.LAYER_STRIDE])
        g_lbstride = Signal(ADDR_BITS, init=P[Param.LB_STRIDE])
        n_jobs = Signal(range(6 * max_L + 2))
        m.d.comb += n_jobs.eq(6 * g_L + 1)
        geom = Signal(geometry_layout(max_d, max_I, max_L, max_V))
        m.d.comb += [geom.d.eq(g_d), geom.I.eq(g_I), geom.V.eq(g_V), geom.L.eq(g_L), geom.n_jobs.eq(n_jobs),
                     geom.packing.eq(g_packing), geom.layer_stride.eq(g_lstride), geom.lb_stride.eq(g_lbstride)]
        for unit in (fetcher, router, opnd, writer):
            m.d.comb += unit.geom.eq(geom)

        def rows_of(jt):
            return Mux(jt == JT_GATE, 2 * g_I, Mux(jt == JT_LM, g_V, g_d))

        def cols_of(jt):
            return Mux(jt == JT_DOWN, g_I, g_d)

        # -- memories --------------------------------------------------------------------------
        # No memory is read at an address written in the same cycle (the front and the operand
        # stage read what the writer finished earlier, or elements ahead of it; norms go to a slot
        # the front is not reading; parameters, logits and weights are written only while idle),
        # so Yosys may leave out its read/write collision logic (NO_RW_CHECK), which otherwise
        # puts an address comparator and a multiplexer behind each block RAM's slow output.
        def mem(name, shape, depth):
            mm = Memory(shape=shape, depth=depth, init=[], attrs=NO_RW_CHECK)
            m.submodules[name] = mm
            return mm
        norm_word = data.ArrayLayout(signed(w.norm_bits), hw_)
        a_mem = mem("a_mem", norm_word, NORM_SLOTS * nw)
        c_mem = mem("c_mem", norm_word, NORM_SLOTS * nw)
        lb_mem = mem("lb_mem", data.ArrayLayout(unsigned(16), hw_), max_d // hw_)
        x_mem = mem("x_mem", x_shape, max_d)
        u_mem = mem("u_mem", x_shape, max_in)      # p (o_proj input) and v (down_proj input)
        g_mem = mem("g_mem", x_shape, max_in)      # f (forget gate) and the GLU gate
        h_mem = mem("h_mem", x_shape, max_L * max_d)
        lg_mem = mem("logit_mem", x_shape, max_V)

        # -- control ------------------------------------------------------------------------------
        running = Signal()
        start = Signal()
        cycles = Signal(32)
        res_valid = Signal()
        res = Signal(result_layout())
        m.d.comb += [self.result.valid.eq(res_valid), self.result.payload.eq(res)]
        with m.If(self.result.valid & self.result.ready):
            m.d.sync += res_valid.eq(0)
        with m.If(running):
            m.d.sync += cycles.eq(cycles + 1)

        cmd = self.cmd.payload
        m.d.comb += self.cmd.ready.eq(~running & ~res_valid)
        m.d.comb += [pw.addr.eq(cmd.index[:6]), pw.data.eq(cmd.arg)]
        with m.If(self.cmd.valid & self.cmd.ready):
            with m.Switch(cmd.op):
                with m.Case(EngineOp.RESET_STATE):
                    m.d.comb += writer.reset_state.eq(1)
                with m.Case(EngineOp.FEED_TOKEN):
                    m.d.sync += [running.eq(1), cycles.eq(1)]
                    m.d.comb += start.eq(1)
                with m.Case(EngineOp.SET_PARAM):
                    m.d.comb += pw.en.eq(cmd.index < Param.RAM_SIZE)
                    for idx, reg in ((Param.D, g_d), (Param.I, g_I), (Param.V, g_V), (Param.L, g_L),
                                     (Param.PACKING, g_packing), (Param.LAYER_STRIDE, g_lstride),
                                     (Param.LB_STRIDE, g_lbstride)):
                        with m.If(cmd.index == idx):
                            m.d.sync += reg.eq(cmd.arg)

        # -- image loading -----------------------------------------------------------------------
        wptr = Signal(ADDR_BITS + 4)
        lword = Signal(8 * wb)
        lb_log = (wb - 1).bit_length()
        boff = wptr[:lb_log] if lb_log else Const(0, 1)
        merged = Signal(8 * wb)
        m.d.comb += self.load.ready.eq(1)
        byte_mask = Signal(8 * wb)
        m.d.comb += byte_mask.eq(Const(0xFF, 8 * wb) << (boff * 8))
        m.d.comb += merged.eq((lword & ~byte_mask) | ((self.load.payload << (boff * 8))[:8 * wb]))
        # The word write is registered: the load stream's valid comes from the Link's state machine
        # at the other end of the chip, and the write enable fans out to every block RAM of the
        # weight store (the ECP5 critical path when it was combinational).
        m.d.sync += self.wwrite.en.eq(self.load.valid)
        with m.If(self.load.valid):
            m.d.sync += [wptr.eq(wptr + 1), lword.eq(Mux(boff == wb - 1, 0, merged)),
                         self.wwrite.addr.eq(wptr >> lb_log), self.wwrite.data.eq(merged)]
        with m.If(self.cmd.valid & self.cmd.ready & (cmd.op == EngineOp.LOAD_RESET)):
            m.d.sync += [wptr.eq(0), lword.eq(0)]

        # -- job counters and progress -------------------------------------------------------------
        fj = JobCounter("fj", max_L)      # front
        mj = JobCounter("mj", max_L)      # matrix issuer
        norm_arrived = router.norms_arrived
        emb_done = writer.emb_done
        front_done = fj.k
        out_done = writer.done
        m.d.comb += [unit.start.eq(start) for unit in (fetcher, router, opnd, writer)]
        with m.If(start):
            m.d.sync += fj.reset() + mj.reset()

        # -- weight traffic ----------------------------------------------------------------------------
        m.d.comb += [fetcher.token.eq(cmd.arg), fetcher.front_done.eq(front_done), fetcher.writer_done.eq(out_done)]
        wiring.connect(m, fetcher.req, wiring.flipped(self.wport.req))
        wiring.connect(m, wiring.flipped(self.wport.resp), router.resp)
        wiring.connect(m, fetcher.tags, router.tags)
        wiring.connect(m, router.trits, mv.weights)
        wiring.connect(m, router.a, a_mem.write_port())
        wiring.connect(m, router.c, c_mem.write_port())
        wiring.connect(m, router.lb, lb_mem.write_port())
        kbuf = router.k

        or_x, or_u = writer.or_x, writer.or_u
        wiring.connect(m, emb_o, writer.emb)

        # -- front -----------------------------------------------------------------------------------
        # x has two readers, the front and (for o_proj and down_proj) the residual add of the
        # operand stage. They are never busy at once: while the operand stage is at an o or down
        # job, every front job up to it reads u, and later ones wait for its outputs. The compact
        # build gives them one read port (one copy of x: 2 iCE40 EBRs fewer).
        xr_f = registered_read_port(m, x_mem)
        x_res = opnd.x_owner    # the operand stage owns the shared port
        ur_f = registered_read_port(m, u_mem)
        ar = registered_read_port(m, a_mem)
        cr = registered_read_port(m, c_mem)
        fv = Signal()               # stage A: the element whose memory words are being read
        f_op = Signal(FrontOp)
        f_last = Signal()
        f_max = Signal()
        f_src = Signal()
        f_sel = Signal(range(hw_))
        j = Signal(range(max_in + 1))
        # Full builds register the element (stage B: the front's input) after the block RAM reads:
        # on ECP5 a block RAM's clock-to-out (about 6 ns) leaves no room for the word select and
        # the source multiplexer in the same cycle. Compact builds (iCE40, 40 MHz) feed the front
        # from stage A directly.
        f_reg = not compact
        fvb = Signal() if f_reg else fv
        f_adv = ~fvb | front.i.ready
        f_state_max = Signal()
        f_state_stats = Signal()
        f_state_quant = Signal()
        f_n = Mux(f_state_max, 1, cols_of(fj.jt))
        f_issue = f_state_max | f_state_stats | f_state_quant
        f_is_last = j == f_n - 1
        src_u = (fj.jt == JT_O) | (fj.jt == JT_DOWN)
        slot = fj.slot
        m.d.comb += [
            ur_f.addr.eq(j),
            ar.addr.eq(slot * nw + j // hw_), cr.addr.eq(slot * nw + j // hw_),
            ur_f.en.eq(f_adv), ar.en.eq(f_adv), cr.en.eq(f_adv),
        ]
        with m.If(f_adv):
            m.d.sync += [fv.eq(f_issue), f_last.eq(f_is_last), f_max.eq(f_state_max), f_src.eq(src_u),
                         f_sel.eq(j % hw_),
                         f_op.eq(Mux(f_state_max, FrontOp.MAX, Mux(f_state_stats, FrontOp.STATS, FrontOp.QUANT)))]
            with m.If(f_issue):
                m.d.sync += j.eq(Mux(f_is_last, 0, j + 1))
        or_in = Mux(f_src, or_u, or_x)
        max_elem = Mux(or_in[31], w.x_min, or_in[:31])
        f_src_vals = [f_op, f_last, f_max, f_src, f_sel, xr_f.data, ur_f.data, ar.data, cr.data]
        if f_reg:
            # stage B holds the RAM words as read (no logic between a block RAM and a register);
            # the word select and the source multiplexer sit in front of the front's own input
            # register
            regs = [Signal.like(v, name=f"{v.name}_b" if hasattr(v, "name") else None) for v in f_src_vals]
            with m.If(f_adv):
                m.d.sync += [fvb.eq(fv)] + [r.eq(v) for r, v in zip(regs, f_src_vals)]
            f_src_vals = regs
        fb_op, fb_last, fb_max, fb_src, fb_sel, fb_x, fb_u, fb_a, fb_c = f_src_vals
        m.d.comb += [
            front.i.valid.eq(fvb),
            front.i.payload.op.eq(fb_op),
            front.i.payload.last.eq(fb_last),
            front.i.payload.v.eq(Mux(fb_max, max_elem, Mux(fb_src, fb_u, fb_x))),
            front.i.payload.a.eq(fb_a[fb_sel]),
            front.i.payload.c.eq(fb_c[fb_sel]),
        ]
        stats_taken = Signal()
        kcur = Mux(slot == 2, kbuf[2], Mux(slot == 1, kbuf[1], kbuf[0]))
        m.d.comb += [scalar.i.payload.eq(front.stats.payload), scalar.i.valid.eq(front.stats.valid),
                     front.stats.ready.eq(scalar.i.ready),
                     scalar.k_mant.eq(kcur[:32]), scalar.k_exp.eq(kcur[32:64].as_signed())]
        with m.If(scalar.i.valid & scalar.i.ready):
            m.d.sync += stats_taken.eq(1)
        input_ready = Mux((fj.jt == JT_I) | (fj.jt == JT_G), 1, (out_done == fj.k) & emb_done)
        with m.FSM(name="front_seq"):
            with m.State("WAIT"):
                with m.If(running & (fj.k < n_jobs) & (norm_arrived > fj.k) & input_ready):
                    m.next = "MAX"
            with m.State("MAX"):
                m.d.comb += f_state_max.eq(f_adv)
                with m.If(f_adv):
                    m.next = "STATS"
            with m.State("STATS"):
                m.d.comb += f_state_stats.eq(f_adv)
                with m.If(f_adv & f_is_last):
                    m.next = "QUANT"
            with m.State("QUANT"):
                m.d.comb += f_state_quant.eq(f_adv)
                with m.If(f_adv & f_is_last):
                    m.next = "FIN"
            with m.State("FIN"):
                with m.If(stats_taken):
                    m.d.sync += fj.step(g_L) + [stats_taken.eq(0)]
                    m.next = "WAIT"

        # q packer and FIFO into the matrix unit. The FIFO holds words of `sub` q values; compact
        # builds use quarter-width words (2 iCE40 EBRs instead of 8 for 16 lanes) that are put
        # back together in front of the matrix unit, whose first row then takes a word per
        # `q_split` cycles at most (dependent jobs are paced by the front's one q per cycle anyway)
        q_split = 4 if compact and lanes % 4 == 0 else 1
        sub = lanes // q_split
        q_words = 2 * max_in // lanes + 2
        m.submodules.qfifo = qfifo = SyncFIFOBuffered(width=sub * w.act_bits, depth=q_words * q_split)
        qpack = Signal(data.ArrayLayout(signed(w.act_bits), sub))
        qcnt = Signal(range(sub))
        # q into the packer. Full builds put a small FIFO between the front and the packer, so the
        # front's pipeline enable (which fans out to all its registers, and on to the reads that
        # feed it) waits only for that FIFO's registered level, and keep "the word is full" in a
        # register; compact builds take q straight from the front.
        if compact:
            q_in = front.q
            q_full = qcnt == sub - 1
        else:
            m.submodules.qskid = qskid = SyncFIFOBuffered(width=w.act_bits, depth=3)
            q_in = stream.Signature(signed(w.act_bits)).create()
            m.d.comb += [qskid.w_data.eq(front.q.payload), qskid.w_en.eq(front.q.valid),
                         front.q.ready.eq(qskid.w_rdy),
                         q_in.payload.eq(qskid.r_data), q_in.valid.eq(qskid.r_rdy), qskid.r_en.eq(q_in.ready)]
            q_full = Signal()
        m.d.comb += q_in.ready.eq(~q_full | qfifo.w_rdy)
        packed = Signal(data.ArrayLayout(signed(w.act_bits), sub))
        m.d.comb += packed.eq(qpack)
        m.d.comb += packed[sub - 1].eq(q_in.payload)
        m.d.comb += qfifo.w_data.eq(packed.as_value())
        with m.If(q_in.valid & q_in.ready):
            if compact:
                m.d.sync += qpack[qcnt].eq(q_in.payload)
            else:
                # (full builds: the element's slot as a one-hot register, so each of the
                # lanes x act_bits enables is one gate behind the transfer, not a qcnt decoder)
                qsel = Signal(sub, init=1)
                m.d.sync += qsel.eq(qsel.rotate_left(1))
                for k in range(sub - 1):        # the last element goes to the FIFO from q_in
                    with m.If(qsel[k]):
                        m.d.sync += qpack[k].eq(q_in.payload)
            with m.If(q_full):
                m.d.comb += qfifo.w_en.eq(1)
                m.d.sync += qcnt.eq(0)
                if not compact:
                    m.d.sync += q_full.eq(0)
            with m.Else():
                m.d.sync += qcnt.eq(qcnt + 1)
                if not compact:
                    m.d.sync += q_full.eq(qcnt == sub - 2)
        if q_split == 1:
            m.d.comb += [mv.act.valid.eq(qfifo.r_rdy), mv.act.payload.eq(qfifo.r_data),
                         qfifo.r_en.eq(mv.act.ready)]
        else:
            ubuf = Signal(data.ArrayLayout(unsigned(sub * w.act_bits), q_split - 1))
            ucnt = Signal(range(q_split))
            whole = ucnt == q_split - 1
            m.d.comb += [mv.act.valid.eq(whole & qfifo.r_rdy), mv.act.payload.eq(Cat(ubuf, qfifo.r_data)),
                         qfifo.r_en.eq(Mux(whole, mv.act.ready, 1))]
            with m.If(qfifo.r_rdy & qfifo.r_en):
                with m.If(whole):
                    m.d.sync += ucnt.eq(0)
                with m.Else():
                    m.d.sync += [ubuf[ucnt].eq(qfifo.r_data), ucnt.eq(ucnt + 1)]

        # -- matrix commands ---------------------------------------------------------------------------
        m.d.comb += [mv.cmd.valid.eq(running & (mj.k < n_jobs)),
                     mv.cmd.payload.rows.eq(rows_of(mj.jt)), mv.cmd.payload.cols.eq(cols_of(mj.jt)),
                     mv.cmd.payload.load.eq(1)]
        if len(self.packings) > 1:
            m.d.comb += mv.cmd.payload.packing.eq(g_packing)
        with m.If(mv.cmd.valid & mv.cmd.ready):
            m.d.sync += mj.step(g_L)

        # -- output scale -------------------------------------------------------------------------------
        m.submodules.scales = sfifo = SyncFIFOBuffered(width=len(scalar.o.payload.as_value()), depth=4)
        m.d.comb += [sfifo.w_data.eq(scalar.o.payload), sfifo.w_en.eq(scalar.o.valid),
                     scalar.o.ready.eq(sfifo.w_rdy)]
        # (compact) embedding: from FEED_TOKEN until the embedding is in x, the output scale takes
        # the embedding row; no accumulator can come before then (f_proj waits for x)
        embedding = Signal()
        if compact:
            m.d.comb += embedding.eq(~emb_done)
        m.d.comb += [
            osc.i.payload.eq(mv.out.payload),
            osc.i.valid.eq(mv.out.valid & sfifo.r_rdy),
            mv.out.ready.eq(osc.i.ready & sfifo.r_rdy & ~embedding),
            osc.scale.eq(sfifo.r_data),
            sfifo.r_en.eq(mv.out.valid & osc.i.ready & mv.out.payload.last & ~embedding),
        ]
        if compact:
            m.d.comb += [osc.embed.eq(embedding), osc.emb_scale.eq(emb_scale),
                         emb_i.ready.eq(embedding & osc.i.ready),
                         emb_o.valid.eq(embedding & osc.o.valid), emb_o.payload.value.eq(osc.o.payload.value),
                         emb_o.payload.last.eq(osc.o.payload.last)]
            with m.If(embedding):
                m.d.comb += [osc.i.payload.acc.eq(emb_i.payload.q), osc.i.payload.last.eq(emb_i.payload.last),
                             osc.i.valid.eq(emb_i.valid)]

        # -- operand stage and writer ----------------------------------------------------------------
        m.d.comb += [opnd.i.payload.eq(osc.o.payload), opnd.i.valid.eq(osc.o.valid & ~embedding),
                     osc.o.ready.eq(opnd.i.ready | embedding)]
        wiring.connect(m, opnd.o, ew.i)
        m.d.comb += [opnd.writer_done.eq(writer.done), opnd.writer_row.eq(writer.row), opnd.fresh.eq(writer.fresh)]
        attach_read_port(m, lb_mem, opnd.lb)
        attach_read_port(m, g_mem, opnd.g)
        attach_read_port(m, h_mem, opnd.h)
        if compact:
            m.d.comb += [xr_f.addr.eq(Mux(x_res, opnd.x.addr, j)), xr_f.en.eq(Mux(x_res, opnd.x.en, f_adv)),
                         opnd.x.data.eq(xr_f.data)]
        else:
            m.d.comb += [xr_f.addr.eq(j), xr_f.en.eq(f_adv)]
            attach_read_port(m, x_mem, opnd.x)
        wiring.connect(m, ew.o, writer.i)
        wiring.connect(m, writer.x, x_mem.write_port())
        wiring.connect(m, writer.u, u_mem.write_port())
        wiring.connect(m, writer.g, g_mem.write_port())
        wiring.connect(m, writer.h, h_mem.write_port())
        wiring.connect(m, writer.logits, lg_mem.write_port())
        m.d.comb += [amax.i.payload.eq(writer.argmax.payload), amax.i.valid.eq(writer.argmax.valid),
                     amax.o.ready.eq(1)]
        wiring.connect(m, writer.trace, wiring.flipped(self.trace))

        # -- the result --------------------------------------------------------------------------------------
        with m.If(amax.o.valid):
            m.d.sync += [res.token.eq(amax.o.payload.index), res.logit.eq(amax.o.payload.value),
                         res.cycles.eq(cycles), res_valid.eq(1), running.eq(0)]

        # -- logit read port -----------------------------------------------------------------------------------
        lr = registered_read_port(m, lg_mem)
        lvalid = Signal()
        m.d.comb += [self.logit_req.ready.eq(~lvalid), lr.addr.eq(self.logit_req.payload),
                     lr.en.eq(self.logit_req.valid & self.logit_req.ready),
                     self.logit_resp.valid.eq(lvalid), self.logit_resp.payload.eq(lr.data)]
        with m.If(self.logit_req.valid & self.logit_req.ready):
            m.d.sync += lvalid.eq(1)
        with m.Elif(self.logit_resp.ready):
            m.d.sync += lvalid.eq(0)
        return m


class Engine(wiring.Component):
    """:class:`EngineCore` with its :class:`~.weight_port.WeightMemory`.

    ``image`` (bytes) initialises on-chip RAM; ``readmemh=True`` uses the simulation store that
    reads ``+weights=FILE``; ``model=True`` adds the memory model, whose knobs become inputs
    ``mem_bandwidth``, ``mem_latency``, ``mem_stall_rate``, ``mem_synthetic``. ``mem_words``
    sizes the store (default: the build geometry's image). ``mem_spram`` builds the store from
    iCE40 SPRAM (None: on an iCE40 platform when ``image`` is None), ``mem_dp16kd`` a banked store
    from ECP5 DP16KD with output registers (None: on an ECP5 platform); ``mem_fifo_depth`` beats of
    response FIFO (without the model 3 suffice for a store of one block, more for a banked one).
    Other keywords (maxima, ``compact``) go to
    :class:`EngineCore`.
    """

    def __init__(self, cfg: ModelConfig, *, lanes: int = 16, packing: str = "base3", packings=PACKINGS,
                 image: bytes | None = None, readmemh: bool = False, model: bool = False,
                 mem_words: int | None = None, mem_fifo_depth: int = 64, mem_spram: bool | None = None,
                 mem_dp16kd: bool | None = None, **maxima):
        from mmfree_fpga.image import image_size
        self.core = EngineCore(cfg, lanes=lanes, packing=packing, packings=packings, **maxima)
        wb = self.core.beat_bytes
        if mem_words is None:
            mem_words = -(-image_size(cfg, packing) // wb)
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
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self.core
        m.submodules.memory = memory = self.memory
        wiring.connect(m, core.wport, memory.port)
        m.d.comb += memory.write.eq(core.wwrite)
        wiring.connect(m, wiring.flipped(self.cmd), core.cmd)
        wiring.connect(m, wiring.flipped(self.load), core.load)
        wiring.connect(m, core.result, wiring.flipped(self.result))
        wiring.connect(m, wiring.flipped(self.logit_req), core.logit_req)
        wiring.connect(m, core.logit_resp, wiring.flipped(self.logit_resp))
        wiring.connect(m, core.trace, wiring.flipped(self.trace))
        if self._model:
            m.d.comb += [memory.bandwidth.eq(self.mem_bandwidth), memory.latency.eq(self.mem_latency),
                         memory.stall_rate.eq(self.mem_stall_rate), memory.synthetic.eq(self.mem_synthetic)]
        return m
