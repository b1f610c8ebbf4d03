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

__all__ = ["Param", "JOBS", "trace_layout", "beat_bytes",
           "engine_params", "check_geometry", "EngineCore", "Engine"]

JOBS = ("f_proj", "i_proj", "g_proj", "o_proj", "gate_proj", "down_proj", "lm_head")
JT_F, JT_I, JT_G, JT_O, JT_GATE, JT_DOWN, JT_LM = range(7)
LANES_SUPPORTED = (8, 16, 32, 64)
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


class _Job:
    """A job counter: global index k, job type jt, layer l."""

    def __init__(self, name: str, max_L: int, strides=()):
        self.k = Signal(range(6 * max_L + 2), name=f"{name}_k")
        self.jt = Signal(3, name=f"{name}_jt")
        self.l = Signal(range(max_L + 1), name=f"{name}_l")
        self.slot = Signal(range(NORM_SLOTS), name=f"{name}_slot")     # k mod NORM_SLOTS
        # l * stride for each (name, stride), kept as running sums (no multiplier)
        self._strides = tuple(strides)
        self.base = {n: Signal(ADDR_BITS, name=f"{name}_{n}_base") for n, _ in self._strides}

    def reset(self):
        return ([self.k.eq(0), self.jt.eq(0), self.l.eq(0), self.slot.eq(0)]
                + [b.eq(0) for b in self.base.values()])

    def step(self, n_layers):
        last_layer = self.l == n_layers - 1
        return [self.k.eq(self.k + 1), self.slot.eq(Mux(self.slot == NORM_SLOTS - 1, 0, self.slot + 1)),
                self.jt.eq(Mux(self.jt == JT_DOWN, Mux(last_layer, JT_LM, JT_F), self.jt + 1)),
                self.l.eq(Mux(self.jt == JT_DOWN, self.l + 1, self.l))] + [
                self.base[n].eq(Mux(self.jt == JT_DOWN, self.base[n] + stride, self.base[n]))
                for n, stride in self._strides]


class _Tag:
    TRITS, A, C, K, LB, EMBS, EMBR = range(7)


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
        emb_i = stream.Signature(data.StructLayout({"q": signed(w.act_bits), "last": 1})).create()
        emb_o = stream.Signature(data.StructLayout({"value": x_shape, "last": 1})).create()
        emb_scale = Signal(32)
        if not compact:
            m.submodules.embed = emb = EmbedScale(FORMATS)
            wiring.connect(m, emb_i, emb.i)
            wiring.connect(m, emb.o, wiring.flipped(emb_o))
            m.d.comb += emb.scale.eq(emb_scale)
        m.submodules.argmax = amax = Argmax(max_V, FORMATS)

        # -- parameters ------------------------------------------------------------------------
        pinit = [self.params.get(k, 0) for k in range(Param.RAM_SIZE)]
        # (full builds: in LUT RAM, whose read is fast; on ECP5 a block RAM's output took about 10
        # ns to the register behind it. iCE40 has no LUT RAM: compact builds keep a block RAM)
        pattrs = NO_RW_CHECK if self.compact else {**NO_RW_CHECK, "ram_style": "distributed"}
        m.submodules.pram = pram = Memory(shape=unsigned(32), depth=Param.RAM_SIZE, init=pinit, attrs=pattrs)
        if self.compact:
            # one read port (one copy of the RAM: 2 iCE40 EBRs fewer): the fetcher reads a
            # request's length (p1) first and keeps it in a register, then its address (p0)
            p_rd = registered_read_port(m, pram)
            p0 = SimpleNamespace(addr=Signal(6, name="p0_addr"), data=p_rd.data)
            p1 = SimpleNamespace(addr=Signal(6, name="p1_addr"), data=Signal(32, name="p1_data"))
        else:
            p0 = registered_read_port(m, pram)
            p1 = registered_read_port(m, pram)
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
        token = Signal(32)
        cycles = Signal(32)
        fresh = Signal(max_L, init=(1 << max_L) - 1)   # h[l] is zero
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
                    m.d.sync += fresh.eq((1 << max_L) - 1)
                with m.Case(EngineOp.FEED_TOKEN):
                    m.d.sync += [token.eq(cmd.arg), running.eq(1), cycles.eq(1)]
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
        nj = _Job("nj", max_L, (("layer", g_lstride), ("lb", g_lbstride)))      # fetcher: next norms
        tj = _Job("tj", max_L, (("layer", g_lstride),))                         # fetcher: next trits
        fj = _Job("fj", max_L)      # front
        mj = _Job("mj", max_L)      # matrix issuer
        oj = _Job("oj", max_L)      # operand stage
        wj = _Job("wj", max_L)      # writer
        norm_arrived = Signal(range(6 * max_L + 2))
        emb_done = Signal()
        front_done = fj.k
        out_done = wj.k
        with m.If(start):
            m.d.sync += nj.reset() + tj.reset() + fj.reset() + mj.reset() + oj.reset() + wj.reset()
            m.d.sync += [norm_arrived.eq(0), emb_done.eq(0)]

        # -- fetcher -----------------------------------------------------------------------------------
        # (``single``: count == 1, so the router knows a tag's first beat is its last without a
        # comparator behind the tag FIFO's output)
        tags = data.StructLayout({"kind": unsigned(3), "slot": unsigned(2), "count": unsigned(LEN_BITS),
                                  "boff": unsigned(4), "single": unsigned(1)})
        m.submodules.tagq = tagq = SyncFIFOBuffered(width=tags.size, depth=8)
        req = self.wport.req
        tag = Signal(tags)
        m.d.comb += [tagq.w_data.eq(tag), tagq.w_en.eq(req.valid & req.ready)]
        # A request takes several phases, so that no path runs from the parameter RAM's output
        # (slow on ECP5 block RAM) through an adder into the weight memory: 0 the parameter RAM
        # reads (compact: p1's word; 1 p1 latched, p0's word read, one read port); then its data
        # is registered (p0d, p1d); then address and length are computed into registers; then the
        # request is offered until taken. The layer and embedding-row offsets are registers
        # (running sums, shift and add): no multiplier on this path.
        ph_calc = 3 if self.compact else 2
        ph_issue = ph_calc + 1
        ph = Signal(range(ph_issue + 1))
        if self.compact:
            m.d.comb += p_rd.addr.eq(Mux(ph == 0, p1.addr, p0.addr))
        k_beats = -(-8 // wb)
        p0d = Signal.like(p0.data)
        p1d = Signal.like(p1.data)
        m.d.sync += [p0d.eq(p0.data), p1d.eq(p1.data)]
        njt_base = nj.jt * Param.JOB_STRIDE
        tjt_base = tj.jt * Param.JOB_STRIDE
        n_layer_base = Mux(nj.jt == JT_LM, 0, nj.base["layer"])
        t_layer_base = Mux(tj.jt == JT_LM, 0, tj.base["layer"])
        tok_bits = max(1, (max_V - 1).bit_length())
        emb_scale_byte = p0d + 4 * token[:tok_bits]
        # the embedding row's word offset token * d / beat_bytes, by shift and add (one token bit
        # per cycle from FEED_TOKEN on, done before the fetcher asks for the row): no multiplier
        emb_row = Signal(ADDR_BITS)
        emb_mtok = Signal(tok_bits)
        emb_mcnt = Signal(range(tok_bits + 1))
        with m.If(start):
            m.d.sync += [emb_row.eq(0), emb_mtok.eq(cmd.arg[:tok_bits]), emb_mcnt.eq(tok_bits)]
        with m.Elif(emb_mcnt != 0):
            m.d.sync += [emb_row.eq((emb_row << 1) + Mux(emb_mtok[-1], g_d >> lb_log, 0)),
                         emb_mtok.eq(emb_mtok << 1), emb_mcnt.eq(emb_mcnt - 1)]
        req_addr = Signal(ADDR_BITS)
        req_len = Signal(LEN_BITS)
        req_tag = Signal(tags)

        def request(addr, length, kind, slot=0, boff_=0, nxt=None, then=()):
            if self.compact:
                with m.If(ph == 1):
                    m.d.sync += p1.data.eq(p_rd.data)
            with m.If(ph == ph_calc):
                m.d.sync += [ph.eq(ph_issue), req_addr.eq(addr), req_len.eq(length), req_tag.kind.eq(kind),
                             req_tag.slot.eq(slot), req_tag.count.eq(length), req_tag.boff.eq(boff_),
                             req_tag.single.eq(length == 1)]
            with m.Elif(ph == ph_issue):
                m.d.comb += [req.valid.eq(tagq.w_rdy), req.payload.addr.eq(req_addr),
                             req.payload.length.eq(req_len), tag.eq(req_tag)]
                with m.If(req.valid & req.ready):
                    m.d.sync += ph.eq(0)
                    m.d.sync += list(then)
                    m.next = nxt
            with m.Else():
                m.d.sync += ph.eq(ph + 1)

        norm_ok = (front_done + NORM_SLOTS - 1 >= nj.k) & ((nj.jt != JT_F) | (out_done + 5 >= nj.k))
        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += ph.eq(0)
                    m.next = "EMBS"
            with m.State("EMBS"):
                m.d.comb += p0.addr.eq(Param.EMB_SCALE_OFF)
                request(emb_scale_byte >> lb_log, -(-4 // wb), _Tag.EMBS, boff_=emb_scale_byte[:lb_log] if lb_log else 0,
                        nxt="EMBR")
            with m.State("EMBR"):
                m.d.comb += [p0.addr.eq(Param.EMB_Q_OFF), p1.addr.eq(Param.EMB_ROW_BEATS)]
                with m.If(emb_mcnt == 0):
                    request(p0d + emb_row, p1d, _Tag.EMBR, nxt="SEL")
            with m.State("SEL"):
                with m.If((nj.k < n_jobs) & (nj.k <= tj.k + 1)):
                    with m.If(norm_ok):
                        m.d.sync += ph.eq(0)
                        with m.If(nj.jt == JT_F):
                            m.next = "LB"
                        with m.Else():
                            m.next = "NA"
                with m.Elif(tj.k < n_jobs):
                    m.d.sync += ph.eq(0)
                    m.next = "TRITS"
                with m.Else():
                    m.next = "IDLE"
            with m.State("LB"):
                m.d.comb += [p0.addr.eq(Param.LB_OFF), p1.addr.eq(Param.LB_BEATS)]
                request(p0d + nj.base["lb"], p1d, _Tag.LB, nxt="NA")
            with m.State("NA"):
                m.d.comb += [p0.addr.eq(njt_base + Param.A_OFF), p1.addr.eq(njt_base + Param.NORM_BEATS)]
                request(p0d + n_layer_base, p1d, _Tag.A, slot=nj.slot, nxt="NC")
            with m.State("NC"):
                m.d.comb += [p0.addr.eq(njt_base + Param.C_OFF), p1.addr.eq(njt_base + Param.NORM_BEATS)]
                request(p0d + n_layer_base, p1d, _Tag.C, slot=nj.slot, nxt="NK")
            with m.State("NK"):
                m.d.comb += p0.addr.eq(njt_base + Param.K_OFF)
                request(p0d + n_layer_base, k_beats, _Tag.K, slot=nj.slot, nxt="SEL", then=nj.step(g_L))
            with m.State("TRITS"):
                m.d.comb += [p0.addr.eq(tjt_base + Param.TRITS_OFF), p1.addr.eq(tjt_base + Param.TRITS_BEATS)]
                request(p0d + t_layer_base, p1d, _Tag.TRITS, nxt="SEL", then=tj.step(g_L))

        # -- router: response beats to their destinations ----------------------------------------------
        rtag = Signal(tags)
        m.d.comb += rtag.eq(tagq.r_data)
        resp = self.wport.resp
        bidx = Signal(LEN_BITS)
        dest_ready = Signal()
        beat_in = resp.valid & tagq.r_rdy
        xfer = beat_in & dest_ready
        m.d.comb += resp.ready.eq(tagq.r_rdy & dest_ready)
        # Whether this beat is its tag's last, from registers: on a tag's first beat the tag's
        # ``single``, on later ones ``last_r``, set a beat ahead from a down-counter (the xfer
        # logic fans out to every destination's enables; no adder or comparator in front of it).
        started = Signal()
        left = Signal(LEN_BITS)
        last_r = Signal()
        left_now = Mux(started, left, rtag.count)
        last_beat = Mux(started, last_r, rtag.single)
        with m.If(xfer):
            with m.If(last_beat):
                m.d.comb += tagq.r_en.eq(1)
                m.d.sync += [bidx.eq(0), started.eq(0)]
            with m.Else():
                m.d.sync += [bidx.eq(bidx + 1), started.eq(1), left.eq(left_now - 1), last_r.eq(left_now == 2)]

        # trits, through a FIFO deep enough to keep the matrix unit busy while the norms of a later
        # job pass the in-order response stream (base3 leaves a fifth of the beats spare to fill it)
        m.submodules.tritq = tritq = SyncFIFOBuffered(width=8 * wb, depth=self.trit_fifo_depth)
        m.d.comb += [tritq.w_data.eq(resp.payload.as_value()),
                     tritq.w_en.eq(beat_in & (rtag.kind == _Tag.TRITS))]
        # then a register slice (one beat; full rate while the matrix unit takes every beat): the
        # FIFO's block RAM output went straight into the matrix unit's decoder registers, the
        # ECP5's critical path at 64 lanes (5.8 ns clock-to-out plus the routing across the unit)
        trits_valid = Signal()
        trits = Signal(8 * wb, reset_less=True)
        m.d.comb += [tritq.r_en.eq(~trits_valid | mv.weights.ready),
                     mv.weights.payload.eq(trits), mv.weights.valid.eq(trits_valid)]
        with m.If(tritq.r_rdy & tritq.r_en):
            m.d.sync += [trits.eq(tritq.r_data), trits_valid.eq(1)]
        with m.Elif(mv.weights.ready):
            m.d.sync += trits_valid.eq(0)
        # norms and lower bounds
        aw = a_mem.write_port()
        cw = c_mem.write_port()
        lbw = lb_mem.write_port()
        n_we = [xfer & (rtag.kind == _Tag.A), xfer & (rtag.kind == _Tag.C), xfer & (rtag.kind == _Tag.LB)]
        n_addr, n_lbaddr, n_data = rtag.slot * nw + bidx, bidx, resp.payload.as_value()
        if not compact:
            # (full builds: norm beats are registered before their RAMs, as k beats are: the
            # transfer logic drives registers, not block RAM enables and addresses; they land a
            # cycle later, still before their job's k, which norm_arrived waits for)
            regs = ([Signal(name=f"n_we{k}") for k in range(3)],
                    Signal(range(NORM_SLOTS * nw), name="n_addr"), Signal(range(max_d // hw_), name="n_lbaddr"),
                    Signal(8 * wb, name="n_data", reset_less=True))
            m.d.sync += [r.eq(v) for r, v in zip(regs[0], n_we)]
            m.d.sync += [regs[1].eq(n_addr), regs[2].eq(n_lbaddr), regs[3].eq(n_data)]
            n_we, n_addr, n_lbaddr, n_data = regs
        m.d.comb += [
            aw.addr.eq(n_addr), aw.data.eq(n_data), aw.en.eq(n_we[0]),
            cw.addr.eq(n_addr), cw.data.eq(n_data), cw.en.eq(n_we[1]),
            lbw.addr.eq(n_lbaddr), lbw.data.eq(n_data), lbw.en.eq(n_we[2]),
        ]
        # k constants, one per slot
        kbuf = [Signal(64, name=f"kbuf{s}") for s in range(NORM_SLOTS)]
        k_we, k_slot, k_bidx, k_last, k_data = (xfer & (rtag.kind == _Tag.K), rtag.slot, bidx, last_beat,
                                                resp.payload.as_value())
        if not compact:
            # (full builds: a k beat is registered first, so the transfer logic does not fan out to
            # the 3 x 64 enables of the k buffers; norm_arrived counts a cycle later)
            regs = (Signal(name="k_we"), Signal.like(k_slot, name="k_slot"), Signal.like(k_bidx, name="k_bidx"),
                    Signal(name="k_last"), Signal(8 * wb, name="k_data", reset_less=True))
            m.d.sync += [r.eq(v) for r, v in zip(regs, (k_we, k_slot, k_bidx, k_last, k_data))]
            k_we, k_slot, k_bidx, k_last, k_data = regs
        for s in range(NORM_SLOTS):
            with m.If(k_we & (k_slot == s)):
                if wb >= 8:
                    m.d.sync += kbuf[s].eq(k_data[:64])
                else:
                    for b in range(8 // wb):
                        with m.If(k_bidx == b):
                            m.d.sync += kbuf[s][8 * wb * b:8 * wb * (b + 1)].eq(k_data)
        with m.If(k_we & k_last):
            m.d.sync += norm_arrived.eq(norm_arrived + 1)
        # embedding scale (full builds, beats of 4 bytes or more: from the registered beat, a
        # cycle later, which is still before the first embedding element can reach EmbedScale:
        # the row's first beat comes a cycle after the scale's at the earliest, then goes
        # through dbuf)
        e_we, e_sel, e_data = xfer & (rtag.kind == _Tag.EMBS), rtag.boff[2:], resp.payload.as_value()
        if not compact and wb >= 4:
            regs = (Signal(name="e_we"), Signal.like(e_sel, name="e_sel"))
            m.d.sync += [regs[0].eq(e_we), regs[1].eq(e_sel)]
            (e_we, e_sel), e_data = regs, n_data
        with m.If(e_we):
            if wb >= 4:
                m.d.sync += emb_scale.eq(e_data.word_select(e_sel, 32) if wb > 4 else e_data[:32])
            else:       # beats narrower than the 32-bit scale: 4 / wb beats, low bytes first
                for b in range(4 // wb):
                    with m.If(bidx == b):
                        m.d.sync += emb_scale[8 * wb * b:8 * wb * (b + 1)].eq(resp.payload.as_value())
        # embedding row: one byte per cycle into EmbedScale
        dbuf = Signal(data.ArrayLayout(signed(8), wb))
        dcnt = Signal(range(wb + 1))
        dpos = Signal(range(wb))
        eidx = Signal(range(max_d + 1))
        emb_take = emb_i.valid & emb_i.ready
        m.d.comb += [emb_i.valid.eq(dcnt != 0), emb_i.payload.q.eq(dbuf[dpos]),
                     emb_i.payload.last.eq(eidx == g_d - 1)]
        with m.If(emb_take):
            m.d.sync += [dpos.eq(dpos + 1), dcnt.eq(dcnt - 1), eidx.eq(eidx + 1)]
        embr_ready = (dcnt == 0) | ((dcnt == 1) & emb_i.ready)
        with m.If(xfer & (rtag.kind == _Tag.EMBR)):
            m.d.sync += [dbuf.eq(resp.payload), dcnt.eq(wb), dpos.eq(0)]
        with m.If(start):
            m.d.sync += eidx.eq(0)
        with m.Switch(rtag.kind):
            with m.Case(_Tag.TRITS):
                m.d.comb += dest_ready.eq(tritq.w_rdy)
            with m.Case(_Tag.EMBR):
                m.d.comb += dest_ready.eq(embr_ready)
            with m.Default():
                m.d.comb += dest_ready.eq(1)

        # -- OR of magnitudes of the vectors the front reads --------------------------------------------
        or_x = Signal(32)
        or_u = Signal(32)

        def mag(v):
            return Mux(v < 0, -v, v)[:32]

        # embedding -> x
        xw = x_mem.write_port()
        je = Signal(range(max_d + 1))
        m.d.comb += emb_o.ready.eq(1)
        with m.If(emb_o.valid):
            m.d.comb += [xw.en.eq(1), xw.addr.eq(je), xw.data.eq(emb_o.payload.value)]
            m.d.sync += [je.eq(je + 1), or_x.eq(Mux(je == 0, 0, or_x) | mag(emb_o.payload.value))]
            with m.If(emb_o.payload.last):
                m.d.sync += [emb_done.eq(1), je.eq(0)]

        # -- front -----------------------------------------------------------------------------------
        # x has two readers, the front and (for o_proj and down_proj) the residual add of the
        # operand stage. They are never busy at once: while the operand stage is at an o or down
        # job, every front job up to it reads u, and later ones wait for its outputs. The compact
        # build gives them one read port (one copy of x: 2 iCE40 EBRs fewer).
        xr_f = registered_read_port(m, x_mem)
        xr_o = xr_f if compact else registered_read_port(m, x_mem)
        x_res = Signal()        # the operand stage owns the shared port
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

        # -- operand stage ----------------------------------------------------------------------------
        lbr = registered_read_port(m, lb_mem)
        gr = registered_read_port(m, g_mem)
        hr = registered_read_port(m, h_mem)
        jo = Signal(range(2 * max_in + max_V + 1))
        jw = Signal(range(2 * max_in + max_V + 1))     # the writer's element index
        ov = Signal()
        o_y = Signal(x_shape)
        o_last = Signal()
        o_jt = Signal(3)
        o_up = Signal()
        o_fresh = Signal()
        o_sel = Signal(range(hw_))
        # (full builds: the elementwise unit's input registered after the block RAM reads, as the
        # front's; see f_reg)
        o_reg = not compact
        ovb = Signal() if o_reg else ov
        o_adv = ~ovb | ew.i.ready
        # ... from the operand stage's first o/down element until the last one has left it (it may
        # wait in front of the elementwise unit with its x operand on the port's output)
        m.d.comb += x_res.eq((oj.jt == JT_O) | (oj.jt == JT_DOWN) | (ov & ((o_jt == JT_O) | (o_jt == JT_DOWN))))
        if compact:
            m.d.comb += [xr_f.addr.eq(Mux(x_res, jo, j)), xr_f.en.eq(Mux(x_res, o_adv, f_adv))]
        else:
            m.d.comb += [xr_f.addr.eq(j), xr_f.en.eq(f_adv), xr_o.addr.eq(jo), xr_o.en.eq(o_adv)]
        upper = (oj.jt == JT_GATE) & (jo >= g_I)
        # Reads after writes through memory: i_proj's element reads f, g_proj's reads h[l] (both
        # written by the job before), and the GLU's upper rows read the gate of row - I (written
        # by this job). With short rows (d / lanes) and few rows (I) an element can reach this
        # stage before the writer has stored its operand; full builds then hold it. The hold is a
        # register, computed a cycle ahead from the writer's progress for the element after the
        # current one (conservative: both counters only grow), and set for the cycle after a job
        # change; compact builds (whose pipelines are unchanged) take elements as before.
        o_hold = Signal()
        o_in = osc.o.valid & ~embedding & ~o_hold
        m.d.comb += osc.o.ready.eq((o_adv & ~o_hold) | embedding)
        if not compact:
            nxt = jo + 1
            writer_behind = wj.k < oj.k
            gate_up = (oj.jt == JT_GATE) & (nxt >= g_I)
            m.d.sync += o_hold.eq((o_adv & o_in & osc.o.payload.last)
                                  | (((oj.jt == JT_I) | (oj.jt == JT_G)) & writer_behind)
                                  | (gate_up & (writer_behind | (nxt >= jw + g_I))))
        m.d.comb += [
            lbr.addr.eq(jo // hw_), gr.addr.eq(Mux(upper, jo - g_I, jo)),
            hr.addr.eq(oj.l * max_d + jo),
            lbr.en.eq(o_adv), gr.en.eq(o_adv), hr.en.eq(o_adv),
        ]
        with m.If(o_adv):
            m.d.sync += [ov.eq(o_in), o_y.eq(osc.o.payload.value), o_last.eq(osc.o.payload.last),
                         o_jt.eq(oj.jt), o_up.eq(upper), o_fresh.eq(fresh.bit_select(oj.l, 1)),
                         o_sel.eq(jo % hw_)]
            with m.If(o_in):
                with m.If(osc.o.payload.last):
                    m.d.sync += [jo.eq(0)] + oj.step(g_L)
                with m.Else():
                    m.d.sync += jo.eq(jo + 1)
        o_vals = [o_y, o_last, o_jt, o_up, o_fresh, o_sel, lbr.data, gr.data, hr.data, xr_o.data]
        if o_reg:
            # stage B: the RAM words as read, then the operand multiplexers in front of the
            # elementwise unit's input register
            regs = [Signal.like(v) for v in o_vals]
            with m.If(o_adv):
                m.d.sync += [ovb.eq(ov)] + [r.eq(v) for r, v in zip(regs, o_vals)]
            o_vals = regs
        ob_y, ob_last, ob_jt, ob_up, ob_fresh, ob_sel, ob_lb, ob_g, ob_h, ob_x = o_vals
        ew_in = ew.i.payload
        m.d.comb += [ew.i.valid.eq(ovb), ew_in.last.eq(ob_last), ew_in.y.eq(ob_y), ew_in.a.eq(0), ew_in.g.eq(0)]
        with m.Switch(ob_jt):
            with m.Case(JT_F):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.FORGET), ew_in.g.eq(ob_lb[ob_sel])]
            with m.Case(JT_I):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.RECUR), ew_in.g.eq(ob_g[:16]),
                             ew_in.a.eq(Mux(ob_fresh, 0, ob_h))]
            with m.Case(JT_G):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.SILU_MUL), ew_in.y.eq(ob_h), ew_in.a.eq(ob_y)]
            with m.Case(JT_O, JT_DOWN):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.ADD), ew_in.a.eq(ob_x)]
            with m.Case(JT_GATE):
                with m.If(ob_up):
                    m.d.comb += [ew_in.op.eq(ElementwiseOp.SILU_MUL), ew_in.y.eq(ob_g), ew_in.a.eq(ob_y)]
                with m.Else():
                    m.d.comb += ew_in.op.eq(ElementwiseOp.ADD)
            with m.Default():
                m.d.comb += ew_in.op.eq(ElementwiseOp.ADD)

        # -- writer ----------------------------------------------------------------------------------------
        uw = u_mem.write_port()
        gw = g_mem.write_port()
        hw = h_mem.write_port()
        lw = lg_mem.write_port()
        val = ew.o.payload.value
        wv = ew.o.valid
        w_up = (wj.jt == JT_GATE) & (jw >= g_I)
        m.d.comb += [ew.o.ready.eq(1),
                     uw.data.eq(val), gw.data.eq(val), hw.data.eq(val), lw.data.eq(val),
                     uw.addr.eq(Mux(w_up, jw - g_I, jw)), gw.addr.eq(jw), hw.addr.eq(wj.l * max_d + jw),
                     lw.addr.eq(jw)]
        m.d.comb += [amax.i.payload.value.eq(val), amax.i.payload.last.eq(ew.o.payload.last),
                     amax.i.valid.eq(wv & (wj.jt == JT_LM)), amax.o.ready.eq(1)]
        m.d.comb += [self.trace.valid.eq(wv), self.trace.payload.job.eq(wj.jt),
                     self.trace.payload.layer.eq(wj.l), self.trace.payload.row.eq(jw),
                     self.trace.payload.value.eq(val)]
        with m.If(wv):
            with m.If(ew.o.payload.last):
                m.d.sync += [jw.eq(0)] + wj.step(g_L)
            with m.Else():
                m.d.sync += jw.eq(jw + 1)
            with m.Switch(wj.jt):
                with m.Case(JT_F):
                    m.d.comb += gw.en.eq(1)
                with m.Case(JT_I):
                    m.d.comb += hw.en.eq(1)
                    with m.If(ew.o.payload.last):
                        m.d.sync += fresh.bit_select(wj.l, 1).eq(0)
                with m.Case(JT_G):
                    m.d.comb += uw.en.eq(1)
                    m.d.sync += or_u.eq(Mux(jw == 0, 0, or_u) | mag(val))
                with m.Case(JT_O, JT_DOWN):
                    m.d.comb += [xw.en.eq(1), xw.addr.eq(jw), xw.data.eq(val)]
                    m.d.sync += or_x.eq(Mux(jw == 0, 0, or_x) | mag(val))
                with m.Case(JT_GATE):
                    with m.If(w_up):
                        m.d.comb += uw.en.eq(1)
                        m.d.sync += or_u.eq(Mux(jw == g_I, 0, or_u) | mag(val))
                    with m.Else():
                        m.d.comb += gw.en.eq(1)
                with m.Case(JT_LM):
                    m.d.comb += lw.en.eq(1)

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
