"""A Python engine that speaks the wire protocol over a byte stream: the fastest faithful device.

``DeviceModel`` is what the hardware engine is, seen from its UART: bytes in, bytes out. It
decodes frames with ``mmfree_fpga.protocol.FrameDecoder``, executes commands exactly as the
protocol module defines them, and computes with ``reference/integer.py``'s ``IntegerModel``
from the weight image it was loaded with, parsed from the raw bytes by geometry and packing
alone (``host/image.py``), as an engine does; it never sees a manifest.

It is a serve backend (``receive``/``poll``/``settle``/``power_cycle``/``close``;
``sim/backends.py``): the RTL engine in a simulator sits behind the same methods. Rules it
keeps, and the fuzz test checks:

* a rejected frame (bad CRC, unknown op, wrong length, bad argument, wrong position or
  offset, missing weights) is answered with a NAK and changes no state at all;
* a command is executed at most once: the last executed command's (SEQ, CRC-16) and its
  response are kept, and a duplicate is answered from that cache;
* frames with the RESPONSE bit (an echo, another device) are ignored without an answer;
* ``power_cycle()`` is a reset: state, weights, load progress and the reply cache are lost,
  the boot id changes and the receiver starts over.

``minor`` makes it a device of an older minor version (0: no LOAD_STATUS, no VERIFY_IMAGE;
they get UNKNOWN_OP, as a 1.0 device answers), ``readback=False`` one that cannot read its
weight memory back (VERIFY_IMAGE gets UNKNOWN_OP). ``corrupt_stored_image`` damages a byte of
the stored image (what VERIFY_IMAGE reads back), as a faulty memory would, for tests.

``slots``: the state slots of protocol 1.2's slice ops (``SliceOp``: a layer slice, residual in
and out, a recurrent state per slot; ``mmfree_fpga/protocol.py``). 0 (the default) is an engine
without them, as the gateware is unless built with slots (``LinkedEngine(slots=...)``, ``serve
--backend rtl --slots N``): the slice ops get UNKNOWN_OP. A slice computes with
the integer model's own functions (``embed_row``, ``block``, ``bitlinear``), so a token through
a chain of slices is bit for bit ``IntegerModel.step``. ``capacity``: the largest image the
weight memory holds (default: the whole model's). ``cycle_model``: a
:class:`~mmfree_fpga.config.PerfModel`; then every feed reports the cycles that model gives an
engine of ``lanes`` lanes for the slice it runs (``planner.stage_cycles``; the whole model:
``PerfModel.cycles_per_token``), not 0. They are the performance model's figures, not a counter.

``stats`` counts what happened (``commands``, ``tokens``, ``replays``, ``naks`` and
``nak_<ERROR>``, ``bad_crc``, ``ignored``, ``idle_drops``, ``power_cycles``, ``bytes_in``,
``bytes_out``; ``slice_feeds``: FEED_SLOTs, also counted in ``tokens``); tests of the gateware
link compare against these names.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig, PerfModel
from mmfree_fpga.image_slice import Slice, slice_image_size, slice_layout, whole_slice
from mmfree_fpga.protocol import (
    DEVICE_MAGIC, FEED_TOKEN_REQUEST, FEED_TOKEN_RESPONSE, FRAME_IDLE_TIMEOUT_S, LOAD_BEGIN_REQUEST,
    LOAD_BEGIN_RESPONSE, LOAD_CHUNK_HEADER, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE, LOAD_STATUS_RESPONSE,
    MAX_CHUNK, MINOR_LOAD_STATUS, VERIFY_IMAGE_RESPONSE,
    MAX_LOGITS_PER_READ, MAX_PAYLOAD, MIN_DEVICE_PAYLOAD, NAK_PAYLOAD, NAK_RESPONSE, POSITION, PROTOCOL_VERSION,
    READ_LOGITS_HEADER, READ_LOGITS_REQUEST, REQUEST_LENGTHS, RESPONSE, BadFrame, Error, Frame, FrameDecoder,
    Identity, Op, Packing, Status, crc32_image, encode_frame, formats_id,
    FEED_SLOT_REQUEST, FEED_SLOT_RESPONSE, LOAD_SLICE_REQUEST, LOAD_SLICE_RESPONSE, MAX_RESIDUAL_PER_WRITE,
    MAX_SLOTS, MINOR_SLICES, READ_OUTPUT_HEADER, READ_OUTPUT_REQUEST, RESET_SLOT_REQUEST, RESET_SLOT_RESPONSE,
    SLICE_REQUEST_LENGTHS, WRITE_RESIDUAL_HEADER, WRITE_RESIDUAL_RESPONSE, SliceInfo, SliceOp,
    residual_element_bytes,
)
from mmfree_fpga.image import IMAGE_VERSION, image_layout, image_size
from mmfree_fpga.reference.integer import IntegerModel, bitlinear, block, embed_row, parse_image, wire_logits


__all__ = ["DeviceModel", "Rejected", "SliceModel", "parse_slice"]


class Rejected(Exception):
    """A command the device answers with NAK ``error`` (and ``arg``)."""

    def __init__(self, error: Error, arg: int = 0):
        super().__init__(error.name)
        self.error, self.arg = error, arg


@dataclass
class _Load:
    size: int
    crc: int
    data: bytearray
    pointer: int = 0
    running_crc: int = 0
    slice: Slice | None = None     # LOAD_SLICE's; None: LOAD_BEGIN's whole image


@dataclass
class _Input:
    """The input buffer: a residual being written for (slot, position)."""
    slot: int
    position: int
    values: np.ndarray
    pointer: int = 0


@dataclass
class _Output:
    """The output buffer: the last feed's logits (``logits``) or residual, for (slot, position)."""
    slot: int
    position: int
    values: np.ndarray
    logits: bool


class SliceModel:
    """A slice's weights and the recurrent state of every slot; computes like ``IntegerModel``.

    ``layers``: the IntLayers of the slice (in order), ``lm_head`` (None without the head),
    ``emb_q``/``emb_scale`` (None without the embedding). ``run(slot, token=, x=)`` feeds one
    token (or a residual, int64 [d]) through the slice on ``slot``'s state and returns the
    logits (with the head) or the residual after the last layer (int64 [d])."""

    def __init__(self, cfg: ModelConfig, sl: Slice, layers, lm_head, emb_q, emb_scale, slots: int,
                 fmt=FORMATS):
        self.cfg, self.slice, self.fmt = cfg, sl, fmt
        self.layers, self.lm_head, self.emb_q, self.emb_scale = list(layers), lm_head, emb_q, emb_scale
        self.slots = slots
        self.states = [self._zero() for _ in range(slots)]

    def _zero(self) -> list[np.ndarray]:
        return [np.zeros(self.cfg.d, dtype=np.int64) for _ in self.layers]

    @property
    def h(self) -> list[np.ndarray]:
        """Every slot's state, slot by slot (for fingerprints)."""
        return [v for state in self.states for v in state]

    def reset(self, slot: int = 0) -> None:
        self.states[slot] = self._zero()

    def run(self, slot: int, token: int | None = None, x: np.ndarray | None = None) -> np.ndarray:
        if token is not None:
            x = embed_row(self.emb_q[token], int(self.emb_scale[token]), self.fmt)
        state = self.states[slot]
        for i, layer in enumerate(self.layers):
            x, state[i] = block(x, state[i], layer, self.cfg, self.fmt)
        return bitlinear(x, self.lm_head, self.fmt) if self.lm_head is not None else x

    def step(self, token: int) -> np.ndarray:
        """``IntegerModel.step`` on slot 0 (a slice holding the embedding and the head)."""
        return self.run(0, token=token)


def parse_slice(blob: bytes, cfg: ModelConfig, packing: str, sl: Slice, slots: int = 1,
                fmt=FORMATS) -> SliceModel:
    """A :class:`SliceModel` from a slice image (``mmfree_fpga.image_slice``), read as an engine
    reads it, by geometry, packing, formats and the slice alone: its sections go where a model of
    the slice's layers has them and ``parse_image`` reads that (the absent parts as zeros)."""
    from dataclasses import replace
    layout = slice_layout(cfg, packing, sl, fmt)
    if len(blob) != layout[-1].offset + layout[-1].size:
        raise ValueError(f"slice image has {len(blob)} bytes, {sl.text()} takes {layout[-1].offset + layout[-1].size}")
    if sl.is_whole(cfg):
        w = parse_image(bytes(blob), cfg, packing, fmt)
        return SliceModel(cfg, sl, w.layers, w.lm_head, w.emb_q, w.emb_scale, slots, fmt)
    sub = replace(cfg, num_hidden_layers=max(sl.layers, 1),
                  vocab_size=cfg.V if (sl.embedding or sl.head) else 1)
    where = {s.name: s for s in image_layout(sub, packing, fmt)}
    full = bytearray(image_size(sub, packing, fmt))
    for s in layout:
        name = s.name
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            name = f"layers.{int(layer) - sl.first}.{rest}"
        dst = where[name]
        full[dst.offset:dst.offset + s.size] = blob[s.offset:s.offset + s.size]
    w = parse_image(bytes(full), sub, packing, fmt)
    return SliceModel(cfg, sl, w.layers[:sl.layers], w.lm_head if sl.head else None,
                      w.emb_q if sl.embedding else None, w.emb_scale if sl.embedding else None, slots, fmt)


def _estimate_step_ms(cfg: ModelConfig) -> int:
    """Generous bound of one integer step in numpy on a slow machine."""
    return int(math.ceil(20 + cfg.ternary_weights / 1e5))


class DeviceModel:
    """The protocol engine around ``IntegerModel``, for an engine built for ``cfg`` and ``packing``.

    ``receive(data, now)`` takes bytes from the host and returns the bytes to send back;
    ``poll(now)`` lets the receiver drop a partial frame after FRAME_IDLE_TIMEOUT_S of silence.
    Thread-safe: a fault injector may call ``power_cycle`` while a server thread feeds bytes.
    ``formats``: the number formats it computes in (IDENTIFY's formats id, the image layout); its
    logits go on the wire as Q16 int32 (``wire_logits``), as an engine's do.
    """

    def __init__(self, cfg: ModelConfig, packing: str = "base3", *, lanes: int = 0,
                 step_time_ms: int | None = None, max_payload: int = MAX_PAYLOAD, seed: int | None = None,
                 minor: int = PROTOCOL_VERSION[1], readback: bool = True, slots: int = 0,
                 capacity: int | None = None, cycle_model: PerfModel | None = None,
                 formats: Formats = FORMATS):
        if not MIN_DEVICE_PAYLOAD <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [{MIN_DEVICE_PAYLOAD}, {MAX_PAYLOAD}]")
        if not 0 <= minor <= PROTOCOL_VERSION[1]:
            raise ValueError(f"minor must be in [0, {PROTOCOL_VERSION[1]}], got {minor}")
        if not (isinstance(slots, int) and 0 <= slots <= MAX_SLOTS):
            raise ValueError(f"slots must be an integer in [0, {MAX_SLOTS}], got {slots!r}")
        if slots and minor < MINOR_SLICES:
            raise ValueError(f"state slots need protocol minor {MINOR_SLICES}, got minor {minor}")
        if cycle_model is not None:
            from mmfree_fpga.hw.engine import LANES_SUPPORTED
            if lanes not in LANES_SUPPORTED:
                raise ValueError(f"a cycle model needs the engine's lanes (one of {LANES_SUPPORTED}), got {lanes}")
        self.minor = minor
        self.slots = slots
        self.cycle_model = cycle_model
        self.readback = readback and minor >= MINOR_LOAD_STATUS
        self.cfg = cfg
        self.packing = packing
        self.packing_code = Packing.from_export_name(packing)
        self.lanes = lanes
        self.max_payload = max_payload
        self.step_time_ms = _estimate_step_ms(cfg) if step_time_ms is None else step_time_ms
        self.formats = formats
        self.image_bytes = image_size(cfg, packing, formats)
        self.capacity = self.image_bytes if capacity is None else capacity
        if not 0 < self.capacity < 1 << 32:
            raise ValueError(f"capacity must be in [1, 2^32), got {capacity}")
        self.element_bytes = residual_element_bytes(formats)
        self.formats_id = formats_id(formats)
        self.stats: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self.boot_id = 0
        self.power_cycle()
        self.stats.clear()

    @property
    def description(self) -> str:
        slots = f", {self.slots} state slots (layer slices)" if self.slots else ""
        cycles = f", cycles of the performance model at {self.lanes} lanes" if self.cycle_model is not None else ""
        return f"Python device model (integer reference), packing {self.packing}{slots}{cycles}"

    # -- the engine's state ------------------------------------------------------------
    def power_cycle(self) -> None:
        """Simulated reset: loses state, weights, load progress, reply cache; new boot id."""
        with self._lock:
            boot = self._rng.getrandbits(32)
            self.boot_id = boot if boot != self.boot_id else (boot + 1) & 0xFFFFFFFF
            self._decoder = FrameDecoder(self.max_payload)
            self._last_rx = 0.0
            self._model: SliceModel | None = None
            self._slice: Slice | None = None          # the loaded weights' (whole: LOAD_BEGIN's)
            self._stored: bytearray | None = None     # the weight memory's bytes (VERIFY_IMAGE)
            self._image_crc = 0
            self._load: _Load | None = None
            self._positions = [0] * max(self.slots, 1)
            self._input: _Input | None = None
            self._output: _Output | None = None
            self._cache: tuple[int, int, bytes] | None = None
            self.stats["power_cycles"] += 1

    # slot 0 is the legacy state (FEED_TOKEN, READ_LOGITS, RESET_STATE, IDENTIFY's position)
    @property
    def _position(self) -> int:
        return self._positions[0]

    @_position.setter
    def _position(self, value: int) -> None:
        self._positions[0] = value

    @property
    def _logits(self) -> np.ndarray | None:
        """Slot 0's logits from its last feed, if the output buffer holds them."""
        out = self._output
        return out.values if out is not None and out.slot == 0 and out.logits else None

    @_logits.setter
    def _logits(self, values: np.ndarray | None) -> None:
        self._output = None if values is None else _Output(0, self._position, values, True)

    @property
    def position(self) -> int:
        return self._position

    def slot_position(self, slot: int) -> int:
        return self._positions[slot]

    @property
    def weights_loaded(self) -> bool:
        return self._model is not None

    def identity(self) -> Identity:
        status = (Status.WEIGHTS_LOADED if self._model is not None else 0) | \
                 (Status.LOADING if self._load is not None else 0)
        return Identity(
            magic=DEVICE_MAGIC, version_major=PROTOCOL_VERSION[0], version_minor=self.minor,
            boot_id=self.boot_id, vocab_size=self.cfg.V, hidden_size=self.cfg.d, num_layers=self.cfg.L,
            intermediate_size=self.cfg.I, lanes=self.lanes, packing=self.packing_code,
            image_version=IMAGE_VERSION, formats_id=self.formats_id, max_payload=self.max_payload,
            step_time_ms=self.step_time_ms, status=int(status),
            image_size=(len(self._stored) if self._stored is not None else self.image_bytes)
            if self._model is not None else 0,
            image_crc=self._image_crc if self._model is not None else 0, position=self._position)

    def fingerprint(self) -> str:
        """A digest of every piece of state a command may change (for tests)."""
        with self._lock:
            h = hashlib.sha256()
            load = self._load
            inp, out = self._input, self._output
            h.update(repr((self.boot_id, self._positions, self._image_crc, self._model is not None, self._slice,
                           None if self._stored is None else crc32_image(self._stored),
                           None if load is None else (load.size, load.crc, load.pointer, load.running_crc, load.slice),
                           None if inp is None else (inp.slot, inp.position, inp.pointer),
                           None if out is None else (out.slot, out.position, out.logits),
                           None if self._cache is None else self._cache[:2])).encode())
            if load is not None:
                h.update(load.data)
            if self._model is not None:
                for v in getattr(self._model, "h", ()):
                    h.update(v.tobytes())
            if inp is not None:
                h.update(inp.values.tobytes())
            if out is not None:
                h.update(out.values.tobytes())
            return h.hexdigest()

    def load_image(self, blob: bytes, sl: Slice | None = None) -> None:
        """Load an image directly, as if LOAD_BEGIN (or LOAD_SLICE for ``sl``)/CHUNK/COMMIT had
        carried it (serve --preload): ``blob`` is the whole image, or ``sl``'s slice image."""
        with self._lock:
            want = self.image_bytes if sl is None else slice_image_size(self.cfg, self.packing, sl, self.formats)
            if len(blob) != want:
                raise ValueError(f"image has {len(blob)} bytes, this engine takes {want}")
            if sl is not None and not self.slots:
                raise ValueError("a device without state slots holds whole images only")
            self._load = _Load(size=len(blob), crc=crc32_image(blob), data=bytearray(blob), slice=sl)
            self._install(bytes(blob), crc32_image(blob))

    def corrupt_stored_image(self, offset: int, xor: int = 0x01) -> None:
        """Flip bits ``xor`` of byte ``offset`` of the stored image, as a faulty weight memory would
        (what VERIFY_IMAGE reads back changes; IDENTIFY still reports the CRC committed)."""
        with self._lock:
            if self._stored is None:
                raise ValueError("no weights are loaded")
            if not 0 <= offset < len(self._stored) or not 0 < xor <= 0xFF:
                raise ValueError(f"offset must be in [0, {len(self._stored)}) and xor in [1, 255]")
            self._stored[offset] ^= xor

    def _install(self, blob: bytes, crc: int) -> None:
        """Commit ``blob``: the whole image, or the open load's slice."""
        sl = self._load.slice if self._load is not None else None
        sl = whole_slice(self.cfg) if sl is None else sl
        self._model = parse_slice(blob, self.cfg, self.packing, sl, max(self.slots, 1), self.formats)
        self._slice = sl
        self._stored = bytearray(blob)
        self._image_crc = crc
        self._load = None
        self._reset_all()

    def _reset_all(self) -> None:
        self._positions = [0] * max(self.slots, 1)
        self._input = None
        self._output = None
        if self._model is not None:
            for slot in range(max(self.slots, 1)):
                self._model.reset(slot) if isinstance(self._model, SliceModel) else self._model.reset()

    def slice_info(self) -> SliceInfo:
        sl, load = self._slice if self._model is not None else None, self._load
        lsl = None if load is None else (load.slice or whole_slice(self.cfg))
        return SliceInfo(slots=max(self.slots, 1), parts=sl.parts if sl else 0, first_layer=sl.first if sl else 0,
                         end_layer=sl.end if sl else 0, load_parts=lsl.parts if lsl else 0,
                         load_first_layer=lsl.first if lsl else 0, load_end_layer=lsl.end if lsl else 0,
                         capacity=self.capacity, element_bytes=self.element_bytes)

    def _cycles(self) -> int:
        if self.cycle_model is None or self._slice is None:
            return 0
        from mmfree_fpga.planner import stage_cycles
        sl = self._slice
        return int(round(stage_cycles(self.cfg, self.lanes, sl.layers, sl.embedding, sl.head, self.cycle_model)))

    # -- the byte stream -----------------------------------------------------------------
    def receive(self, data: bytes, now: float | None = None) -> bytes:
        with self._lock:
            self._last_rx = time.monotonic() if now is None else now
            self.stats["bytes_in"] += len(data)
            return self._answer(self._decoder.feed(data))

    def poll(self, now: float | None = None) -> bytes:
        now = time.monotonic() if now is None else now
        with self._lock:
            out = b""
            while self._decoder.pending and now - self._last_rx >= FRAME_IDLE_TIMEOUT_S:
                self.stats["idle_drops"] += 1
                out += self._answer(self._decoder.abandon())
            return out

    def settle(self, timeout: float | None = None) -> int:
        """The host went away: let a partial frame time out, as FRAME_IDLE_TIMEOUT_S of silence
        would, and discard what that produces (answers to frames behind a false start, NAKs).
        Every other answer left with ``receive``. Returns the bytes discarded."""
        with self._lock:
            return len(self.poll(math.inf))     # (any time later than the timeout)

    def close(self) -> None:
        pass

    def _answer(self, events) -> bytes:
        out = bytearray()
        for event in events:
            if event.op & RESPONSE:
                self.stats["ignored"] += 1
                continue
            if isinstance(event, BadFrame):
                self.stats["bad_crc"] += 1
                out += self._nak(event.seq, event.op, Error.BAD_CRC, 0)
                continue
            out += self._command(event)
        self.stats["bytes_out"] += len(out)
        return bytes(out)

    def _nak(self, seq: int, op: int, error: Error, arg: int) -> bytes:
        self.stats["naks"] += 1
        self.stats[f"nak_{error.name}"] += 1
        return encode_frame(seq, NAK_RESPONSE, NAK_PAYLOAD.pack(error, op, arg & 0xFFFFFFFF))

    def _command(self, frame: Frame) -> bytes:
        if self._cache is not None and self._cache[:2] == (frame.seq, frame.crc):
            self.stats["replays"] += 1
            return self._cache[2]
        try:
            payload = self._execute(frame.op, frame.payload)
        except Rejected as r:
            return self._nak(frame.seq, frame.op, r.error, r.arg)
        response = encode_frame(frame.seq, frame.op | RESPONSE, payload)
        self._cache = (frame.seq, frame.crc, response)
        self.stats["commands"] += 1
        return response

    # -- commands: each validates everything before it changes anything ---------------------
    def _execute(self, op: int, payload: bytes) -> bytes:
        try:
            command = Op(op)
        except ValueError:
            return self._execute_slice_op(op, payload)
        if command == Op.NAK or (command in (Op.LOAD_STATUS, Op.VERIFY_IMAGE) and self.minor < MINOR_LOAD_STATUS) \
                or (command == Op.VERIFY_IMAGE and not self.readback):
            raise Rejected(Error.UNKNOWN_OP)
        if command == Op.LOAD_CHUNK:
            if len(payload) <= LOAD_CHUNK_HEADER.size:
                raise Rejected(Error.BAD_LENGTH, LOAD_CHUNK_HEADER.size + 1)
            if len(payload) > LOAD_CHUNK_HEADER.size + MAX_CHUNK:
                raise Rejected(Error.BAD_LENGTH, LOAD_CHUNK_HEADER.size + MAX_CHUNK)
        elif len(payload) != REQUEST_LENGTHS[command]:
            raise Rejected(Error.BAD_LENGTH, REQUEST_LENGTHS[command])
        return getattr(self, f"_op_{command.name.lower()}")(payload)

    def _op_identify(self, payload: bytes) -> bytes:
        return self.identity().pack()

    def _op_reset_state(self, payload: bytes) -> bytes:
        self._reset_slot(0)
        return POSITION.pack(0)

    def _reset_slot(self, slot: int) -> None:
        self._positions[slot] = 0
        if self._input is not None and self._input.slot == slot:
            self._input = None
        if self._output is not None and self._output.slot == slot:
            self._output = None
        if self._model is not None:
            self._model.reset(slot) if isinstance(self._model, SliceModel) else self._model.reset()

    def _needs_whole(self) -> None:
        """FEED_TOKEN and READ_LOGITS: slot 0 of a device holding the embedding and the head."""
        sl = self._slice
        if sl is not None and not (sl.embedding and sl.head):
            raise Rejected(Error.NO_WEIGHTS, sl.parts)

    def _op_load_begin(self, payload: bytes) -> bytes:
        size, crc = LOAD_BEGIN_REQUEST.unpack(payload)
        if size != self.image_bytes:
            raise Rejected(Error.BAD_IMAGE_SIZE, self.image_bytes)
        if size > self.capacity:           # the whole model is more than the memory holds: slices only
            raise Rejected(Error.BAD_IMAGE_SIZE, self.capacity)
        self._begin_load(_Load(size=size, crc=crc, data=bytearray(size)))
        return LOAD_BEGIN_RESPONSE.pack(size, crc)

    def _begin_load(self, load: _Load) -> None:
        self._model = None
        self._slice = None
        self._stored = None
        self._image_crc = 0
        self._reset_all()
        self._load = load

    def _op_load_chunk(self, payload: bytes) -> bytes:
        (offset,) = LOAD_CHUNK_HEADER.unpack_from(payload)
        data = payload[LOAD_CHUNK_HEADER.size:]
        load = self._load
        if load is None:
            raise Rejected(Error.NO_LOAD)
        if offset != load.pointer:
            raise Rejected(Error.BAD_OFFSET, load.pointer)
        if offset + len(data) > load.size:
            raise Rejected(Error.BAD_ARGUMENT, load.size - offset)
        load.data[offset:offset + len(data)] = data
        load.pointer += len(data)
        load.running_crc = crc32_image(data, load.running_crc)
        return LOAD_CHUNK_RESPONSE.pack(load.pointer)

    def _op_load_commit(self, payload: bytes) -> bytes:
        load = self._load
        if load is None:
            raise Rejected(Error.NO_LOAD)
        if load.pointer != load.size:
            raise Rejected(Error.INCOMPLETE, load.pointer)
        if load.running_crc != load.crc:
            raise Rejected(Error.CHECKSUM_MISMATCH, load.running_crc)
        self._install(bytes(load.data), load.crc)
        return LOAD_COMMIT_RESPONSE.pack(load.size, load.crc)

    def _op_feed_token(self, payload: bytes) -> bytes:
        position, token = FEED_TOKEN_REQUEST.unpack(payload)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        self._needs_whole()
        if token >= self.cfg.V:
            raise Rejected(Error.BAD_ARGUMENT, self.cfg.V)
        if position != self._position:
            raise Rejected(Error.POSITION_MISMATCH, self._position)
        if position == 0xFFFFFFFF:
            raise Rejected(Error.BAD_ARGUMENT, position)
        logits = self._model.step(token)
        best = IntegerModel.argmax(logits)
        self._position += 1
        self._logits = logits
        self.stats["tokens"] += 1
        return FEED_TOKEN_RESPONSE.pack(self._position, best, int(wire_logits(logits[best:best + 1], self.formats)[0]),
                                        self._cycles())

    def _op_read_logits(self, payload: bytes) -> bytes:
        position, start, count = READ_LOGITS_REQUEST.unpack(payload)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        self._needs_whole()
        if position != self._position:
            raise Rejected(Error.POSITION_MISMATCH, self._position)
        per_read = min(MAX_LOGITS_PER_READ, (self.max_payload - READ_LOGITS_HEADER.size) // 4)
        if self._logits is None or not 1 <= count <= per_read or start + count > self.cfg.V:
            raise Rejected(Error.BAD_ARGUMENT, per_read)
        values = wire_logits(self._logits[start:start + count], self.formats).astype("<i4").tobytes()
        return READ_LOGITS_HEADER.pack(position, start) + values

    def _op_load_status(self, payload: bytes) -> bytes:
        load = self._load
        if load is None:
            return LOAD_STATUS_RESPONSE.pack(0, 0, 0, 0)
        return LOAD_STATUS_RESPONSE.pack(load.size, load.crc, load.pointer, load.running_crc)

    def _op_verify_image(self, payload: bytes) -> bytes:
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        return VERIFY_IMAGE_RESPONSE.pack(len(self._stored), crc32_image(self._stored))

    # -- the slice ops (protocol 1.2, with state slots) ------------------------------------------
    def _execute_slice_op(self, op: int, payload: bytes) -> bytes:
        try:
            command = SliceOp(op)
        except ValueError:
            raise Rejected(Error.UNKNOWN_OP) from None
        if not self.slots:
            raise Rejected(Error.UNKNOWN_OP)
        if command == SliceOp.WRITE_RESIDUAL:
            head, e = WRITE_RESIDUAL_HEADER.size, self.element_bytes
            most = min(MAX_RESIDUAL_PER_WRITE, (self.max_payload - head) // e)
            n = len(payload) - head
            if n < e:
                raise Rejected(Error.BAD_LENGTH, head + e)
            if n > most * e:
                raise Rejected(Error.BAD_LENGTH, head + most * e)
            if n % e:
                raise Rejected(Error.BAD_LENGTH, head + n // e * e)
        elif len(payload) != SLICE_REQUEST_LENGTHS[command]:
            raise Rejected(Error.BAD_LENGTH, SLICE_REQUEST_LENGTHS[command])
        return getattr(self, f"_op_{command.name.lower()}")(payload)

    def _check_slot(self, slot: int) -> None:
        if slot >= self.slots:
            raise Rejected(Error.BAD_ARGUMENT, self.slots)

    def _check_position(self, slot: int, position: int) -> None:
        if position != self._positions[slot]:
            raise Rejected(Error.POSITION_MISMATCH, self._positions[slot])

    def _op_slice_info(self, payload: bytes) -> bytes:
        return self.slice_info().pack()

    def _op_load_slice(self, payload: bytes) -> bytes:
        size, crc, first, end, parts = LOAD_SLICE_REQUEST.unpack(payload)
        try:
            sl = Slice.from_parts(first, end, parts)
            sl.check(self.cfg)
        except ValueError:
            raise Rejected(Error.BAD_ARGUMENT, self.cfg.L) from None
        want = slice_image_size(self.cfg, self.packing, sl, self.formats)
        if size != want:
            raise Rejected(Error.BAD_IMAGE_SIZE, want)
        if size > self.capacity:
            raise Rejected(Error.BAD_IMAGE_SIZE, self.capacity)
        self._begin_load(_Load(size=size, crc=crc, data=bytearray(size), slice=sl))
        return LOAD_SLICE_RESPONSE.pack(size, crc, first, end, parts)

    def _op_reset_slot(self, payload: bytes) -> bytes:
        (slot,) = RESET_SLOT_REQUEST.unpack(payload)
        self._check_slot(slot)
        self._reset_slot(slot)
        return RESET_SLOT_RESPONSE.pack(slot, 0)

    def _op_write_residual(self, payload: bytes) -> bytes:
        slot, position, start = WRITE_RESIDUAL_HEADER.unpack_from(payload)
        dtype = "<i4" if self.element_bytes == 4 else "<i8"
        values = np.frombuffer(payload, dtype=dtype, offset=WRITE_RESIDUAL_HEADER.size).astype(np.int64)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        sl = self._slice or whole_slice(self.cfg)
        if sl.embedding:
            raise Rejected(Error.NO_WEIGHTS, sl.parts)
        self._check_slot(slot)
        self._check_position(slot, position)
        buf = self._input
        ours = buf is not None and (buf.slot, buf.position) == (slot, position)
        if start != 0 and not (ours and start == buf.pointer):
            raise Rejected(Error.BAD_OFFSET, buf.pointer if ours else 0)
        if start + len(values) > self.cfg.d:
            raise Rejected(Error.BAD_ARGUMENT, self.cfg.d - start)
        bad = np.flatnonzero((values < self.formats.x_min) | (values > self.formats.x_max))
        if bad.size:
            raise Rejected(Error.BAD_ARGUMENT, int(bad[0]))
        if start == 0:
            buf = self._input = _Input(slot, position, np.zeros(self.cfg.d, dtype=np.int64))
        buf.values[start:start + len(values)] = values
        buf.pointer = start + len(values)
        return WRITE_RESIDUAL_RESPONSE.pack(slot, position, buf.pointer)

    def _op_feed_slot(self, payload: bytes) -> bytes:
        slot, position, token = FEED_SLOT_REQUEST.unpack(payload)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        self._check_slot(slot)
        self._check_position(slot, position)
        if position == 0xFFFFFFFF:
            raise Rejected(Error.BAD_ARGUMENT, position)
        sl = self._slice or whole_slice(self.cfg)
        if sl.embedding:
            if token >= self.cfg.V:
                raise Rejected(Error.BAD_ARGUMENT, self.cfg.V)
            out = self._model.run(slot, token=token)
        else:
            if token != 0:
                raise Rejected(Error.BAD_ARGUMENT, 0)
            buf = self._input
            ours = buf is not None and (buf.slot, buf.position) == (slot, position)
            if not ours or buf.pointer != self.cfg.d:
                raise Rejected(Error.INCOMPLETE, buf.pointer if ours else 0)
            out = self._model.run(slot, x=buf.values.copy())
            self._input = None
        self._positions[slot] += 1
        self._output = _Output(slot, self._positions[slot], out, sl.head)
        self.stats["tokens"] += 1
        self.stats["slice_feeds"] += 1
        best = IntegerModel.argmax(out) if sl.head else 0
        logit = int(wire_logits(out[best:best + 1], self.formats)[0]) if sl.head else 0
        return FEED_SLOT_RESPONSE.pack(self._positions[slot], best, logit, self._cycles())

    def _op_read_output(self, payload: bytes) -> bytes:
        slot, position, start, count = READ_OUTPUT_REQUEST.unpack(payload)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        self._check_slot(slot)
        self._check_position(slot, position)
        out = self._output
        e = 4 if out is not None and out.logits else self.element_bytes
        per_read = min(MAX_LOGITS_PER_READ, (self.max_payload - READ_OUTPUT_HEADER.size) // e)
        if out is None or (out.slot, out.position) != (slot, position) or not 1 <= count <= per_read \
                or start + count > len(out.values):
            raise Rejected(Error.BAD_ARGUMENT, per_read)
        values = out.values[start:start + count]
        if out.logits:
            return READ_OUTPUT_HEADER.pack(slot, position, start) + wire_logits(values, self.formats).astype("<i4").tobytes()
        dtype = "<i4" if e == 4 else "<i8"
        return READ_OUTPUT_HEADER.pack(slot, position, start) + values.astype(dtype).tobytes()
