"""The engine's weight traffic: the :class:`Fetcher` asks the weight port for everything a token
reads, in order, and the :class:`ResponseRouter` sends each response beat where it belongs.

Request order: the embedding scale and row, then per job its norm vectors ``a`` and ``c`` and
constant ``k`` (plus the lower bounds for ``f_proj``) into one of three norm slots, and its
trits. Norms are fetched one job ahead of the trits (``N0 N1 T0 N2 T1 ...``), so the statistics
of job k+1 run while matrix k streams. Responses come in request order; each request's tag
(what it is, its slot, its length) goes through a FIFO from the fetcher to the router.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .engine_common import (JT_F, JT_LM, NORM_SLOTS, ImageElements, JobCounter, Param, Tag, Variant, geometry_layout,
                            image_elements, job_count_shape, read_port_signature, write_port_signature)
from .weight_port import ADDR_BITS, LEN_BITS, weight_request_layout

__all__ = ["tag_layout", "emb_bits", "Fetcher", "ResponseRouter"]


def emb_bits(w) -> int:
    """Bits of an embedding value (the ``emb`` stream's ``q``): int8 rows, or ``emb_bits``."""
    bits = getattr(w.fmt, "emb_bits", 8)
    return 8 if bits <= 8 else bits


def _elements_of(beat, stride: int, bits: int):
    """The low ``bits`` of each ``stride``-bit element of ``beat``, packed (a memory word)."""
    if stride == bits:
        return beat
    return Cat(*(beat[k:k + bits] for k in range(0, len(beat), stride)))


def tag_layout() -> data.StructLayout:
    """A request's tag: ``kind`` (:class:`~.engine_common.Tag`), norm ``slot``, ``count`` (beats),
    ``boff`` (byte offset of the embedding scale in its beat), ``single`` (``count == 1``, so the
    router knows a tag's first beat is its last without a comparator behind the tag FIFO)."""
    return data.StructLayout({"kind": unsigned(3), "slot": unsigned(2), "count": unsigned(LEN_BITS),
                              "boff": unsigned(4), "single": unsigned(1)})


class Fetcher(wiring.Component):
    """Issues a token's weight-port requests (module docstring), paced by the front and the writer.

    Parameters
    ----------
    beat_bytes : int
    max_d, max_I, max_L, max_V : int
        Synthesis maxima.
    elements : ImageElements
        The image's element sizes (:func:`~.engine_common.image_elements`): the embedding row's
        and the k section's lengths.
    variant : Variant
        ``param_read_ports``: 2 (members ``p0`` and ``p1``: a request's address and length are
        read at once) or 1 (``p0`` only: its length is read first and kept in a register).

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted, with its token in ``token`` : In(32).
    front_done, writer_done : In(job index)
        Jobs the front and the writer have finished: norms go into a slot only once the front is
        done with its previous job, and f_proj's lower bounds once the writer is far enough.
    p0, p1 : In(read port of the parameter RAM)
        One cycle latency; the fetcher reads ``Param`` entries.
    req : Out(stream of weight_request_layout)
        To the weight port.
    tags : Out(stream of tag_layout)
        One per request taken by the weight port, in order (an 8-entry FIFO: ``req`` waits while
        it is full).
    embedding : In(1), only with ``slices``
        The slice holds the embedding; without it a step starts from the residual written by the
        host, and no embedding is fetched.

    A request takes several cycles, so that no path runs from the parameter RAM's output through
    an adder into the weight memory: the parameter RAM is read (with one port: the length, then
    the address, kept in a register); its data is registered; address and length are computed
    into registers; then the request is offered until taken. The layer and embedding-row offsets
    are registers (running sums, shift and add): no multiplier.
    """

    def __init__(self, *, beat_bytes: int, max_d: int, max_I: int, max_L: int, max_V: int, variant: Variant,
                 elements: ImageElements = ImageElements(norm=2, lb=2, emb=1, k=8), slices: bool = False):
        self._wb = beat_bytes
        self._slices = slices
        self._max = (max_d, max_I, max_L, max_V)
        self._ports = variant.param_read_ports
        self._elements = elements
        members = {
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "token": In(32),
            "front_done": In(job_count_shape(max_L)),
            "writer_done": In(job_count_shape(max_L)),
            "p0": In(read_port_signature(unsigned(32), Param.RAM_SIZE)),
            "req": Out(stream.Signature(weight_request_layout())),
            "tags": Out(stream.Signature(tag_layout())),
        }
        if self._ports == 2:
            members["p1"] = In(read_port_signature(unsigned(32), Param.RAM_SIZE))
        if slices:
            members["embedding"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        max_d, max_I, max_L, max_V = self._max
        wb, geom = self._wb, self.geom
        lb_log = (wb - 1).bit_length()
        m.submodules.tagq = tagq = SyncFIFOBuffered(width=tag_layout().size, depth=8)
        m.d.comb += [self.tags.payload.eq(tagq.r_data), self.tags.valid.eq(tagq.r_rdy), tagq.r_en.eq(self.tags.ready)]
        tag = Signal(tag_layout())
        req = self.req
        m.d.comb += [tagq.w_data.eq(tag), tagq.w_en.eq(req.valid & req.ready)]
        ph_calc = 2 if self._ports == 2 else 3
        ph_issue = ph_calc + 1
        ph = Signal(range(ph_issue + 1))
        if self._ports == 2:
            p0, p1 = self.p0, self.p1
        else:
            p0 = SimpleNamespace(addr=Signal(6, name="p0_addr"), data=self.p0.data)
            p1 = SimpleNamespace(addr=Signal(6, name="p1_addr"), data=Signal(32, name="p1_data"))
            m.d.comb += self.p0.addr.eq(Mux(ph == 0, p1.addr, p0.addr))
        p0d = Signal.like(p0.data)
        p1d = Signal.like(p1.data)
        m.d.sync += [p0d.eq(p0.data), p1d.eq(p1.data)]
        nj = JobCounter("nj", max_L, (("layer", geom.layer_stride), ("lb", geom.lb_stride)))     # next norms
        tj = JobCounter("tj", max_L, (("layer", geom.layer_stride),))                           # next trits
        with m.If(self.start):
            m.d.sync += nj.reset(geom) + tj.reset(geom)
        # the embedding row's word offset token * d * emb / beat_bytes, by shift and add (one
        # token bit per cycle from FEED_TOKEN on, done before the fetcher asks for the row): no
        # multiplier
        tok_bits = max(1, (max_V - 1).bit_length())
        token = Signal(32)
        emb_row = Signal(ADDR_BITS)
        emb_mtok = Signal(tok_bits)
        emb_mcnt = Signal(range(tok_bits + 1))
        with m.If(self.start):
            m.d.sync += [token.eq(self.token), emb_row.eq(0), emb_mtok.eq(self.token[:tok_bits]),
                         emb_mcnt.eq(tok_bits)]
        with m.Elif(emb_mcnt != 0):
            row_words = geom.d.shift_left((self._elements.emb - 1).bit_length()) >> lb_log
            m.d.sync += [emb_row.eq((emb_row << 1) + Mux(emb_mtok[-1], row_words, 0)),
                         emb_mtok.eq(emb_mtok << 1), emb_mcnt.eq(emb_mcnt - 1)]
        req_addr = Signal(ADDR_BITS)
        req_len = Signal(LEN_BITS)
        req_tag = Signal(tag_layout())

        def request(addr, length, kind, slot=0, boff=0, nxt=None, then=()):
            if self._ports == 1:
                with m.If(ph == 1):
                    m.d.sync += p1.data.eq(self.p0.data)
            with m.If(ph == ph_calc):
                m.d.sync += [ph.eq(ph_issue), req_addr.eq(addr), req_len.eq(length), req_tag.kind.eq(kind),
                             req_tag.slot.eq(slot), req_tag.count.eq(length), req_tag.boff.eq(boff),
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

        self._sequence(m, request, ph, p0, p1, p0d, p1d, nj, tj, token, emb_row, emb_mcnt, lb_log)
        return m

    def _sequence(self, m, request, ph, p0, p1, p0d, p1d, nj, tj, token, emb_row, emb_mcnt, lb_log):
        """The request order: embedding scale and row, then norms one job ahead of trits."""
        geom, wb = self.geom, self._wb
        njt_base = nj.jt * Param.JOB_STRIDE
        tjt_base = tj.jt * Param.JOB_STRIDE
        n_layer_base = Mux(nj.jt == JT_LM, 0, nj.base["layer"])
        t_layer_base = Mux(tj.jt == JT_LM, 0, tj.base["layer"])
        emb_scale_byte = p0d + 4 * token[:max(1, (self._max[3] - 1).bit_length())]
        k_beats = -(-self._elements.k // wb)
        norm_ok = ((self.front_done + NORM_SLOTS - 1 >= nj.k)
                   & ((nj.jt != JT_F) | (self.writer_done + 5 >= nj.k)))
        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += ph.eq(0)
                    m.next = "EMBS"
                    if self._slices:
                        with m.If(~self.embedding):
                            m.next = "SEL"
            with m.State("EMBS"):
                m.d.comb += p0.addr.eq(Param.EMB_SCALE_OFF)
                request(emb_scale_byte >> lb_log, -(-4 // wb), Tag.EMBS,
                        boff=emb_scale_byte[:lb_log] if lb_log else 0, nxt="EMBR")
            with m.State("EMBR"):
                m.d.comb += [p0.addr.eq(Param.EMB_Q_OFF), p1.addr.eq(Param.EMB_ROW_BEATS)]
                with m.If(emb_mcnt == 0):
                    request(p0d + emb_row, p1d, Tag.EMBR, nxt="SEL")
            with m.State("SEL"):
                with m.If((nj.k < geom.n_jobs) & (nj.k <= tj.k + 1)):
                    with m.If(norm_ok):
                        m.d.sync += ph.eq(0)
                        with m.If(nj.jt == JT_F):
                            m.next = "LB"
                        with m.Else():
                            m.next = "NA"
                with m.Elif(tj.k < geom.n_jobs):
                    m.d.sync += ph.eq(0)
                    m.next = "TRITS"
                with m.Else():
                    m.next = "IDLE"
            with m.State("LB"):
                m.d.comb += [p0.addr.eq(Param.LB_OFF), p1.addr.eq(Param.LB_BEATS)]
                request(p0d + nj.base["lb"], p1d, Tag.LB, nxt="NA")
            with m.State("NA"):
                m.d.comb += [p0.addr.eq(njt_base + Param.A_OFF), p1.addr.eq(njt_base + Param.NORM_BEATS)]
                request(p0d + n_layer_base, p1d, Tag.A, slot=nj.slot, nxt="NC")
            with m.State("NC"):
                m.d.comb += [p0.addr.eq(njt_base + Param.C_OFF), p1.addr.eq(njt_base + Param.NORM_BEATS)]
                request(p0d + n_layer_base, p1d, Tag.C, slot=nj.slot, nxt="NK")
            with m.State("NK"):
                m.d.comb += p0.addr.eq(njt_base + Param.K_OFF)
                request(p0d + n_layer_base, k_beats, Tag.K, slot=nj.slot, nxt="SEL", then=nj.step(geom.L))
            with m.State("TRITS"):
                m.d.comb += [p0.addr.eq(tjt_base + Param.TRITS_OFF), p1.addr.eq(tjt_base + Param.TRITS_BEATS)]
                request(p0d + t_layer_base, p1d, Tag.TRITS, nxt="SEL", then=tj.step(geom.L))


class ResponseRouter(wiring.Component):
    """Routes the weight port's in-order response beats, by their requests' tags.

    Parameters
    ----------
    w : VectorWidths
    beat_bytes : int
    max_d, max_I, max_L, max_V : int
        Synthesis maxima (norm slots hold ``max(max_d, max_I)`` values).
    trit_fifo_depth : int
        Beats of the trit FIFO: enough to keep the matrix unit busy while the norms of a later
        job pass the in-order response stream (base3 leaves a fifth of the beats spare to fill it).
    variant : Variant
        ``register_beats``: norm, lower-bound, k and embedding-scale beats are registered before
        their destinations (they land a cycle later, still before their job's k, which
        ``norms_arrived`` waits for, and before the first embedding element).

    Members
    -------
    geom : In(geometry_layout)
    start : In(1)
        FEED_TOKEN accepted: no norms arrived, embedding element 0 next.
    tags : In(stream of tag_layout)
        One per request, in order; taken with its last beat.
    resp : In(stream of ArrayLayout(unsigned(8), beat_bytes))
        The weight port's response beats.
    trits : Out(stream of ArrayLayout(unsigned(8), beat_bytes))
        Trit beats, through the trit FIFO and a one-beat register slice (full rate).
    a, c, lb : In(write port)
        The norm slots (slot s at ``s * max_in`` values) and the lower bounds: a beat's elements
        (int16 or int32, uint16 or uint32: :func:`~.engine_common.image_elements`) per word,
        each as norm_bits (gate_bits) of its element.
    k : Out(ArrayLayout(unsigned(8 k_bytes), NORM_SLOTS))
        Each slot's constants: k (mantissa in bits 31:0, exponent 63:32) and with ``norm_eps``
        the eps term's (mantissa 95:64, exponent 127:96).
    norms_arrived : Out(job index)
        Jobs whose norms (k last) are all stored.
    emb_scale : Out(32)
        The token's embedding scale.
    emb : Out(stream of {q: signed(emb_bits), last})
        The embedding row, one element per cycle (``last`` on element d - 1); int8 or int32
        elements in the image.
    """

    def __init__(self, w, *, beat_bytes: int, max_d: int, max_I: int, max_L: int, max_V: int,
                 trit_fifo_depth: int, variant: Variant):
        wb = beat_bytes
        el = self._elements = image_elements(w.fmt)
        hw_ = el.per_beat(wb, "norm")
        max_in = max(max_d, max_I)
        self._w = w
        self._wb = wb
        self._max = (max_d, max_I, max_L, max_V)
        self._depth = trit_fifo_depth
        self._registered = variant.register_beats
        beat = data.ArrayLayout(unsigned(8), wb)
        norm_word = data.ArrayLayout(signed(w.norm_bits), hw_)
        lb_per = el.per_beat(wb, "lb")
        super().__init__({
            "geom": In(geometry_layout(max_d, max_I, max_L, max_V)),
            "start": In(1),
            "tags": In(stream.Signature(tag_layout())),
            "resp": In(stream.Signature(beat)),
            "trits": Out(stream.Signature(beat)),
            "a": In(write_port_signature(norm_word, NORM_SLOTS * (max_in // hw_))),
            "c": In(write_port_signature(norm_word, NORM_SLOTS * (max_in // hw_))),
            "lb": In(write_port_signature(data.ArrayLayout(unsigned(w.gate_bits), lb_per), max_d // lb_per)),
            "k": Out(data.ArrayLayout(unsigned(8 * el.k), NORM_SLOTS)),
            "norms_arrived": Out(job_count_shape(max_L)),
            "emb_scale": Out(32),
            "emb": Out(stream.Signature(data.StructLayout({"q": signed(emb_bits(w)), "last": 1}))),
        })

    def elaborate(self, platform):
        m = Module()
        rtag = self.tags.payload
        resp = self.resp
        bidx = Signal(LEN_BITS)
        dest_ready = Signal()
        beat_in = resp.valid & self.tags.valid
        xfer = beat_in & dest_ready
        m.d.comb += resp.ready.eq(self.tags.valid & dest_ready)
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
                m.d.comb += self.tags.ready.eq(1)
                m.d.sync += [bidx.eq(0), started.eq(0)]
            with m.Else():
                m.d.sync += [bidx.eq(bidx + 1), started.eq(1), left.eq(left_now - 1), last_r.eq(left_now == 2)]
        trits_ready = self._trits(m, beat_in & (rtag.kind == Tag.TRITS))
        n_data = self._norms(m, xfer, bidx)
        self._constants(m, xfer, bidx, last_beat)
        self._emb_scale(m, xfer, bidx, n_data)
        embr_ready = self._emb_row(m, xfer & (rtag.kind == Tag.EMBR))
        with m.Switch(rtag.kind):
            with m.Case(Tag.TRITS):
                m.d.comb += dest_ready.eq(trits_ready)
            with m.Case(Tag.EMBR):
                m.d.comb += dest_ready.eq(embr_ready)
            with m.Default():
                m.d.comb += dest_ready.eq(1)
        return m

    def _trits(self, m, we):
        """The trit FIFO (written on ``we``) and its register slice; returns the FIFO's w_rdy."""
        wb = self._wb
        m.submodules.tritq = tritq = SyncFIFOBuffered(width=8 * wb, depth=self._depth)
        m.d.comb += [tritq.w_data.eq(self.resp.payload.as_value()), tritq.w_en.eq(we)]
        # registered: the FIFO's block RAM output would otherwise go straight into the matrix
        # unit's decoder registers (one beat; full rate while the matrix unit takes every beat)
        trits_valid = Signal()
        trits = Signal(8 * wb, reset_less=True)
        out = self.trits
        m.d.comb += [tritq.r_en.eq(~trits_valid | out.ready), out.payload.eq(trits), out.valid.eq(trits_valid)]
        with m.If(tritq.r_rdy & tritq.r_en):
            m.d.sync += [trits.eq(tritq.r_data), trits_valid.eq(1)]
        with m.Elif(out.ready):
            m.d.sync += trits_valid.eq(0)
        return tritq.w_rdy

    def _norms(self, m, xfer, bidx):
        """Norm and lower-bound beats into their RAMs; returns the (registered) beat data."""
        max_d, max_I = self._max[:2]
        wb, rtag = self._wb, self.tags.payload
        hw_ = self._elements.per_beat(wb, "norm")
        nw = max(max_d, max_I) // hw_
        n_we = [xfer & (rtag.kind == Tag.A), xfer & (rtag.kind == Tag.C), xfer & (rtag.kind == Tag.LB)]
        n_addr, n_lbaddr, n_data = rtag.slot * nw + bidx, bidx, self.resp.payload.as_value()
        el, w = self._elements, self._w
        if self._registered:
            # the transfer logic drives registers, not block RAM enables and addresses
            regs = ([Signal(name=f"n_we{k}") for k in range(3)],
                    Signal(range(NORM_SLOTS * nw), name="n_addr"),
                    Signal(range(max_d // self._elements.per_beat(wb, "lb")), name="n_lbaddr"),
                    Signal(8 * wb, name="n_data", reset_less=True))
            m.d.sync += [r.eq(v) for r, v in zip(regs[0], n_we)]
            m.d.sync += [regs[1].eq(n_addr), regs[2].eq(n_lbaddr), regs[3].eq(n_data)]
            n_we, n_addr, n_lbaddr, n_data = regs
        norm_data = _elements_of(n_data, 8 * el.norm, w.norm_bits)
        m.d.comb += [
            self.a.addr.eq(n_addr), self.a.data.eq(norm_data), self.a.en.eq(n_we[0]),
            self.c.addr.eq(n_addr), self.c.data.eq(norm_data), self.c.en.eq(n_we[1]),
            self.lb.addr.eq(n_lbaddr), self.lb.data.eq(_elements_of(n_data, 8 * el.lb, w.gate_bits)),
            self.lb.en.eq(n_we[2]),
        ]
        return n_data

    def _constants(self, m, xfer, bidx, last_beat):
        """k beats into their slot's register; ``norms_arrived`` counts each job's last k beat."""
        wb, rtag = self._wb, self.tags.payload
        k_we, k_slot, k_bidx, k_last, k_data = (xfer & (rtag.kind == Tag.K), rtag.slot, bidx, last_beat,
                                                self.resp.payload.as_value())
        if self._registered:
            # the transfer logic does not fan out to the 3 x 64 enables of the k registers
            regs = (Signal(name="k_we"), Signal.like(k_slot, name="k_slot"), Signal.like(k_bidx, name="k_bidx"),
                    Signal(name="k_last"), Signal(8 * wb, name="k_data", reset_less=True))
            m.d.sync += [r.eq(v) for r, v in zip(regs, (k_we, k_slot, k_bidx, k_last, k_data))]
            k_we, k_slot, k_bidx, k_last, k_data = regs
        with m.If(self.start):
            m.d.sync += self.norms_arrived.eq(0)
        kb = self._elements.k
        for s in range(NORM_SLOTS):
            with m.If(k_we & (k_slot == s)):
                if wb >= kb:
                    m.d.sync += self.k[s].eq(k_data[:8 * kb])
                else:
                    for b in range(kb // wb):
                        with m.If(k_bidx == b):
                            m.d.sync += self.k[s][8 * wb * b:8 * wb * (b + 1)].eq(k_data)
        with m.If(k_we & k_last):
            m.d.sync += self.norms_arrived.eq(self.norms_arrived + 1)

    def _emb_scale(self, m, xfer, bidx, n_data):
        """The embedding scale from its beat(s); with ``register_beats`` and beats of 4 bytes or
        more from the registered beat ``n_data``, a cycle later (still before the first embedding
        element: the row's first beat comes a cycle after the scale's at the earliest)."""
        wb, rtag = self._wb, self.tags.payload
        e_we, e_sel, e_data = xfer & (rtag.kind == Tag.EMBS), rtag.boff[2:], self.resp.payload.as_value()
        if self._registered and wb >= 4:
            regs = (Signal(name="e_we"), Signal.like(e_sel, name="e_sel"))
            m.d.sync += [regs[0].eq(e_we), regs[1].eq(e_sel)]
            (e_we, e_sel), e_data = regs, n_data
        with m.If(e_we):
            if wb >= 4:
                m.d.sync += self.emb_scale.eq(e_data.word_select(e_sel, 32) if wb > 4 else e_data[:32])
            else:       # beats narrower than the 32-bit scale: 4 / wb beats, low bytes first
                for b in range(4 // wb):
                    with m.If(bidx == b):
                        m.d.sync += self.emb_scale[8 * wb * b:8 * wb * (b + 1)].eq(self.resp.payload.as_value())

    def _emb_row(self, m, we):
        """The embedding row's beats (written on ``we``), one byte per cycle out of ``emb``;
        returns whether a beat can be taken."""
        wb, max_d = self._wb, self._max[0]
        eb = self._elements.emb
        per = self._elements.per_beat(wb, "emb")
        dbuf = Signal(data.ArrayLayout(signed(8 * eb), per))
        dcnt = Signal(range(per + 1))
        dpos = Signal(range(per))
        eidx = Signal(range(max_d + 1))
        emb = self.emb
        m.d.comb += [emb.valid.eq(dcnt != 0), emb.payload.q.eq(dbuf[dpos]),
                     emb.payload.last.eq(eidx == self.geom.d - 1)]
        with m.If(emb.valid & emb.ready):
            m.d.sync += [dpos.eq(dpos + 1), dcnt.eq(dcnt - 1), eidx.eq(eidx + 1)]
        with m.If(we):
            m.d.sync += [dbuf.eq(self.resp.payload.as_value()), dcnt.eq(per), dpos.eq(0)]
        with m.If(self.start):
            m.d.sync += eidx.eq(0)
        return (dcnt == 0) | ((dcnt == 1) & emb.ready)
