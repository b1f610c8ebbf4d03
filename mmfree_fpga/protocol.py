"""The wire protocol between a host and an mmfree-fpga engine: defined once, here.

The host driver (``host/driver.py``), the Python device model (``host/device_model.py``) and
the hardware's UART front end all implement exactly this module; the gateware imports the
enums, constants and CRC algorithms from it (``FRAME_CRC(data_width=8)`` gives an
``amaranth.lib.crc.Processor``'s parameters), so no number is written twice.

Frame (both directions; multi-byte fields little-endian, except the trailing CRC-16)::

    offset  size  field
    0       1     SYNC = 0xA5
    1       1     SEQ      sequence number, chosen by the host, echoed by the device
    2       1     OP       opcode (Op); bit 7 (RESPONSE) set on every device -> host frame
    3       2     LEN      payload length, 0 .. MAX_PAYLOAD
    5       1     HCRC     CRC-8/AUTOSAR of bytes 1..4 (SEQ, OP, LEN)
    6       LEN   PAYLOAD
    6+LEN   2     CRC      CRC-16/IBM-3740 of bytes 1 .. 5+LEN, most significant byte first

Sending the CRC-16 most significant byte first means that a receiver which runs every byte
after SYNC, the CRC included, through one CRC-16/IBM-3740 register ends on the residue 0:
Amaranth's ``Processor.match_detected``. The header CRC lets a receiver reject a corrupt
length at once instead of waiting for up to MAX_PAYLOAD bytes, and makes SEQ/OP of a frame
whose payload is corrupt trustworthy enough to answer with a NAK.

Receiving: scan for SYNC; wait for the 6 header bytes; if HCRC is wrong or LEN > MAX_PAYLOAD,
drop the SYNC byte and scan on from the next byte. Otherwise wait for the whole frame; if the
CRC-16 is wrong, drop the SYNC byte and scan on (a device answers NAK BAD_CRC first, but only
to host -> device frames). A partial frame that sees no byte for FRAME_IDLE_TIMEOUT_S is
dropped the same way. (A hardware receiver may restart its scan at the next incoming byte
instead of rescanning the bytes it already took: the host retransmits, so that only costs time.)

Exchanges are stop-and-wait: the host sends one command and waits for its response (same SEQ,
``OP | RESPONSE``) or a NAK (same SEQ, op NAK_RESPONSE). A new command gets the next SEQ (mod
256); a retransmission keeps its SEQ and bytes. The device keeps its last executed command's
(SEQ, CRC-16) and response: a frame with the same SEQ and CRC-16 is answered by resending that
response without executing again, so a lost response never makes a command run twice (a
token fed twice). NAKs are never cached and a rejected frame changes no state at all. (A
device may run a duplicate of IDENTIFY or READ_LOGITS again instead of caching its answer:
they change nothing, so the bytes come out the same; only the answers of commands that change
state, at most 16 bytes, need storing. LOAD_STATUS, VERIFY_IMAGE, SLICE_INFO and READ_OUTPUT
change nothing either.)

Versions: a host accepts a device of its major version and any minor. Minor 1 added LOAD_STATUS
and VERIFY_IMAGE; a 1.0 device answers both with UNKNOWN_OP, and a host talking to it loads an
image from byte 0 and cannot verify it. Minor 2 added the slice ops (:class:`SliceOp`, below) that
let several devices run one model as a pipeline, each holding a contiguous slice of its layers;
they are optional: a device without state slots (every 1.0/1.1 device, and a 1.2 engine built
without them) answers them UNKNOWN_OP and runs whole models only. Nothing else changed: a 1.1 host
talks to a 1.2 device as to a 1.1 device.

Commands (request payload -> response payload; all fields little-endian)::

    op    name         request                          response (op | 0x80)
    0x01  IDENTIFY     -                                Identity (IDENTITY, 51 bytes)
    0x02  RESET_STATE  -                                position u32 (= 0)
    0x03  LOAD_BEGIN   size u32, crc32 u32              size u32, crc32 u32
    0x04  LOAD_CHUNK   offset u32, data[1..MAX_CHUNK]   next_offset u32
    0x05  LOAD_COMMIT  -                                size u32, crc32 u32
    0x06  FEED_TOKEN   position u32, token u32          position u32, argmax u32,
                                                        logit i32, cycles u32
    0x07  READ_LOGITS  position u32, start u32,         position u32, start u32,
                       count u16                        logits i32[count]
    0x08  LOAD_STATUS  -                                size u32, crc32 u32, pointer u32,
          (1.1)                                         running_crc32 u32
    0x09  VERIFY_IMAGE -                                size u32, crc32 u32
          (1.1)
    0x0a  SLICE_INFO   -                                SliceInfo (SLICE_INFO_RESPONSE, 16 bytes)
          (1.2)
    0x0b  LOAD_SLICE   size u32, crc32 u32, first u16,  size u32, crc32 u32, first u16,
          (1.2)        end u16, parts u8                end u16, parts u8
    0x0c  RESET_SLOT   slot u8                          slot u8, position u32 (= 0)
          (1.2)
    0x0d  WRITE_       slot u8, position u32, start     slot u8, position u32, next u16
          RESIDUAL     u16, values[1..n]
          (1.2)
    0x0e  FEED_SLOT    slot u8, position u32, token u32 position u32, argmax u32, logit i32,
          (1.2)                                         cycles u32 (as FEED_TOKEN's)
    0x0f  READ_OUTPUT  slot u8, position u32, start     slot u8, position u32, start u32,
          (1.2)        u32, count u16                   values[count]
    0x7f  (NAK)        never sent by the host           sent as op 0xff: error u8,
                                                        rejected op u8, arg u32

Before a command runs, the device checks, in this order (the first failure is the NAK): the
opcode (UNKNOWN_OP), the payload length (BAD_LENGTH, arg = the length expected; for
LOAD_CHUNK the minimum 5 when it is shorter, the maximum 4 + MAX_CHUNK when it is longer), then
per command as listed below. Every check comes before any change of state.

* IDENTIFY: answered in any state. ``Identity`` (wire order): magic "HGRB", protocol version
  major/minor, a boot id (new after every power-up or reset), the geometry the engine was built
  for (vocab u32, hidden u32, layers u16, intermediate u32), lanes u16, trit packing u8
  (Packing), image format version u8, formats id u32 (``formats_id()``), max payload u16,
  an upper bound of one FEED_TOKEN's compute time in ms u32, status u8 (Status bits), the
  loaded image's size u32 and CRC-32 u32 (0 when none) and the token position u32.
* RESET_STATE: zeroes the recurrent state: position 0, no logits. Needs no weights.
* LOAD_BEGIN: size must be exactly what the engine's geometry and packing imply
  (BAD_IMAGE_SIZE, arg = that size); crc32 is the CRC-32/ISO-HDLC (zlib) of the whole image.
  Drops the loaded weights and the state, and opens a load with write pointer 0 (restarting
  any load in progress).
* LOAD_CHUNK: a load must be open (NO_LOAD); ``offset`` must equal the write pointer
  (BAD_OFFSET, arg = the pointer), so chunks come in order and the CRC is computed on the fly;
  the data must not run past the size (BAD_ARGUMENT, arg = bytes left). Writes the data and
  advances the pointer.
* LOAD_COMMIT: a load must be open (NO_LOAD), the pointer at the size (INCOMPLETE, arg = the
  pointer), the running CRC equal to LOAD_BEGIN's (CHECKSUM_MISMATCH, arg = the computed CRC;
  the load stays open, the host starts over with LOAD_BEGIN). Then the weights count as
  loaded, the load closes, the state is reset.
  The image is ``weights.bin`` exactly as ``mmfree-fpga export`` writes it for the engine's
  packing; its layout follows from geometry and packing alone
  (``mmfree_fpga.image.image_layout``), so an engine never parses the manifest.
* FEED_TOKEN: weights loaded (NO_WEIGHTS); token < vocab (BAD_ARGUMENT, arg = vocab);
  ``position`` equal to the device's position, the tokens fed since RESET_STATE
  (POSITION_MISMATCH, arg = the device's position): this makes a feed idempotent and exposes
  a device that lost its state; a position of 2^32 - 1 cannot advance (BAD_ARGUMENT). Runs
  one step; the response has the new position, the greedy next token (the first index of the
  largest logit), that logit (Q16, like every logit) and the cycles the step took (0 if not
  counted).
* READ_LOGITS: weights loaded (NO_WEIGHTS); ``position`` equal to the device's
  (POSITION_MISMATCH, arg = the device's position); then a token fed since RESET_STATE,
  1 <= count <= min(MAX_LOGITS_PER_READ, (max payload - 8) / 4) and start + count <= vocab
  (BAD_ARGUMENT, arg = that largest count). Returns logits[start:start+count] of the last step.
* LOAD_STATUS (minor 1): answered in any state, changes nothing. While a load is open: its size
  and target CRC-32 (LOAD_BEGIN's), the write pointer and the CRC-32 of the bytes received so
  far (``crc32_image(image[:pointer])`` when they are the image's); with no load open, four
  zeros. A host that lost a load midway (its process killed, the link gone; the device kept
  power) resumes it with LOAD_CHUNK at the pointer, skipping LOAD_BEGIN, when size and target
  CRC are its image's and the running CRC equals its own CRC of image[:pointer]; otherwise it
  starts over with LOAD_BEGIN.
* VERIFY_IMAGE (minor 1, optional): weights loaded (NO_WEIGHTS). The device reads the stored
  image back from its weight memory (block RAM, DRAM) and answers its size and the CRC-32 of
  the bytes read; the host compares that with its image's CRC. Changes nothing; it takes about
  one memory read of the image (at least VERIFY_MIN_BYTES_PER_S). A device whose engine cannot
  read its weight memory back answers UNKNOWN_OP.
* A frame with the RESPONSE bit, a frame failing HCRC and garbage get no answer; a frame whose
  CRC-16 fails gets NAK BAD_CRC (arg 0); an unknown op (or NAK) gets UNKNOWN_OP.
"""

from __future__ import annotations

import binascii
import enum
import json
import struct
import zlib
from dataclasses import astuple, dataclass

from amaranth.lib.crc import catalog as _crc_catalog

from .config import FORMATS, Formats
from .packing import PACKINGS

__all__ = [
    "SYNC", "RESPONSE", "PROTOCOL_VERSION", "DEVICE_MAGIC", "HEADER_LEN", "TRAILER_LEN",
    "FRAME_OVERHEAD", "MAX_CHUNK", "MAX_LOGITS_PER_READ", "WIRE_LOGIT_FRAC", "MAX_PAYLOAD", "MIN_DEVICE_PAYLOAD",
    "Op", "Error", "NAK_RESPONSE", "Packing", "Status",
    "HEADER_CRC", "FRAME_CRC", "IMAGE_CRC", "crc8_header", "crc16_frame", "crc32_image",
    "table_crc", "formats_id",
    "Identity", "IDENTITY", "POSITION", "LOAD_BEGIN_REQUEST", "LOAD_BEGIN_RESPONSE",
    "LOAD_CHUNK_HEADER", "LOAD_CHUNK_RESPONSE", "LOAD_COMMIT_RESPONSE", "FEED_TOKEN_REQUEST",
    "FEED_TOKEN_RESPONSE", "READ_LOGITS_REQUEST", "READ_LOGITS_HEADER", "LOAD_STATUS_RESPONSE",
    "VERIFY_IMAGE_RESPONSE", "NAK_PAYLOAD", "REQUEST_LENGTHS", "MINOR_LOAD_STATUS",
    "MINOR_SLICES", "SliceOp", "SliceInfo", "SLICE_INFO_RESPONSE", "LOAD_SLICE_REQUEST", "LOAD_SLICE_RESPONSE",
    "RESET_SLOT_REQUEST", "RESET_SLOT_RESPONSE", "WRITE_RESIDUAL_HEADER", "WRITE_RESIDUAL_RESPONSE",
    "FEED_SLOT_REQUEST", "FEED_SLOT_RESPONSE", "READ_OUTPUT_REQUEST", "READ_OUTPUT_HEADER",
    "SLICE_REQUEST_LENGTHS", "MAX_RESIDUAL_PER_WRITE", "MAX_SLOTS", "residual_element_bytes", "op_name",
    "Frame", "BadFrame", "encode_frame", "FrameDecoder",
    "DEFAULT_BAUD", "FRAME_IDLE_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "MIN_TIMEOUT_S", "MAX_TIMEOUT_S", "EARLY_RETRY_GAP_S",
    "CONNECT_TIMEOUT_S", "CONNECT_RETRIES", "MAX_SILENT_RETRIES", "MAX_ATTEMPTS",
    "MAX_RECOVERIES", "MAX_LOAD_ATTEMPTS", "MIN_CHUNK", "MIN_LOGITS_READ", "VERIFY_MIN_BYTES_PER_S",
]

# -- framing ---------------------------------------------------------------------------

SYNC = 0xA5
RESPONSE = 0x80
PROTOCOL_VERSION = (1, 2)          # (major, minor): a host accepts any minor of its major
MINOR_LOAD_STATUS = 1              # the first minor with LOAD_STATUS and VERIFY_IMAGE
MINOR_SLICES = 2                   # the first minor with the (optional) slice ops
DEVICE_MAGIC = b"HGRB"
HEADER_LEN = 6                     # SYNC SEQ OP LEN(2) HCRC
TRAILER_LEN = 2                    # CRC-16
FRAME_OVERHEAD = HEADER_LEN + TRAILER_LEN

MAX_CHUNK = 1024                   # LOAD_CHUNK data bytes
MAX_LOGITS_PER_READ = 256          # READ_LOGITS count
WIRE_LOGIT_FRAC = 16               # logits on the wire (FEED_TOKEN's logit, READ_LOGITS) are Q16 int32,
                                   # whatever the engine's formats (reference.integer.wire_logits)
MAX_PAYLOAD = max(4 + MAX_CHUNK, 8 + 4 * MAX_LOGITS_PER_READ)   # 1032
MAX_RESIDUAL_PER_WRITE = 256       # WRITE_RESIDUAL values (fewer where the payload limits them)
MAX_SLOTS = 255                    # state slots a device may announce (a byte)
MIN_DEVICE_PAYLOAD = 64            # a device may announce a smaller buffer, not below this


class Op(enum.IntEnum):
    """Command opcodes; a response carries ``op | RESPONSE``."""

    IDENTIFY = 0x01
    RESET_STATE = 0x02
    LOAD_BEGIN = 0x03
    LOAD_CHUNK = 0x04
    LOAD_COMMIT = 0x05
    FEED_TOKEN = 0x06
    READ_LOGITS = 0x07
    LOAD_STATUS = 0x08        # (minor 1)
    VERIFY_IMAGE = 0x09       # (minor 1, optional)
    NAK = 0x7F


NAK_RESPONSE = Op.NAK | RESPONSE


class SliceOp(enum.IntEnum):
    """The slice ops of minor 2 (module docstring: layer slices and state slots). Optional, so
    they are not in :class:`Op`, the set every device executes; a device without state slots
    answers them UNKNOWN_OP."""

    SLICE_INFO = 0x0A
    LOAD_SLICE = 0x0B
    RESET_SLOT = 0x0C
    WRITE_RESIDUAL = 0x0D
    FEED_SLOT = 0x0E
    READ_OUTPUT = 0x0F


def op_name(op: int) -> str:
    """The name of an opcode of :class:`Op` or :class:`SliceOp`, else 'op 0x..'."""
    for enum_ in (Op, SliceOp):
        try:
            return enum_(op).name
        except ValueError:
            pass
    return f"op {op:#x}"


class Error(enum.IntEnum):
    """NAK error codes; ``arg`` is described where it carries something."""

    BAD_CRC = 0x01            # payload CRC-16 wrong (header was valid): retransmit
    UNKNOWN_OP = 0x02
    BAD_LENGTH = 0x03         # payload length wrong for the op; arg = the length expected
    BAD_ARGUMENT = 0x04       # token or logit range outside the vocabulary, count out of range
    NO_WEIGHTS = 0x05         # the command needs loaded weights
    POSITION_MISMATCH = 0x06  # arg = the device's position
    BAD_OFFSET = 0x07         # arg = the device's write pointer
    NO_LOAD = 0x08            # LOAD_CHUNK/LOAD_COMMIT without LOAD_BEGIN
    BAD_IMAGE_SIZE = 0x09     # arg = the image size this engine takes
    CHECKSUM_MISMATCH = 0x0A  # arg = the CRC-32 the device computed
    INCOMPLETE = 0x0B         # arg = bytes received so far


class Packing(enum.IntEnum):
    """Trit packing of the image (``mmfree_fpga/packing.py``): on the wire and in the engine's
    packing select, a packing's code is its index in :data:`~mmfree_fpga.packing.PACKINGS`."""

    TWO_BIT = PACKINGS.index("2bit")
    BASE3 = PACKINGS.index("base3")

    @property
    def name_in_export(self) -> str:
        return PACKINGS[self]

    @classmethod
    def from_export_name(cls, name: str) -> "Packing":
        return cls(PACKINGS.index(name))


class Status(enum.IntFlag):
    WEIGHTS_LOADED = 0x01
    LOADING = 0x02
    MEMORY_ERROR = 0x04       # the weight memory failed to start (a DRAM's calibration): nothing runs


# -- CRCs --------------------------------------------------------------------------------

HEADER_CRC = _crc_catalog.CRC8_AUTOSAR      # poly 0x2F, init 0xFF, xorout 0xFF, not reflected
FRAME_CRC = _crc_catalog.CRC16_IBM_3740     # poly 0x1021, init 0xFFFF, not reflected ("CCITT-FALSE")
IMAGE_CRC = _crc_catalog.CRC32_ISO_HDLC     # zlib/Ethernet CRC-32


def _reflect(value: int, width: int) -> int:
    return int(f"{value:0{width}b}"[::-1], 2)


def table_crc(algorithm):
    """A byte-wise table implementation of any catalog CRC ``algorithm``: ``f(data) -> int``."""
    width, poly = algorithm.crc_width, algorithm.polynomial
    if width < 8:
        raise ValueError("CRCs narrower than 8 bits are not supported here")
    mask, top = (1 << width) - 1, 1 << (width - 1)
    if algorithm.reflect_input:
        rpoly = _reflect(poly, width)
        table = []
        for b in range(256):
            c = b
            for _ in range(8):
                c = (c >> 1) ^ rpoly if c & 1 else c >> 1
            table.append(c)
    else:
        table = []
        for b in range(256):
            c = b << (width - 8) if width >= 8 else b
            for _ in range(8):
                c = ((c << 1) ^ poly) & mask if c & top else (c << 1) & mask
            table.append(c)
    init = algorithm.initial_crc
    refin, refout, xorout = algorithm.reflect_input, algorithm.reflect_output, algorithm.xor_output

    def compute(data) -> int:
        if refin:
            crc = _reflect(init, width)
            for b in data:
                crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
            out = crc if refout else _reflect(crc, width)
        else:
            crc = init
            for b in data:
                crc = ((crc << 8) & mask) ^ table[((crc >> (width - 8)) ^ b) & 0xFF]
            out = _reflect(crc, width) if refout else crc
        return out ^ xorout

    return compute


crc8_header = table_crc(HEADER_CRC)


def crc16_frame(data) -> int:
    """CRC-16/IBM-3740 (``binascii.crc_hqx`` with init 0xFFFF is exactly that algorithm)."""
    return binascii.crc_hqx(bytes(data), 0xFFFF)


def crc32_image(data, crc: int = 0) -> int:
    """CRC-32/ISO-HDLC of the weight image (zlib's crc32); ``crc`` continues a running value."""
    return zlib.crc32(data, crc)


def residual_element_bytes(fmt: Formats = FORMATS) -> int:
    """Bytes of one residual value on the wire (WRITE_RESIDUAL, READ_OUTPUT without the head):
    4 (int32) when x_bits <= 32, else 8 (int64)."""
    return 4 if fmt.x_bits <= 32 else 8


def formats_id(fmt: Formats = FORMATS) -> int:
    """CRC-32 of the canonical JSON of the fixed-point formats: the engine reports it in IDENTIFY."""
    text = json.dumps(fmt.as_dict(), sort_keys=True, separators=(",", ":"))
    return crc32_image(text.encode())


# -- payloads ----------------------------------------------------------------------------

POSITION = struct.Struct("<I")                      # RESET_STATE response
LOAD_BEGIN_REQUEST = struct.Struct("<II")           # size, crc32
LOAD_BEGIN_RESPONSE = struct.Struct("<II")          # size, crc32
LOAD_CHUNK_HEADER = struct.Struct("<I")             # offset, then the data
LOAD_CHUNK_RESPONSE = struct.Struct("<I")           # next offset
LOAD_COMMIT_RESPONSE = struct.Struct("<II")         # size, crc32
FEED_TOKEN_REQUEST = struct.Struct("<II")           # position, token
FEED_TOKEN_RESPONSE = struct.Struct("<IIiI")        # position, argmax, logit, cycles
READ_LOGITS_REQUEST = struct.Struct("<IIH")         # position, start, count
READ_LOGITS_HEADER = struct.Struct("<II")           # position, start, then int32 logits
LOAD_STATUS_RESPONSE = struct.Struct("<IIII")       # size, crc32, pointer, running crc32 (0s: no load)
VERIFY_IMAGE_RESPONSE = struct.Struct("<II")        # size, crc32 of the image read back
NAK_PAYLOAD = struct.Struct("<BBI")                 # error, rejected op, arg

SLICE_INFO_RESPONSE = struct.Struct("<BBHHBHHIB")   # SliceInfo, wire order
LOAD_SLICE_REQUEST = struct.Struct("<IIHHB")        # size, crc32, first layer, end layer, parts
LOAD_SLICE_RESPONSE = LOAD_SLICE_REQUEST            # the same fields, echoed
RESET_SLOT_REQUEST = struct.Struct("<B")            # slot
RESET_SLOT_RESPONSE = struct.Struct("<BI")          # slot, position (0)
WRITE_RESIDUAL_HEADER = struct.Struct("<BIH")       # slot, position, start; then the values
WRITE_RESIDUAL_RESPONSE = struct.Struct("<BIH")     # slot, position, next (the write pointer)
FEED_SLOT_REQUEST = struct.Struct("<BII")           # slot, position, token
FEED_SLOT_RESPONSE = FEED_TOKEN_RESPONSE            # position, argmax, logit, cycles (16 bytes)
READ_OUTPUT_REQUEST = struct.Struct("<BIIH")        # slot, position, start, count
READ_OUTPUT_HEADER = struct.Struct("<BII")          # slot, position, start; then the values

# exact request payload lengths; LOAD_CHUNK is header + 1..MAX_CHUNK bytes of data
REQUEST_LENGTHS = {
    Op.IDENTIFY: 0, Op.RESET_STATE: 0, Op.LOAD_BEGIN: LOAD_BEGIN_REQUEST.size,
    Op.LOAD_COMMIT: 0, Op.FEED_TOKEN: FEED_TOKEN_REQUEST.size, Op.READ_LOGITS: READ_LOGITS_REQUEST.size,
    Op.LOAD_STATUS: 0, Op.VERIFY_IMAGE: 0,
}

# the slice ops' exact request lengths; WRITE_RESIDUAL is its header + whole values
SLICE_REQUEST_LENGTHS = {
    SliceOp.SLICE_INFO: 0, SliceOp.LOAD_SLICE: LOAD_SLICE_REQUEST.size, SliceOp.RESET_SLOT: RESET_SLOT_REQUEST.size,
    SliceOp.FEED_SLOT: FEED_SLOT_REQUEST.size, SliceOp.READ_OUTPUT: READ_OUTPUT_REQUEST.size,
}

IDENTITY = struct.Struct("<4sBBIIIHIHBBIHIBIII")


@dataclass(frozen=True)
class Identity:
    """The IDENTIFY response, field by field in wire order."""

    magic: bytes
    version_major: int
    version_minor: int
    boot_id: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    lanes: int               # MAC lanes of the engine (0: not a lane-parallel engine, e.g. the model)
    packing: int             # Packing
    image_version: int       # reference/export.py IMAGE_VERSION the engine reads
    formats_id: int          # formats_id() of the engine's fixed-point formats
    max_payload: int         # largest payload the device accepts and sends
    step_time_ms: int        # upper bound of one FEED_TOKEN's compute time (0: unknown)
    status: int              # Status bits
    image_size: int          # of the loaded image (0 if none)
    image_crc: int           # CRC-32 of the loaded image (0 if none)
    position: int            # tokens fed since RESET_STATE

    def pack(self) -> bytes:
        return IDENTITY.pack(*astuple(self))

    @classmethod
    def unpack(cls, payload: bytes) -> "Identity":
        return cls(*IDENTITY.unpack(payload))

    @property
    def weights_loaded(self) -> bool:
        return bool(self.status & Status.WEIGHTS_LOADED)

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        return (self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size)


@dataclass(frozen=True)
class SliceInfo:
    """The SLICE_INFO response, field by field in wire order."""

    slots: int               # state slots (>= 1)
    parts: int               # of the loaded weights' slice: bit 0 embedding, bit 1 head (0: none loaded)
    first_layer: int
    end_layer: int
    load_parts: int          # the open load's slice (all 0: no load open)
    load_first_layer: int
    load_end_layer: int
    capacity: int            # the largest image the weight memory holds, bytes
    element_bytes: int       # of a residual value on the wire

    def pack(self) -> bytes:
        return SLICE_INFO_RESPONSE.pack(*astuple(self))

    @classmethod
    def unpack(cls, payload: bytes) -> "SliceInfo":
        return cls(*SLICE_INFO_RESPONSE.unpack(payload))


# -- frames ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A frame that passed both CRCs. ``crc`` is its CRC-16 (the device's replay key)."""

    seq: int
    op: int
    payload: bytes
    crc: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.op & RESPONSE)


@dataclass(frozen=True)
class BadFrame:
    """A frame whose header was valid but whose CRC-16 was not (so SEQ and OP are known)."""

    seq: int
    op: int
    length: int


def encode_frame(seq: int, op: int, payload: bytes = b"") -> bytes:
    """The bytes of one frame."""
    if not 0 <= seq <= 0xFF or not 0 <= op <= 0xFF:
        raise ValueError(f"seq {seq} and op {op} must be bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD {MAX_PAYLOAD}")
    head = bytes((seq, op, len(payload) & 0xFF, len(payload) >> 8))
    body = head + bytes((crc8_header(head),)) + payload
    return bytes((SYNC,)) + body + crc16_frame(body).to_bytes(2, "big")


class FrameDecoder:
    """Incremental frame decoder that resynchronises after garbage.

    ``feed(data)`` returns the Frames and BadFrames completed by ``data``, in order. Garbage
    before or between frames is skipped; after any failure the decoder drops the SYNC byte it
    had taken for the start of a frame and rescans from the byte after it, so a real frame
    hidden behind a false start is still found. Memory is bounded: at most one frame's worth
    of bytes is kept between calls.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        if not 0 <= max_payload <= 0xFFFF:
            raise ValueError("max_payload must fit the 16-bit length field")
        self.max_payload = max_payload
        self._buf = bytearray()
        self.frames = 0
        self.bad_frames = 0
        self.header_errors = 0
        self.garbage_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes held as the start of an incomplete frame."""
        return len(self._buf)

    def pending_header(self) -> tuple[int, int, int] | None:
        """(seq, op, length) of the incomplete frame being received, once its header checked out."""
        if len(self._buf) < HEADER_LEN:
            return None
        return self._buf[1], self._buf[2], self._buf[3] | (self._buf[4] << 8)

    def clear(self) -> None:
        self.garbage_bytes += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        self._buf += data
        return self._scan()

    def abandon(self) -> list[Frame | BadFrame]:
        """Give up on the pending partial frame (the line went idle): skip its SYNC, rescan."""
        if not self._buf:
            return []
        del self._buf[:1]
        self.garbage_bytes += 1
        return self._scan()

    def _scan(self) -> list[Frame | BadFrame]:
        buf, out, i, n = self._buf, [], 0, len(self._buf)
        while i < n:
            j = buf.find(SYNC, i)
            if j < 0:
                self.garbage_bytes += n - i
                i = n
                break
            self.garbage_bytes += j - i
            i = j
            if n - i < HEADER_LEN:
                break
            length = buf[i + 3] | (buf[i + 4] << 8)
            if length > self.max_payload or crc8_header(buf[i + 1:i + 5]) != buf[i + 5]:
                self.header_errors += 1
                self.garbage_bytes += 1
                i += 1
                continue
            end = i + HEADER_LEN + length + TRAILER_LEN
            if end > n:
                break
            crc = int.from_bytes(buf[end - 2:end], "big")
            if crc16_frame(buf[i + 1:end - 2]) == crc:
                out.append(Frame(seq=buf[i + 1], op=buf[i + 2],
                                 payload=bytes(buf[i + HEADER_LEN:end - 2]), crc=crc))
                self.frames += 1
                i = end
            else:
                out.append(BadFrame(seq=buf[i + 1], op=buf[i + 2], length=length))
                self.bad_frames += 1
                self.garbage_bytes += 1
                i += 1
        del buf[:i]
        return out


# -- timing and retry policy (host side, and the device's idle timeout) ---------------------

DEFAULT_BAUD = 3_000_000       # the serial line: the boards' UART 8N1 rate and the host's default

FRAME_IDLE_TIMEOUT_S = 0.1     # a receiver drops a partial frame after this long without a byte
DEFAULT_TIMEOUT_S = 0.5        # first response timeout of a command, before round trips are measured
MIN_TIMEOUT_S = 0.03           # adaptive response timeout bounds
MAX_TIMEOUT_S = 4.0
EARLY_RETRY_GAP_S = 0.005      # bytes that are no frame, then this long quiet: retransmit before the timeout
CONNECT_TIMEOUT_S = 0.5        # IDENTIFY while connecting: CONNECT_RETRIES tries of this long
CONNECT_RETRIES = 5
MAX_SILENT_RETRIES = 8         # consecutive timeouts with nothing at all received: the device is gone
MAX_ATTEMPTS = 64              # sends of one command on a noisy link (bytes arrive, frames do not)
MAX_RECOVERIES = 8             # device resets recovered in a row without a successful feed
MAX_LOAD_ATTEMPTS = 4          # whole-image load attempts (LOAD_BEGIN .. LOAD_COMMIT)
MIN_CHUNK = 32                 # the host halves its LOAD_CHUNK size on a noisy link down to this
MIN_LOGITS_READ = 8            # ... and its READ_LOGITS count down to this
VERIFY_MIN_BYTES_PER_S = 1e6   # VERIFY_IMAGE reads back at least this fast: the host's timeout
