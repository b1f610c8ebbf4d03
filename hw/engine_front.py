"""The engine's input side of each matrix: the :class:`FrontSequencer` walks a job's input
vector through :class:`~.bitlinear_front.BitLinearFront` (one MAX element, a STATS pass, a QUANT
pass), the :class:`QPacker` packs the q values ``lanes`` wide into the FIFO the matrix unit
loads from, and the :class:`MatrixIssuer` gives :class:`~.matvec.TernaryMatVec` one command per
job.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .bitlinear_front import FrontOp, front_input_layout
from .engine_common import (JT_DOWN, JT_G, JT_GATE, JT_I, JT_LM, JT_O, NORM_SLOTS, JobCounter, Variant,
                            geometry_layout, image_elements, job_count_shape, read_port_signature)

__all__ = ["rows_of", "cols_of", "FrontSequencer", "SkidBuffer", "QPacker", "MatrixIssuer"]


def rows_of(geom, jt):
    """Rows of job type ``jt``'s matrix (gate_proj: the gate and the up rows, 2 I)."""
    return Mux(jt == JT_GATE, 2 * geom.I, Mux(jt == JT_LM, geom.V, geom.d))


def cols_of(geom, jt):
    """Columns of job type ``jt``'s matrix: its input length."""
    return Mux(jt == JT_DOWN, geom.I, geom.d)


class FrontSequencer(wiring.Component):
    """Feeds BitLinearFront each job's input: a MAX element, then STATS and QUANT passes.

    A job starts once its norms have arrived and its input vector is complete: ``f``, ``o``,
    ``gate``, ``down`` and ``lm_head`` wait until the writer finished the job before (``i`` and
    ``g`` read the same x as ``f``); it ends when the scalar unit has taken its statistics.
    The MAX element is the OR of the input's magnitudes (its bit length is the maximum's).
    Inputs: x for ``f``, ``i``, ``g``, ``gate``, ``lm_head``; u (p or v) for ``o`` and ``down``.

    Parameters
    ----------
    w : VectorWidths
    beat_bytes : int
        Norm words hold a beat's values (``beat_bytes / 2`` int16, or ``beat_bytes / 4`` int32
        with norms wider than 16 bits: :func:`~.engine_common.image_elements`).
    max_d, max_I, max_L, max_V : int
        Synthesis maxima.
    variant : Variant
        ``register_stage_inputs``: the memory words are registered once more (stage B) before
        the word select and the source multiplexer.

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted: back to job 0. ``running`` : In(1): a token is under way.
    norms_arrived : In(job index)
        Jobs whose norms are stored (job k's in slot k mod 3).
    emb_done : In(1)
        The embedding is in x. ``writer_done`` : In(job index): jobs the writer has finished.
    or_x, or_u : In(x_bits)
        The OR of the magnitudes of x and u.
    k : In(ArrayLayout(unsigned(8 k_bytes), NORM_SLOTS))
        Each norm slot's constants (the image's k section: 8 bytes, 16 with ``norm_eps``);
        ``k_cur`` : Out(8 k_bytes) the current job's (for the scalar unit).
    x, u, a, c : In(read port)
        The input vectors and the norm slots (slot s at ``s * max_in`` values).
    o : Out(stream of front_input_layout(w))
        The front's input. Latency from a memory read to ``o``: one cycle, two with
        ``register_stage_inputs``.
    stats_taken : In(1)
        The scalar unit took the job's statistics (the job is done).
    done : Out(job index)
        Jobs finished.
    jt : Out(3)
        The current job's type (index in ``JOBS``; with ``k_cur``, for the scalar unit).
    """

    def __init__(self, w, *, beat_bytes: int, max_d: int, max_I: int, max_L: int, max_V: int, variant: Variant):
        self._w = w
        self._hw = image_elements(w.fmt).per_beat(beat_bytes, "norm")
        k_bits = 8 * image_elements(w.fmt).k
        self._max = (max_d, max_I, max_L, max_V)
        self._registered = variant.register_stage_inputs
        max_in = max(max_d, max_I)
        norm_word = data.ArrayLayout(signed(w.norm_bits), self._hw)
        super().__init__({
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "running": In(1),
            "norms_arrived": In(job_count_shape(max_L)),
            "emb_done": In(1),
            "writer_done": In(job_count_shape(max_L)),
            "or_x": In(w.x_bits),
            "or_u": In(w.x_bits),
            "k": In(data.ArrayLayout(unsigned(k_bits), NORM_SLOTS)),
            "k_cur": Out(k_bits),
            "x": In(read_port_signature(w.x, max_d)),
            "u": In(read_port_signature(w.x, max_in)),
            "a": In(read_port_signature(norm_word, NORM_SLOTS * (max_in // self._hw))),
            "c": In(read_port_signature(norm_word, NORM_SLOTS * (max_in // self._hw))),
            "o": Out(stream.Signature(front_input_layout(w))),
            "stats_taken": In(1),
            "done": Out(job_count_shape(max_L)),
            "jt": Out(3),
        })

    def elaborate(self, platform):
        m = Module()
        max_d, max_I, max_L, max_V = self._max
        hw_, geom = self._hw, self.geom
        nw = max(max_d, max_I) // hw_
        fj = JobCounter("fj", max_L)
        m.d.comb += [self.done.eq(fj.k), self.jt.eq(fj.jt)]
        with m.If(self.start):
            m.d.sync += fj.reset(self.geom)
        fv = Signal()               # stage A: the element whose memory words are being read
        f_op = Signal(FrontOp)
        f_last = Signal()
        f_max = Signal()
        f_src = Signal()
        f_sel = Signal(range(hw_))
        j = Signal(range(max(max_d, max_I) + 1))
        fvb = Signal() if self._registered else fv
        f_adv = ~fvb | self.o.ready
        f_state_max = Signal()
        f_state_stats = Signal()
        f_state_quant = Signal()
        f_n = Mux(f_state_max, 1, cols_of(geom, fj.jt))
        f_issue = f_state_max | f_state_stats | f_state_quant
        f_is_last = j == f_n - 1
        src_u = (fj.jt == JT_O) | (fj.jt == JT_DOWN)
        m.d.comb += [
            self.x.addr.eq(j), self.u.addr.eq(j),
            self.a.addr.eq(fj.slot * nw + j // hw_), self.c.addr.eq(fj.slot * nw + j // hw_),
            self.x.en.eq(f_adv), self.u.en.eq(f_adv), self.a.en.eq(f_adv), self.c.en.eq(f_adv),
        ]
        with m.If(f_adv):
            m.d.sync += [fv.eq(f_issue), f_last.eq(f_is_last), f_max.eq(f_state_max), f_src.eq(src_u),
                         f_sel.eq(j % hw_),
                         f_op.eq(Mux(f_state_max, FrontOp.MAX, Mux(f_state_stats, FrontOp.STATS, FrontOp.QUANT)))]
            with m.If(f_issue):
                m.d.sync += j.eq(Mux(f_is_last, 0, j + 1))
        or_in = Mux(f_src, self.or_u, self.or_x)
        xb = self._w.x_bits
        max_elem = Mux(or_in[xb - 1], self._w.x_min, or_in[:xb - 1])
        f_vals = [f_op, f_last, f_max, f_src, f_sel, self.x.data, self.u.data, self.a.data, self.c.data]
        if self._registered:
            # stage B holds the RAM words as read (no logic between a block RAM and a register);
            # the word select and the source multiplexer sit in front of the front's own input
            # register
            regs = [Signal.like(v, name=f"{v.name}_b" if hasattr(v, "name") else None) for v in f_vals]
            with m.If(f_adv):
                m.d.sync += [fvb.eq(fv)] + [r.eq(v) for r, v in zip(regs, f_vals)]
            f_vals = regs
        fb_op, fb_last, fb_max, fb_src, fb_sel, fb_x, fb_u, fb_a, fb_c = f_vals
        m.d.comb += [
            self.o.valid.eq(fvb),
            self.o.payload.op.eq(fb_op),
            self.o.payload.last.eq(fb_last),
            self.o.payload.v.eq(Mux(fb_max, max_elem, Mux(fb_src, fb_u, fb_x))),
            self.o.payload.a.eq(fb_a[fb_sel]),
            self.o.payload.c.eq(fb_c[fb_sel]),
        ]
        slot = fj.slot
        m.d.comb += self.k_cur.eq(Mux(slot == 2, self.k[2], Mux(slot == 1, self.k[1], self.k[0])))
        self._passes(m, fj, f_adv, f_is_last, f_state_max, f_state_stats, f_state_quant)
        return m

    def _passes(self, m, fj, f_adv, f_is_last, f_state_max, f_state_stats, f_state_quant):
        """WAIT (for the job's norms and input) -> MAX -> STATS -> QUANT -> FIN (statistics taken)."""
        stats_taken = Signal()
        with m.If(self.stats_taken):
            m.d.sync += stats_taken.eq(1)
        input_ready = Mux((fj.jt == JT_I) | (fj.jt == JT_G), 1, (self.writer_done == fj.k) & self.emb_done)
        with m.FSM(name="front_seq"):
            with m.State("WAIT"):
                with m.If(self.running & (fj.k < self.geom.n_jobs) & (self.norms_arrived > fj.k) & input_ready):
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
                    m.d.sync += fj.step(self.geom.L) + [stats_taken.eq(0)]
                    m.next = "WAIT"


class SkidBuffer(wiring.Component):
    """A stream register slice that cuts the ``ready`` path and adds no latency.

    ``i.ready`` is a register ("the spare entry is free"): a producer's advance logic no longer
    sees the consumer's ``ready`` chain. While the spare entry is free, ``i`` passes through to
    ``o`` combinationally; a transfer the consumer refuses is kept in the spare entry and offered
    first, and ``i.ready`` drops for as long as it is held.

    Members
    -------
    i : In(stream of ``shape``)
    o : Out(stream of ``shape``)
    """

    def __init__(self, shape):
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        full = Signal()
        spare = Signal.like(self.i.payload)
        m.d.comb += [
            self.i.ready.eq(~full),
            self.o.valid.eq(full | self.i.valid),
            self.o.payload.eq(Mux(full, spare, self.i.payload)),
        ]
        with m.If(full):
            with m.If(self.o.ready):
                m.d.sync += full.eq(0)
        with m.Elif(self.i.valid & ~self.o.ready):
            m.d.sync += [full.eq(1), spare.eq(self.i.payload)]
        return m


class QPacker(wiring.Component):
    """Packs q values ``lanes`` wide into a FIFO of ``2 max_in / lanes + 2`` words, which the
    matrix unit loads from with its first row.

    Parameters
    ----------
    act_bits : int
    lanes : int
    max_in : int
        The longest input vector.
    variant : Variant
        ``q_skid``: a 3-entry FIFO between ``q`` and the packer (``q.ready`` is then that FIFO's
        registered level, not the packer's state) and the element's slot as a one-hot register.
        ``q_split``: the FIFO holds words of ``lanes / q_split`` values, put back together in front
        of ``act`` (the matrix unit's first row then takes a word per ``q_split`` cycles at most).

    Members
    -------
    q : In(stream of signed(act_bits))
        One job's q values after another.
    act : Out(stream of ArrayLayout(signed(act_bits), lanes))
        Packed words, element 0 in the lowest bits.
    """

    def __init__(self, *, act_bits: int, lanes: int, max_in: int, variant: Variant):
        self._act_bits = act_bits
        self._lanes = lanes
        self._max_in = max_in
        self._skid = variant.q_skid
        self._split = variant.q_split_for(lanes)
        super().__init__({
            "q": In(stream.Signature(signed(act_bits))),
            "act": Out(stream.Signature(data.ArrayLayout(signed(act_bits), lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        ab, q_split = self._act_bits, self._split
        sub = self._lanes // q_split
        q_words = 2 * self._max_in // self._lanes + 2
        m.submodules.qfifo = qfifo = SyncFIFOBuffered(width=sub * ab, depth=q_words * q_split)
        qpack = Signal(data.ArrayLayout(signed(ab), sub))
        qcnt = Signal(range(sub))
        if self._skid:
            m.submodules.qskid = qskid = SyncFIFOBuffered(width=ab, depth=3)
            q_in = stream.Signature(signed(ab)).create()
            m.d.comb += [qskid.w_data.eq(self.q.payload), qskid.w_en.eq(self.q.valid),
                         self.q.ready.eq(qskid.w_rdy),
                         q_in.payload.eq(qskid.r_data), q_in.valid.eq(qskid.r_rdy), qskid.r_en.eq(q_in.ready)]
            q_full = Signal()       # registered: "the word is full"
        else:
            q_in = self.q
            q_full = qcnt == sub - 1
        m.d.comb += q_in.ready.eq(~q_full | qfifo.w_rdy)
        packed = Signal(data.ArrayLayout(signed(ab), sub))
        m.d.comb += packed.eq(qpack)
        m.d.comb += packed[sub - 1].eq(q_in.payload)
        m.d.comb += qfifo.w_data.eq(packed.as_value())
        with m.If(q_in.valid & q_in.ready):
            if self._skid:
                # the element's slot as a one-hot register: each of the lanes x act_bits enables
                # is one gate behind the transfer, not a qcnt decoder
                qsel = Signal(sub, init=1)
                m.d.sync += qsel.eq(qsel.rotate_left(1))
                for k in range(sub - 1):        # the last element goes to the FIFO from q_in
                    with m.If(qsel[k]):
                        m.d.sync += qpack[k].eq(q_in.payload)
            else:
                m.d.sync += qpack[qcnt].eq(q_in.payload)
            with m.If(q_full):
                m.d.comb += qfifo.w_en.eq(1)
                m.d.sync += qcnt.eq(0)
                if self._skid:
                    m.d.sync += q_full.eq(0)
            with m.Else():
                m.d.sync += qcnt.eq(qcnt + 1)
                if self._skid:
                    m.d.sync += q_full.eq(qcnt == sub - 2)
        act = self.act
        if q_split == 1:
            m.d.comb += [act.valid.eq(qfifo.r_rdy), act.payload.eq(qfifo.r_data), qfifo.r_en.eq(act.ready)]
        else:
            ubuf = Signal(data.ArrayLayout(unsigned(sub * ab), q_split - 1))
            ucnt = Signal(range(q_split))
            whole = ucnt == q_split - 1
            m.d.comb += [act.valid.eq(whole & qfifo.r_rdy), act.payload.eq(Cat(ubuf, qfifo.r_data)),
                         qfifo.r_en.eq(Mux(whole, act.ready, 1))]
            with m.If(qfifo.r_rdy & qfifo.r_en):
                with m.If(whole):
                    m.d.sync += ucnt.eq(0)
                with m.Else():
                    m.d.sync += [ubuf[ucnt].eq(qfifo.r_data), ucnt.eq(ucnt + 1)]
        return m


class MatrixIssuer(wiring.Component):
    """One matrix command per job (``rows_of``, ``cols_of``, load q with the first row).

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted: back to job 0. ``running`` : In(1): a token is under way.
    cmd : Out(stream of cmd_layout)
        To the matrix unit; valid from ``start`` until every job's command is taken.
    """

    def __init__(self, cmd_layout, *, max_d: int, max_I: int, max_L: int, max_V: int):
        self._max_L = max_L
        self._packing = "packing" in cmd_layout.members
        super().__init__({
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "running": In(1),
            "cmd": Out(stream.Signature(cmd_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        mj = JobCounter("mj", self._max_L)
        geom, cmd = self.geom, self.cmd
        with m.If(self.start):
            m.d.sync += mj.reset(geom)
        m.d.comb += [cmd.valid.eq(self.running & (mj.k < geom.n_jobs)),
                     cmd.payload.rows.eq(rows_of(geom, mj.jt)), cmd.payload.cols.eq(cols_of(geom, mj.jt)),
                     cmd.payload.load.eq(1)]
        if self._packing:
            m.d.comb += cmd.payload.packing.eq(geom.packing)
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += mj.step(geom.L)
        return m
