"""The ternary matrix-vector unit: ``acc = T @ q`` for trits T and int8 q, additions only.

Bit-exact counterpart of :func:`mmfree_fpga.reference.integer.matvec`.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

import numpy as np

from mmfree_fpga.config import FORMATS
from mmfree_fpga.packing import PACKINGS, TRITS_PER_BYTE, pack_trits

from .trits import (TRIT_CODE, TritDecoder, TritGearbox, check_beats, check_packings, packing_code,
                    select_by_packing)

__all__ = ["PipelinedAdderTree", "TernaryMatVec"]


def _levels(n: int) -> int:
    return (n - 1).bit_length()


def _shift_add_product(a, cols, lanes: int):
    """a * cols for a ``cols`` that is a multiple of ``lanes``, as a sum of shifted copies of
    ``a`` (LUTs and carry chains; no hardware multiplier: the iCE40UP5K has 8 and the vector
    datapath uses them). With ``lanes`` a power of two cols' low bits are known zero."""
    low = (lanes & -lanes).bit_length() - 1            # trailing zero bits of every multiple
    total = 0
    for i in range(low, len(cols)):
        total = total + Mux(cols[i], a << i, 0)
    return total


class PipelinedAdderTree(wiring.Component):
    """Sum of ``n`` signed inputs through a binary tree with a register after every level.

    Exact: each level is one bit wider than the one before. An odd element at a level is
    carried to the next level through a register.

    Members
    -------
    i : In(ArrayLayout(signed(width), n))
        Addends, sampled every cycle.
    o : Out(signed(width + latency))
        Their sum, ``latency`` cycles later.

    Latency ``ceil(log2 n)`` cycles (0 for n = 1), throughput one sum per cycle. The registers
    have neither enable nor reset: they shift every cycle, and validity travels beside them.
    """

    def __init__(self, n: int, width: int):
        if n < 1 or width < 1:
            raise ValueError(f"need n >= 1 and width >= 1, got n={n}, width={width}")
        self._n = n
        self._width = width
        super().__init__({
            "i": In(data.ArrayLayout(signed(width), n)),
            "o": Out(signed(width + _levels(n))),
        })

    @property
    def latency(self) -> int:
        return _levels(self._n)

    def elaborate(self, platform):
        m = Module()
        level = [self.i[k] for k in range(self._n)]
        width = self._width
        for depth in range(self.latency):
            width += 1
            nxt = []
            for k in range(0, len(level), 2):
                s = Signal(signed(width), name=f"sum_l{depth + 1}_{k // 2}", reset_less=True)
                m.d.sync += s.eq(level[k] + level[k + 1] if k + 1 < len(level) else level[k])
                nxt.append(s)
            level = nxt
        m.d.comb += self.o.eq(level[0])
        return m


class TernaryMatVec(wiring.Component):
    """Ternary matrix-vector unit: ``acc[r] = sum_c T[r, c] * q[c]``, ``lanes`` trits per cycle.

    A *command* names the matrix size and whether a new activation vector q comes with it.
    q is written into an internal buffer of ``max_cols / lanes`` words of ``lanes`` int8 and
    reused for every row (and by later commands that do not load). The weights arrive as the
    packed trit stream of the matrix (``mmfree_fpga.packing``: row-major, one continuous trit
    stream) cut into beats of ``weight_bytes`` bytes; each command's stream starts on a beat
    boundary and its last beat is padded with any bytes (``weight_beats`` builds it). The unit
    emits one accumulator per row, in row order.

    Parameters
    ----------
    lanes : int
        Trits multiplied and added per cycle (verified from 4 to 256, powers of two or not).
    packings : tuple of str
        Trit packings decoded: ``("2bit",)``, ``("base3",)`` or both (the default), in which
        case each command selects one.
    weight_bytes : int or None
        Bytes per weight beat; each packing's beat must carry at least ``lanes`` trits.
        Default ``ceil(lanes / 4)``: one bus width sustains ``lanes`` trits per cycle for both
        packings (``2bit`` uses every beat, ``base3`` 4 beats in 5) and keeps the ``base3``
        gearbox at 5 offsets when ``lanes % 4 == 0``. ``ceil(lanes / 5)`` is the narrowest
        ``base3``-only bus, at the cost of a wider gearbox multiplexer.
    max_rows, max_cols : int
        Synthesis-time maxima of a command's ``rows`` and ``cols``. ``max_cols`` is a multiple
        of ``lanes``, at most ``FORMATS.max_features`` (which bounds the accumulator). The
        default ``max_rows`` covers the fused gate/up projection (2 I rows) and ``lm_head`` of
        vocabularies up to that size.

    Members
    -------
    cmd : In(stream.Signature(cmd_layout))
        ``rows`` (1..max_rows), ``cols`` (a multiple of ``lanes``, lanes..max_cols), ``load``
        (1: ``cols / lanes`` act beats follow; 0: reuse the buffered q, which must hold at
        least ``cols`` entries) and, with two packings, ``packing`` (``trits.packing_code``).
        Accepted only while idle (``ready`` is a register); a command with ``rows`` or
        ``cols`` 0 is accepted and does nothing.
    act : In(stream.Signature(ArrayLayout(signed(act_bits), lanes)))
        q, ``lanes`` entries per beat, entry ``i`` of beat ``w`` is ``q[w * lanes + i]``.
        Ready (a register) only while a loading command is active; loading overlaps the
        first row.
    weights : In(stream.Signature(ArrayLayout(unsigned(8), weight_bytes)))
        Packed trits, byte 0 of a beat first. Ready only while the active command still needs
        beats: exactly ``ceil(rows * cols / beat trits)`` beats per command are taken.
        ``ready`` depends on registers only (a free slot, beats still due). A beat is
        registered before it is decoded: on ECP5 the payload may come straight from a block
        RAM (a FIFO), whose output is slow.
    out : Out(stream.Signature(out_layout))
        ``acc`` (signed ``FORMATS.acc_bits``) of each row, ``last`` on the final row of a
        command. ``valid`` is a register (it comes from a FIFO).

    Latency and throughput
    ----------------------
    One group of ``lanes`` trits is issued per cycle while the gearbox holds a group (the
    weight stream keeps up), the group's q word has been loaded, and a result slot is free.
    Result slots are credits for the output FIFO (``fifo_depth`` of them, one taken when a
    row's last group issues, returned when ``out`` takes a result), so ``out`` back-pressure
    only pauses issue: the registers behind the issue stage have no enables.

    With no stalls, counting the cycle in which ``cmd`` is transferred as cycle 0, the last
    result is transferred in cycle ``N + latency`` for ``N = rows * cols / lanes`` groups,
    ``latency = 7 + ceil(log2 lanes)``: the first group issues in cycle 3 (cycle 1 takes the
    first weight beat into a register, cycle 2 into the gearbox), the last in cycle N + 2; then
    1 cycle for the q buffer's read, 1 for a register behind it, 1 of products,
    ``ceil(log2 lanes)`` of adder tree, and 2 through the output FIFO (the accumulator writes it
    combinationally). The next command is accepted the cycle after the last group issues, so
    back-to-back commands start ``N + 3`` cycles apart. With ``load``, q streams in alongside the first row and costs nothing extra if the
    act stream keeps up (one beat per cycle).
    """

    def __init__(self, *, lanes: int, packings=PACKINGS, weight_bytes: int | None = None,
                 max_rows: int = 2 * FORMATS.max_features, max_cols: int = FORMATS.max_features):
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        if max_cols < lanes or max_cols % lanes or max_cols > FORMATS.max_features:
            raise ValueError(f"max_cols must be a multiple of lanes={lanes} and at most "
                             f"FORMATS.max_features={FORMATS.max_features}, got {max_cols}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self._packings = check_packings(packings)
        if weight_bytes is None:
            weight_bytes = -(-lanes // TRITS_PER_BYTE["2bit"])
        self._beats = check_beats(lanes, weight_bytes, self._packings)
        self._lanes = lanes
        self._weight_bytes = weight_bytes
        self._max_rows = max_rows
        self._max_cols = max_cols

        fields = {
            "rows": unsigned(max_rows.bit_length()),
            "cols": unsigned(max_cols.bit_length()),
            "load": unsigned(1),
        }
        if len(self._packings) > 1:
            fields["packing"] = unsigned(1)
        self.cmd_layout = data.StructLayout(fields)
        self.act_layout = data.ArrayLayout(signed(FORMATS.act_bits), lanes)
        self.weight_layout = data.ArrayLayout(unsigned(8), weight_bytes)
        self.out_layout = data.StructLayout({"acc": signed(FORMATS.acc_bits), "last": unsigned(1)})
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout)),
            "act": In(stream.Signature(self.act_layout)),
            "weights": In(stream.Signature(self.weight_layout)),
            "out": Out(stream.Signature(self.out_layout)),
        })

    # -- parameters ----------------------------------------------------------------------
    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def packings(self) -> tuple[str, ...]:
        return self._packings

    @property
    def weight_bytes(self) -> int:
        return self._weight_bytes

    @property
    def max_rows(self) -> int:
        return self._max_rows

    @property
    def max_cols(self) -> int:
        return self._max_cols

    @property
    def tree_latency(self) -> int:
        return _levels(self._lanes)

    @property
    def latency(self) -> int:
        """Cycles from the command transfer to the last result, beyond one per group."""
        return 7 + self.tree_latency

    @property
    def fifo_depth(self) -> int:
        """Result FIFO entries: one per result in flight when every group ends a row."""
        return self.latency

    def cycles(self, rows: int, cols: int) -> int:
        """Cycles from command transfer to the last result transfer with no stalls."""
        return rows * cols // self._lanes + self.latency

    # -- host side: the bits on each stream ---------------------------------------------
    def cmd_payload(self, rows: int, cols: int, *, load: bool = True, packing: str | None = None) -> int:
        """The ``cmd`` payload as an integer."""
        fields = {"rows": rows, "cols": cols, "load": int(load)}
        if len(self._packings) > 1:
            if packing not in self._packings:
                raise ValueError(f"name the packing of this command: one of {self._packings}, not {packing!r}")
            fields["packing"] = packing_code(packing)
        elif packing not in (None, self._packings[0]):
            raise ValueError(f"this unit decodes {self._packings[0]} only, not {packing}")
        return self.cmd_layout.const(fields).as_value().value

    def act_beats(self, q) -> list[int]:
        """``act`` payloads carrying the vector q (its length a multiple of lanes)."""
        q = np.asarray(q, dtype=np.int64).reshape(-1, self._lanes)
        return [self.act_layout.const([int(v) for v in word]).as_value().value for word in q]

    def weight_beats(self, trits, packing: str) -> list[int]:
        """``weights`` payloads for the matrix ``trits``: its packed stream, the last beat padded."""
        raw = pack_trits(np.asarray(trits), packing)
        raw += bytes(-len(raw) % self._weight_bytes)
        b = self._weight_bytes
        return [int.from_bytes(raw[k:k + b], "little") for k in range(0, len(raw), b)]

    def unpack_out(self, value: int) -> tuple[int, bool]:
        """(acc, last) from an ``out`` payload integer."""
        fields = data.Const(self.out_layout, value)
        return int(fields.acc), bool(fields.last)

    # -- gateware ------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        lanes = self._lanes
        words = self._max_cols // lanes
        runtime_packing = len(self._packings) > 1

        m.submodules.decoder = decoder = TritDecoder(weight_bytes=self._weight_bytes, packings=self._packings)
        m.submodules.gearbox = gearbox = TritGearbox(lanes=lanes, weight_bytes=self._weight_bytes,
                                                     packings=self._packings)
        # (at least 2 words: a 1-word memory would have 0-bit address ports in Verilog)
        m.submodules.act_buffer = act_buffer = Memory(shape=self.act_layout, depth=max(2, words), init=[])
        act_write = act_buffer.write_port()
        act_read = act_buffer.read_port()
        m.submodules.tree = tree = PipelinedAdderTree(lanes, FORMATS.act_bits + 1)
        m.submodules.results = results = SyncFIFOBuffered(width=self.out_layout.size, depth=self.fifo_depth)

        # -- command -------------------------------------------------------------------
        busy = Signal()
        rows_left = Signal(range(self._max_rows + 1))
        cols = Signal(range(self._max_cols + 1))
        col = Signal(range(self._max_cols + 1))          # first column of the next group
        word = Signal(range(max(2, words)))                # its act buffer word (>= 1 bit)
        # Properties of the next group, kept in registers so that the issue decision (which
        # fans out to the gearbox) waits for no adder or comparator.
        first_col = Signal()
        last_col = Signal()
        last_row = Signal()
        one_group = Signal()                               # cols == lanes
        packing = Signal(1)
        loading = Signal()
        load_col = Signal(range(self._max_cols + 1))
        load_word = Signal(range(max(2, words)))
        ahead = Signal(range(words + 1))                   # q words loaded, not yet used
        feeding = Signal()
        trits_left = Signal(range(self._max_rows * self._max_cols + 1))

        cmd = self.cmd.payload
        m.d.comb += self.cmd.ready.eq(~busy)
        with m.If(self.cmd.valid & self.cmd.ready & (cmd.rows != 0) & (cmd.cols != 0)):
            m.d.sync += [
                busy.eq(1), rows_left.eq(cmd.rows), cols.eq(cmd.cols), col.eq(0), word.eq(0),
                first_col.eq(1), last_col.eq(cmd.cols == lanes), one_group.eq(cmd.cols == lanes),
                last_row.eq(cmd.rows == 1),
                loading.eq(cmd.load), load_col.eq(0), load_word.eq(0), ahead.eq(0),
                feeding.eq(1), trits_left.eq(_shift_add_product(cmd.rows, cmd.cols, lanes)),
            ]
            if runtime_packing:
                m.d.sync += packing.eq(cmd.packing)

        # -- activation buffer ------------------------------------------------------------
        m.d.comb += [
            self.act.ready.eq(loading),
            act_write.addr.eq(load_word),
            act_write.data.eq(self.act.payload),
            act_write.en.eq(self.act.valid & self.act.ready),
        ]
        with m.If(act_write.en):
            m.d.sync += [load_word.eq(load_word + 1), load_col.eq(load_col + lanes)]
            with m.If(load_col + lanes == cols):
                m.d.sync += loading.eq(0)

        # -- weights: decoder, then gearbox --------------------------------------------------
        beat = Signal(range(max(self._beats.values()) + 1))
        if runtime_packing:
            m.d.comb += [decoder.packing.eq(packing), gearbox.packing.eq(packing)]
        m.d.comb += beat.eq(select_by_packing(packing, self._beats))
        wbuf = Signal(self.weight_layout, reset_less=True)
        wbuf_valid = Signal()
        m.d.comb += [
            decoder.data.eq(wbuf),
            gearbox.i.payload.eq(decoder.codes),
            gearbox.i.valid.eq(wbuf_valid),
            self.weights.ready.eq(feeding & (~wbuf_valid | gearbox.i.ready)),
        ]
        with m.If(self.weights.valid & self.weights.ready):
            m.d.sync += [wbuf.eq(self.weights.payload), wbuf_valid.eq(1)]
        with m.Elif(gearbox.i.ready):
            m.d.sync += wbuf_valid.eq(0)
        with m.If(self.weights.valid & self.weights.ready):
            with m.If(trits_left <= beat):
                m.d.sync += feeding.eq(0)
            with m.Else():
                m.d.sync += trits_left.eq(trits_left - beat)

        # -- issue: one group per cycle -------------------------------------------------------
        credits = Signal(range(self.fifo_depth + 1), init=self.fifo_depth)
        # While q loads (during the first row), a group waits for its word: words are loaded
        # and used in the same order, so counting the words loaded ahead is enough.
        act_loaded = ~loading | (ahead != 0)
        m.d.comb += gearbox.o.ready.eq(busy & act_loaded & (credits != 0))
        issue = gearbox.o.valid & gearbox.o.ready
        with m.If(loading):
            m.d.sync += ahead.eq(ahead + act_write.en - issue)
        m.d.comb += [
            gearbox.flush.eq(issue & last_col & last_row),
            act_read.addr.eq(word),
        ]
        with m.If(issue):
            m.d.sync += first_col.eq(last_col)
            with m.If(last_col):
                m.d.sync += [
                    col.eq(0), word.eq(0), rows_left.eq(rows_left - 1),
                    last_col.eq(one_group), last_row.eq(rows_left == 2),
                ]
                with m.If(last_row):
                    m.d.sync += busy.eq(0)
            with m.Else():
                m.d.sync += [col.eq(col + lanes), word.eq(word + 1), last_col.eq(col + 2 * lanes == cols)]

        pop = self.out.valid & self.out.ready
        reserve = issue & last_col
        with m.If(reserve & ~pop):
            m.d.sync += credits.eq(credits - 1)
        with m.Elif(pop & ~reserve):
            m.d.sync += credits.eq(credits + 1)

        self._datapath(m, issue=issue, first_col=first_col, last_col=last_col, last_row=last_row,
                       group_in=gearbox.o.payload, q_in=act_read.data, tree=tree, results=results)
        return m

    def _datapath(self, m, *, issue, first_col, last_col, last_row, group_in, q_in, tree, results):
        """Trits + q -> products -> adder tree -> accumulator -> the result FIFO: a group issued
        in one cycle (``group_in``, its q word ``q_in`` read in the same cycle) reaches the
        accumulator ``3 + tree.latency`` cycles later."""
        lanes = self._lanes
        flags = data.StructLayout({"valid": 1, "first": 1, "last": 1, "end": 1})
        stage = Signal(flags)
        m.d.sync += [
            stage.valid.eq(issue), stage.first.eq(first_col),
            stage.last.eq(last_col), stage.end.eq(last_col & last_row),
        ]
        # The block RAM's output is slow (about 6 ns clock-to-out on ECP5), so q is registered
        # once more before the products; the trits wait one cycle beside it.
        # Datapath registers need no reset (the valid flags in `stage` have one), which spares
        # their reset routing.
        group = Signal(data.ArrayLayout(TRIT_CODE, lanes), reset_less=True)
        group_q = Signal(data.ArrayLayout(TRIT_CODE, lanes), reset_less=True)
        q_word = Signal(self.act_layout, reset_less=True)
        m.d.sync += [group.eq(group_in), group_q.eq(group), q_word.eq(q_in)]

        product = Signal(data.ArrayLayout(signed(FORMATS.act_bits + 1), lanes), reset_less=True)
        for i in range(lanes):
            q = q_word[i]
            nonzero, negative = group_q[i][0], group_q[i][1]
            m.d.sync += product[i].eq(Mux(nonzero, Mux(negative, -q, q), 0))
        m.d.comb += tree.i.eq(product)
        for _ in range(2 + tree.latency):
            delayed = Signal(flags)
            m.d.sync += delayed.eq(stage)
            stage = delayed

        acc = Signal(signed(FORMATS.acc_bits), reset_less=True)   # a row's first group ignores it
        acc_next = Signal(signed(FORMATS.acc_bits))
        m.d.comb += acc_next.eq(Mux(stage.first, 0, acc) + tree.o)
        with m.If(stage.valid):
            m.d.sync += acc.eq(acc_next)

        result = Signal(self.out_layout)
        m.d.comb += [
            result.acc.eq(acc_next),
            result.last.eq(stage.end),
            results.w_data.eq(result),
            results.w_en.eq(stage.valid & stage.last),
            self.out.payload.eq(results.r_data),
            self.out.valid.eq(results.r_rdy),
            results.r_en.eq(self.out.ready),
        ]
