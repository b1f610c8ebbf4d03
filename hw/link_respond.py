"""The Link's responder: :class:`ResponseSender` puts a response frame's bytes (header, payload,
trailer) into the tx stream and the CRCs; the payload part makes the bytes of every response's
payload from constants and the device state, with the prefetch register the sender takes them
from.

The payload part has two forms: :class:`MuxPayload` (the default form) is one multiplexer over
every response's packed payload; :class:`RomPayload` (the small form) reads a ROM that holds,
for every byte of every response (and of the NAK for each possible argument), either a constant
or the code of a register byte, and one multiplexer over the distinct register bytes serves all
responses.

Members of the payload part (both forms)
----------------------------------------
kind : In(PayloadKind)
    The response whose payload is sent.
index : In(range(max_payload))
    The payload byte wanted (``j``).
logits_data : In(1)
    READ_LOGITS: ``index`` is past the header; the byte is ``logit_word``'s byte ``logit_byte``,
    ready once ``logit_have``.
logit_word : In(32), logit_byte : In(2), logit_have : In(1)
    The logit being sent, its byte and whether it has arrived.
boot_id : In(32), position : In(32), load_pointer : In(range(image_bytes + 1)), load_crc : In(32),
weights_loaded : In(1), load_open : In(1), result : In(RESULT_LAYOUT), read_start : In(range(V)),
running_crc : In(32)
    The device state the responses report (``load_crc``: LOAD_BEGIN's expected image CRC;
    ``result``: the last FEED_TOKEN's; ``read_start``: READ_LOGITS' first index;
    ``running_crc``: the image CRC register, the CRC-32 of the bytes loaded so far or, after
    VERIFY_IMAGE's read-back, of the bytes read back). LOAD_STATUS reports the load's fields
    while ``load_open``, else zeros.
nak_error : In(8), op : In(8)
    The NAK's error and the request's opcode.
data : Out(8), data_ready : Out(1)
    The payload byte of ``kind`` at ``index`` and whether it is available (logits): in the
    default form combinationally, in the small form two cycles after ``kind`` / ``index``
    change (the ROM's read and the register behind its multiplexer).
last : In(range(max_payload + 1))
    The index of the payload's last byte.
stale : In(1)
    Something ``data`` depends on changes at this clock edge (the transmitter took ``pb`` and
    moves ``index`` on, or a logit arrived).
pb : Out(8), pb_ready : Out(1), pb_last : Out(1)
    ``data``, registered; ``pb_ready``: ``pb`` is the byte at ``index`` and available (low for
    one cycle after ``stale``, three in the small form); ``pb_last``: ``index == last``,
    registered with ``pb``.

Default form only: ``image_crc : In(32)`` (the loaded image's CRC, 0 while none is loaded) and
``nak_arg : In(32)`` (the NAK's argument). Small form only: ``nak_arg_sel :
In(range(len(arguments)))`` (the NAK's argument as an index into ``arguments``) and the values
the arguments name (``load_left : In(range(image_bytes + 1))``; ``running_crc``, ``position``
and ``load_pointer`` above); the image CRC reported is ``load_crc`` while weights are loaded.
The small form has no VERIFY_IMAGE response (``readback`` must be False).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

from amaranth.hdl import Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats
from mmfree_fpga.image import IMAGE_VERSION
from mmfree_fpga.protocol import (
    DEVICE_MAGIC, FEED_TOKEN_RESPONSE, HEADER_LEN, IDENTITY, LOAD_BEGIN_RESPONSE, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE,
    LOAD_STATUS_RESPONSE, NAK_PAYLOAD, POSITION, PROTOCOL_VERSION, READ_LOGITS_HEADER, READ_OUTPUT_HEADER, SYNC,
    TRAILER_LEN,
    VERIFY_IMAGE_RESPONSE, Identity, Packing, Status, formats_id,
)

from .link_fields import pack, struct_fields

__all__ = ["PayloadKind", "result_layout", "MuxPayload", "RomPayload", "ResponseSender"]


class PayloadKind(enum.Enum, shape=4):
    """Where a response's payload bytes come from."""
    IDENTITY = 0
    NAK = 1
    LOGITS = 2
    RESET_STATE = 3     # the other kinds: the response of the command of that name, from the state
    LOAD_BEGIN = 4
    LOAD_CHUNK = 5
    LOAD_COMMIT = 6
    FEED_TOKEN = 7
    LOAD_STATUS = 8
    VERIFY_IMAGE = 9
    SLICE_INFO = 10     # the slice ops' (a Link with state slots): packed by the Link (``extra``)
    LOAD_SLICE = 11
    RESET_SLOT = 12
    WRITE_RESIDUAL = 13
    FEED_SLOT = 14
    OUTPUT = 15         # READ_OUTPUT: its header (``extra``), then the values, as LOGITS


def result_layout(vocab_size: int) -> data.StructLayout:
    """The last FEED_TOKEN's result: argmax (< V), logit, cycles."""
    return data.StructLayout({"argmax": range(vocab_size), "logit": signed(32), "cycles": unsigned(32)})


@dataclasses.dataclass(frozen=True)
class _IfLoaded:
    """A response field that is ``value`` (a constant or a register) while weights are loaded,
    else 0 (IDENTITY's image size and CRC); in LOAD_STATUS: while a load is open, else 0."""
    value: object


class _ResponsePayload(wiring.Component):
    """Both forms' members and prefetch register (module docstring).

    Parameters
    ----------
    cfg : ModelConfig
        The engine's geometry (IDENTIFY).
    packing : str
        The image's trit packing (IDENTIFY).
    lanes, max_payload, step_time_ms : int
        Reported in IDENTIFY; ``max_payload`` also sizes ``index``.
    image_bytes : int
        The image size.
    arguments : list of (int or str)
        The NAK's arguments (:attr:`~.link_check.RequestCheck.arguments`).
    readback : bool
        The VERIFY_IMAGE response is among the payloads.
    formats : Formats
        The engine's number formats (IDENTIFY's formats id).
    memory_status : bool
        The ``memory_error`` member exists and sets IDENTIFY's ``Status.MEMORY_ERROR`` (engines
        whose weight memory can fail to start: a DRAM).
    extra : dict of PayloadKind -> int
        (Default form; a Link with state slots.) Payloads the Link packs itself, each a member
        ``x_<kind>`` of that many bits; then also ``stored_size`` and ``load_size`` (In(32)): the
        loaded image's size and the open load's (an image's or a slice image's), which IDENTIFY,
        LOAD_COMMIT, LOAD_STATUS and VERIFY_IMAGE report instead of the constant image size.
    """

    stale_cycles = 1

    def __init__(self, *, cfg, packing: str, lanes: int, max_payload: int, step_time_ms: int, image_bytes: int,
                 arguments, readback: bool = False, formats: Formats = FORMATS, memory_status: bool = False,
                 extra=None):
        self.extra = dict(extra or {})
        self.readback = readback
        self.formats = formats
        self.memory_status = memory_status
        self.cfg = cfg
        self.packing_code = Packing.from_export_name(packing)
        self.lanes = lanes
        self.max_payload = max_payload
        self.step_time_ms = step_time_ms
        self.image_bytes = image_bytes
        self.arguments = list(arguments)
        super().__init__({
            "kind": In(PayloadKind), "index": In(range(max_payload)), "logits_data": In(1),
            "logit_word": In(32), "logit_byte": In(2), "logit_have": In(1),
            "boot_id": In(32), "position": In(32), "load_pointer": In(range(image_bytes + 1)), "load_crc": In(32),
            "weights_loaded": In(1), "load_open": In(1), "result": In(result_layout(cfg.V)),
            "read_start": In(range(cfg.V)), "nak_error": In(8), "op": In(8), "running_crc": In(32),
            "data": Out(8), "data_ready": Out(1),
            "last": In(range(max_payload + 1)), "stale": In(1),
            "pb": Out(8), "pb_ready": Out(1), "pb_last": Out(1),
            **self._form_members(),
            **({"memory_error": In(1)} if memory_status else {}),
            **{f"x_{kind.name.lower()}": In(bits) for kind, bits in self.extra.items()},
            **({"stored_size": In(32), "load_size": In(32)} if self.extra else {}),
        })

    def _identity_values(self, m):
        status = Signal(8)
        # bit by bit (Status.WEIGHTS_LOADED, LOADING, MEMORY_ERROR): an expression of the Status
        # values would be as wide as the largest flag, a wider dynamic field for the small form's ROM
        m.d.comb += [status[Status.WEIGHTS_LOADED.bit_length() - 1].eq(self.weights_loaded),
                     status[Status.LOADING.bit_length() - 1].eq(self.load_open)]
        if self.memory_status:
            m.d.comb += status[Status.MEMORY_ERROR.bit_length() - 1].eq(self.memory_error)
        cfg = self.cfg
        return dict(
            magic=DEVICE_MAGIC, version_major=PROTOCOL_VERSION[0], version_minor=PROTOCOL_VERSION[1],
            boot_id=self.boot_id, vocab_size=cfg.V, hidden_size=cfg.d, num_layers=cfg.L, intermediate_size=cfg.I,
            lanes=self.lanes, packing=int(self.packing_code), image_version=IMAGE_VERSION,
            formats_id=formats_id(self.formats), max_payload=self.max_payload, step_time_ms=self.step_time_ms,
            status=status, position=self.position, **self._image_fields())

    def elaborate(self, platform):
        m = Module()
        self._payload(m)
        # The payload byte at index, registered (pb) before it is picked (the multiplexer and
        # the output path are in different cycles); withheld after anything it depends on changed.
        m.d.sync += [self.pb.eq(self.data), self.pb_ready.eq(self.data_ready & ~self.stale),
                     self.pb_last.eq(self.index == self.last)]
        stale = self.stale
        for _ in range(self.stale_cycles - 1):
            stale_d = Signal()
            m.d.sync += stale_d.eq(stale)
            with m.If(stale_d):
                m.d.sync += self.pb_ready.eq(0)
            stale = stale_d
        return m


class MuxPayload(_ResponsePayload):
    """The default form's payload: one multiplexer over every response's packed payload
    (module docstring); ``data`` follows ``kind`` and ``index`` in the same cycle."""

    def _form_members(self):
        return {"image_crc": In(32), "nak_arg": In(32)}

    def _image_fields(self):
        size = self.stored_size if self.extra else self.image_bytes
        return dict(image_size=Mux(self.weights_loaded, size, 0), image_crc=self.image_crc)

    def _payload(self, m):
        values = self._identity_values(m)
        identity = pack(IDENTITY, *[values[f.name] for f in dataclasses.fields(Identity)])
        nak = pack(NAK_PAYLOAD, self.nak_error, self.op, self.nak_arg)
        logits_header = pack(READ_LOGITS_HEADER, self.position, self.read_start)
        r = self.result
        stored, loading = (self.stored_size, self.load_size) if self.extra else (self.image_bytes, self.image_bytes)
        payloads = {
            PayloadKind.RESET_STATE: pack(POSITION, 0),
            PayloadKind.LOAD_BEGIN: pack(LOAD_BEGIN_RESPONSE, self.image_bytes, self.load_crc),
            PayloadKind.LOAD_CHUNK: pack(LOAD_CHUNK_RESPONSE, self.load_pointer),
            PayloadKind.LOAD_COMMIT: pack(LOAD_COMMIT_RESPONSE, stored, self.image_crc),
            PayloadKind.FEED_TOKEN: pack(FEED_TOKEN_RESPONSE, self.position, r.argmax, r.logit, r.cycles),
            PayloadKind.IDENTITY: identity,
            PayloadKind.NAK: nak,
            PayloadKind.LOAD_STATUS: pack(LOAD_STATUS_RESPONSE, *[Mux(self.load_open, v, 0) for v in (
                loading, self.load_crc, self.load_pointer, self.running_crc)]),
        }
        if self.readback:
            payloads[PayloadKind.VERIFY_IMAGE] = pack(VERIFY_IMAGE_RESPONSE, stored, self.running_crc)
        payloads.update({kind: getattr(self, f"x_{kind.name.lower()}") for kind in self.extra
                         if kind != PayloadKind.OUTPUT})
        j = self.index
        with m.Switch(self.kind):
            for kind, value in payloads.items():
                with m.Case(kind):
                    m.d.comb += [self.data.eq(value.word_select(j[:(len(value) // 8 - 1).bit_length()], 8)),
                                 self.data_ready.eq(1)]
            headers = [(PayloadKind.LOGITS, logits_header)]
            if PayloadKind.OUTPUT in self.extra:
                headers.append((PayloadKind.OUTPUT, self.x_output))
            for kind, header in headers:
                with m.Case(kind):
                    with m.If(~self.logits_data):
                        m.d.comb += [self.data.eq(header.word_select(
                            j[:(len(header) // 8 - 1).bit_length()], 8)), self.data_ready.eq(1)]
                    with m.Else():
                        m.d.comb += [self.data.eq(self.logit_word.word_select(self.logit_byte, 8)),
                                     self.data_ready.eq(self.logit_have)]


class RomPayload(_ResponsePayload):
    """The small form's payload: the response ROM (module docstring). A ROM entry holds a constant
    or a register byte's code: its index in a group of eight and its group, both one-hot, so
    the multiplexer behind the ROM is an AND-OR per group and an AND-OR of the groups, four
    LUTs deep. ``data`` is ready two cycles after ``kind`` / ``index`` change."""

    stale_cycles = 3    # (the ROM and the register behind its multiplexer add two cycles)
    GROUP = 8

    def _form_members(self):
        if self.readback:
            raise ValueError("the small form's response ROM has no VERIFY_IMAGE response (readback=False)")
        return {"nak_arg_sel": In(range(len(self.arguments))), "load_left": In(range(self.image_bytes + 1))}

    def _image_fields(self):
        return dict(image_size=_IfLoaded(self.image_bytes), image_crc=_IfLoaded(self.load_crc))

    def _programs(self, m):
        values = self._identity_values(m)
        r = self.result
        programs = {
            PayloadKind.IDENTITY: (IDENTITY, [values[f.name] for f in dataclasses.fields(Identity)]),
            PayloadKind.RESET_STATE: (POSITION, [0]),
            PayloadKind.LOAD_BEGIN: (LOAD_BEGIN_RESPONSE, [self.image_bytes, self.load_crc]),
            PayloadKind.LOAD_CHUNK: (LOAD_CHUNK_RESPONSE, [self.load_pointer]),
            # (a LOAD_COMMIT's response is replayed only while its weights are loaded)
            PayloadKind.LOAD_COMMIT: (LOAD_COMMIT_RESPONSE, [self.image_bytes, self.load_crc]),
            PayloadKind.FEED_TOKEN: (FEED_TOKEN_RESPONSE, [self.position, r.argmax, r.logit, r.cycles]),
            PayloadKind.LOGITS: (READ_LOGITS_HEADER, [self.position, self.read_start]),
            # (masked while no load is open)
            PayloadKind.LOAD_STATUS: (LOAD_STATUS_RESPONSE, [_IfLoaded(v) for v in (
                self.image_bytes, self.load_crc, self.load_pointer, self.running_crc)]),
        }
        arguments = [arg if isinstance(arg, int) else getattr(self, arg) for arg in self.arguments]
        nak_programs = [(NAK_PAYLOAD, [self.nak_error, self.op, value]) for value in arguments]
        return programs, nak_programs

    def _payload(self, m):
        programs, nak_programs = self._programs(m)
        sources, keys = [], {}

        def entries(layout, values):
            """(code, constant, masked) per byte: code 0 is the constant, else source code - 1;
            masked: 0 while no weights are loaded."""
            out = []
            for (_, width), value in zip(struct_fields(layout), values):
                masked = isinstance(value, _IfLoaded)
                if masked:
                    value = value.value
                if isinstance(value, bytes):
                    value = int.from_bytes(value, "little")
                for k in range(width // 8):
                    if isinstance(value, int):
                        out.append((0, (value & ((1 << width) - 1)) >> 8 * k & 0xFF, masked))
                    elif 8 * k >= len(Value.cast(value)):
                        out.append((0, 0, masked))
                    else:
                        key = (id(value), k)
                        if key not in keys:
                            keys[key] = (len(sources) + 1, value)    # (the value kept: its id stays unique)
                            sources.append(Value.cast(value).as_unsigned().word_select(k, 8))
                        out.append((keys[key][0], 0, masked))
            return out

        # regions, each at a multiple of its size rounded up to a power of two: address = base | j
        regions = [(kind, entries(layout, values)) for kind, (layout, values) in programs.items()]
        nak_entries = [entries(layout, values) for layout, values in nak_programs]
        nak_span = 1 << (len(nak_entries[0]) - 1).bit_length()
        regions.append(("nak", [e for ent in nak_entries for e in ent + [(0, 0, False)] * (nak_span - len(ent))]))
        regions.sort(key=lambda r: -len(r[1]))
        group = self.GROUP
        n_groups = max(1, -(-len(sources) // group))
        code_bits = group + n_groups

        def code_of(n):
            return 0 if n == 0 else 1 << (n - 1) % group | 1 << ((n - 1) // group + group)

        bases, rom = {}, []
        for name, ents in regions:
            span = 1 << (len(ents) - 1).bit_length()
            base = -(-len(rom) // span) * span
            rom += [0] * (base - len(rom))
            bases[name] = base
            rom += [const | code_of(code) << 8 | masked << (8 + code_bits) for code, const, masked in ents]
        rom_depth = 1 << (len(rom) - 1).bit_length()
        rom += [0] * (rom_depth - len(rom))
        m.submodules.response_rom = memory = Memory(shape=9 + code_bits, depth=rom_depth, init=rom)
        port = memory.read_port()
        addr = Signal(range(rom_depth))
        j = self.index
        with m.Switch(self.kind):
            for kind in programs:
                with m.Case(kind):
                    span = 1 << (programs[kind][0].size - 1).bit_length()
                    m.d.comb += addr.eq(bases[kind] | j[:(span - 1).bit_length()])
            with m.Case(PayloadKind.NAK):
                m.d.comb += addr.eq(bases["nak"] | Cat(j[:(nak_span - 1).bit_length()], self.nak_arg_sel))
        m.d.comb += port.addr.eq(addr)
        const, code, masked = port.data[:8], port.data[8:8 + code_bits], port.data[8 + code_bits]
        # the multiplexer's output is registered (with the constant and the mask, to stay aligned):
        # the ROM's output, the multiplexer and pb would otherwise be one long path
        register_byte = Signal(8)
        const_r = Signal(8)
        masked_r = Signal()
        index, groups = code[:group], code[group:]
        picked = []
        for g in range(n_groups):
            members = sources[group * g:group * (g + 1)]
            in_group = functools.reduce(operator.or_, (Mux(index[k], v, 0) for k, v in enumerate(members)))
            picked.append(Mux(groups[g], in_group, 0))
        m.d.sync += [register_byte.eq(functools.reduce(operator.or_, picked)),
                     const_r.eq(const), masked_r.eq(masked)]
        # a masked byte is 0 while no weights are loaded (LOAD_STATUS: while no load is open)
        absent = Mux(self.kind == PayloadKind.LOAD_STATUS, ~self.load_open, ~self.weights_loaded)
        rom_byte = Mux(masked_r & absent, 0, const_r | register_byte)
        with m.If((self.kind == PayloadKind.LOGITS) & self.logits_data):
            m.d.comb += [self.data.eq(self.logit_word.word_select(self.logit_byte, 8)),
                         self.data_ready.eq(self.logit_have)]
        with m.Else():
            m.d.comb += [self.data.eq(rom_byte), self.data_ready.eq(1)]


class ResponseSender(wiring.Component):
    """A response frame's bytes, one at a time, into ``tx`` and then into the CRCs: the header
    (SYNC, SEQ, OP, LEN, the header CRC), the payload (from a payload part's prefetch register,
    fetching READ_LOGITS' logits from the engine on the way) and the trailer (the frame CRC).

    The Link's state machine sequences the three phases (``send_header``, ``send_payload``,
    ``send_trailer``, each held until its ``..._done``); this part chooses each byte into its
    output register once that is free. In the cycle after ``tx`` takes a byte the CRCs take it
    (``crc_*``), and only then is the next byte chosen: the payload multiplexer, the handshake
    and the CRC logic are in different cycles (one byte per three cycles at most).

    Parameters: ``vocab_size`` (logit indices) and ``max_payload`` (the longest payload);
    ``output``: READ_OUTPUT's values are sent too (member ``output`` : In(1): the response is
    READ_OUTPUT's, whose header is READ_OUTPUT_HEADER's 9 bytes; ``vocab_size`` then bounds the
    output buffer's indices).

    Members
    -------
    tx : Out(stream.Signature(8))
        The response's bytes.
    seq : In(8), op : In(8), length : In(range(HEADER_LEN + max_payload + TRAILER_LEN + 1))
        The response's SEQ, OP and LEN (fixed while it is sent).
    header_crc : In(8), frame_crc : In(16)
        The CRCs of the bytes given to them (final while ``may_pick`` is high).
    may_pick : In(1)
        The CRCs are done with the last byte (always 1 with byte-wide CRCs).
    free : Out(1)
        The next byte may be chosen: the output register is empty, its last byte has been
        through the CRCs, and ``may_pick``.
    pending : Out(1)
        A byte waits in the output register.
    send_header : In(1), header_done : Out(1)
        Send the next header byte once ``free``; ``header_done``: the last one (the header CRC)
        is chosen in this cycle.
    send_payload : In(1), payload_done : Out(1)
        Send the payload byte ``pb`` once ``free`` and ``pb_ready``, and move ``index`` on;
        ``payload_done``: it is the last (``pb_last``). While ``payload_ready`` is low, the
        logit is fetched (at most one request outstanding).
    send_trailer : In(1), trailer_done : Out(1)
        Send the trailer's next byte once ``free``; ``trailer_done``: its last.
    restart : In(1)
        A response begins: header, payload and trailer from their first bytes.
    restart_payload : In(1), advance : In(1)
        ``index`` to 0 / one on (the small form's parser reads the payload part at ``index``).
    logits : In(1)
        The response is READ_LOGITS': its payload after the header is ``logit_word``'s bytes.
    logits_begin : In(1), logits_from : In(range(vocab_size))
        A READ_LOGITS begins: its first logit is ``logits_from``.
    pb : In(8), pb_ready : In(1), pb_last : In(1), payload_ready : In(1)
        The payload part's prefetch register and whether the byte at ``index`` is available.
    index : Out(range(max_payload)), logits_data : Out(1), stale : Out(1)
        The payload byte wanted, whether it is past READ_LOGITS' header, and that something
        the payload byte depends on changes at this clock edge.
    logit_word : Out(32), logit_byte : Out(2), logit_have : Out(1)
        The logit being sent, its byte and whether it has arrived.
    logit_req : Out(stream.Signature(unsigned(32))), logit_resp : In(stream.Signature(signed(32)))
        The engine's logits, asked for in ascending order from ``logits_from``.
    crc_feed : Out(1), crc_data : Out(8), crc_start : Out(1), crc_header : Out(1), crc_frame : Out(1)
        The byte ``tx`` took in the previous cycle, for the CRCs (``crc_start``: it is the SYNC,
        which restarts them; ``crc_header`` / ``crc_frame``: it enters that CRC).
    """

    def __init__(self, *, vocab_size: int, max_payload: int, output: bool = False):
        self.vocab_size = vocab_size
        self.max_payload = max_payload
        self._output = output
        super().__init__({
            **({"output": In(1)} if output else {}),
            "tx": Out(stream.Signature(8)),
            "seq": In(8), "op": In(8), "length": In(range(HEADER_LEN + max_payload + TRAILER_LEN + 1)),
            "header_crc": In(8), "frame_crc": In(16), "may_pick": In(1), "free": Out(1), "pending": Out(1),
            "send_header": In(1), "header_done": Out(1), "send_payload": In(1), "payload_done": Out(1),
            "send_trailer": In(1), "trailer_done": Out(1),
            "restart": In(1), "restart_payload": In(1), "advance": In(1),
            "logits": In(1), "logits_begin": In(1), "logits_from": In(range(vocab_size)),
            "pb": In(8), "pb_ready": In(1), "pb_last": In(1), "payload_ready": In(1),
            "index": Out(range(max_payload)), "logits_data": Out(1), "stale": Out(1),
            "logit_word": Out(32), "logit_byte": Out(2), "logit_have": Out(1),
            "logit_req": Out(stream.Signature(unsigned(32))), "logit_resp": In(stream.Signature(signed(32))),
            "crc_feed": Out(1), "crc_data": Out(8), "crc_start": Out(1), "crc_header": Out(1), "crc_frame": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        hk = Signal(range(HEADER_LEN))      # next header (or trailer) byte
        j = self.index
        nb, nb_valid = Signal(8), Signal()   # the output register
        nb_start, nb_hcrc, nb_fcrc = Signal(), Signal(), Signal()   # its byte restarts / enters the CRCs
        fed = self.crc_feed                  # tx took nb in the previous cycle: the CRCs take it now
        logit_index = Signal(range(self.vocab_size + 1))
        logit_asked = Signal()
        m.d.comb += [self.tx.valid.eq(nb_valid), self.tx.payload.eq(nb), self.pending.eq(nb_valid),
                     self.free.eq(~nb_valid & ~fed & self.may_pick),
                     self.crc_data.eq(nb), self.crc_start.eq(nb_start), self.crc_header.eq(nb_hcrc),
                     self.crc_frame.eq(nb_fcrc), self.logit_req.payload.eq(logit_index)]

        # (the phases and the restarts exclude each other: one multiplexer per register)
        with m.If(self.send_header):
            with m.If(self.free):
                m.d.sync += [nb_valid.eq(1), hk.eq(hk + 1), nb_start.eq(hk == 0),
                             nb_hcrc.eq((hk >= 1) & (hk < HEADER_LEN - 1)), nb_fcrc.eq(hk >= 1)]
                with m.Switch(hk):
                    with m.Case(0):
                        m.d.sync += nb.eq(SYNC)
                    with m.Case(1):
                        m.d.sync += nb.eq(self.seq)
                    with m.Case(2):
                        m.d.sync += nb.eq(self.op)
                    with m.Case(3):
                        m.d.sync += nb.eq(self.length[:8])
                    with m.Case(4):
                        m.d.sync += nb.eq(self.length[8:])
                    with m.Default():
                        m.d.sync += [nb.eq(self.header_crc), hk.eq(0)]
                        m.d.comb += self.header_done.eq(1)

        with m.Elif(self.send_payload):
            with m.If(self.free & self.pb_ready):
                m.d.comb += self.stale.eq(1)
                m.d.sync += [nb.eq(self.pb), nb_valid.eq(1), nb_start.eq(0), nb_hcrc.eq(0), nb_fcrc.eq(1),
                             j.eq(j + 1)]
                header_last = READ_LOGITS_HEADER.size - 1
                if self._output:
                    header_last = Mux(self.output, READ_OUTPUT_HEADER.size - 1, header_last)
                with m.If(j == header_last):
                    m.d.sync += self.logits_data.eq(1)
                with m.If(self.logits & self.logits_data):
                    m.d.sync += self.logit_byte.eq(self.logit_byte + 1)
                    with m.If(self.logit_byte == 3):
                        m.d.sync += [self.logit_have.eq(0), logit_index.eq(logit_index + 1)]
                with m.If(self.pb_last):
                    m.d.comb += self.payload_done.eq(1)
            with m.If(~self.payload_ready):
                # fetch the next logit from the engine
                m.d.comb += [self.logit_req.valid.eq(~logit_asked), self.logit_resp.ready.eq(logit_asked)]
                with m.If(self.logit_req.valid & self.logit_req.ready):
                    m.d.sync += logit_asked.eq(1)
                with m.If(self.logit_resp.valid & self.logit_resp.ready):
                    m.d.comb += self.stale.eq(1)
                    m.d.sync += [self.logit_word.eq(self.logit_resp.payload), self.logit_have.eq(1),
                                 logit_asked.eq(0)]

        with m.Elif(self.send_trailer):
            with m.If(self.free):
                m.d.sync += [nb_valid.eq(1), nb_start.eq(0), nb_hcrc.eq(0), nb_fcrc.eq(0), hk.eq(1)]
                with m.If(hk == 0):
                    m.d.sync += nb.eq(self.frame_crc[8:])
                with m.Else():
                    m.d.sync += nb.eq(self.frame_crc[:8])
                    m.d.comb += self.trailer_done.eq(1)

        with m.Elif(self.restart):
            m.d.sync += [hk.eq(0), j.eq(0), self.logits_data.eq(0)]
        with m.Elif(self.restart_payload):
            m.d.sync += [j.eq(0), self.logits_data.eq(0)]
        with m.Elif(self.advance):
            m.d.sync += j.eq(j + 1)
        with m.If(self.logits_begin):
            m.d.sync += [logit_index.eq(self.logits_from), self.logit_have.eq(0), logit_asked.eq(0),
                         self.logit_byte.eq(0)]

        m.d.sync += fed.eq(nb_valid & self.tx.ready)
        with m.If(nb_valid & self.tx.ready):
            m.d.sync += nb_valid.eq(0)
        return m
