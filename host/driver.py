"""The host driver: streams tokens to an mmfree-fpga engine over an unreliable byte link.

``Driver`` talks to a transport (``host/transport.py``): a board's UART, the simulated device
of ``mmfree-fpga serve`` over ``socket://``, or an in-process pipe to ``DeviceModel``. The same
code serves all three. What it does about an unreliable link:

* every command is retransmitted (same SEQ, same bytes) until its response arrives: at once
  after a NAK BAD_CRC or a corrupt response with its SEQ, else after a timeout that adapts to
  the measured round trip (Jacobson/Karels; doubled while nothing at all comes back), or
  EARLY_RETRY_GAP_S after bytes that form no frame (most likely its answer, damaged). The
  device's reply cache makes retransmission safe: no command runs twice;
* garbage and false starts are skipped by the frame decoder; at a timeout a partial frame
  is given up and the bytes behind its false start are rescanned;
* weights go in chunks, logits come in pieces, whose size halves on a noisy link (down to
  MIN_CHUNK / MIN_LOGITS_READ) and grows back when clean; the image ends with a CRC-32 check;
* an upload that was cut off (the host process killed, the link lost; the device kept power)
  resumes where the device's write pointer stands, when LOAD_STATUS shows a load of the same
  image (size and CRC-32) whose bytes so far are the image's (their running CRC-32 equals the
  host's CRC of the image up to the pointer); otherwise, and with a device of protocol 1.0, the
  load starts from byte 0. On request the device reads the committed image back from its
  weight memory (VERIFY_IMAGE) and the host compares the CRC-32;
* with protocol 1.2's slice ops (optional) a driver also loads a slice image (LOAD_SLICE; a
  ``WeightImage`` with ``slice``), names state slots and moves residuals in and out in pieces
  (``reset_slot``, ``write_residual``, ``feed_slot``, ``read_output``); a device without them
  gives one line (``NoSlicesError``). ``host/pipeline.py`` runs several devices with these;
* a device that lost its state (reset, power cycle, reprogrammed) is noticed by the position
  every FEED_TOKEN/READ_LOGITS carries (POSITION_MISMATCH) or by NO_WEIGHTS. The driver then
  identifies it (a new boot id), reloads the weights if they are gone or differ, resets the
  state and replays the token history, checking that each replayed step predicts what it did
  before, so the recurrent state is exactly what it was. Then the command is retried.

All waits are bounded: MAX_SILENT_RETRIES timeouts without a byte, MAX_ATTEMPTS sends of one
command, MAX_RECOVERIES recoveries in a row, MAX_LOAD_ATTEMPTS image loads.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from mmfree_fpga.config import FORMAT_SETS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.generation import Sampler
from mmfree_fpga.protocol import (
    CONNECT_RETRIES, CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, DEVICE_MAGIC, EARLY_RETRY_GAP_S,
    FEED_TOKEN_REQUEST, FEED_TOKEN_RESPONSE, FRAME_OVERHEAD, IDENTITY, LOAD_BEGIN_REQUEST,
    LOAD_BEGIN_RESPONSE, LOAD_CHUNK_HEADER, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE, LOAD_STATUS_RESPONSE,
    MAX_ATTEMPTS, MINOR_LOAD_STATUS, VERIFY_IMAGE_RESPONSE, VERIFY_MIN_BYTES_PER_S,
    MAX_CHUNK, MAX_LOAD_ATTEMPTS, MAX_LOGITS_PER_READ, MAX_PAYLOAD, MAX_RECOVERIES, MAX_SILENT_RETRIES,
    MAX_TIMEOUT_S, MIN_CHUNK, MIN_DEVICE_PAYLOAD, MIN_LOGITS_READ, MIN_TIMEOUT_S, NAK_PAYLOAD,
    NAK_RESPONSE, POSITION, PROTOCOL_VERSION, READ_LOGITS_HEADER, READ_LOGITS_REQUEST, RESPONSE,
    BadFrame, Error, FrameDecoder, Identity, Op, Packing, crc32_image, encode_frame, formats_id,
    FEED_SLOT_REQUEST, FEED_SLOT_RESPONSE, LOAD_SLICE_REQUEST, LOAD_SLICE_RESPONSE, MAX_RESIDUAL_PER_WRITE,
    MINOR_SLICES, READ_OUTPUT_HEADER, READ_OUTPUT_REQUEST, RESET_SLOT_REQUEST, RESET_SLOT_RESPONSE,
    SLICE_INFO_RESPONSE, WIRE_LOGIT_FRAC, WRITE_RESIDUAL_HEADER, WRITE_RESIDUAL_RESPONSE, SliceInfo, SliceOp,
    Status, op_name,
    residual_element_bytes,
)
from mmfree_fpga.image_slice import Slice
from mmfree_fpga.image import IMAGE_VERSION

from .image import WeightImage
from .transport import LinkClosed, SerialTransport

__all__ = ["Driver", "FeedResult", "LoadStatus", "DriverStats", "DriverError", "NoDeviceError",
           "WrongDeviceError", "IncompatibleDeviceError", "DeviceNak", "RecoveryError", "NoisyLinkError",
           "VerifyError", "MemoryFailedError", "NoSlicesError", "describe"]


class DriverError(UserError):
    """The device or the link did not do what the driver needs (one line for the user)."""


class NoDeviceError(DriverError):
    """Nothing answers."""


class WrongDeviceError(DriverError):
    """Something answers, but not an mmfree-fpga engine speaking this protocol."""


class IncompatibleDeviceError(DriverError):
    """An engine that cannot run this model: protocol version, geometry, formats, packing, weights."""


class RecoveryError(DriverError):
    """The device kept losing its state, or gave different results after a recovery."""


class NoisyLinkError(DriverError):
    """Bytes arrive but no valid answer does, MAX_ATTEMPTS times in a row."""


class MemoryFailedError(DriverError):
    """The device reports that its weight memory failed to start (``Status.MEMORY_ERROR``)."""


class VerifyError(DriverError):
    """The image the device read back from its weight memory is not the one loaded."""


class NoSlicesError(IncompatibleDeviceError):
    """The engine cannot hold a layer slice (no protocol 1.2 slice ops in its build)."""


class _GiveUp(Exception):
    """A command failed ``give_up`` sends in a row on a noisy link; the caller re-issues it."""


def _member(enum, value):
    """The member of ``enum`` with ``value``, or None for a value the protocol does not define."""
    try:
        return enum(value)
    except ValueError:
        return None


class DeviceNak(DriverError):
    """The device rejected a command (a NAK other than BAD_CRC)."""

    def __init__(self, op: int, error: int, arg: int):
        name = _member(Error, error).name if _member(Error, error) else f"error {error}"
        super().__init__(f"the device rejected {op_name(op)}: {name} (arg {arg})")
        self.op, self.error, self.arg = op, error, arg


@dataclass(frozen=True)
class FeedResult:
    position: int        # tokens fed since the reset, this one included
    token: int           # the greedy next token (first index of the largest logit)
    logit: int           # that logit, Q16
    cycles: int          # engine cycles of the step (0: not counted)


@dataclass(frozen=True)
class LoadStatus:
    """LOAD_STATUS: the device's open load (all 0 when none is open)."""
    size: int            # of the image being loaded
    crc32: int           # its CRC-32, as LOAD_BEGIN gave it
    pointer: int         # bytes received so far
    running_crc32: int   # CRC-32 of those bytes

    @property
    def open(self) -> bool:
        return self.size != 0


@dataclass
class DriverStats:
    commands: int = 0
    sends: int = 0
    retransmits: int = 0
    timeouts: int = 0
    bad_crc_naks: int = 0
    corrupt_responses: int = 0
    garbled_responses: int = 0
    stale_frames: int = 0
    echo_frames: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    recoveries: int = 0
    device_resets: int = 0
    loads: int = 0
    resumed_loads: int = 0
    resumed_bytes: int = 0     # image bytes a resumed load did not send again
    image_bytes_sent: int = 0  # image bytes sent in LOAD_CHUNKs that the device took
    replayed_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _RoundTrip:
    """Adaptive response timeout of one opcode (RFC 6298 without the clock granularity)."""

    def __init__(self, initial: float):
        self.initial, self.srtt, self.rttvar = initial, None, 0.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self, cap: float = MAX_TIMEOUT_S) -> float:
        if self.srtt is None:
            return self.initial
        return min(max(self.srtt + 4 * self.rttvar + 0.02, MIN_TIMEOUT_S), cap)


class _AdaptiveSize:
    """A transfer size that halves when a transfer of it fails and doubles after clean ones."""

    CLEAN_TO_GROW = 4

    def __init__(self, maximum: int, minimum: int):
        self.maximum, self.minimum, self.size, self._clean = maximum, minimum, maximum, 0

    def failed(self, tried: int) -> None:
        self.size = max(self.minimum, min(self.size, tried) // 2)
        self._clean = 0

    def done(self, failures: int) -> None:
        if failures:
            self.size = max(self.minimum, self.size // 2)
            self._clean = 0
        else:
            self._clean += 1
            if self._clean >= self.CLEAN_TO_GROW and self.size < self.maximum:
                self.size, self._clean = min(self.maximum, self.size * 2), 0


def describe(info: Identity) -> str:
    """One line about an engine, for humans."""
    weights = (f"weights loaded ({info.image_size} bytes, CRC-32 {info.image_crc:08x})"
               if info.weights_loaded else "no weights loaded")
    packing = _member(Packing, info.packing).name_in_export if _member(Packing, info.packing) else info.packing
    return (f"protocol {info.version_major}.{info.version_minor}, vocab {info.vocab_size}, hidden "
            f"{info.hidden_size}, {info.num_layers} layers, intermediate {info.intermediate_size}, "
            f"{packing} packing, {info.lanes} lanes, {weights}, boot id {info.boot_id:08x}")


def _unpack(layout: struct.Struct, payload: bytes, op: Op):
    if len(payload) != layout.size:
        raise WrongDeviceError(f"the device answered {op.name} with {len(payload)} payload bytes, "
                               f"expected {layout.size}; it does not speak this protocol version")
    return layout.unpack_from(payload)


class Driver:
    """A connection to one engine. Open with ``Driver.open(url)`` or ``Driver(transport)``.

    Typical use::

        with Driver.open("socket://127.0.0.1:7000") as dev:
            dev.connect(image.cfg)
            dev.ensure_weights(image, progress=callback)
            for token in dev.generate(prompt, steps=32):
                ...

    ``timeout`` fixes every response timeout instead of adapting it; ``log`` gets one line
    per notable event (device reset, reload, replay).
    """

    def __init__(self, transport, *, timeout: float | None = None, log: Callable[[str], None] | None = None):
        self.transport = transport
        self.fixed_timeout = timeout
        self.log = log or (lambda message: None)
        self.decoder = FrameDecoder(MAX_PAYLOAD)
        self.stats = DriverStats()
        self.info: Identity | None = None
        self.image: WeightImage | None = None
        self.history: list[int] = []         # tokens fed since the last RESET_STATE
        self.feed_cycles: list[int] = []     # engine cycles of every step fed, as the device counted them
        self._predicted: list[int] = []      # the greedy token the device returned after each of them
        self.chunk = _AdaptiveSize(MAX_CHUNK, MIN_CHUNK)                   # LOAD_CHUNK data bytes
        self.logits_read = _AdaptiveSize(MAX_LOGITS_PER_READ, MIN_LOGITS_READ)  # READ_LOGITS count
        self.last_failures = 0               # failed sends of the last command
        self._events: deque = deque()
        self._seq = os.urandom(1)[0]
        self._rtt: dict[int, _RoundTrip] = {}
        self._link_rtt = _RoundTrip(DEFAULT_TIMEOUT_S)

    @classmethod
    def open(cls, url: str, *, baudrate: int = 115200, **kw) -> "Driver":
        """A driver on ``serial_for_url(url)``: /dev/ttyUSB1, /dev/pts/N, socket://127.0.0.1:P, loop://."""
        return cls(SerialTransport.open(url, baudrate), **kw)

    @property
    def name(self) -> str:
        return getattr(self.transport, "name", "the device")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one command, retried until it is answered --------------------------------------------
    def _timeout(self, op: Op) -> float:
        """The adaptive response timeout of ``op``; before its first round trip, what the link
        has shown so far (any command), plus the device's compute bound for the slow ones."""
        own = self._rtt.get(op)
        if own is not None and own.srtt is not None:
            return own.timeout(self._cap(op))
        return self._link_rtt.timeout() + self._compute_allowance(op)

    def _compute_allowance(self, op: Op) -> float:
        if op == Op.VERIFY_IMAGE:        # one read of the whole image, at the slowest rate allowed
            size = self.info.image_size if self.info is not None else 0
            return 1.0 + 2 * size / VERIFY_MIN_BYTES_PER_S
        step = (self.info.step_time_ms / 1000.0) if self.info is not None else 0.0
        return 2 * step if op in (Op.FEED_TOKEN, Op.LOAD_COMMIT, SliceOp.FEED_SLOT) else 0.0

    def _cap(self, op: Op) -> float:
        """The longest response timeout: MAX_TIMEOUT_S, more for a device that computes slowly."""
        return MAX_TIMEOUT_S + self._compute_allowance(op)

    def _line_time(self, op: Op, frame_len: int) -> float:
        rate = getattr(self.transport, "bytes_per_s", None)
        if not rate:
            return 0.0
        answer = FRAME_OVERHEAD + (MAX_PAYLOAD if op in (Op.READ_LOGITS, SliceOp.READ_OUTPUT) else IDENTITY.size)
        return 1.5 * (frame_len + answer) / rate

    def _exchange(self, op: Op, payload: bytes = b"", *, tries: int | None = None,
                  timeout: float | None = None, give_up: int | None = None) -> bytes:
        """Send one command until its response arrives; returns the response payload.

        Every failed send is retried with the same SEQ and bytes. Gives up after
        MAX_SILENT_RETRIES timeouts in a row with nothing received (the device is gone), or
        MAX_ATTEMPTS sends (a link too noisy to use). ``tries`` (connecting) also bounds the
        sends that got no sign of an engine (silence, echo or unrecognisable bytes) until one
        shows (a NAK or a damaged response with our SEQ). ``give_up`` raises ``_GiveUp`` after
        that many failed sends, for commands the caller can re-issue in another form (a
        smaller chunk).
        """
        self._seq = (self._seq + 1) & 0xFF
        seq = self._seq
        frame = encode_frame(seq, op, payload)
        rtt = self._rtt.setdefault(op, _RoundTrip(DEFAULT_TIMEOUT_S))
        adaptive = timeout is None and self.fixed_timeout is None
        wait = (timeout or self.fixed_timeout or self._timeout(op)) + self._line_time(op, len(frame))
        quiet = max(EARLY_RETRY_GAP_S, 0.5 * (rtt.srtt or 0.0)) + (0.02 if self._line_time(op, 1) else 0.0)
        self.stats.commands += 1
        seen = (self.stats.echo_frames, self.decoder.garbage_bytes, time.monotonic())
        base_wait = wait
        sends = silent = no_engine = 0
        engine_seen = False          # a NAK or a damaged response of ours: an engine is there
        while True:
            sends += 1
            self.stats.sends += 1
            self.stats.retransmits += int(sends > 1)
            self.transport.write(frame)
            self.stats.bytes_sent += len(frame)
            sent_at = time.monotonic()
            kind, value, heard = self._await(seq, op, sent_at + wait, quiet)
            if kind == "ok":
                if sends == 1:           # Karn: a retransmitted command's round trip is ambiguous
                    rtt.sample(time.monotonic() - sent_at)
                    self._link_rtt.sample(time.monotonic() - sent_at)
                self.last_failures = sends - 1
                return value
            if kind == "nak":
                error, arg = value
                if error != Error.BAD_CRC:
                    raise DeviceNak(op, error, arg)
                self.stats.bad_crc_naks += 1
                silent, engine_seen = 0, True
            elif kind == "corrupt":
                self.stats.corrupt_responses += 1
                silent, engine_seen = 0, True
            elif kind == "garbled":
                self.stats.garbled_responses += 1
                silent = 0
                no_engine += 1
            else:
                self.stats.timeouts += 1
                no_engine += 1
                silent = 0 if heard else silent + 1
            # back off while the device says nothing at all; a device that answers, even
            # garbled, is there and gets the measured timeout again
            wait = min(wait * 2, max(self._cap(op) / 4, base_wait)) if silent and adaptive else base_wait
            if give_up is not None and sends >= give_up and silent == 0:
                raise _GiveUp()
            if (tries is not None and not engine_seen and no_engine >= tries) or silent >= MAX_SILENT_RETRIES:
                raise self._silence(op, sends, seen)
            if sends >= MAX_ATTEMPTS:
                raise NoisyLinkError(f"{sends} sends of {op.name} to {self.name} got no valid answer although "
                                     "bytes arrive: the link is too noisy (check cable, baud rate, ground)")

    def _silence(self, op: Op, sends: int, seen) -> DriverError:
        echo0, garbage0, t0 = seen
        took = f"{sends} tries over {time.monotonic() - t0:.1f} s"
        if self.stats.echo_frames > echo0:
            return NoDeviceError(f"{self.name} echoes what the host sends but no device answers ({took}); "
                                 "is it a loopback (loop://, a loopback plug) rather than an engine?")
        garbage = self.decoder.garbage_bytes - garbage0
        if garbage:
            return WrongDeviceError(f"{garbage} bytes came from {self.name} but no valid frame ({took}): "
                                    "not an mmfree-fpga engine, or the wrong port or baud rate")
        if self.info is None:
            return NoDeviceError(f"no device answered at {self.name} ({op.name}, {took}); is the board "
                                 "programmed and the port right, or is 'mmfree-fpga serve' running?")
        return NoDeviceError(f"the device at {self.name} stopped answering ({op.name}, {took})")

    def _await(self, seq: int, op: Op, deadline: float, quiet: float):
        """Wait for the answer to (seq, op); returns (kind, value, heard) with kind one of

        "ok" (payload), "nak" ((error, arg)), "corrupt" (a response with our SEQ failed its CRC
        or stopped short), "garbled" (bytes that are no frame arrived, then the line stayed
        quiet for ``quiet`` seconds: most likely our answer with a damaged header) or
        "timeout"; ``heard`` says whether any byte arrived.
        """
        heard = False
        garbage0 = self.decoder.garbage_bytes
        quiet_since = None
        while True:
            while self._events:
                found = self._match(self._events.popleft(), seq, op)
                if found is not None:
                    return (*found, heard)
            now = time.monotonic()
            expired = now >= deadline
            if expired or (quiet_since is not None and now >= quiet_since + quiet):
                head = self.decoder.pending_header()
                ours = head is not None and head[0] == seq and head[1] & RESPONSE
                if self.decoder.pending:      # give the partial frame up; rescan what it held back
                    self._events.extend(self.decoder.abandon())
                    if self._events:
                        continue
                if ours:
                    return "corrupt", None, heard
                return ("timeout" if expired else "garbled"), None, heard
            until = deadline if quiet_since is None else min(deadline, quiet_since + quiet)
            data = self.transport.read(min(until - now, 0.05))
            if data:
                heard = True
                self.stats.bytes_received += len(data)
                self._events.extend(self.decoder.feed(data))
                head = self.decoder.pending_header()
                truncated = head is not None and head[0] == seq and head[1] & RESPONSE
                unusable = self.decoder.garbage_bytes > garbage0 and not self.decoder.pending
                quiet_since = time.monotonic() if unusable or truncated else None

    def _match(self, event, seq: int, op: Op):
        if isinstance(event, BadFrame):
            return ("corrupt", None) if event.op & RESPONSE and event.seq == seq else None
        if not event.is_response:
            self.stats.echo_frames += 1
            return None
        if event.seq == seq:
            if event.op == op | RESPONSE:
                return "ok", event.payload
            if event.op == NAK_RESPONSE and len(event.payload) == NAK_PAYLOAD.size:
                error, rejected, arg = NAK_PAYLOAD.unpack(event.payload)
                if rejected == op:
                    return "nak", (error, arg)
        self.stats.stale_frames += 1
        return None

    # -- connecting -----------------------------------------------------------------------
    def identify(self, *, connecting: bool = False) -> Identity:
        """IDENTIFY; notes a changed boot id (the device was reset) in ``stats.device_resets``."""
        if connecting:
            try:
                payload = self._exchange(Op.IDENTIFY, tries=CONNECT_RETRIES,
                                         timeout=max(CONNECT_TIMEOUT_S, self.fixed_timeout or 0.0))
            except LinkClosed as e:
                raise NoDeviceError(f"{self.name} closed the connection before answering ({e}); is another "
                                    "host connected to that device?") from None
        else:
            payload = self._exchange(Op.IDENTIFY)
        if len(payload) < 6 or payload[:4] != DEVICE_MAGIC:
            raise WrongDeviceError(f"the device at {self.name} answers, but is not an mmfree-fpga engine "
                                   f"(IDENTIFY magic {payload[:4]!r}, expected {DEVICE_MAGIC!r})")
        major, minor = payload[4], payload[5]
        if major != PROTOCOL_VERSION[0]:
            raise IncompatibleDeviceError(
                f"the engine at {self.name} speaks protocol {major}.{minor}, this host "
                f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}; update mmfree-fpga or rebuild the engine")
        if len(payload) < IDENTITY.size:
            raise WrongDeviceError(f"the device at {self.name} answered IDENTIFY with {len(payload)} bytes, "
                                   f"protocol {major}.x has {IDENTITY.size}")
        info = Identity.unpack(payload[:IDENTITY.size])
        if info.max_payload < MIN_DEVICE_PAYLOAD:
            raise WrongDeviceError(f"the engine at {self.name} announces a {info.max_payload}-byte payload "
                                   f"buffer; the protocol needs at least {MIN_DEVICE_PAYLOAD}")
        if self.info is not None and info.boot_id != self.info.boot_id:
            self.stats.device_resets += 1
            self.log(f"the device was reset (boot id {self.info.boot_id:08x} -> {info.boot_id:08x})")
        self.info = info
        return info

    def connect(self, cfg: ModelConfig | None = None, what: str = "the model") -> Identity:
        """Identify the engine and check it can run this host's formats (and ``cfg``'s geometry)."""
        info = self.identify(connecting=True)
        if info.status & Status.MEMORY_ERROR:
            raise MemoryFailedError(
                f"the engine at {self.name} reports that its weight memory failed to start (the DRAM's read "
                "levelling found no working setting, or its final check failed); power-cycle the board, and if "
                "it persists check the DRAM's clock and the build (the board's DRAM status LED shows it too)")
        known = {formats_id(fmt): name for name, fmt in FORMAT_SETS.items()}
        if info.formats_id not in known:
            raise IncompatibleDeviceError(
                f"the engine at {self.name} computes with fixed-point formats this host does not know (id "
                f"{info.formats_id:08x}; this version's sets: "
                + ", ".join(f"{name} {fid:08x}" for fid, name in known.items()) + "); rebuild the engine from this version")
        if info.image_version != IMAGE_VERSION:
            raise IncompatibleDeviceError(
                f"the engine at {self.name} reads weight image version {info.image_version}, this host "
                f"writes version {IMAGE_VERSION}; rebuild the engine from this version")
        if _member(Packing, info.packing) is None:
            raise IncompatibleDeviceError(f"the engine at {self.name} uses an unknown trit packing {info.packing}")
        if cfg is not None:
            self.check_geometry(cfg, what)
        return info

    def check_geometry(self, cfg: ModelConfig, what: str = "the model") -> None:
        info = self.info or self.identify()
        if info.geometry != (cfg.V, cfg.d, cfg.L, cfg.I):
            raise IncompatibleDeviceError(
                f"the engine at {self.name} is built for vocab {info.vocab_size}, hidden {info.hidden_size}, "
                f"{info.num_layers} layers, intermediate {info.intermediate_size}, but {what} has vocab {cfg.V}, "
                f"hidden {cfg.d}, {cfg.L} layers, intermediate {cfg.I}; use the checkpoint the engine was "
                "built for, or build the engine for this one")

    @property
    def formats(self) -> Formats:
        """The number formats the engine computes in (one of ``config.FORMAT_SETS``, by IDENTIFY's
        formats id): the image it takes is exported in them."""
        info = self.info or self.identify()
        for fmt in FORMAT_SETS.values():
            if formats_id(fmt) == info.formats_id:
                return fmt
        raise IncompatibleDeviceError(f"the engine at {self.name} computes with unknown formats "
                                      f"(id {info.formats_id:08x}); rebuild the engine from this version")

    @property
    def packing(self) -> str:
        """The trit packing the engine decodes, as ``mmfree-fpga export --packing`` names it."""
        info = self.info or self.identify()
        return Packing(info.packing).name_in_export

    # -- weights ----------------------------------------------------------------------------
    def holds(self, image: WeightImage) -> bool:
        """The engine holds ``image`` (and, for a slice image, as that slice)."""
        info = self.info or self.identify()
        if not (info.weights_loaded and info.image_crc == image.crc32 and info.image_size == image.size):
            return False
        if image.slice is None:
            return True
        held = self.held_slice()
        return held == image.slice

    def ensure_weights(self, image: WeightImage, *, force: bool = False, allow_load: bool = True,
                       progress: Callable[[int, int], None] | None = None, verify: bool = False) -> bool:
        """Make the engine hold ``image``; True if it had to be loaded. ``verify``: then have the
        device read it back from its weight memory and compare (:meth:`verify_weights`)."""
        info = self.info or self.identify()
        self.check_geometry(image.cfg, image.source or "the image")
        if Packing.from_export_name(image.packing) != info.packing:
            raise IncompatibleDeviceError(
                f"the image is packed {image.packing} but the engine at {self.name} decodes "
                f"{Packing(info.packing).name_in_export}; export with --packing {Packing(info.packing).name_in_export}")
        if image.formats_id != info.formats_id or image.image_version != info.image_version:
            raise IncompatibleDeviceError(f"the image {image.source} was written for other formats or another "
                                          "image version than the engine's; re-export it")
        if verify:
            self._check_verify_supported()
        if self.holds(image) and not force:
            self.image = image
            loaded = False
        elif not allow_load:
            held = (f"other weights (CRC-32 {info.image_crc:08x}, this image {image.crc32:08x})"
                    if info.weights_loaded else "no weights")
            raise IncompatibleDeviceError(f"the engine at {self.name} holds {held}; load this image into it "
                                          "(in 'mmfree-fpga run': leave out --no-load)")
        else:
            self.load_weights(image, progress, resume=not force)
            loaded = True
        if verify:
            self.verify_weights(image)
        return loaded

    def load_status(self) -> LoadStatus | None:
        """LOAD_STATUS: the device's open load; None from a device of protocol 1.0."""
        info = self.info or self.identify()
        if info.version_minor < MINOR_LOAD_STATUS:
            return None
        try:
            answer = self._exchange(Op.LOAD_STATUS)
        except DeviceNak as e:
            if e.error == Error.UNKNOWN_OP:
                return None
            raise
        return LoadStatus(*_unpack(LOAD_STATUS_RESPONSE, answer, Op.LOAD_STATUS))

    def _resume_point(self, image: WeightImage) -> int | None:
        """Where the device's open load of ``image`` stands, if its bytes so far are the image's."""
        status = self.load_status()
        if status is None or not status.open:
            return None
        if image.slice is not None:
            sl = self.slice_info()
            if sl is None or (sl.load_first_layer, sl.load_end_layer, sl.load_parts) != \
                    (image.slice.first, image.slice.end, image.slice.parts):
                return None
        if (status.size, status.crc32) != (image.size, image.crc32) or not 0 < status.pointer <= image.size:
            self.log(f"the device holds a partial load of another image ({status.pointer:,} of {status.size:,} "
                     f"bytes, CRC-32 {status.crc32:08x}); loading from byte 0")
            return None
        if crc32_image(image.blob[:status.pointer]) != status.running_crc32:
            self.log(f"the {status.pointer:,} bytes the device received of this image do not check out "
                     "(CRC-32); loading from byte 0")
            return None
        return status.pointer

    def load_weights(self, image: WeightImage, progress: Callable[[int, int], None] | None = None, *,
                     resume: bool = True) -> None:
        """LOAD_BEGIN, in-order LOAD_CHUNKs, LOAD_COMMIT; restarts if the device loses the load.

        ``resume``: continue a load of the same image that the device holds open (an upload cut
        off earlier) from its write pointer instead of from 0, if LOAD_STATUS shows that its
        bytes so far are the image's (module docstring)."""
        info = self.info or self.identify()
        max_chunk = min(MAX_CHUNK, info.max_payload - LOAD_CHUNK_HEADER.size)
        blob, size, crc = image.blob, image.size, image.crc32
        self.stats.loads += 1
        last: DeviceNak | None = None
        for attempt in range(MAX_LOAD_ATTEMPTS):
            start = self._resume_point(image) if resume else None
            if start is None:
                if image.slice is not None:
                    self._begin_slice(image)
                else:
                    try:
                        begin = self._exchange(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(size, crc))
                    except DeviceNak as e:
                        if e.error == Error.BAD_IMAGE_SIZE:
                            info = self.slice_info() if e.arg < size else None
                            if info is not None and info.capacity == e.arg:
                                raise IncompatibleDeviceError(
                                    f"the engine at {self.name} holds at most {e.arg:,} bytes of weights, the model "
                                    f"has {size:,}: it runs as a slice of a split over several devices "
                                    "(run --device A,B,...; mmfree-fpga plan)") from None
                            raise IncompatibleDeviceError(
                                f"the engine at {self.name} takes images of {e.arg} bytes, this one has {size}; "
                                "export for the engine's geometry") from None
                        raise
                    if _unpack(LOAD_BEGIN_RESPONSE, begin, Op.LOAD_BEGIN) != (size, crc):
                        raise WrongDeviceError(f"the device at {self.name} acknowledged LOAD_BEGIN for another image")
                start = 0
            else:
                self.stats.resumed_loads += 1
                self.stats.resumed_bytes += start
                self.log(f"resuming the interrupted upload at byte {start:,} of {size:,}")
            self.history.clear()
            self._predicted.clear()
            offset, rewinds = start, 0
            if progress is not None:
                progress(offset, size)
            try:
                while offset < size:
                    n = min(self.chunk.size, max_chunk, size - offset)
                    try:
                        answer = self._exchange(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(offset) + blob[offset:offset + n],
                                                give_up=2 if n > MIN_CHUNK else None)
                        (next_offset,) = _unpack(LOAD_CHUNK_RESPONSE, answer, Op.LOAD_CHUNK)
                    except _GiveUp:
                        # too long for this link: send less. If the device did take the chunk
                        # and only its answer was lost, BAD_OFFSET will say where it stands.
                        self.chunk.failed(n)
                        continue
                    except DeviceNak as e:
                        if e.error != Error.BAD_OFFSET or not 0 <= e.arg <= size:
                            raise
                        if e.arg < offset:
                            rewinds += 1
                            if rewinds > MAX_RECOVERIES:
                                raise
                        next_offset, n = e.arg, 0
                    if not 0 <= next_offset <= size:
                        raise WrongDeviceError(f"the device at {self.name} reports load offset {next_offset} "
                                               f"outside the {size}-byte image")
                    self.stats.image_bytes_sent += max(0, next_offset - offset) if n else 0
                    offset = next_offset
                    if n:
                        self.chunk.done(self.last_failures)
                    if progress is not None:
                        progress(offset, size)
                done = self._exchange(Op.LOAD_COMMIT)
            except DeviceNak as e:
                if e.error not in (Error.NO_LOAD, Error.CHECKSUM_MISMATCH, Error.INCOMPLETE):
                    raise
                last = e
                self.log(f"weight load attempt {attempt + 1} failed ({e}); starting over")
                continue
            if _unpack(LOAD_COMMIT_RESPONSE, done, Op.LOAD_COMMIT) != (size, crc):
                raise WrongDeviceError(f"the device at {self.name} committed another image than it was sent")
            self.image = image
            self.identify()
            return
        raise DriverError(f"loading the weights into {self.name} failed {MAX_LOAD_ATTEMPTS} times (last: {last})")

    def _begin_slice(self, image: WeightImage) -> None:
        """LOAD_SLICE for ``image`` (a slice image)."""
        sl, size, crc = image.slice, image.size, image.crc32
        info = self.require_slices()
        if size > info.capacity:
            raise IncompatibleDeviceError(
                f"the engine at {self.name} holds images of at most {info.capacity:,} bytes; the slice "
                f"{sl.text()} has {size:,}; use more devices")
        request = LOAD_SLICE_REQUEST.pack(size, crc, sl.first, sl.end, sl.parts)
        try:
            answer = self._exchange(SliceOp.LOAD_SLICE, request)
        except DeviceNak as e:
            if e.error == Error.UNKNOWN_OP:
                raise self._no_slices() from None
            if e.error in (Error.BAD_IMAGE_SIZE, Error.BAD_ARGUMENT):
                raise IncompatibleDeviceError(
                    f"the engine at {self.name} refused the slice {sl.text()} of {size:,} bytes "
                    f"({Error(e.error).name}, arg {e.arg}); is it built for this model?") from None
            raise
        if _unpack(LOAD_SLICE_RESPONSE, answer, SliceOp.LOAD_SLICE) != LOAD_SLICE_REQUEST.unpack(request):
            raise WrongDeviceError(f"the device at {self.name} acknowledged LOAD_SLICE for another slice")

    # -- layer slices and state slots (protocol 1.2's optional slice ops) ------------------------
    def _no_slices(self) -> NoSlicesError:
        info = self.info or self.identify()
        if info.version_minor < MINOR_SLICES:
            why = (f"it speaks protocol {info.version_major}.{info.version_minor}; layer slices came with "
                   f"{info.version_major}.{MINOR_SLICES}")
        else:
            why = "its build has no state slots: it answers the slice ops UNKNOWN_OP"
        return NoSlicesError(f"the engine at {self.name} cannot hold a layer slice ({why}); a run over several "
                             "devices needs engines with the slice ops, e.g. 'mmfree-fpga serve --backend model' "
                             "or '--backend rtl --slots 4'")

    def slice_info(self) -> SliceInfo | None:
        """SLICE_INFO; None from a device without the slice ops (protocol < 1.2 or no state slots)."""
        info = self.info or self.identify()
        if info.version_minor < MINOR_SLICES:
            return None
        try:
            answer = self._exchange(SliceOp.SLICE_INFO)
        except DeviceNak as e:
            if e.error == Error.UNKNOWN_OP:
                return None
            raise
        result = SliceInfo(*_unpack(SLICE_INFO_RESPONSE, answer, SliceOp.SLICE_INFO))
        if result.slots < 1:
            raise WrongDeviceError(f"the engine at {self.name} announces {result.slots} state slots")
        return result

    def require_slices(self) -> SliceInfo:
        """SLICE_INFO, or :class:`NoSlicesError` (one line) for an engine without the slice ops."""
        result = self.slice_info()
        if result is None:
            raise self._no_slices()
        if result.element_bytes != residual_element_bytes(self.formats):
            raise IncompatibleDeviceError(
                f"the engine at {self.name} sends {result.element_bytes}-byte residual values, its formats "
                f"{residual_element_bytes(self.formats)}; rebuild the engine from this version")
        return result

    def held_slice(self) -> Slice | None:
        """The slice of the weights the engine holds (None: none, or no slice ops)."""
        info = self.slice_info()
        if info is None or not info.parts and info.first_layer == info.end_layer:
            return None
        try:
            return Slice.from_parts(info.first_layer, info.end_layer, info.parts)
        except ValueError:
            raise WrongDeviceError(f"the engine at {self.name} announces an impossible slice (layers "
                                   f"{info.first_layer}..{info.end_layer}, parts {info.parts:#x})") from None

    def reset_slot(self, slot: int) -> None:
        """RESET_SLOT: slot ``slot``'s state to position 0."""
        answer = self._exchange(SliceOp.RESET_SLOT, RESET_SLOT_REQUEST.pack(slot))
        if _unpack(RESET_SLOT_RESPONSE, answer, SliceOp.RESET_SLOT) != (slot, 0):
            raise WrongDeviceError(f"the device at {self.name} answered RESET_SLOT {slot} with something else")

    def _element_dtype(self) -> tuple[int, str]:
        e = residual_element_bytes(self.formats)
        return e, "<i4" if e == 4 else "<i8"

    def write_residual(self, slot: int, position: int, values: np.ndarray) -> None:
        """WRITE_RESIDUAL in pieces: the input residual of ``slot``'s feed at ``position``."""
        info = self.info or self.identify()
        e, dtype = self._element_dtype()
        per = min(MAX_RESIDUAL_PER_WRITE, (info.max_payload - WRITE_RESIDUAL_HEADER.size) // e)
        data = np.asarray(values).astype(dtype)
        start, restarts = 0, 0
        while start < len(data):
            n = min(per, len(data) - start)
            payload = WRITE_RESIDUAL_HEADER.pack(slot, position, start) + data[start:start + n].tobytes()
            try:
                answer = self._exchange(SliceOp.WRITE_RESIDUAL, payload)
            except DeviceNak as e_:
                # a piece whose answer was lost, then re-sent as a new command: start over
                if e_.error != Error.BAD_OFFSET or restarts >= MAX_RECOVERIES:
                    raise
                start, restarts = 0, restarts + 1
                continue
            got = _unpack(WRITE_RESIDUAL_RESPONSE, answer, SliceOp.WRITE_RESIDUAL)
            if got != (slot, position, start + n):
                raise WrongDeviceError(f"the device at {self.name} answered WRITE_RESIDUAL with {got}, expected "
                                       f"{(slot, position, start + n)}")
            start += n

    def feed_slot(self, slot: int, position: int, token: int = 0) -> FeedResult:
        """FEED_SLOT: one step of ``slot`` at ``position`` from ``token`` (a slice with the embedding)
        or from the residual written for it; the device then holds the output."""
        answer = self._exchange(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(slot, position, token))
        result = FeedResult(*_unpack(FEED_SLOT_RESPONSE, answer, SliceOp.FEED_SLOT))
        if result.position != position + 1:
            raise WrongDeviceError(f"the device at {self.name} answered a feed of slot {slot} at position "
                                   f"{position} with position {result.position}")
        return result

    def read_output(self, slot: int, position: int, count: int, logits: bool) -> np.ndarray:
        """READ_OUTPUT in pieces: ``count`` values of ``slot``'s output at ``position`` (the logits,
        int32 Q16, with ``logits``; else the residual), as int64."""
        info = self.info or self.identify()
        e, dtype = (4, "<i4") if logits else self._element_dtype()
        per = min(MAX_LOGITS_PER_READ, (info.max_payload - READ_OUTPUT_HEADER.size) // e)
        out = np.empty(count, dtype=np.int64)
        start = 0
        while start < count:
            n = min(per, count - start)
            answer = self._exchange(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(slot, position, start, n))
            if len(answer) != READ_OUTPUT_HEADER.size + e * n or \
                    READ_OUTPUT_HEADER.unpack_from(answer) != (slot, position, start):
                raise WrongDeviceError(f"the device at {self.name} answered READ_OUTPUT of slot {slot} at position "
                                       f"{position} from {start} with something else")
            out[start:start + n] = np.frombuffer(answer, dtype=dtype, offset=READ_OUTPUT_HEADER.size)
            start += n
        return out

    def _check_verify_supported(self) -> None:
        info = self.info or self.identify()
        if info.version_minor < MINOR_LOAD_STATUS:
            raise IncompatibleDeviceError(
                f"the engine at {self.name} speaks protocol {info.version_major}.{info.version_minor}, which cannot "
                f"read its weights back (VERIFY_IMAGE came with {info.version_major}.{MINOR_LOAD_STATUS}); "
                "leave out --verify or rebuild the engine from this version")

    def verify_weights(self, image: WeightImage) -> None:
        """VERIFY_IMAGE: the device reads its weight memory back; VerifyError unless the CRC-32 of
        what it read is ``image``'s."""
        self._check_verify_supported()
        try:
            answer = self._exchange(Op.VERIFY_IMAGE)
        except DeviceNak as e:
            if e.error == Error.UNKNOWN_OP:
                raise IncompatibleDeviceError(
                    f"the engine at {self.name} cannot read its weight memory back (no VERIFY_IMAGE in this "
                    "build, e.g. the iCE40 tiny engine); leave out --verify") from None
            if e.error == Error.NO_WEIGHTS:
                raise DriverError(f"the engine at {self.name} holds no weights to verify (was it reset?); "
                                  "run again to load them") from None
            raise
        size, crc = _unpack(VERIFY_IMAGE_RESPONSE, answer, Op.VERIFY_IMAGE)
        if (size, crc) != (image.size, image.crc32):
            raise VerifyError(
                f"read-back verification failed: the engine at {self.name} read {size:,} bytes with CRC-32 "
                f"{crc:08x} from its weight memory, the image has {image.size:,} bytes with CRC-32 "
                f"{image.crc32:08x}; the memory does not hold what was loaded (a faulty memory or memory "
                "settings): load again with --force-load, or check the board's memory")

    # -- state and tokens -----------------------------------------------------------------
    def reset_state(self) -> None:
        (position,) = _unpack(POSITION, self._exchange(Op.RESET_STATE), Op.RESET_STATE)
        if position != 0:
            raise WrongDeviceError(f"the device at {self.name} reports position {position} after RESET_STATE")
        self.history.clear()
        self._predicted.clear()

    def _feed_once(self, position: int, token: int) -> FeedResult:
        answer = self._exchange(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(position, token))
        result = FeedResult(*_unpack(FEED_TOKEN_RESPONSE, answer, Op.FEED_TOKEN))
        if result.position != position + 1:
            raise WrongDeviceError(f"the device at {self.name} answered a feed at position {position} "
                                   f"with position {result.position}")
        return result

    def feed(self, token: int) -> FeedResult:
        """Feed one token at the current position; recovers from a device reset and retries."""
        for _ in range(MAX_RECOVERIES + 1):
            try:
                result = self._feed_once(len(self.history), token)
            except DeviceNak as e:
                if e.error not in (Error.POSITION_MISMATCH, Error.NO_WEIGHTS):
                    raise
                self._recover(e)
                continue
            self.history.append(token)
            self._predicted.append(result.token)
            self.feed_cycles.append(result.cycles)
            return result
        raise RecoveryError(f"the device at {self.name} keeps losing its state")

    def logits(self) -> np.ndarray:
        """The integer (Q16) logits after the last token fed, read in pieces; recovers like feed."""
        info = self.info or self.identify()
        if not self.history:
            raise DriverError("there are no logits before the first token is fed")
        per_read = min(MAX_LOGITS_PER_READ, (info.max_payload - READ_LOGITS_HEADER.size) // 4)
        for _ in range(MAX_RECOVERIES + 1):
            position = len(self.history)
            out = np.empty(info.vocab_size, dtype=np.int64)
            start = 0
            try:
                while start < info.vocab_size:
                    count = min(self.logits_read.size, per_read, info.vocab_size - start)
                    try:
                        answer = self._exchange(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(position, start, count),
                                                give_up=2 if count > MIN_LOGITS_READ else None)
                    except _GiveUp:      # reading is idempotent: ask for fewer at once
                        self.logits_read.failed(count)
                        continue
                    if len(answer) != READ_LOGITS_HEADER.size + 4 * count or \
                            READ_LOGITS_HEADER.unpack_from(answer) != (position, start):
                        raise WrongDeviceError(f"the device at {self.name} answered READ_LOGITS for position "
                                               f"{position} from {start} with something else")
                    out[start:start + count] = np.frombuffer(answer, dtype="<i4", offset=READ_LOGITS_HEADER.size)
                    self.logits_read.done(self.last_failures)
                    start += count
                return out
            except DeviceNak as e:
                if e.error not in (Error.POSITION_MISMATCH, Error.NO_WEIGHTS):
                    raise
                self._recover(e)
        raise RecoveryError(f"the device at {self.name} keeps losing its state")

    def _recover(self, cause: DeviceNak) -> None:
        """Bring a device that lost its state back to exactly ``self.history``."""
        history, predicted = list(self.history), list(self._predicted)
        self.stats.recoveries += 1
        self.log(f"the device lost its state ({cause}); recovering {len(history)} tokens")
        last: DeviceNak = cause
        for _ in range(MAX_RECOVERIES):
            try:
                info = self.identify()
                intact = info.weights_loaded and (self.image is None or self.holds(self.image))
                if not intact:
                    if self.image is None:
                        raise RecoveryError(f"the device at {self.name} lost its weights and this driver has no "
                                            "image to reload; load the weights again")
                    self.log("reloading the weights")
                    self.load_weights(self.image)
                self.reset_state()
                for position, token in enumerate(history):
                    result = self._feed_once(position, token)
                    if result.token != predicted[position]:
                        raise RecoveryError(
                            f"after recovery the device predicts {result.token} at position {position + 1}, "
                            f"before it predicted {predicted[position]}: its state cannot be restored exactly")
                    self.history.append(token)
                    self._predicted.append(result.token)
                    self.stats.replayed_tokens += 1
                return
            except DeviceNak as e:
                if e.error not in (Error.POSITION_MISMATCH, Error.NO_WEIGHTS, Error.NO_LOAD):
                    raise
                last = e
        raise RecoveryError(f"the device at {self.name} lost its state {MAX_RECOVERIES} times during "
                            f"recovery (last: {last})")

    def generate(self, prompt: list[int], steps: int, sampler: Sampler | None = None) -> Iterator[int]:
        """Reset, feed the prompt, then yield ``steps`` new tokens as they arrive.

        Greedy (the device's argmax) unless ``sampler`` samples; then the logits are read and
        ``sampler`` sees them as floats (Q16 / 2^16), exactly as ``reference --integer`` does.
        """
        info = self.info or self.identify()
        sampler = sampler or Sampler()
        if steps < 0:
            raise UserError("--steps must be >= 0")
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad:
            raise UserError(f"prompt id {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
        return self._generate(list(prompt), steps, sampler)

    def _generate(self, prompt: list[int], steps: int, sampler: Sampler) -> Iterator[int]:
        self.reset_state()
        last = None
        for token in prompt:
            last = self.feed(token)
        for step in range(steps):
            if sampler.greedy:
                token = last.token
            else:
                # the wire's logits are Q16 whatever the engine's formats (reference.integer.wire_logits)
                token = sampler(self.logits().astype(np.float64) / (1 << WIRE_LOGIT_FRAC))
            yield token
            if step < steps - 1:
                last = self.feed(token)
