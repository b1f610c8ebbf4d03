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

``stats`` counts what happened (``commands``, ``tokens``, ``replays``, ``naks`` and
``nak_<ERROR>``, ``bad_crc``, ``ignored``, ``idle_drops``, ``power_cycles``, ``bytes_in``,
``bytes_out``); tests of the gateware link compare against these names.
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

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.protocol import (
    DEVICE_MAGIC, FEED_TOKEN_REQUEST, FEED_TOKEN_RESPONSE, FRAME_IDLE_TIMEOUT_S, LOAD_BEGIN_REQUEST,
    LOAD_BEGIN_RESPONSE, LOAD_CHUNK_HEADER, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE, LOAD_STATUS_RESPONSE,
    MAX_CHUNK, MINOR_LOAD_STATUS, VERIFY_IMAGE_RESPONSE,
    MAX_LOGITS_PER_READ, MAX_PAYLOAD, MIN_DEVICE_PAYLOAD, NAK_PAYLOAD, NAK_RESPONSE, POSITION, PROTOCOL_VERSION,
    READ_LOGITS_HEADER, READ_LOGITS_REQUEST, REQUEST_LENGTHS, RESPONSE, BadFrame, Error, Frame, FrameDecoder,
    Identity, Op, Packing, Status, crc32_image, encode_frame, formats_id,
)
from mmfree_fpga.image import IMAGE_VERSION, image_size
from mmfree_fpga.reference.integer import IntegerModel, parse_image


__all__ = ["DeviceModel", "Rejected"]


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


def _estimate_step_ms(cfg: ModelConfig) -> int:
    """Generous bound of one integer step in numpy on a slow machine."""
    return int(math.ceil(20 + cfg.ternary_weights / 1e5))


class DeviceModel:
    """The protocol engine around ``IntegerModel``, for an engine built for ``cfg`` and ``packing``.

    ``receive(data, now)`` takes bytes from the host and returns the bytes to send back;
    ``poll(now)`` lets the receiver drop a partial frame after FRAME_IDLE_TIMEOUT_S of silence.
    Thread-safe: a fault injector may call ``power_cycle`` while a server thread feeds bytes.
    """

    def __init__(self, cfg: ModelConfig, packing: str = "base3", *, lanes: int = 0,
                 step_time_ms: int | None = None, max_payload: int = MAX_PAYLOAD, seed: int | None = None,
                 minor: int = PROTOCOL_VERSION[1], readback: bool = True):
        if not MIN_DEVICE_PAYLOAD <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [{MIN_DEVICE_PAYLOAD}, {MAX_PAYLOAD}]")
        if not 0 <= minor <= PROTOCOL_VERSION[1]:
            raise ValueError(f"minor must be in [0, {PROTOCOL_VERSION[1]}], got {minor}")
        self.minor = minor
        self.readback = readback and minor >= MINOR_LOAD_STATUS
        self.cfg = cfg
        self.packing = packing
        self.packing_code = Packing.from_export_name(packing)
        self.lanes = lanes
        self.max_payload = max_payload
        self.step_time_ms = _estimate_step_ms(cfg) if step_time_ms is None else step_time_ms
        self.image_bytes = image_size(cfg, packing)
        self.formats_id = formats_id(FORMATS)
        self.stats: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self.boot_id = 0
        self.power_cycle()
        self.stats.clear()

    @property
    def description(self) -> str:
        return f"Python device model (integer reference), packing {self.packing}"

    # -- the engine's state ------------------------------------------------------------
    def power_cycle(self) -> None:
        """Simulated reset: loses state, weights, load progress, reply cache; new boot id."""
        with self._lock:
            boot = self._rng.getrandbits(32)
            self.boot_id = boot if boot != self.boot_id else (boot + 1) & 0xFFFFFFFF
            self._decoder = FrameDecoder(self.max_payload)
            self._last_rx = 0.0
            self._model: IntegerModel | None = None
            self._stored: bytearray | None = None     # the weight memory's bytes (VERIFY_IMAGE)
            self._image_crc = 0
            self._load: _Load | None = None
            self._position = 0
            self._logits: np.ndarray | None = None
            self._cache: tuple[int, int, bytes] | None = None
            self.stats["power_cycles"] += 1

    @property
    def position(self) -> int:
        return self._position

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
            image_size=self.image_bytes if self._model is not None else 0,
            image_crc=self._image_crc if self._model is not None else 0, position=self._position)

    def fingerprint(self) -> str:
        """A digest of every piece of state a command may change (for tests)."""
        with self._lock:
            h = hashlib.sha256()
            load = self._load
            h.update(repr((self.boot_id, self._position, self._image_crc, self._model is not None,
                           None if self._stored is None else crc32_image(self._stored),
                           None if load is None else (load.size, load.crc, load.pointer, load.running_crc),
                           None if self._cache is None else self._cache[:2])).encode())
            if load is not None:
                h.update(load.data)
            if self._model is not None:
                for v in self._model.h:
                    h.update(v.tobytes())
            if self._logits is not None:
                h.update(self._logits.tobytes())
            return h.hexdigest()

    def load_image(self, blob: bytes) -> None:
        """Load an image directly, as if LOAD_BEGIN/CHUNK/COMMIT had carried it (serve --preload)."""
        with self._lock:
            if len(blob) != self.image_bytes:
                raise ValueError(f"image has {len(blob)} bytes, this engine takes {self.image_bytes}")
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
        self._model = IntegerModel(parse_image(blob, self.cfg, self.packing, FORMATS))
        self._stored = bytearray(blob)
        self._image_crc = crc
        self._load = None
        self._position = 0
        self._logits = None

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
            raise Rejected(Error.UNKNOWN_OP) from None
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
        self._position = 0
        self._logits = None
        if self._model is not None:
            self._model.reset()
        return POSITION.pack(0)

    def _op_load_begin(self, payload: bytes) -> bytes:
        size, crc = LOAD_BEGIN_REQUEST.unpack(payload)
        if size != self.image_bytes:
            raise Rejected(Error.BAD_IMAGE_SIZE, self.image_bytes)
        self._model = None
        self._stored = None
        self._image_crc = 0
        self._position = 0
        self._logits = None
        self._load = _Load(size=size, crc=crc, data=bytearray(size))
        return LOAD_BEGIN_RESPONSE.pack(size, crc)

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
        if token >= self.cfg.V:
            raise Rejected(Error.BAD_ARGUMENT, self.cfg.V)
        if position != self._position:
            raise Rejected(Error.POSITION_MISMATCH, self._position)
        if position == 0xFFFFFFFF:
            raise Rejected(Error.BAD_ARGUMENT, position)
        logits = self._model.step(token)
        best = IntegerModel.argmax(logits)
        self._logits = logits
        self._position += 1
        self.stats["tokens"] += 1
        return FEED_TOKEN_RESPONSE.pack(self._position, best, int(logits[best]), 0)

    def _op_read_logits(self, payload: bytes) -> bytes:
        position, start, count = READ_LOGITS_REQUEST.unpack(payload)
        if self._model is None:
            raise Rejected(Error.NO_WEIGHTS)
        if position != self._position:
            raise Rejected(Error.POSITION_MISMATCH, self._position)
        per_read = min(MAX_LOGITS_PER_READ, (self.max_payload - READ_LOGITS_HEADER.size) // 4)
        if self._logits is None or not 1 <= count <= per_read or start + count > self.cfg.V:
            raise Rejected(Error.BAD_ARGUMENT, per_read)
        values = self._logits[start:start + count].astype("<i4").tobytes()
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
