"""The engine's output path after the output scale: the operand stage and the writer.

Scaled matrix outputs (one job's rows in order, one job after another) enter the
:class:`OperandStage`, which reads each element's second operand from on-chip memory and hands
both to the :class:`~.elementwise.ElementwiseUnit`; the :class:`Writer` stores what comes out.
Per job type (index in ``JOBS``): ``f``: FORGET with the lower bound -> f; ``i``: RECUR with f
and h[l] -> h[l]; ``g``: SILU_MUL with h[l] -> p; ``o`` and ``down``: ADD to x; ``gate``:
rows < I stored, rows >= I SILU_MUL with the stored gate -> v; ``lm_head``: -> logits and the
argmax.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .elementwise import ElementwiseOp, elementwise_input_layout
from .engine_common import (JT_DOWN, JT_F, JT_G, JT_GATE, JT_I, JT_LM, JT_O, JobCounter, Variant,
                            geometry_layout, image_elements, job_count_shape, magnitude, read_port_signature,
                            write_port_signature)
from .engine_fetch import emb_bits
from .embed_scale import EmbedScale
from .output_scale import OutputScale
from .vector_common import GSUM_BITS, Pipeline, scale_layout, umul, value_layout

__all__ = ["ScaleStage", "SharedScaleStage", "OperandStage", "Writer", "row_shape"]


def row_shape(max_in: int, max_V: int):
    """Shape of an output row index (a gate_proj job has 2 I rows)."""
    return range(2 * max_in + max_V + 1)


class OperandStage(wiring.Component):
    """Pairs each scaled matrix output with its operand from memory, for the elementwise unit.

    Parameters
    ----------
    w : VectorWidths
    beat_bytes : int
        Bytes per weight beat (lower bounds are stored a beat's worth per word: ``beat_bytes / 2``
        uint16 or ``beat_bytes / 4`` uint32, :func:`~.engine_common.image_elements`).
    max_d, max_I, max_L, max_V : int
        Synthesis maxima.
    variant : Variant
        ``register_stage_inputs``: the memory words are registered once more (stage B) before
        the operand multiplexers; ``hold_operands``: an element waits while its operand may not
        be stored yet.

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted: back to job 0.
    i : In(stream of value_layout(w))
        Scaled outputs (``value``, ``last`` on a job's last row), jobs in order.
    o : Out(stream of elementwise_input_layout(w))
        The op for the job and the element with its operands. Latency from ``i`` to ``o``: one
        cycle (stage A, the memory reads), two with ``register_stage_inputs``.
    writer_done : In(job index)
        Jobs the writer has finished; ``writer_row`` : In the writer's row in its job.
        (``hold_operands``: reads of f, h[l] and the GLU gate wait for them.)
    fresh : In(max_L)
        Per layer: h[l] is zero (RECUR adds 0 instead of reading h).
    lb, g, h, x : In(read port)
        Lower bounds (a beat's per word), f / the GLU gate, h (layer-major; with ``slots``, slot
        by slot), x.
    h_base : In(h address), only with ``slots``
        Where the current slot's h starts (``slot * max_L * max_d``).
    x_owner : Out(1)
        The operand stage is between the first and the last element of an o or down job (so a
        read port of x shared with the front belongs to it).
    gsum : Out(unsigned(eps_gsum_bits))
        With ``norm_eps`` only: o_proj's eps sum G = sum(min(|yg| >> (x_frac - 12), 2^20 - 1)^2)
        over the g_proj outputs yg of the last g job, complete a few cycles (the square's
        pipeline) after its last element passed this stage, long before the o job's statistics
        (the front waits for the writer to finish the g job).
    """

    def __init__(self, w, *, beat_bytes: int, max_d: int, max_I: int, max_L: int, max_V: int, variant: Variant,
                 slots: int = 0):
        self._w = w
        self._slots = slots
        h_depth = max(slots, 1) * max_L * max_d
        self._hw = image_elements(w.fmt).per_beat(beat_bytes, "lb")
        self._max = (max_d, max_I, max_L, max_V)
        self._variant = variant
        max_in = max(max_d, max_I)
        super().__init__({
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "i": In(stream.Signature(value_layout(w))),
            "o": Out(stream.Signature(elementwise_input_layout(w))),
            "writer_done": In(job_count_shape(max_L)),
            "writer_row": In(row_shape(max_in, max_V)),
            "fresh": In(max_L),
            "lb": In(read_port_signature(data.ArrayLayout(w.gate_bits, self._hw), max_d // self._hw)),
            "g": In(read_port_signature(w.x, max_in)),
            "h": In(read_port_signature(w.x, h_depth)),
            "x": In(read_port_signature(w.x, max_d)),
            "x_owner": Out(1),
            **({"h_base": In(range(h_depth))} if slots else {}),
            **({"gsum": Out(unsigned(w.eps_gsum_bits))} if w.norm_eps else {}),
        })

    def elaborate(self, platform):
        m = Module()
        max_d, max_I, max_L, max_V = self._max
        hw_, geom, v = self._hw, self.geom, self._variant
        oj = JobCounter("oj", max_L)
        with m.If(self.start):
            m.d.sync += oj.reset(geom)
        jo = Signal(row_shape(max(max_d, max_I), max_V))
        ov = Signal()
        o_y = Signal(self._w.x)
        o_last = Signal()
        o_jt = Signal(3)
        o_up = Signal()
        o_fresh = Signal()
        o_sel = Signal(range(hw_))
        ovb = Signal() if v.register_stage_inputs else ov
        o_adv = ~ovb | self.o.ready
        # from the first o/down element until the last one has left (it may wait in front of
        # the elementwise unit with its x operand on the port's output)
        m.d.comb += self.x_owner.eq((oj.jt == JT_O) | (oj.jt == JT_DOWN)
                                    | (ov & ((o_jt == JT_O) | (o_jt == JT_DOWN))))
        upper = (oj.jt == JT_GATE) & (jo >= geom.I)
        # Reads after writes through memory: i_proj's element reads f, g_proj's reads h[l] (both
        # written by the job before), and the GLU's upper rows read the gate of row - I (written
        # by this job). With short rows (d / lanes) and few rows (I) an element can reach this
        # stage before the writer has stored its operand; ``hold_operands`` then holds it. The
        # hold is a register, computed a cycle ahead from the writer's progress for the element
        # after the current one (conservative: both counters only grow), and set for the cycle
        # after a job change.
        o_hold = Signal()
        o_in = self.i.valid & ~o_hold
        m.d.comb += self.i.ready.eq(o_adv & ~o_hold)
        if v.hold_operands:
            nxt = jo + 1
            writer_behind = self.writer_done < oj.k
            gate_up = (oj.jt == JT_GATE) & (nxt >= geom.I)
            m.d.sync += o_hold.eq((o_adv & o_in & self.i.payload.last)
                                  | (((oj.jt == JT_I) | (oj.jt == JT_G)) & writer_behind)
                                  | (gate_up & (writer_behind | (nxt >= self.writer_row + geom.I))))
        m.d.comb += [
            self.lb.addr.eq(jo // hw_), self.g.addr.eq(Mux(upper, jo - geom.I, jo)),
            self.h.addr.eq(oj.l * max_d + jo + (self.h_base if self._slots else 0)), self.x.addr.eq(jo),
            self.lb.en.eq(o_adv), self.g.en.eq(o_adv), self.h.en.eq(o_adv), self.x.en.eq(o_adv),
        ]
        if self._w.norm_eps:
            self._gsum(m, o_adv & o_in & (oj.jt == JT_G), jo == 0, self.i.payload.value)
        with m.If(o_adv):
            m.d.sync += [ov.eq(o_in), o_y.eq(self.i.payload.value), o_last.eq(self.i.payload.last),
                         o_jt.eq(oj.jt), o_up.eq(upper), o_fresh.eq(self.fresh.bit_select(oj.l, 1)),
                         o_sel.eq(jo % hw_)]
            with m.If(o_in):
                with m.If(self.i.payload.last):
                    m.d.sync += [jo.eq(0)] + oj.step(geom.L)
                with m.Else():
                    m.d.sync += jo.eq(jo + 1)
        o_vals = [o_y, o_last, o_jt, o_up, o_fresh, o_sel,
                  self.lb.data, self.g.data, self.h.data, self.x.data]
        if v.register_stage_inputs:
            # stage B: the RAM words as read (no logic between a block RAM and a register), then
            # the operand multiplexers in front of the elementwise unit's input register
            regs = [Signal.like(val) for val in o_vals]
            with m.If(o_adv):
                m.d.sync += [ovb.eq(ov)] + [r.eq(val) for r, val in zip(regs, o_vals)]
            o_vals = regs
        self._operands(m, ovb, *o_vals)
        return m

    def _gsum(self, m, take, first, y):
        """o_proj's G from the g job's outputs ``y`` (each taken when ``take``; ``first`` on
        the job's first): a free-running pipeline (clamp, limb products, sum, accumulate)."""
        w = self._w
        p = Pipeline(m, Const(1), name="gsum_pipe")
        top = (1 << GSUM_BITS) - 1
        k = w.fmt.x_frac - 12
        valid = p.reg(1, "valid", take)
        frst = p.reg(1, "first", first)
        ymag = p.reg(1, "ymag", magnitude(y)[k:], unsigned(max(1, w.x_bits - k)))
        gmag = p.reg(2, "gmag", Mux(ymag > top, top, ymag), unsigned(GSUM_BITS))
        sq, s = umul(p, 3, "gsq", gmag, top, gmag, top, registered=True)
        with m.If(p.at(valid, s)):
            m.d.sync += self.gsum.eq(Mux(p.at(frst, s), 0, self.gsum) + sq)

    def _operands(self, m, valid, y, last, jt, up, fresh, sel, lb, g, h, x):
        """The elementwise op and its operands for an element of job type ``jt``."""
        ew_in = self.o.payload
        m.d.comb += [self.o.valid.eq(valid), ew_in.last.eq(last), ew_in.y.eq(y), ew_in.a.eq(0), ew_in.g.eq(0)]
        with m.Switch(jt):
            with m.Case(JT_F):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.FORGET), ew_in.g.eq(lb[sel])]
            with m.Case(JT_I):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.RECUR), ew_in.g.eq(g[:self._w.gate_bits]),
                             ew_in.a.eq(Mux(fresh, 0, h))]
            with m.Case(JT_G):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.SILU_MUL), ew_in.y.eq(h), ew_in.a.eq(y)]
            with m.Case(JT_O, JT_DOWN):
                m.d.comb += [ew_in.op.eq(ElementwiseOp.ADD), ew_in.a.eq(x)]
            with m.Case(JT_GATE):
                with m.If(up):
                    m.d.comb += [ew_in.op.eq(ElementwiseOp.SILU_MUL), ew_in.y.eq(g), ew_in.a.eq(y)]
                with m.Else():
                    m.d.comb += ew_in.op.eq(ElementwiseOp.ADD)
            with m.Default():
                m.d.comb += ew_in.op.eq(ElementwiseOp.ADD)


class Writer(wiring.Component):
    """Stores the embedding and every job's results; tracks what the front needs to know.

    Parameters
    ----------
    w : VectorWidths
    max_d, max_I, max_L, max_V : int
        Synthesis maxima.
    trace_layout : StructLayout
        The ``trace`` payload (:func:`~.engine.trace_layout`).

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted: back to job 0, the embedding not yet stored.
    reset_state : In(1)
        RESET_STATE accepted: every h[l] is zero again.
    emb : In(stream of {value, last})
        The scaled embedding row (always ready), stored to x.
    i : In(stream of value_layout(w))
        The elementwise unit's results (always ready), one job's rows after another.
    x, u, g, h, logits : In(write port)
        x; p and v (``u``); f and the GLU gate (``g``); h (layer-major); the logits. Each store
        is one write in the cycle the element arrives.
    argmax : Out(stream of value_layout(w))
        lm_head's results (its ``ready`` is not looked at).
    trace : Out(stream of trace_layout)
        Every stored result (job, layer, row, value) in the cycle it is stored; ``ready`` is
        not looked at.
    done : Out(job index)
        Jobs finished; ``row`` : Out the row of the current job.
    emb_done : Out(1)
        The embedding is in x.
    fresh : Out(max_L)
        Per layer: h[l] is zero (after RESET_STATE, until i_proj of that layer is stored); with
        ``slots``, the current slot's (each slot has its own).
    slot, h_base, head, reset_slot, reset_index : In, only with ``slots``
        The slot a step runs on and where its h starts; whether the slice ends with the head
        (without it the last layer's down_proj results, the residual out, are also stored to
        ``logits``, the output buffer); RESET_SLOT accepted, for slot ``reset_index``.
    or_x, or_u : Out(x_bits)
        The OR of the magnitudes of x and of u (p or v) as last stored: its bit length is the
        maximum's.
    """

    def __init__(self, w, *, max_d: int, max_I: int, max_L: int, max_V: int, trace_layout, slots: int = 0):
        self._w = w
        self._max = (max_d, max_I, max_L, max_V)
        self._slots = slots
        max_in = max(max_d, max_I)
        h_depth = max(slots, 1) * max_L * max_d
        # with slots the logit memory is also the output buffer of a residual
        logit_depth = max(max_V, max_d) if slots else max_V
        slot_members = {"slot": In(range(slots)), "h_base": In(range(h_depth)), "head": In(1),
                        "reset_slot": In(1), "reset_index": In(8)} if slots else {}
        super().__init__({
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "reset_state": In(1),
            "emb": In(stream.Signature(data.StructLayout({"value": w.x, "last": 1}))),
            "i": In(stream.Signature(value_layout(w))),
            "x": In(write_port_signature(w.x, max_d)),
            "u": In(write_port_signature(w.x, max_in)),
            "g": In(write_port_signature(w.x, max_in)),
            "h": In(write_port_signature(w.x, h_depth)),
            "logits": In(write_port_signature(w.x, logit_depth)),
            "argmax": Out(stream.Signature(value_layout(w))),
            "trace": Out(stream.Signature(trace_layout)),
            "done": Out(job_count_shape(max_L)),
            "row": Out(row_shape(max_in, max_V)),
            "emb_done": Out(1),
            "fresh": Out(max_L, init=(1 << max_L) - 1),
            "or_x": Out(w.x_bits),
            "or_u": Out(w.x_bits),
            **slot_members,
        })

    def elaborate(self, platform):
        m = Module()
        max_d, max_I, max_L, max_V = self._max
        geom = self.geom
        wj = JobCounter("wj", max_L)
        m.d.comb += self.done.eq(wj.k)
        with m.If(self.start):
            m.d.sync += wj.reset(geom) + [self.emb_done.eq(0)]
        if self._slots:
            # every slot's flags, the current slot's on ``fresh``
            self._fresh = fresh = Signal(self._slots * max_L, init=(1 << (self._slots * max_L)) - 1)
            m.d.comb += self.fresh.eq(fresh.word_select(self.slot, max_L))
            with m.If(self.reset_state):
                m.d.sync += fresh.eq(fresh.init)
            with m.Elif(self.reset_slot):
                for s in range(self._slots):
                    with m.If(self.reset_index == s):
                        m.d.sync += fresh[s * max_L:(s + 1) * max_L].eq((1 << max_L) - 1)
        else:
            with m.If(self.reset_state):
                m.d.sync += self.fresh.eq((1 << max_L) - 1)
        # the embedding -> x
        je = Signal(range(max_d + 1))
        emb = self.emb
        m.d.comb += emb.ready.eq(1)
        with m.If(emb.valid):
            m.d.comb += [self.x.en.eq(1), self.x.addr.eq(je), self.x.data.eq(emb.payload.value)]
            m.d.sync += [je.eq(je + 1), self.or_x.eq(Mux(je == 0, 0, self.or_x) | magnitude(emb.payload.value))]
            with m.If(emb.payload.last):
                m.d.sync += [self.emb_done.eq(1), je.eq(0)]
        # results
        jw = self.row
        val = self.i.payload.value
        wv = self.i.valid
        w_up = (wj.jt == JT_GATE) & (jw >= geom.I)
        m.d.comb += [self.i.ready.eq(1),
                     self.u.data.eq(val), self.g.data.eq(val), self.h.data.eq(val), self.logits.data.eq(val),
                     self.u.addr.eq(Mux(w_up, jw - geom.I, jw)), self.g.addr.eq(jw),
                     self.h.addr.eq(wj.l * max_d + jw + (self.h_base if self._slots else 0)),
                     self.logits.addr.eq(jw)]
        m.d.comb += [self.argmax.payload.value.eq(val), self.argmax.payload.last.eq(self.i.payload.last),
                     self.argmax.valid.eq(wv & (wj.jt == JT_LM))]
        m.d.comb += [self.trace.valid.eq(wv), self.trace.payload.job.eq(wj.jt),
                     self.trace.payload.layer.eq(wj.l), self.trace.payload.row.eq(jw),
                     self.trace.payload.value.eq(val)]
        with m.If(wv):
            with m.If(self.i.payload.last):
                m.d.sync += [jw.eq(0)] + wj.step(geom.L)
            with m.Else():
                m.d.sync += jw.eq(jw + 1)
            self._store(m, wj, jw, val, w_up)
        if self._slots:
            # a slice of no layers and no head (the embedding only): the residual out, the
            # embedding, into the output buffer as it is stored to x (no result comes meanwhile)
            with m.If(emb.valid & (geom.L == 0) & ~self.head):
                m.d.comb += [self.logits.en.eq(1), self.logits.addr.eq(je), self.logits.data.eq(emb.payload.value)]
        return m

    def _store(self, m, wj, jw, val, w_up):
        """The write enables of a result of job type ``wj.jt``, and the ORs of magnitudes."""
        with m.Switch(wj.jt):
            with m.Case(JT_F):
                m.d.comb += self.g.en.eq(1)
            with m.Case(JT_I):
                m.d.comb += self.h.en.eq(1)
                with m.If(self.i.payload.last):
                    if self._slots:
                        m.d.sync += self._fresh.bit_select(self.slot * self._max[2] + wj.l, 1).eq(0)
                    else:
                        m.d.sync += self.fresh.bit_select(wj.l, 1).eq(0)
            with m.Case(JT_G):
                m.d.comb += self.u.en.eq(1)
                m.d.sync += self.or_u.eq(Mux(jw == 0, 0, self.or_u) | magnitude(val))
            with m.Case(JT_O, JT_DOWN):
                m.d.comb += [self.x.en.eq(1), self.x.addr.eq(jw), self.x.data.eq(val)]
                m.d.sync += self.or_x.eq(Mux(jw == 0, 0, self.or_x) | magnitude(val))
                if self._slots:
                    # a slice without the head: the residual out, also into the output buffer
                    m.d.comb += self.logits.en.eq((wj.jt == JT_DOWN) & (wj.l == self.geom.L - 1) & ~self.head)
            with m.Case(JT_GATE):
                with m.If(w_up):
                    m.d.comb += self.u.en.eq(1)
                    m.d.sync += self.or_u.eq(Mux(jw == self.geom.I, 0, self.or_u) | magnitude(val))
                with m.Else():
                    m.d.comb += self.g.en.eq(1)
            with m.Case(JT_LM):
                m.d.comb += self.logits.en.eq(1)



class ScaleStage(wiring.Component):
    """The output scale: accumulators times their job's scale (from the scalar unit, through a
    4-entry FIFO), and the embedding row times the token's scale (own :class:`~.embed_scale.EmbedScale`;
    :class:`SharedScaleStage` puts it through the output scale instead).

    Parameters
    ----------
    w : VectorWidths
    acc_layout : Layout
        The matrix unit's output (``acc``, ``last``).

    Members
    -------
    acc : In(stream of acc_layout)
        Accumulators, ``last`` on a job's last row.
    scale : In(stream of scale_layout(w))
        One scale per job, in job order.
    o : Out(stream of value_layout(w))
        Scaled outputs (OutputScale's latency).
    emb : In(stream of {q, last})
        The embedding row (``q`` of :func:`~.engine_fetch.emb_bits`); ``emb_scale`` : In(32) its scale.
    emb_o : Out(stream of {value, last})
        The scaled embedding row (its ``ready`` must be high).
    emb_done : In(1)
        The embedding is in x.
    """

    #: products per multiplier of the output scale
    share = 1

    def __init__(self, w, *, acc_layout):
        self._w = w
        super().__init__({
            "acc": In(stream.Signature(acc_layout)),
            "scale": In(stream.Signature(scale_layout(w))),
            "o": Out(stream.Signature(value_layout(w))),
            "emb": In(stream.Signature(data.StructLayout({"q": signed(emb_bits(w)), "last": 1}))),
            "emb_scale": In(32),
            "emb_o": Out(stream.Signature(data.StructLayout({"value": w.x, "last": 1}))),
            "emb_done": In(1),
        })

    def _output_scale(self):
        return OutputScale(self._w.fmt, share=self.share)

    def _embedding(self, m, osc):
        """The embedding's own path; returns the signal that gives the output scale to it."""
        m.submodules.embed = emb = EmbedScale(self._w.fmt)
        wiring.connect(m, wiring.flipped(self.emb), emb.i)
        wiring.connect(m, emb.o, wiring.flipped(self.emb_o))
        m.d.comb += emb.scale.eq(self.emb_scale)
        return Signal()

    def elaborate(self, platform):
        m = Module()
        m.submodules.oscale = osc = self._output_scale()
        m.submodules.scales = sfifo = SyncFIFOBuffered(width=len(self.scale.payload.as_value()), depth=4)
        m.d.comb += [sfifo.w_data.eq(self.scale.payload), sfifo.w_en.eq(self.scale.valid),
                     self.scale.ready.eq(sfifo.w_rdy)]
        embedding = self._embedding(m, osc)
        acc = self.acc
        m.d.comb += [
            osc.i.payload.eq(acc.payload),
            osc.i.valid.eq(acc.valid & sfifo.r_rdy),
            acc.ready.eq(osc.i.ready & sfifo.r_rdy & ~embedding),
            osc.scale.eq(sfifo.r_data),
            sfifo.r_en.eq(acc.valid & osc.i.ready & acc.payload.last & ~embedding),
        ]
        self._embedding_input(m, osc, embedding)
        m.d.comb += [self.o.payload.eq(osc.o.payload), self.o.valid.eq(osc.o.valid & ~embedding),
                     osc.o.ready.eq(self.o.ready | embedding)]
        return m

    def _embedding_input(self, m, osc, embedding):
        pass


class SharedScaleStage(ScaleStage):
    """:class:`ScaleStage` whose output scale also scales the embedding (no EmbedScale: fewer
    multipliers), and shares each multiplier between two products (one output every two cycles).
    From FEED_TOKEN until ``emb_done`` the output scale takes the embedding row; no accumulator
    can come before then (f_proj waits for x)."""

    share = 2

    def _output_scale(self):
        return OutputScale(self._w.fmt, share=self.share, embed=True)

    def _embedding(self, m, osc):
        embedding = Signal()
        m.d.comb += embedding.eq(~self.emb_done)
        m.d.comb += [osc.embed.eq(embedding), osc.emb_scale.eq(self.emb_scale),
                     self.emb.ready.eq(embedding & osc.i.ready),
                     self.emb_o.valid.eq(embedding & osc.o.valid), self.emb_o.payload.value.eq(osc.o.payload.value),
                     self.emb_o.payload.last.eq(osc.o.payload.last)]
        return embedding

    def _embedding_input(self, m, osc, embedding):
        with m.If(embedding):
            m.d.comb += [osc.i.payload.acc.eq(self.emb.payload.q), osc.i.payload.last.eq(self.emb.payload.last),
                         osc.i.valid.eq(self.emb.valid)]
