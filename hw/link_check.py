"""The Link's request check: which NAK, if any, a complete request frame gets.

The checks are those of ``host/device_model.py``, in its order (``_execute`` and the ``_op_*``
methods): the opcode, the length, then each command's own checks; the first that fails is the
NAK's error and argument. They are computed while the frame's trailer arrives, in registered
stages, so the Link's decision reads only registers: first each comparison into a flag (and
the opcode into ``op_code``), then the first failing check into ``nak_error`` and the choice of
its argument ``nak_arg_sel`` (and, in the default form, that argument into ``nak_arg``).

Two forms: :class:`RequestCheck` (the default form) compares the request's first payload word
itself and holds the NAK's 32-bit argument; :class:`SmallRequestCheck` (the small form) takes
that comparison from the parser (``word0_differs`` / ``word0_ones``: the first word was
compared byte by byte as it arrived) and leaves the argument to the response ROM, which reads
the value ``arguments[nak_arg_sel]`` names.

Members (both forms)
--------------------
op : In(8), length : In(max(8, max_payload.bit_length())), seq : In(8)
    The frame's OP, LEN and SEQ.
args : In(8 * ARG_BYTES)
    The request's first ``ARG_BYTES`` payload bytes (byte i at bits 8i..8i+7).
in_trailer : In(1)
    The trailer is arriving: every input above and below is fixed (at least six cycles, the
    last three after the flags were registered); the verdict is registered while it is high.
position : In(32), load_pointer : In(range(image_bytes + 1)), load_open : In(1),
load_crc : In(32), running_crc : In(32), weights_loaded : In(1), logits_valid : In(1)
    The device state the checks read (``load_crc``: the expected image CRC of LOAD_BEGIN;
    ``running_crc``: the CRC-32 of the image bytes loaded so far).
cache_valid : In(1), cache_seq : In(8), cache_op : In(8)
    The last executed command (for ``replayable``).
crc_failed : In(1)
    The frame's CRC-16 failed: the NAK becomes BAD_CRC with argument 0 at the next clock edge.
op_code : Out(range(len(COMMANDS) + 1))
    The opcode as ``OP_INDEX[command]`` (0: not a command), registered.
replayable : Out(1)
    ``seq`` is the cached command's and that command is answered from the state on a
    duplicate (not one of :data:`REEXECUTED`), registered.
rejected : Out(1), nak_error : Out(8), nak_arg_sel : Out(range(len(arguments)))
    Some check failed; the first one's error code and the index of its argument in
    ``arguments``. Registered from ``in_trailer`` on (one cycle after the flags).

Default form only: ``nak_arg : Out(32)``, the argument's value, registered with ``nak_error``.
Small form only: ``word0_differs : In(1)`` (the first payload word differs from the first word of
the command's response: image size, write pointer, position), ``word0_ones : In(1)`` (every byte
of it was 0xFF) and ``load_left : Out(range(image_bytes + 1))`` (image bytes still to come,
registered), an argument value.

``arguments``: the distinct NAK arguments in ``nak_arg_sel`` order, each an int or the name of
the member whose value it is (``"position"``, ``"load_pointer"``, ``"running_crc"``,
``"load_left"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.protocol import (
    FEED_SLOT_REQUEST, FEED_TOKEN_REQUEST, LOAD_BEGIN_REQUEST, LOAD_BEGIN_RESPONSE, LOAD_CHUNK_HEADER,
    LOAD_CHUNK_RESPONSE, LOAD_SLICE_REQUEST, MAX_CHUNK, MAX_LOGITS_PER_READ, MAX_RESIDUAL_PER_WRITE, READ_LOGITS_HEADER,
    READ_LOGITS_REQUEST, READ_OUTPUT_HEADER, READ_OUTPUT_REQUEST, REQUEST_LENGTHS, SLICE_REQUEST_LENGTHS,
    WRITE_RESIDUAL_HEADER, Error, Op, SliceOp,
)

from .link_fields import field, struct_fields

__all__ = ["SliceGeometry", "slice_geometry", "COMMANDS", "SLICE_COMMANDS", "OP_INDEX", "ARG_BYTES", "SLICE_ARG_BYTES", "REEXECUTED",
           "RequestCheck", "SmallRequestCheck"]

# The opcodes a request may carry, and each one's code in ``op_code`` (0: unknown); the slice
# ops (protocol minor 2) only in a Link with state slots.
COMMANDS = [c for c in Op if c != Op.NAK]
SLICE_COMMANDS = list(SliceOp)
OP_INDEX = {c: i + 1 for i, c in enumerate(COMMANDS + SLICE_COMMANDS)}
# Request payload bytes the checks and the commands read (with the slice ops: SLICE_ARG_BYTES).
ARG_BYTES = max(max(REQUEST_LENGTHS.values()), LOAD_CHUNK_HEADER.size)
SLICE_ARG_BYTES = max(ARG_BYTES, max(SLICE_REQUEST_LENGTHS.values()), WRITE_RESIDUAL_HEADER.size)
# Commands whose duplicate is executed again (they change no state) instead of replayed.
REEXECUTED = (Op.IDENTIFY, Op.READ_LOGITS, Op.LOAD_STATUS, Op.VERIFY_IMAGE, SliceOp.SLICE_INFO, SliceOp.READ_OUTPUT)

@dataclass(frozen=True)
class SliceGeometry:
    """What a Link with state slots checks slice ops against: ``slots``, the model's hidden size
    ``d`` and ``layers``, and ``sizes``: (layer count, parts) -> slice image size, for every slice
    the engine runs (:func:`slice_geometry`); ``capacity``: the largest image its weight memory
    holds (LOAD_SLICE of a larger slice is refused, as ``DeviceModel(capacity=...)`` does)."""
    slots: int
    d: int
    layers: int
    sizes: dict
    capacity: int


def slice_geometry(cfg, packing: str, slots: int, fmt=None, capacity: int | None = None) -> SliceGeometry:
    """The :class:`SliceGeometry` of ``cfg`` and ``packing`` (``capacity`` None: the whole image)."""
    from mmfree_fpga.config import FORMATS
    from mmfree_fpga.image_slice import Slice, slice_image_size
    fmt = FORMATS if fmt is None else fmt
    sizes = {(n, parts): slice_image_size(cfg, packing, Slice.from_parts(0, n, parts), fmt)
             for n in range(cfg.L + 1) for parts in range(4) if n or parts}
    if capacity is None:
        capacity = sizes[(cfg.L, 3)]
    return SliceGeometry(slots=slots, d=cfg.d, layers=cfg.L, sizes=sizes, capacity=capacity)


for _layout in (LOAD_BEGIN_REQUEST, LOAD_CHUNK_HEADER, FEED_TOKEN_REQUEST, READ_LOGITS_REQUEST,
                LOAD_BEGIN_RESPONSE, LOAD_CHUNK_RESPONSE, READ_LOGITS_HEADER):
    assert struct_fields(_layout)[0] == (0, 32)     # the first word, compared by the small form
assert struct_fields(FEED_TOKEN_REQUEST)[0] == struct_fields(READ_LOGITS_REQUEST)[0]


class RequestCheck(wiring.Component):
    """The request check of the default form (module docstring).

    Parameters
    ----------
    vocab_size : int
        V: tokens and logit indices are below it.
    image_bytes : int
        The image size of the engine's geometry and packing.
    max_payload : int
        The largest payload the Link accepts (LEN's width; the READ_LOGITS count limit; whether
        a LOAD_CHUNK can be longer than MAX_CHUNK).
    commands : sequence of Op
        The commands the Link executes (of :data:`COMMANDS`); any other opcode is UNKNOWN_OP.
    slices : SliceGeometry or None
        With state slots (the default form only): the slice ops of :data:`SLICE_COMMANDS` are
        executed too, with the members and checks below (``Link(slots=...)``).

    Members with ``slices`` only: ``slot_position : In(32)`` (the position of the slot in the
    request's first byte), ``slice_parts : In(2)`` (the loaded slice's parts), ``load_size :
    In(range(image_bytes + 1))`` (the open load's size: the image's or a slice image's),
    ``in_valid, in_slot, in_position, in_pointer`` (the input buffer: a residual being written for
    a slot and position, and its write pointer) and ``out_valid, out_slot, out_position,
    out_logits`` (the output buffer: the last feed's logits or residual, for a slot and position).
    """

    def __init__(self, *, vocab_size: int, image_bytes: int, max_payload: int, commands=COMMANDS, slices=None):
        self.slices = slices
        every = COMMANDS + (SLICE_COMMANDS if slices is not None else [])
        if not set(commands) <= set(every):
            raise ValueError(f"commands must be among {[c.name for c in every]}")
        self.commands = [c for c in every if c in commands]
        self.arg_bytes = SLICE_ARG_BYTES if slices is not None else ARG_BYTES
        if slices is not None:
            self.output_per_read = min(MAX_LOGITS_PER_READ, (max_payload - READ_OUTPUT_HEADER.size) // 4)
            self.residual_most = min(MAX_RESIDUAL_PER_WRITE, (max_payload - WRITE_RESIDUAL_HEADER.size) // 4)
        self.vocab_size = vocab_size
        self.image_bytes = image_bytes
        self.max_payload = max_payload
        self.logits_per_read = min(MAX_LOGITS_PER_READ, (max_payload - READ_LOGITS_HEADER.size) // 4)
        self.chunk_max = LOAD_CHUNK_HEADER.size + MAX_CHUNK
        self.arguments = []
        self._argument_table()
        super().__init__(self._members())

    # -- the members ------------------------------------------------------------------------------
    def _members(self):
        return {
            "op": In(8), "length": In(max(8, self.max_payload.bit_length())), "seq": In(8),
            "args": In(8 * self.arg_bytes), "in_trailer": In(1),
            "position": In(32), "load_pointer": In(range(self.image_bytes + 1)), "load_open": In(1),
            "load_crc": In(32), "running_crc": In(32), "weights_loaded": In(1), "logits_valid": In(1),
            "cache_valid": In(1), "cache_seq": In(8), "cache_op": In(8), "crc_failed": In(1),
            "op_code": Out(range(len(COMMANDS + SLICE_COMMANDS) + 1)), "replayable": Out(1),
            "rejected": Out(1), "nak_error": Out(8), "nak_arg_sel": Out(range(len(self.arguments))),
            **self._form_members(),
            **(self._slice_members() if self.slices is not None else {}),
        }

    def _slice_members(self):
        g = self.slices
        return {"slot_position": In(32), "slice_parts": In(2), "load_size": In(range(self.image_bytes + 1)),
                "in_valid": In(1), "in_slot": In(8), "in_position": In(32), "in_pointer": In(range(g.d + 1)),
                "out_valid": In(1), "out_slot": In(8), "out_position": In(32), "out_logits": In(1)}

    def _form_members(self):
        return {"nak_arg": Out(32)}

    # -- each command's checks, in the device model's order --------------------------------------
    def _checks_of(self, c, flags):
        """(condition, error, argument) per check after the length checks; an argument is an int
        or a member name (``arguments``). ``flags``: name -> registered condition (None while
        the table of arguments is made)."""
        f = flags or {}
        if c == Op.LOAD_BEGIN:
            checks = [(f.get("begin_size"), Error.BAD_IMAGE_SIZE, self.image_bytes)]
            if self.slices is not None and self.image_bytes > self.slices.capacity:
                # the whole model is more than the weight memory holds: it runs as slices only
                checks.append((f.get("begin_over"), Error.BAD_IMAGE_SIZE, self.slices.capacity))
            return checks
        if c == Op.LOAD_CHUNK:
            return [(f.get("no_load"), Error.NO_LOAD, 0),
                    (f.get("offset"), Error.BAD_OFFSET, "load_pointer"),
                    (f.get("overrun"), Error.BAD_ARGUMENT, "load_left")]
        if c == Op.LOAD_COMMIT:
            return [(f.get("no_load"), Error.NO_LOAD, 0),
                    (f.get("incomplete"), Error.INCOMPLETE, "load_pointer"),
                    (f.get("checksum"), Error.CHECKSUM_MISMATCH, "running_crc")]
        sl = self.slices is not None
        whole = [(f.get("not_whole"), Error.NO_WEIGHTS, "slice_parts")] if sl else []
        if c in SLICE_COMMANDS:
            return self._slice_checks_of(c, f)
        if c == Op.FEED_TOKEN:
            return [(f.get("no_weights"), Error.NO_WEIGHTS, 0), *whole,
                    (f.get("token"), Error.BAD_ARGUMENT, self.vocab_size),
                    (f.get("position"), Error.POSITION_MISMATCH, "position"),
                    (f.get("last_position"), Error.BAD_ARGUMENT, 0xFFFFFFFF)]
        if c == Op.READ_LOGITS:
            return [(f.get("no_weights"), Error.NO_WEIGHTS, 0), *whole,
                    (f.get("position"), Error.POSITION_MISMATCH, "position"),
                    (f.get("read_range"), Error.BAD_ARGUMENT, self.logits_per_read)]
        if c == Op.VERIFY_IMAGE:
            return [(f.get("no_weights"), Error.NO_WEIGHTS, 0)]
        return []

    def _slice_checks_of(self, c, f):
        """The slice ops' checks (``host/device_model.py``'s ``_op_*`` of the slice ops)."""
        g = self.slices
        weights, slot = (f.get("no_weights"), Error.NO_WEIGHTS, 0), (f.get("bad_slot"), Error.BAD_ARGUMENT, g.slots)
        position = (f.get("slot_position"), Error.POSITION_MISMATCH, "slot_position")
        if c == SliceOp.LOAD_SLICE:
            return [(f.get("bad_slice"), Error.BAD_ARGUMENT, g.layers),
                    (f.get("slice_size"), Error.BAD_IMAGE_SIZE, "slice_size"),
                    (f.get("over_capacity"), Error.BAD_IMAGE_SIZE, g.capacity)]
        if c == SliceOp.RESET_SLOT:
            return [slot]
        if c == SliceOp.WRITE_RESIDUAL:
            return [weights, (f.get("has_embedding"), Error.NO_WEIGHTS, "slice_parts"), slot, position,
                    (f.get("bad_start"), Error.BAD_OFFSET, "in_pointer_ours"),
                    (f.get("past_d"), Error.BAD_ARGUMENT, "d_minus_start")]
        if c == SliceOp.FEED_SLOT:
            return [weights, slot, position, (f.get("slot_last_position"), Error.BAD_ARGUMENT, 0xFFFFFFFF),
                    (f.get("emb_token"), Error.BAD_ARGUMENT, self.vocab_size),
                    (f.get("token_nonzero"), Error.BAD_ARGUMENT, 0),
                    (f.get("input_incomplete"), Error.INCOMPLETE, "in_pointer_ours")]
        if c == SliceOp.READ_OUTPUT:
            return [weights, slot, position, (f.get("output_range"), Error.BAD_ARGUMENT, self.output_per_read)]
        return []

    def _length_checks(self, c, flags):
        f = flags or {}
        if c == SliceOp.WRITE_RESIDUAL:
            head = WRITE_RESIDUAL_HEADER.size
            return [(f.get("residual_short"), Error.BAD_LENGTH, head + 4),
                    (f.get("residual_long"), Error.BAD_LENGTH, head + 4 * self.residual_most),
                    (f.get("residual_ragged"), Error.BAD_LENGTH, "residual_len")]
        if c in SLICE_COMMANDS:
            return [(None if flags is None else ~f["len_ok"], Error.BAD_LENGTH, SLICE_REQUEST_LENGTHS[c])]
        expected = LOAD_CHUNK_HEADER.size + 1 if c == Op.LOAD_CHUNK else REQUEST_LENGTHS[c]
        too_long = ([(f.get("chunk_long"), Error.BAD_LENGTH, self.chunk_max)]
                    if c == Op.LOAD_CHUNK and self.max_payload > self.chunk_max else [])
        return too_long + [(None if flags is None else ~f["len_ok"], Error.BAD_LENGTH, expected)]

    def _argument_table(self):
        def index(arg):
            if arg not in self.arguments:
                self.arguments.append(arg)
            return self.arguments.index(arg)
        index(0)
        for c in self.commands:
            for _, _, arg in self._length_checks(c, None) + self._checks_of(c, None):
                index(arg)

    # -- the first stage: each comparison into a flag ------------------------------------------
    def _word0_flags(self, m, flag):
        """The checks of the request's first payload word (size, offset, position)."""
        position = field(self.args, FEED_TOKEN_REQUEST, 0)     # (READ_LOGITS' position: the same bytes)
        return {
            "position": flag(position != self.position, "position"),
            "begin_size": flag(field(self.args, LOAD_BEGIN_REQUEST, 0) != self.image_bytes, "begin_size"),
            "begin_over": Const(1),
            "offset": flag(field(self.args, LOAD_CHUNK_HEADER, 0) != self.load_pointer, "offset"),
            "last_position": flag(position == 0xFFFFFFFF, "last_position"),
        }

    def _overrun(self, m):
        """The chunk's data (LEN - 5 bytes) runs past the image (for LEN > 5: the length check)."""
        return self.load_pointer + self.length > self.image_bytes + LOAD_CHUNK_HEADER.size

    def _token_big(self, token):
        return token >= self.vocab_size

    def _count_big(self, count):
        return count > self.logits_per_read

    def _flags(self, m):
        def flag(cond, name):
            r = Signal(name=f"chk_{name}")
            m.d.sync += r.eq(cond)
            return r

        req_len_ok = Signal()
        with m.Switch(self.op):
            for c in self.commands:
                with m.Case(c):
                    if c == Op.LOAD_CHUNK:
                        m.d.comb += req_len_ok.eq(self.length > LOAD_CHUNK_HEADER.size)
                    elif c == SliceOp.WRITE_RESIDUAL:
                        m.d.comb += req_len_ok.eq(1)
                    elif c in SLICE_COMMANDS:
                        m.d.comb += req_len_ok.eq(self.length == SLICE_REQUEST_LENGTHS[c])
                    else:
                        m.d.comb += req_len_ok.eq(self.length == REQUEST_LENGTHS[c])
        flags = {"len_ok": flag(req_len_ok, "len_ok")}
        if self.max_payload > self.chunk_max:
            flags["chunk_long"] = flag(self.length > self.chunk_max, "chunk_long")
        with m.Switch(self.op):
            for c in self.commands:
                with m.Case(c):
                    m.d.sync += self.op_code.eq(OP_INDEX[c])
            with m.Default():
                m.d.sync += self.op_code.eq(0)

        flags.update(self._word0_flags(m, flag))
        # start + count > V on vb-bit operands (vb: the bits of V): a higher bit set in either
        # makes the sum exceed V anyway
        vb = self.vocab_size.bit_length()
        start = field(self.args, READ_LOGITS_REQUEST, 1)
        count = field(self.args, READ_LOGITS_REQUEST, 2)
        past_vocab = (start[vb:] != 0) | (count[vb:] != 0) | (start[:vb] + count[:vb] > self.vocab_size)
        flags.update(
            no_load=~self.load_open, no_weights=~self.weights_loaded,
            overrun=flag(self._overrun(m), "overrun"),
            incomplete=flag(self.load_pointer != self.image_bytes, "incomplete"),
            checksum=flag(self.running_crc != self.load_crc, "checksum"),
            token=flag(self._token_big(field(self.args, FEED_TOKEN_REQUEST, 1)), "token"),
            read_range=flag(~self.logits_valid | (count == 0) | self._count_big(count) | past_vocab, "read_range"))
        if self.slices is not None:
            flags.update(self._slice_flags(m, flag))
        reexecuted = Cat(*(self.cache_op == c for c in REEXECUTED if c in Op or c in self.commands)).any()
        m.d.sync += self.replayable.eq(self.cache_valid & (self.cache_seq == self.seq) & ~reexecuted)
        return flags

    def _slice_flags(self, m, flag):
        """The slice ops' comparisons (and the slice-aware load checks), each into a flag."""
        g, args, length = self.slices, self.args, self.length
        slot = args[:8]
        position = field(args, FEED_SLOT_REQUEST, 1)     # (WRITE_RESIDUAL's, READ_OUTPUT's: the same bytes)
        first, end, parts = (field(args, LOAD_SLICE_REQUEST, i) for i in (2, 3, 4))
        # the slice image size LOAD_SLICE wants, from a table by (layers, parts), registered first
        n = Signal(range(g.layers + 1))
        m.d.comb += n.eq(end - first)
        want = Signal(32, name="slice_want")
        self.slice_want = want
        over = Signal(name="slice_over")     # that size is more than the weight memory holds
        with m.Switch(Cat(parts[:2], n)):
            for (layers, p), size in g.sizes.items():
                with m.Case(p | (layers << 2)):
                    m.d.sync += [want.eq(size), over.eq(size > g.capacity)]
            with m.Default():
                m.d.sync += [want.eq(0), over.eq(0)]
        # the input buffer belongs to this slot and position (WRITE_RESIDUAL, FEED_SLOT)
        ours = flag(self.in_valid & (self.in_slot == slot) & (self.in_position == position), "ours")
        self.ours = ours
        start_w = args[8 * 5:8 * 7]                       # WRITE_RESIDUAL's start (u16)
        values = (length - WRITE_RESIDUAL_HEADER.size) >> 2
        token = field(args, FEED_SLOT_REQUEST, 2)
        out_start, out_count = field(args, READ_OUTPUT_REQUEST, 2), field(args, READ_OUTPUT_REQUEST, 3)
        out_len = Mux(self.out_logits, self.vocab_size, g.d)
        wide = max(self.vocab_size, g.d).bit_length() + 1
        out_past = (out_start[wide:] != 0) | (out_start[:wide] + out_count > out_len)
        emb = self.slice_parts[0]
        return dict(
            # LOAD_CHUNK and LOAD_COMMIT against the open load's size (an image's or a slice's)
            incomplete=flag(self.load_pointer != self.load_size, "load_incomplete"),
            overrun=flag(self.load_pointer + length > self.load_size + LOAD_CHUNK_HEADER.size, "load_overrun"),
            not_whole=flag(self.slice_parts != 3, "not_whole"),
            bad_slot=flag(slot >= g.slots, "bad_slot"),
            slot_position=flag(position != self.slot_position, "slot_position"),
            slot_last_position=flag(position == 0xFFFFFFFF, "slot_last_position"),
            bad_slice=flag((parts[2:] != 0) | (end < first) | ((end == first) & (parts[:2] == 0)) | (end > g.layers),
                           "bad_slice"),
            slice_size=flag(field(args, LOAD_SLICE_REQUEST, 0) != want, "slice_size"),
            over_capacity=flag(over, "over_capacity"),
            residual_short=flag(length < WRITE_RESIDUAL_HEADER.size + 4, "residual_short"),
            residual_long=flag(length > WRITE_RESIDUAL_HEADER.size + 4 * self.residual_most, "residual_long"),
            residual_ragged=flag((length - WRITE_RESIDUAL_HEADER.size)[:2] != 0, "residual_ragged"),
            has_embedding=flag(emb, "has_embedding"),
            bad_start=flag((start_w != 0) & ~(ours & (start_w == self.in_pointer)), "bad_start"),
            past_d=flag(start_w + values > g.d, "past_d"),
            emb_token=flag(emb & (token >= self.vocab_size), "emb_token"),
            token_nonzero=flag(~emb & (token != 0), "token_nonzero"),
            input_incomplete=flag(~emb & ~(ours & (self.in_pointer == g.d)), "input_incomplete"),
            output_range=flag(~self.out_valid | (self.out_slot != slot) | (self.out_position != position)
                              | (out_count == 0) | (out_count > self.output_per_read) | out_past, "output_range"),
        )

    # -- the second stage: the first failure ------------------------------------------------------
    def _argument_value(self, arg):
        if self.slices is not None:
            length, args = self.length, self.args
            values = {
                "load_left": self.load_size - self.load_pointer,
                "slice_size": self.slice_want,
                "in_pointer_ours": Mux(self.ours, self.in_pointer, 0),
                "d_minus_start": self.slices.d - args[8 * 5:8 * 7],
                "residual_len": WRITE_RESIDUAL_HEADER.size
                + ((length - WRITE_RESIDUAL_HEADER.size) & ~3)[:len(length)],
            }
            if arg in values:
                return values[arg]
        if arg == "load_left":
            return self.image_bytes - self.load_pointer
        return arg if isinstance(arg, int) else getattr(self, arg)

    def _nak_arg(self, m):
        """The third stage (default form): the chosen argument's value."""
        with m.Switch(self.nak_arg_sel):
            for i, value in enumerate(self.arguments):
                with m.Case(i):
                    m.d.sync += self.nak_arg.eq(self._argument_value(value))

    def _bad_crc(self, m):
        m.d.sync += [self.nak_error.eq(Error.BAD_CRC), self.nak_arg.eq(0)]

    def elaborate(self, platform):
        m = Module()
        flags = self._flags(m)
        with m.If(self.in_trailer):
            with m.Switch(self.op_code):
                for c in self.commands:
                    with m.Case(OP_INDEX[c]):
                        m.d.sync += self.rejected.eq(1)
                        cases = self._length_checks(c, flags) + self._checks_of(c, flags)
                        for n, (cond, err, arg) in enumerate(cases):
                            with (m.If if n == 0 else m.Elif)(cond):
                                m.d.sync += [self.nak_error.eq(err),
                                             self.nak_arg_sel.eq(self.arguments.index(arg))]
                        with m.Else():
                            m.d.sync += self.rejected.eq(0)
                with m.Default():
                    m.d.sync += [self.rejected.eq(1), self.nak_error.eq(Error.UNKNOWN_OP), self.nak_arg_sel.eq(0)]
            self._nak_arg(m)
        with m.If(self.crc_failed):
            self._bad_crc(m)
        return m


class SmallRequestCheck(RequestCheck):
    """The request check of the small form (module docstring): the first payload word is
    compared by the parser (``word0_differs``, ``word0_ones``), the NAK's argument is named by
    ``nak_arg_sel`` only, and the bytes of the image still to come are a register
    (``load_left``, also an argument)."""

    def _form_members(self):
        return {"word0_differs": In(1), "word0_ones": In(1), "load_left": Out(range(self.image_bytes + 1))}

    def _word0_flags(self, m, flag):
        return {"position": self.word0_differs, "begin_size": self.word0_differs, "offset": self.word0_differs,
                "last_position": self.word0_ones}

    def _overrun(self, m):
        # image bytes still to come, registered: load_pointer is fixed for the trailer's six
        # cycles before the checks are read (the subtractor, the comparison and the flag are
        # not one path); and that plus the chunk header's size, for the check
        load_left_h = Signal(range(self.image_bytes + LOAD_CHUNK_HEADER.size + 1))
        m.d.sync += [self.load_left.eq(self.image_bytes - self.load_pointer),
                     load_left_h.eq(self.image_bytes + LOAD_CHUNK_HEADER.size - self.load_pointer)]
        # a comparison as wide as LEN
        lb = len(self.length)
        return (load_left_h[lb:] == 0) & (self.length > load_left_h[:lb])

    def _token_big(self, token):
        vb = self.vocab_size.bit_length()
        return (token[vb:] != 0) | (token[:vb] >= self.vocab_size)

    def _count_big(self, count):
        cb = self.logits_per_read.bit_length()
        return (count[cb:] != 0) | (count[:cb] > self.logits_per_read)

    def _nak_arg(self, m):
        pass        # (the response ROM picks the argument's bytes as they are sent)

    def _bad_crc(self, m):
        m.d.sync += [self.nak_error.eq(Error.BAD_CRC), self.nak_arg_sel.eq(0)]   # (argument 0 has index 0)
