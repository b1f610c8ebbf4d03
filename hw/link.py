"""The serial link: the wire protocol of :mod:`mmfree_fpga.protocol` in gateware.

:class:`Link` sits between the UART byte streams and the compute engine. It receives frames,
checks both CRCs, answers every command byte for byte as ``host/device_model.py`` does (the
same NAKs, in the same order of checks, the same duplicate replay, the same resynchronisation
after garbage) and drives the engine through a small command/result interface. It imports
every constant, enum, payload layout and CRC algorithm from the protocol module.

Receiving
---------
Incoming bytes go into a ring buffer (``ring_depth`` bytes, the smallest power of two that
holds a whole frame of ``max_payload``). The parser reads the ring at its own pace, so it can
rescan: when a header, a frame CRC or the idle timeout rejects a frame it resumes at the byte
after the rejected SYNC and reparses the bytes it already took, exactly like
``protocol.FrameDecoder``. A frame's bytes stay in the ring until the command is done, so
LOAD_CHUNK data is forwarded to the engine only after the frame's CRC-16 has checked out; the
ring is the chunk buffer. ``rx.ready`` falls only when the ring is full (the host's
stop-and-wait keeps it far from that).

A partial frame that sees no new byte for ``idle_timeout_cycles`` is dropped the same way
(``FRAME_IDLE_TIMEOUT_S`` at ``clk_freq`` unless given).

Commands
--------
Duplicate replay keeps the last executed command's SEQ, CRC-16 and op, not its response: every
executed command replaces that cache and a rejected one changes nothing, so when a duplicate
arrives the device is in the state the cached command left it in, and each response is a
function of that state (RESET_STATE: position 0; LOAD_BEGIN: size and the expected CRC;
LOAD_CHUNK: the write pointer; LOAD_COMMIT: size and image CRC; FEED_TOKEN: the position and
the engine's last result, the one 96-bit register kept for this). IDENTIFY and READ_LOGITS
change nothing, so a duplicate of one of them is executed again, with identical bytes.

Members
-------
rx : In(stream.Signature(8))
    Bytes from the host (the UART receiver).
tx : Out(stream.Signature(8))
    Bytes to the host (the UART transmitter).
engine : In(:class:`~.control.ControlSignature`)
    The engine-control interface, flipped: the Link drives ``cmd``, ``load`` and ``logit_req``
    and takes ``result`` and ``logit_resp`` (hw/control.py has the payloads).
memory_error : In(1), only with ``memory_status=True``
    The engine's weight memory failed to start (a DRAM's read levelling found no window): IDENTIFY
    reports ``Status.MEMORY_ERROR``.
readback : In(:class:`~.weight_port.ReadbackSignature`), only with ``readback=True``
    VERIFY_IMAGE: the Link asks the engine (``start``, the image size) for its stored image,
    between commands, and runs the bytes (``data``) through the image CRC, which its response
    reports. Without it VERIFY_IMAGE is an unknown op (UNKNOWN_OP).

    * ``cmd``: ``op`` RESET_STATE (sent by RESET_STATE and by a successful LOAD_COMMIT),
      LOAD_RESET (sent by LOAD_BEGIN) or FEED_TOKEN (``arg``: the token); ``index`` is 0. The
      Link sends one command and, for FEED_TOKEN, waits for its result before anything else;
      the engine may hold ``ready`` low while busy.
    * ``load``: image bytes in order, only of LOAD_CHUNK frames whose CRC-16 and checks passed,
      never past the image size.
    * ``result``: one per FEED_TOKEN (``token``, ``logit``, ``cycles``), copied into its response.
    * ``logit_req`` / ``logit_resp``: READ_LOGITS asks for each logit in ascending order, at
      most one request outstanding; one response per request.

Loads: LOAD_STATUS reports the open load (size, expected CRC, write pointer, the image CRC
register), zeros when none is open, so a host can resume an upload at the pointer. The image
CRC register is free once the weights are loaded (a load is then closed): VERIFY_IMAGE, which
needs weights, restarts it and runs the read-back through it.

Throughput: one byte per three cycles in parsing, in forwarding image bytes and in
transmitting (every path from the ring's output, into the CRCs or out of the Link, is cut by a
register); a UART byte takes ten bit times, at least 40 cycles.

Timing (ECP5): the request checks are computed while the trailer arrives (at least six cycles),
in registered stages, so DECIDE reads only registers; a frame's CRC verdict is registered in
CHECK; the response's next byte is prefetched (pb), and the CRCs take a byte in the cycle after
the transmitter did.

Memory: the ring is the only RAM (``ring_depth(max_payload)`` bytes: 128 for 64, 512 for 256,
2048 for MAX_PAYLOAD; one, one and four iCE40 EBRs).

Small form
----------
``Link(..., small=True)`` is the same protocol, byte for byte, in fewer logic cells for the
iCE40UP5K (the default form, tuned for ECP5 timing, is unchanged; tests/test_hw_link.py runs
every exchange test on both). It takes one block RAM more (the response ROM).

* The three CRCs are bit-serial (``data_width=1`` processors): a byte is shifted into them one
  bit per cycle by a shared feeder, and the parser, the transmitter and the chunk forwarder wait
  for it (about eleven cycles a byte; a UART byte takes at least 40).
* The response payload comes from a ROM (256 entries, 240 used on the iCEBreaker's
  parameters; two block RAMs, as its code is wide) that holds, for every byte of every response
  and of the NAK for each possible argument, either a constant or the code of a register byte
  (its group of eight and its index in the group, both one-hot); one multiplexer over the distinct
  register bytes serves all responses (the NAK's argument is picked as it is sent: no 32-bit
  argument register, no argument multiplexer). A payload byte is ready two cycles after its
  index changes.
* The first payload word of LOAD_BEGIN, LOAD_CHUNK, FEED_TOKEN and READ_LOGITS (size, offset,
  position) is compared byte by byte as it arrives with the first word of the command's
  response, read through that multiplexer while no response is being sent; it is not stored.
* The idle timeout and the boot id are LFSRs instead of counters (no carry chains): the
  timeout still expires exactly ``idle_timeout_cycles`` after the last byte; the boot id is the
  LFSR state reached from reset to the first byte received.
* The image CRC is not a register of its own: it is ``load_crc`` while weights are loaded and 0
  otherwise (a LOAD_COMMIT copies ``load_crc``, a LOAD_BEGIN drops the weights).

Layer slices and state slots
----------------------------
``Link(..., slots=N)`` (the default form only; with ``EngineCore(slots=N)``, ``LinkedEngine(slots=N)``)
executes protocol 1.2's slice ops as ``DeviceModel(slots=N)`` does, the same NAKs in the same
order and the same replay: SLICE_INFO (``slots``, the loaded and the loading slice, ``capacity``:
the whole image unless given, a DRAM engine's the DRAM's size; 4-byte residual values), LOAD_SLICE
(its image size from a table by layer count and parts), RESET_SLOT, WRITE_RESIDUAL (the values
are forwarded from the ring like a chunk's, four
bytes each, into the engine's ``residual`` input buffer), FEED_SLOT (engine ``FEED_SLOT``; its
``cycles`` are the engine's count) and READ_OUTPUT (the output buffer through the logit port, as
READ_LOGITS' logits). State: every slot's position (slot 0's is ``position``: FEED_TOKEN,
READ_LOGITS and IDENTIFY), the loaded slice and the open load's with their sizes (LOAD_CHUNK,
LOAD_COMMIT, LOAD_STATUS, VERIFY_IMAGE and IDENTIFY use them instead of the whole image's), and
whose residual the input buffer and whose output the output buffer hold. RESET_STATE resets slot
0 only (engine ``RESET_SLOT``); FEED_TOKEN and READ_LOGITS need the whole model
(NO_WEIGHTS, arg = the parts). After LOAD_COMMIT the Link writes the slice's engine parameters
(``SET_PARAM``, from ``engine_params`` of every slice, those that differ) before RESET_STATE. The
argument bytes kept grow to 13 (LOAD_SLICE's). Without slots nothing of this is built (Yosys's
cell statistics of both forms are those of before) and the six ops are unknown (UNKNOWN_OP).

Structure
---------
Each part is a component of its own file, in one class per form where the forms differ:

* :class:`~.link_ring.ReceiveRing`: the ring buffer (rx stream in, a registered read port out);
* :mod:`~.link_timers`: the idle timer (``CountingIdleTimer`` / ``LfsrIdleTimer``) and the boot
  id (``CountingBootId`` / ``LfsrBootId`` / ``FixedBootId``);
* :mod:`~.link_crc`: the header, frame and image CRCs (``ByteCrcs`` / ``SerialCrcs``);
* :mod:`~.link_check`: the request check, the device model's checks in its order, registered
  while the trailer arrives (``RequestCheck`` / ``SmallRequestCheck``);
* :mod:`~.link_respond`: the responder: the response payload and its prefetch register
  (``MuxPayload`` / ``RomPayload``, the response ROM) and ``ResponseSender`` (the header, payload
  and trailer bytes into tx and the CRCs, and the logits fetched from the engine);
* :mod:`~.link_chunk`: the ring addresses of a LOAD_CHUNK's data (``CountedChunk`` /
  ``BoundedChunk``);
* :mod:`~.link_form`: the form as a strategy object (``DefaultForm`` / ``SmallForm``): which of
  the classes above it is built from and the few places where the parser and the state
  machine differ.

:class:`Link` itself wires them (``_receive``, ``_registers``, ``_checks``, ``_payload``) and
holds the parse position (``_parser_datapath``) and one state machine (``_fsm``) whose states
are grouped by phase: parse, decide, engine command, chunk forwarding, send (the sender's
phases: header, payload, trailer).

Testbench observation points (not ports): ``idle`` (the parser waits for bytes and nothing is
being sent), ``in_frame`` (the parser is inside a frame: the idle timeout can drop it) and
``state`` (name -> Signal of every register a command may change).

Not byte-identical to the device model, by design: the boot id (a counter or a parameter, not
random), ``cycles`` in FEED_TOKEN (the engine's count, the model says 0), and the moment a
partial frame times out (cycles here, ``poll(now)`` there).
"""

from __future__ import annotations

import contextlib
import functools
import types

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.protocol import (
    FEED_TOKEN_REQUEST, FEED_TOKEN_RESPONSE, FRAME_IDLE_TIMEOUT_S, HEADER_LEN, IDENTITY, LOAD_BEGIN_REQUEST,
    LOAD_BEGIN_RESPONSE, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE, LOAD_STATUS_RESPONSE, MAX_LOGITS_PER_READ,
    MAX_PAYLOAD, MIN_DEVICE_PAYLOAD, NAK_PAYLOAD, NAK_RESPONSE, POSITION, READ_LOGITS_HEADER, READ_LOGITS_REQUEST,
    RESPONSE, SYNC, TRAILER_LEN, VERIFY_IMAGE_RESPONSE, Op, Packing, crc32_image,
    FEED_SLOT_REQUEST, FEED_SLOT_RESPONSE, LOAD_SLICE_REQUEST, LOAD_SLICE_RESPONSE, READ_OUTPUT_HEADER,
    READ_OUTPUT_REQUEST, RESET_SLOT_RESPONSE, SLICE_INFO_RESPONSE, WRITE_RESIDUAL_HEADER, WRITE_RESIDUAL_RESPONSE,
    SliceOp, residual_element_bytes,
)

from .control import ControlSignature, EngineOp, residual_layout
from .link_check import ARG_BYTES, COMMANDS, SLICE_ARG_BYTES, SLICE_COMMANDS, slice_geometry
from .link_fields import field, pack, struct_fields
from .link_form import DefaultForm, SmallForm
from .link_respond import PayloadKind, ResponseSender, result_layout
from .link_ring import ReceiveRing
from .link_timers import LFSR_TAPS, lfsr_jump, lfsr_signal, lfsr_step
from .weight_port import ReadbackSignature

__all__ = ["Link", "ring_depth", "struct_fields", "LFSR_TAPS", "lfsr_step", "lfsr_jump", "lfsr_signal"]


def ring_depth(max_payload: int) -> int:
    """Bytes of the receive ring: the smallest power of two that holds a whole frame and one byte
    more (the Link takes a byte only while at least two places are free)."""
    frame = HEADER_LEN + max_payload + TRAILER_LEN
    return 1 << frame.bit_length()




# The commands answered from the state after they ran: (payload kind, response layout).
_STATE_RESPONSES = {
    Op.RESET_STATE: (PayloadKind.RESET_STATE, POSITION),
    Op.LOAD_BEGIN: (PayloadKind.LOAD_BEGIN, LOAD_BEGIN_RESPONSE),
    Op.LOAD_CHUNK: (PayloadKind.LOAD_CHUNK, LOAD_CHUNK_RESPONSE),
    Op.LOAD_COMMIT: (PayloadKind.LOAD_COMMIT, LOAD_COMMIT_RESPONSE),
    Op.FEED_TOKEN: (PayloadKind.FEED_TOKEN, FEED_TOKEN_RESPONSE),
}
# ... and with state slots, the slice ops that change state
_SLICE_STATE_RESPONSES = {
    SliceOp.LOAD_SLICE: (PayloadKind.LOAD_SLICE, LOAD_SLICE_RESPONSE),
    SliceOp.RESET_SLOT: (PayloadKind.RESET_SLOT, RESET_SLOT_RESPONSE),
    SliceOp.WRITE_RESIDUAL: (PayloadKind.WRITE_RESIDUAL, WRITE_RESIDUAL_RESPONSE),
    SliceOp.FEED_SLOT: (PayloadKind.FEED_SLOT, FEED_SLOT_RESPONSE),
}


class Link(wiring.Component):
    """The device side of the wire protocol for an engine of ``cfg`` / ``packing`` (module docstring).

    Parameters
    ----------
    cfg : ModelConfig
        The geometry the engine was built for (IDENTIFY, the image size, token and logit ranges).
    packing : str
        Trit packing of the image the engine reads ("base3" or "2bit").
    lanes : int
        MAC lanes of the engine, reported in IDENTIFY.
    max_payload : int
        Largest payload accepted and sent, MIN_DEVICE_PAYLOAD .. MAX_PAYLOAD; sizes the ring.
    step_time_ms : int
        Upper bound of one FEED_TOKEN's compute time, reported in IDENTIFY (0: unknown).
    clk_freq : float
        Clock frequency of the sync domain; gives the idle timeout in cycles.
    idle_timeout_cycles : int or None
        Overrides ``FRAME_IDLE_TIMEOUT_S * clk_freq``.
    boot_id : int or None
        A fixed boot id, or None: the cycles from reset to the first byte received (the host's
        timing makes it differ from one reset to the next).
    image : bytes or None
        The image the engine's RAM holds from configuration on (weights in the bitstream), or
        None (the RAM starts empty). With an image, IDENTIFY reports the weights loaded with the
        image's size and CRC-32 from the start, and a reset does not change that (the RAM keeps
        its contents through a reset); LOAD_BEGIN still replaces them as usual.
    small : bool
        The small form for the iCE40 (module docstring, "Small form"): the same bytes on the
        wire, fewer logic cells, a slower parser; False keeps the form tuned for ECP5 timing.
    readback : bool
        The engine can read its weights back: the ``readback`` member and VERIFY_IMAGE (the
        default form only).
    formats : Formats
        The engine's number formats: IDENTIFY's formats id and the image size.
    memory_status : bool
        The ``memory_error`` member (an engine whose weight memory can fail to start: a DRAM).
    slots : int
        State slots of the engine (``EngineCore(slots=...)``; the default form only): the slice
        ops of protocol 1.2 (module docstring, "Layer slices and state slots"). 0 (the default):
        none; they are answered UNKNOWN_OP and the netlist is that of a Link without them.
    capacity : int or None
        With slots: the largest image the engine's weight memory holds, SLICE_INFO's ``capacity``
        (as ``DeviceModel(capacity=...)``); None: the whole image of ``cfg`` (block RAM sized for
        it). A DRAM engine's is the DRAM's size, which may be smaller than the whole image: the
        host then loads it a slice that fits (host/driver.py checks the slice against it; unlike
        ``DeviceModel``, the Link does not NAK a LOAD_SLICE beyond it).
    """

    def __init__(self, cfg: ModelConfig, *, packing: str = "base3", lanes: int = 0,
                 max_payload: int = MAX_PAYLOAD, step_time_ms: int = 0, clk_freq: float = 12e6,
                 idle_timeout_cycles: int | None = None, boot_id: int | None = None,
                 image: bytes | None = None, small: bool = False, readback: bool = False,
                 formats: Formats = FORMATS, memory_status: bool = False, slots: int = 0,
                 capacity: int | None = None):
        from mmfree_fpga.image import image_size
        if small and readback:
            raise ValueError("the Link's small form has no VERIFY_IMAGE: readback needs small=False")
        if slots and small:
            raise ValueError("the Link's small form has no state slots (the slice ops): slots needs small=False")
        if slots and not formats.int32_residual:
            # (WRITE_RESIDUAL's range check is then the int32's, which the wire value always passes)
            raise ValueError("state slots need formats whose residual is a Q16 int32 (Formats.int32_residual)")
        self.slots = slots
        self.reads_back = readback
        self.commands = [c for c in COMMANDS if readback or c != Op.VERIFY_IMAGE] + (SLICE_COMMANDS if slots else [])
        self.state_responses = {**_STATE_RESPONSES, **(_SLICE_STATE_RESPONSES if slots else {})}
        self.slices = slice_geometry(cfg, packing, slots, formats, capacity) if slots else None
        self.slice_params = self._slice_params(cfg, packing, lanes, formats) if slots else None
        self.arg_bytes = SLICE_ARG_BYTES if slots else ARG_BYTES
        if not MIN_DEVICE_PAYLOAD <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [{MIN_DEVICE_PAYLOAD}, {MAX_PAYLOAD}], got {max_payload}")
        self.cfg = cfg
        self.packing = packing
        self.packing_code = Packing.from_export_name(packing)
        self.lanes = lanes
        self.max_payload = max_payload
        self.step_time_ms = step_time_ms
        self.formats = formats
        self.memory_status = memory_status
        self.image_bytes = image_size(cfg, packing, formats)
        self.capacity = self.image_bytes if capacity is None else capacity
        if not 0 < self.capacity < 1 << 32:
            raise ValueError(f"capacity must be in [1, 2^32) (SLICE_INFO's field), got {capacity}")
        self.idle_timeout_cycles = (max(1, round(FRAME_IDLE_TIMEOUT_S * clk_freq))
                                    if idle_timeout_cycles is None else idle_timeout_cycles)
        if self.idle_timeout_cycles < 1:
            raise ValueError("idle_timeout_cycles must be at least 1")
        self.boot_id = boot_id
        if image is not None and len(image) != self.image_bytes:
            raise ValueError(f"the preloaded image has {len(image)} bytes; this geometry and packing take "
                             f"{self.image_bytes}")
        self.preloaded = image is not None
        self.small = small
        self.form = SmallForm() if small else DefaultForm()
        self.ring_depth = ring_depth(max_payload)
        self.logits_per_read = min(MAX_LOGITS_PER_READ, (max_payload - READ_LOGITS_HEADER.size) // 4)
        members = {
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "engine": In(ControlSignature()),
        }
        if memory_status:
            members["memory_error"] = In(1)
        if readback:
            members["readback"] = In(ReadbackSignature())
        if slots:
            members["residual"] = Out(stream.Signature(residual_layout(cfg.d, formats)))
        super().__init__(members)
        # observation points for testbenches (not ports): ``idle`` (waiting for bytes, nothing
        # to send), ``in_frame`` (a partial frame is held: its idle timeout counts) and every
        # register of the device state a command may change
        self.idle = Signal()
        self.in_frame = Signal()
        image_crc_init = crc32_image(image) if image is not None else 0
        image_crc, load_crc = self.form.state_crcs(image_crc_init, self.preloaded)
        self.state = {
            "image_crc": image_crc, "load_crc": load_crc,
            "position": Signal(32), "logits_valid": Signal(),
            # preloaded weights are there from configuration on and survive a reset, like the RAM
            "weights_loaded": Signal(init=self.preloaded, reset_less=self.preloaded),
            "load_open": Signal(),
            "load_pointer": Signal(range(self.image_bytes + 1)),
            "running_crc": Signal(32), "cache_valid": Signal(), "cache_seq": Signal(8), "cache_crc": Signal(16),
            "cache_op": Signal(8), "boot_id": Signal(32),
            # the last FEED_TOKEN's result: argmax (< vocab, so range(vocab) bits), logit, cycles
            "result": Signal(result_layout(cfg.V).size),
        }
        if slots:
            self.state.update(self._slice_registers())

    @staticmethod
    def _slice_params(cfg, packing, lanes, formats):
        """The engine parameters a slice changes: (layers, parts) -> [(index, value)], the same
        indices in every entry (``engine_params`` of each slice the engine runs)."""
        from mmfree_fpga.image_slice import Slice
        from .engine import engine_params
        table = {(n, parts): engine_params(cfg, packing, lanes, formats, sl=Slice.from_parts(0, n, parts))
                 for n in range(cfg.L + 1) for parts in range(4) if n or parts}
        whole = table[(cfg.L, 3)]
        varying = sorted(k for k in whole if any(row[k] != whole[k] for row in table.values()))
        return {key: [(k, row[k]) for k in varying] for key, row in table.items()}

    def _slice_registers(self):
        """The state of the slice ops: every slot's position but slot 0's (``position``), the
        loaded slice and the open load's, the sizes, the input and the output buffer."""
        cfg, pre = self.cfg, self.preloaded
        regs = {f"position{s}": Signal(32, name=f"position{s}") for s in range(1, self.slots)}
        # the loaded weights' slice: preloaded weights are the whole model, from configuration on
        regs.update(
            slice_layers=Signal(range(cfg.L + 1), init=cfg.L if pre else 0, reset_less=pre),
            slice_first=Signal(16, reset_less=pre), slice_end=Signal(16, init=cfg.L if pre else 0, reset_less=pre),
            slice_parts=Signal(2, init=3 if pre else 0, reset_less=pre),
            stored_size=Signal(range(self.image_bytes + 1), init=self.image_bytes if pre else 0, reset_less=pre),
            load_first=Signal(16), load_end=Signal(16), load_parts=Signal(2),
            load_size=Signal(range(self.image_bytes + 1)),
            in_valid=Signal(), in_slot=Signal(8), in_position=Signal(32), in_pointer=Signal(range(cfg.d + 1)),
            out_valid=Signal(), out_slot=Signal(8), out_position=Signal(32), out_logits=Signal())
        return regs
    def elaborate(self, platform):
        # ``b``: the signals and helpers the parts below share, each made by one of them
        m = Module()
        b = types.SimpleNamespace()
        b.cfg = self.cfg
        b.ring_bits = (self.ring_depth - 1).bit_length()
        b.ptr_shape = unsigned(b.ring_bits + 1)
        b.index_shape = range(HEADER_LEN + self.max_payload + TRAILER_LEN + 1)   # a byte within a frame

        self._receive(m, b)
        self._registers(m, b)
        self._checks(m, b)
        self._payload(m, b)
        self._parser_datapath(m, b)
        self._fsm(m, b)
        return m

    def _receive(self, m, b):
        """The receive ring, the idle timer, the boot id and the CRCs."""
        # -- receive ring, idle timer, boot id, CRCs -------------------------------------------
        m.submodules.ring = b.ring = ReceiveRing(self.ring_depth)
        wiring.connect(m, wiring.flipped(self.rx), b.ring.incoming)
        b.ring_q = b.ring.data               # the byte at the address of the previous cycle
        b.wp = b.ring.wp                     # next byte written
        b.sp = Signal(b.ptr_shape)       # start of the frame candidate (the SYNC) or the scan point
        b.rp = Signal(b.ptr_shape)       # next byte parsed
        m.d.comb += b.ring.keep.eq(b.sp)

        m.submodules.idle_timer = idle_timer = self.form.IdleTimer(self.idle_timeout_cycles)
        m.submodules.boot_id = boot = self.form.boot_id(self.boot_id)
        m.d.comb += [idle_timer.restart.eq(b.ring.wrote), boot.byte.eq(b.ring.wrote)]
        b.idle_expired = idle_timer.expired
        b.boot_id = self.state["boot_id"]
        m.d.comb += b.boot_id.eq(boot.boot_id)

        # one header CRC and one frame CRC serve both directions: a frame is parsed (HEADER ..
        # DECIDE) and a response sent (SEND ..) at different times. In the small form the
        # parser takes no byte, the transmitter picks none and the chunk forwarder offers none
        # while the CRCs are busy, so every CRC has seen every byte before anything reads it.
        m.submodules.crcs = b.crcs = self.form.Crcs()
        b.feeding = b.crcs.busy
        # done(cond): cond, and (small form) the CRCs done with every byte given them;
        # after_feeder(): a block that runs once the CRCs are not busy
        b.done = functools.partial(self.form.done, b)
        b.after_feeder = functools.partial(self.form.after_feeder, m, b)

    def _registers(self, m, b):
        """The frame, device-state and response registers and the decoded request fields."""
        # -- frame registers ------------------------------------------------------------------
        b.got = Signal()                   # byte holds the byte at rp
        b.take = Signal()
        b.jump = Signal()
        b.rp_next = Signal(b.ptr_shape)
        b.byte = Signal(8)
        b.byte_r = Signal(8)               # the ring's output, registered
        m.d.comb += b.byte.eq(b.byte_r)
        b.hidx = Signal(range(HEADER_LEN))
        b.seq = Signal(8)
        b.op = Signal(8)
        b.length = Signal(max(8, self.max_payload.bit_length()))   # LEN, if not too long
        b.length_big = Signal()            # LEN > max_payload
        b.length_zero = Signal()           # registered: LEN == 0
        m.d.sync += b.length_zero.eq(b.length == 0)
        b.payload_left = Signal(b.index_shape)   # payload bytes still to come, less one
        b.args = Signal(8 * self.arg_bytes)
        b.arg_sel = Signal(self.arg_bytes)     # one-hot: the byte of args the next payload byte goes to
        b.frame_crc = Signal(16)
        b.tidx = Signal(range(TRAILER_LEN))

        # -- device state ------------------------------------------------------------------------
        st = self.state
        b.position, b.logits_valid, b.weights_loaded = st["position"], st["logits_valid"], st["weights_loaded"]
        b.image_crc, b.load_open, b.load_crc, b.load_pointer = (st["image_crc"], st["load_open"], st["load_crc"],
                                                        st["load_pointer"])
        b.cache_valid, b.cache_seq, b.cache_crc, b.cache_op = (st["cache_valid"], st["cache_seq"], st["cache_crc"],
                                                       st["cache_op"])
        b.last_result = data.View(result_layout(b.cfg.V), st["result"])
        m.d.comb += st["running_crc"].eq(b.crcs.image_crc)

        # -- response registers ------------------------------------------------------------------
        b.out_op = Signal(8)
        b.out_len = Signal(b.index_shape)
        b.out_last = Signal(b.index_shape)   # out_len - 1 (every response has a payload)
        b.out_kind = Signal(PayloadKind)
        b.rescan_after = Signal()          # after the response: rescan from sp + 1 (bad CRC)
        # READ_LOGITS: checked: start + count <= V, count >= 1 (READ_OUTPUT: <= V or d)
        b.read_start = Signal(range(max(b.cfg.V, b.cfg.d) if self.slots else b.cfg.V))

        # the response frame's bytes into tx and the CRCs (:class:`~.link_respond.ResponseSender`)
        m.submodules.sender = b.sender = sender = ResponseSender(
            vocab_size=max(b.cfg.V, b.cfg.d) if self.slots else b.cfg.V, max_payload=self.max_payload,
            output=bool(self.slots))
        wiring.connect(m, sender.tx, wiring.flipped(self.tx))
        wiring.connect(m, sender.logit_req, wiring.flipped(self.engine.logit_req))
        wiring.connect(m, wiring.flipped(self.engine.logit_resp), sender.logit_resp)
        m.d.comb += [sender.seq.eq(b.seq),       # the frame's SEQ (no byte is parsed while it is sent)
                     sender.op.eq(b.out_op), sender.length.eq(b.out_len),
                     sender.header_crc.eq(b.crcs.header_crc), sender.frame_crc.eq(b.crcs.frame_crc),
                     sender.may_pick.eq(b.done(1)), sender.logits.eq(b.out_kind == PayloadKind.LOGITS)]
        if self.slots:
            m.d.comb += [sender.logits.eq((b.out_kind == PayloadKind.LOGITS) | (b.out_kind == PayloadKind.OUTPUT)),
                         sender.output.eq(b.out_kind == PayloadKind.OUTPUT)]
        b.j, b.nb_free = sender.index, sender.free

        # -- decoded request fields --------------------------------------------------------
        b.begin_crc = field(b.args, LOAD_BEGIN_REQUEST, 1)
        b.feed_token = field(b.args, FEED_TOKEN_REQUEST, 1)
        b.read_start_arg = field(b.args, READ_LOGITS_REQUEST, 1)
        b.read_count = field(b.args, READ_LOGITS_REQUEST, 2)
        # (small form) the request's first payload word compared, byte by byte as it arrives,
        # with the first word of the command's response (the check's word0_differs / word0_ones)
        b.word0_differs = Signal()         # some byte of the first word differed
        b.word0_ones = Signal()            # every byte of the first word was 0xFF

    def _checks(self, m, b):
        """The request check (:mod:`~.link_check`), fed while the trailer arrives; the cached
        command's replay flags, registered in CHECK."""
        m.submodules.check = b.check = check = self.form.Check(
            vocab_size=b.cfg.V, image_bytes=self.image_bytes, max_payload=self.max_payload, commands=self.commands,
            **({"slices": self.slices} if self.slots else {}))
        b.in_trailer = Signal()
        m.d.comb += [check.op.eq(b.op), check.length.eq(b.length), check.seq.eq(b.seq), check.args.eq(b.args),
                     check.in_trailer.eq(b.in_trailer),
                     check.position.eq(b.position), check.load_pointer.eq(b.load_pointer),
                     check.load_open.eq(b.load_open), check.load_crc.eq(b.load_crc),
                     check.running_crc.eq(b.crcs.image_crc), check.weights_loaded.eq(b.weights_loaded),
                     check.logits_valid.eq(b.logits_valid), check.cache_valid.eq(b.cache_valid),
                     check.cache_seq.eq(b.cache_seq), check.cache_op.eq(b.cache_op)]
        if self.slots:
            self._slice_signals(m, b)
            st = self.state
            m.d.comb += [check.slot_position.eq(b.slot_position), check.slice_parts.eq(st["slice_parts"]),
                         check.load_size.eq(st["load_size"]),
                         # READ_LOGITS: the output buffer holds slot 0's logits
                         check.logits_valid.eq(st["out_valid"] & (st["out_slot"] == 0) & st["out_logits"])]
            for name in ("in_valid", "in_slot", "in_position", "in_pointer", "out_valid", "out_slot",
                         "out_position", "out_logits"):
                m.d.comb += getattr(check, name).eq(st[name])
        b.op_code, b.replayable, b.rejected = check.op_code, check.replayable, check.rejected
        b.nak_error, b.nak_arg_sel = check.nak_error, check.nak_arg_sel
        # the NAK's arguments, as the Link's own signals (the small form's response ROM reads
        # each distinct register once)
        own = {"position": b.position, "load_pointer": b.load_pointer, "running_crc": b.crcs.image_crc,
               **self.form.connect_check(m, b, check)}
        b.arg_values = [arg if isinstance(arg, int) else own.get(arg) for arg in check.arguments]

        # a duplicate of the last executed command is answered from the state (crc_cached: the
        # frame's CRC-16 equals the cached one, compared as its last byte is taken)
        b.crc_cached = Signal()
        b.good = Signal()                   # the frame's CRC-16 checked out (registered in CHECK)
        b.replay = Signal()                 # DECIDE answers from the cache (registered in CHECK) ...
        b.replay_kind = Signal(PayloadKind)       # ... with the cached command's response
        b.replay_len = Signal(range(max(layout.size for _, layout in self.state_responses.values()) + 1))

    def _payload(self, m, b):
        """The response payload (:mod:`~.link_respond`): ``payload_byte`` and its prefetch
        register ``pb``."""
        m.submodules.payload = payload = self.form.Payload(
            cfg=b.cfg, packing=self.packing, lanes=self.lanes, max_payload=self.max_payload,
            step_time_ms=self.step_time_ms, image_bytes=self.image_bytes, arguments=b.check.arguments,
            readback=self.reads_back, formats=self.formats, memory_status=self.memory_status,
            **({"extra": {kind: len(value) for kind, value in self._slice_payloads(b).items()}}
               if self.slots else {}))
        sender = b.sender
        m.d.comb += [payload.kind.eq(b.out_kind), payload.index.eq(sender.index),
                     payload.logits_data.eq(sender.logits_data), payload.logit_word.eq(sender.logit_word),
                     payload.logit_byte.eq(sender.logit_byte), payload.logit_have.eq(sender.logit_have),
                     payload.boot_id.eq(b.boot_id), payload.position.eq(b.position),
                     payload.load_pointer.eq(b.load_pointer), payload.load_crc.eq(b.load_crc),
                     payload.weights_loaded.eq(b.weights_loaded), payload.load_open.eq(b.load_open),
                     payload.result.eq(b.last_result), payload.read_start.eq(b.read_start),
                     payload.running_crc.eq(b.crcs.image_crc),
                     payload.nak_error.eq(b.nak_error), payload.op.eq(b.op),
                     payload.last.eq(b.out_last), payload.stale.eq(sender.stale),
                     sender.pb.eq(payload.pb), sender.pb_ready.eq(payload.pb_ready), sender.pb_last.eq(payload.pb_last),
                     sender.payload_ready.eq(payload.data_ready)]
        if self.memory_status:
            m.d.comb += payload.memory_error.eq(self.memory_error)
        self.form.connect_payload(m, b, payload)
        if self.slots:
            for kind, value in self._slice_payloads(b).items():
                m.d.comb += getattr(payload, f"x_{kind.name.lower()}").eq(value)
            m.d.comb += [payload.stored_size.eq(self.state["stored_size"]), payload.load_size.eq(self.state["load_size"])]
        b.payload_byte = payload.data
        m.d.comb += self.engine.load.payload.eq(b.byte_r)

    def _parser_datapath(self, m, b):
        """The ring's read address, the parse position and the parser's helpers."""
        # -- read port address ---------------------------------------------------------------------
        # the chunk forwarder (:mod:`~.link_chunk`): the ring addresses of a LOAD_CHUNK's data
        m.submodules.chunk = b.chunk = chunk = self.form.Chunk(
            ring_depth=self.ring_depth, max_payload=self.max_payload, **({"residual": True} if self.slots else {}))
        m.d.comb += chunk.frame_start.eq(b.sp)
        self.form.connect_chunk(m, b, chunk)
        if self.slots:
            m.d.comb += chunk.residual.eq(b.op == SliceOp.WRITE_RESIDUAL)
        b.chunk_phase = chunk.active
        # the read address is a register (the chunk's or rp): no decision of this cycle reaches it
        m.d.comb += b.ring.addr.eq(Mux(chunk.active, chunk.addr, b.rp[:b.ring_bits]))
        # The read port is addressed with the parse position rp (a register) and its output is
        # registered (byte_r) before the parser looks at it: no path runs from the block RAM's
        # slow output through the parser's decisions back into its address. A byte is parsed every third cycle at
        # most; ``got``: byte_r holds the byte at rp, which was in the ring when it was read.
        read_ok = Signal()               # ring_q holds the byte at rp
        moved = self.form.parse_position(m, b)    # rp moves at this clock edge
        # the CRCs' byte: the ring's registered output (the parser's and the chunk's bytes)
        # unless the transmitter's byte goes in (below)
        m.d.comb += b.crcs.data.eq(b.byte_r)
        # byte != the header CRC, compared as the byte is registered (small form: the CRC is
        # final then, done() waits a cycle after the CRCs; registered, the comparison is not on
        # the path from the byte into the parser's decisions and rp)
        b.hcrc_differs = Signal()
        self.form.header_compare(m, b)
        m.d.sync += [b.rp.eq(b.rp_next), b.byte_r.eq(b.ring_q),
                     read_ok.eq((b.rp != b.wp) & ~moved & ~b.chunk_phase),
                     b.got.eq(read_ok & ~moved & ~b.chunk_phase)]

        @contextlib.contextmanager
        def frame_byte():
            """Inside a frame: the idle timeout returns to HUNT, else the body runs on each byte."""
            m.d.comb += [self.idle.eq(b.done(b.waiting)), in_frame.eq(1)]
            with m.If(timed_out):
                b.rescan()
                m.next = "HUNT"
            with m.Elif(b.ready_byte):
                b.take_byte()
                yield
        b.frame_byte = frame_byte

        def take_byte():
            """Consume the byte at rp (its value is ``byte`` this cycle)."""
            m.d.comb += b.take.eq(1)
        b.take_byte = take_byte

        def rescan():
            """Drop the SYNC at sp and parse again from the byte after it."""
            m.d.comb += b.jump.eq(1)
            m.d.sync += b.sp.eq(b.sp + 1)
        b.rescan = rescan

        def respond(kind, out_op_value, length_value, *, rescan_flag=0):
            self.form.restart_response(m, b)
            return [b.out_kind.eq(kind), b.out_op.eq(out_op_value), b.out_len.eq(length_value),
                    b.out_last.eq(length_value - 1), b.rescan_after.eq(rescan_flag)]
        b.respond = respond

        def cache_and_respond(kind, length_value):
            return [b.cache_valid.eq(1), b.cache_seq.eq(b.seq), b.cache_crc.eq(b.frame_crc), b.cache_op.eq(b.op),
                    *b.respond(kind, b.op | RESPONSE, length_value)]
        b.cache_and_respond = cache_and_respond

        def finish_response():
            """After a response: parse from the byte after the frame's SYNC again (a NAK for a
            bad CRC) or from the byte after the frame."""
            with m.If(b.rescan_after):
                b.rescan()
            with m.Else():
                m.d.sync += b.sp.eq(b.rp)
        b.finish_response = finish_response

        def state_response(command):
            kind, layout = self.state_responses[command]
            return b.cache_and_respond(kind, layout.size)
        b.state_response = state_response

        b.waiting = Signal()     # the parser needs a byte that has not arrived
        m.d.comb += b.waiting.eq(~b.got & (b.rp == b.wp))
        b.ready_byte = self.form.ready_byte(m, b, moved)
        # the idle timeout inside a frame, registered: while the parser waits it takes no byte
        # and stays in its state, so the next cycle drops the frame in the state that timed out
        in_frame = self.in_frame
        timed_out = Signal()
        m.d.sync += timed_out.eq(b.waiting & b.idle_expired & in_frame)

    def _parse_states(self, m, b):
        """Parsing states: HUNT, HEADER, PAYLOAD, TRAILER, CHECK."""
        # ---- parsing: one byte every third cycle while bytes are in the ring ----
        with m.State("HUNT"):
            m.d.comb += self.idle.eq(b.done(b.waiting & ~b.sender.pending))
            with m.If(b.ready_byte):
                b.take_byte()
                with m.If(b.byte == SYNC):
                    m.d.comb += b.crcs.start.eq(1)
                    m.d.sync += b.hidx.eq(1)
                    m.next = "HEADER"
                with m.Else():
                    m.d.sync += b.sp.eq(b.rp + 1)

        with m.State("HEADER"):
            with b.frame_byte():
                m.d.sync += [b.hidx.eq(b.hidx + 1), b.tidx.eq(0), b.arg_sel.eq(1)]
                m.d.comb += [b.crcs.frame.eq(1), b.crcs.header.eq(b.hidx < HEADER_LEN - 1)]
                with m.Switch(b.hidx):
                    with m.Case(1):
                        m.d.sync += b.seq.eq(b.byte)
                    with m.Case(2):
                        m.d.sync += b.op.eq(b.byte)
                        self.form.on_op_byte(m, b)
                    with m.Case(3):
                        m.d.sync += b.length[:8].eq(b.byte)
                    with m.Case(4):
                        # LEN > max_payload, from its high byte and the low byte kept
                        m.d.sync += [b.length[8:].eq(b.byte),
                                     b.length_big.eq((b.byte > self.max_payload >> 8)
                                                   | ((b.byte == self.max_payload >> 8)
                                                      & (b.length[:8] > (self.max_payload & 0xFF))))]
                    with m.Default():
                        m.d.sync += b.payload_left.eq(b.length - 1)
                        with m.If(b.hcrc_differs | b.length_big):
                            b.rescan()
                            m.next = "HUNT"
                        with m.Elif(b.length_zero):
                            m.next = "TRAILER"
                        with m.Else():
                            m.next = "PAYLOAD"

        with m.State("PAYLOAD"):
            with b.frame_byte():
                m.d.sync += [b.payload_left.eq(b.payload_left - 1), b.arg_sel.eq(b.arg_sel << 1)]
                m.d.comb += b.crcs.frame.eq(1)
                for i in range(self.form.stored_arg_bytes, self.arg_bytes):
                    with m.If(b.arg_sel[i]):
                        m.d.sync += b.args[8 * i:8 * i + 8].eq(b.byte)
                self.form.on_payload_byte(m, b)
                with m.If(b.payload_left == 0):
                    m.next = "TRAILER"

        with m.State("TRAILER"):
            m.d.comb += b.in_trailer.eq(1)
            with b.frame_byte():
                m.d.sync += [b.tidx.eq(b.tidx + 1),
                             b.frame_crc.eq(Cat(b.byte, b.frame_crc[:8])),
                             b.crc_cached.eq(Cat(b.byte, b.frame_crc[:8]) == b.cache_crc)]
                m.d.comb += b.crcs.frame.eq(1)
                with m.If(b.tidx == TRAILER_LEN - 1):
                    m.next = "CHECK"

        # ---- the frame CRC has seen every byte: its verdict is registered first ----
        with m.State("CHECK"):
            # (also registered here: whether DECIDE replays the cached response, and that
            # response's kind and length, decoded from cache_op, so that decoding, the priority
            # chain and the response registers' enables are not one path)
            m.d.sync += b.replay.eq(b.crc_cached & b.replayable)
            with m.Switch(b.cache_op):
                for command, (kind, layout) in self.state_responses.items():
                    with m.Case(command):
                        m.d.sync += [b.replay_kind.eq(kind), b.replay_len.eq(layout.size)]
            with b.after_feeder():
                m.d.sync += b.good.eq(b.crcs.frame_match)
                m.next = self.form.after_check

    def _decide_states(self, m, b):
        """The decision on a complete frame (VERDICT in the small form, DECIDE)."""
        # ---- a frame with a valid header is complete; the frame CRC has seen every byte ----
        # DECIDE's branches in priority order (the frame is a response; its CRC failed; it
        # repeats the cached command; a check failed), then one per command
        def on_response():
            with m.If(b.good):
                m.d.sync += b.sp.eq(b.rp)
            with m.Else():
                b.rescan()
            m.next = "HUNT"

        def on_bad_crc():
            m.d.sync += b.respond(PayloadKind.NAK, NAK_RESPONSE, NAK_PAYLOAD.size, rescan_flag=1)
            m.d.comb += b.check.crc_failed.eq(1)
            m.next = "SEND"

        def on_replay():
            m.d.sync += b.respond(b.replay_kind, b.cache_op | RESPONSE, b.replay_len)
            m.next = "SEND"

        def on_rejected():
            m.d.sync += b.respond(PayloadKind.NAK, NAK_RESPONSE, NAK_PAYLOAD.size)
            m.next = "SEND"

        def on_identify():
            m.d.sync += b.cache_and_respond(PayloadKind.IDENTITY, IDENTITY.size)
            m.next = "SEND"

        def on_reset_state():
            m.d.sync += [b.position.eq(0), b.logits_valid.eq(0),
                         *b.state_response(Op.RESET_STATE)]
            m.next = "ENGINE_RESET"
            if self.slots:      # slot 0 only
                self._reset_slot(m, b, 0)

        def on_load_begin():
            # (small form: image_crc follows load_crc and weights_loaded)
            m.d.sync += [b.weights_loaded.eq(0), *self.form.image_crc_cleared(b),
                         b.position.eq(0),
                         b.logits_valid.eq(0), b.load_open.eq(1), b.load_crc.eq(b.begin_crc),
                         b.load_pointer.eq(0),
                         *b.state_response(Op.LOAD_BEGIN)]
            m.next = "ENGINE_LOAD_RESET"
            if self.slots:
                self._begin_load(m, b, self.image_bytes, 0, b.cfg.L, 3)

        def on_load_chunk():
            m.d.sync += b.state_response(Op.LOAD_CHUNK)
            m.d.comb += b.chunk.begin.eq(1)
            m.next = "CHUNK_ADDR"

        def on_load_commit():
            m.d.sync += [b.weights_loaded.eq(1), *self.form.image_crc_committed(b),
                         b.load_open.eq(0),
                         b.position.eq(0), b.logits_valid.eq(0),
                         *b.state_response(Op.LOAD_COMMIT)]
            m.next = "ENGINE_RESET"
            if self.slots:
                st = self.state
                self._reset_all(m, b)
                m.d.sync += [st["slice_first"].eq(st["load_first"]), st["slice_end"].eq(st["load_end"]),
                             st["slice_parts"].eq(st["load_parts"]), st["stored_size"].eq(st["load_size"]),
                             st["slice_layers"].eq(st["load_end"] - st["load_first"]), b.param_index.eq(0)]
                m.next = "ENGINE_PARAMS"      # the slice's parameters, then RESET_STATE

        def on_feed_token():
            m.d.sync += b.state_response(Op.FEED_TOKEN)
            m.next = "ENGINE_FEED"

        def on_load_status():
            m.d.sync += b.cache_and_respond(PayloadKind.LOAD_STATUS, LOAD_STATUS_RESPONSE.size)
            m.next = "SEND"

        def on_verify_image():
            m.d.sync += b.cache_and_respond(PayloadKind.VERIFY_IMAGE, VERIFY_IMAGE_RESPONSE.size)
            m.next = "VERIFY_START"

        def on_read_logits():
            m.d.comb += [b.sender.logits_begin.eq(1), b.sender.logits_from.eq(b.read_start_arg)]
            m.d.sync += [b.read_start.eq(b.read_start_arg),
                         *b.cache_and_respond(PayloadKind.LOGITS,
                                            READ_LOGITS_HEADER.size + 4 * b.read_count)]
            m.next = "SEND"

        checks = [(b.op & RESPONSE, on_response), (~b.good, on_bad_crc), (b.replay, on_replay),
                  (b.rejected, on_rejected)]
        commands_taken = [(Op.IDENTIFY, on_identify), (Op.RESET_STATE, on_reset_state),
                          (Op.LOAD_BEGIN, on_load_begin), (Op.LOAD_CHUNK, on_load_chunk),
                          (Op.LOAD_COMMIT, on_load_commit), (Op.FEED_TOKEN, on_feed_token),
                          (Op.READ_LOGITS, on_read_logits), (Op.LOAD_STATUS, on_load_status)]
        if self.reads_back:
            commands_taken.append((Op.VERIFY_IMAGE, on_verify_image))
        if self.slots:
            commands_taken += self._slice_commands(m, b)
        self.form.decide(m, b, checks, commands_taken)

    def _engine_states(self, m, b):
        """Engine commands: ENGINE_RESET, ENGINE_LOAD_RESET, ENGINE_FEED, ENGINE_RESULT."""
        # ---- engine commands ----
        with m.State("ENGINE_RESET"):
            m.d.comb += [self.engine.cmd.valid.eq(1), self.engine.cmd.payload.op.eq(EngineOp.RESET_STATE), self.engine.cmd.payload.index.eq(0)]
            with m.If(self.engine.cmd.ready):
                m.next = "SEND"
        with m.State("ENGINE_LOAD_RESET"):
            # LOAD_BEGIN's restart of the image CRC (here, not in DECIDE: a shorter path)
            m.d.comb += [self.engine.cmd.valid.eq(1), self.engine.cmd.payload.op.eq(EngineOp.LOAD_RESET), self.engine.cmd.payload.index.eq(0),
                         b.crcs.image_start.eq(1)]
            with m.If(self.engine.cmd.ready):
                m.next = "SEND"
        with m.State("ENGINE_FEED"):
            m.d.comb += [self.engine.cmd.valid.eq(1), self.engine.cmd.payload.op.eq(EngineOp.FEED_TOKEN), self.engine.cmd.payload.index.eq(0),
                         self.engine.cmd.payload.arg.eq(b.feed_token)]
            with m.If(self.engine.cmd.ready):
                m.next = "ENGINE_RESULT"
        with m.State("ENGINE_RESULT"):
            m.d.comb += self.engine.result.ready.eq(1)
            with m.If(self.engine.result.valid):
                result = self.engine.result.payload
                m.d.sync += [b.position.eq(b.position + 1), b.logits_valid.eq(1),
                             b.last_result.argmax.eq(result.token), b.last_result.logit.eq(result.logit),
                             b.last_result.cycles.eq(result.cycles)]
                if self.slots:      # the output buffer: slot 0's logits
                    st = self.state
                    m.d.sync += [st["out_valid"].eq(1), st["out_slot"].eq(0), st["out_position"].eq(b.position + 1),
                                 st["out_logits"].eq(1)]
                m.next = "SEND"
        if self.slots:
            self._slice_engine_states(m, b)

    def _chunk_states(self, m, b):
        """LOAD_CHUNK: the checked frame's data from the ring to the engine."""
        # ---- LOAD_CHUNK: the checked frame's data from the ring to the engine ----
        # One byte per three cycles: the ring is read at chunk_addr (CHUNK_ADDR), its output
        # registered (ring_q, CHUNK_WAIT) and registered again (byte_r, CHUNK_OUT), which is
        # what the engine and the image CRC get: no path from the block RAM's slow output
        # leaves the Link or enters the CRC-32.
        with m.State("CHUNK_ADDR"):
            with b.after_feeder():
                m.next = "CHUNK_WAIT"
        with m.State("CHUNK_WAIT"):
            m.next = "CHUNK_OUT"
        with m.State("CHUNK_OUT"):
            m.d.comb += [self.engine.load.valid.eq(1), b.chunk.step.eq(self.engine.load.ready),
                         b.crcs.image.eq(self.engine.load.ready)]
            with m.If(self.engine.load.ready):
                m.next = "CHUNK_ADDR"
                m.d.sync += b.load_pointer.eq(b.load_pointer + 1)
                with m.If(b.chunk.last):
                    m.next = "SEND"

    def _verify_states(self, m, b):
        """VERIFY_IMAGE: the engine's stored image, read back, through the image CRC."""
        rb = self.readback
        with m.State("VERIFY_START"):
            m.d.comb += [rb.start.valid.eq(1), b.crcs.image_start.eq(1),
                         rb.start.payload.eq(self.state["stored_size"] if self.slots else self.image_bytes)]
            with m.If(rb.start.ready):
                m.next = "VERIFY_READ"
        with m.State("VERIFY_READ"):
            # (nothing else feeds the CRCs now: no frame is parsed, no response byte sent)
            m.d.comb += [rb.data.ready.eq(1), b.crcs.data.eq(rb.data.payload.byte),
                         b.crcs.image.eq(rb.data.valid)]
            with m.If(rb.data.valid & rb.data.payload.last):
                m.next = "SEND"

    def _send_states(self, m, b):
        """Sending the response frame (:class:`~.link_respond.ResponseSender` chooses the bytes):
        SEND (the header), SEND_PAYLOAD, SEND_TRAILER, then SEND_END (SEND_DONE)."""
        for state, phase, done, after in (("SEND", "send_header", "header_done", "SEND_PAYLOAD"),
                                          ("SEND_PAYLOAD", "send_payload", "payload_done", "SEND_TRAILER"),
                                          ("SEND_TRAILER", "send_trailer", "trailer_done", "SEND_END")):
            with m.State(state):
                m.d.comb += getattr(b.sender, phase).eq(1)
                with m.If(getattr(b.sender, done)):
                    m.next = after
        self.form.send_end(m, b)

    # -- the slice ops (``slots``) -------------------------------------------------------------------
    def _positions(self):
        return [self.state["position"]] + [self.state[f"position{s}"] for s in range(1, self.slots)]

    def _slice_signals(self, m, b):
        """The request's slot (its first payload byte), that slot's position, and the registers the
        slice ops' engine states use."""
        b.req_slot = b.args[:8]
        b.slot_position = Signal(32)
        with m.Switch(b.req_slot):
            for s, position in enumerate(self._positions()):
                with m.Case(s):
                    m.d.comb += b.slot_position.eq(position)
        b.reset_index = Signal(8)            # the slot ENGINE_RESET_SLOT resets
        b.param_index = Signal(range(len(next(iter(self.slice_params.values()))) + 1))
        b.res_index = Signal(range(b.cfg.d + 1))    # the next input buffer element written
        b.res_word = Signal(32)
        b.res_byte = Signal(2)
        b.res_last = Signal()

    def _slice_payloads(self, b):
        """The slice ops' response payloads, packed from the state (and the request's fields)."""
        st, args, r = self.state, b.args, b.last_result
        loaded, loading = self.state["weights_loaded"], b.load_open
        return {
            PayloadKind.SLICE_INFO: pack(SLICE_INFO_RESPONSE, self.slots, Mux(loaded, st["slice_parts"], 0),
                                         Mux(loaded, st["slice_first"], 0), Mux(loaded, st["slice_end"], 0),
                                         Mux(loading, st["load_parts"], 0), Mux(loading, st["load_first"], 0),
                                         Mux(loading, st["load_end"], 0), self.capacity,
                                         residual_element_bytes(self.formats)),
            PayloadKind.LOAD_SLICE: pack(LOAD_SLICE_RESPONSE, st["load_size"], b.load_crc, st["load_first"],
                                         st["load_end"], st["load_parts"]),
            PayloadKind.RESET_SLOT: pack(RESET_SLOT_RESPONSE, args[:8], 0),
            PayloadKind.WRITE_RESIDUAL: pack(WRITE_RESIDUAL_RESPONSE, args[:8], field(args, WRITE_RESIDUAL_HEADER, 1),
                                             st["in_pointer"]),
            PayloadKind.FEED_SLOT: pack(FEED_SLOT_RESPONSE, b.slot_position, r.argmax, r.logit, r.cycles),
            PayloadKind.OUTPUT: pack(READ_OUTPUT_HEADER, args[:8], field(args, READ_OUTPUT_REQUEST, 1),
                                     field(args, READ_OUTPUT_REQUEST, 2)),
        }

    def _set_position(self, m, slot, value):
        if isinstance(slot, int):
            m.d.sync += self._positions()[slot].eq(value)
            return
        with m.Switch(slot):
            for s, position in enumerate(self._positions()):
                with m.Case(s):
                    m.d.sync += position.eq(value)

    def _reset_slot(self, m, b, slot):
        """RESET_SLOT's (and RESET_STATE's, slot 0) state changes; ENGINE_RESET_SLOT follows."""
        st = self.state
        self._set_position(m, slot, 0)
        with m.If(st["in_slot"] == slot):
            m.d.sync += st["in_valid"].eq(0)
        with m.If(st["out_slot"] == slot):
            m.d.sync += st["out_valid"].eq(0)
        m.d.sync += b.reset_index.eq(slot)
        m.next = "ENGINE_RESET_SLOT"

    def _reset_all(self, m, b):
        st = self.state
        m.d.sync += [p.eq(0) for p in self._positions()] + [st["in_valid"].eq(0), st["out_valid"].eq(0)]

    def _begin_load(self, m, b, size, first, end, parts):
        st = self.state
        self._reset_all(m, b)
        m.d.sync += [st["load_size"].eq(size), st["load_first"].eq(first), st["load_end"].eq(end),
                     st["load_parts"].eq(parts)]

    def _slice_commands(self, m, b):
        """DECIDE's branches of the slice ops (their checks passed)."""
        st, args = self.state, b.args

        def on_slice_info():
            m.d.sync += b.cache_and_respond(PayloadKind.SLICE_INFO, SLICE_INFO_RESPONSE.size)
            m.next = "SEND"

        def on_load_slice():
            size, crc, first, end, parts = (field(args, LOAD_SLICE_REQUEST, i) for i in range(5))
            m.d.sync += [b.weights_loaded.eq(0), *self.form.image_crc_cleared(b), b.logits_valid.eq(0),
                         b.load_open.eq(1), b.load_crc.eq(crc), b.load_pointer.eq(0),
                         *b.state_response(SliceOp.LOAD_SLICE)]
            self._begin_load(m, b, size, first, end, parts)
            m.next = "ENGINE_LOAD_RESET"

        def on_reset_slot():
            m.d.sync += b.state_response(SliceOp.RESET_SLOT)
            self._reset_slot(m, b, b.req_slot)

        def on_write_residual():
            position, start = field(args, WRITE_RESIDUAL_HEADER, 1), field(args, WRITE_RESIDUAL_HEADER, 2)
            values = (b.length - WRITE_RESIDUAL_HEADER.size) >> 2
            with m.If(start == 0):          # a new residual for this slot and position
                m.d.sync += [st["in_valid"].eq(1), st["in_slot"].eq(b.req_slot), st["in_position"].eq(position)]
            m.d.sync += [st["in_pointer"].eq(start + values), b.res_index.eq(start), b.res_byte.eq(0),
                         *b.state_response(SliceOp.WRITE_RESIDUAL)]
            m.d.comb += b.chunk.begin.eq(1)
            m.next = "RESIDUAL_ADDR"

        def on_feed_slot():
            m.d.sync += b.state_response(SliceOp.FEED_SLOT)
            m.next = "ENGINE_FEED_SLOT"

        def on_read_output():
            start, count = field(args, READ_OUTPUT_REQUEST, 2), field(args, READ_OUTPUT_REQUEST, 3)
            m.d.comb += [b.sender.logits_begin.eq(1), b.sender.logits_from.eq(start)]
            m.d.sync += b.cache_and_respond(PayloadKind.OUTPUT, READ_OUTPUT_HEADER.size + 4 * count)
            m.next = "SEND"

        return [(SliceOp.SLICE_INFO, on_slice_info), (SliceOp.LOAD_SLICE, on_load_slice),
                (SliceOp.RESET_SLOT, on_reset_slot), (SliceOp.WRITE_RESIDUAL, on_write_residual),
                (SliceOp.FEED_SLOT, on_feed_slot), (SliceOp.READ_OUTPUT, on_read_output)]

    def _slice_engine_states(self, m, b):
        """ENGINE_RESET_SLOT, ENGINE_PARAMS (after LOAD_COMMIT: the slice's parameters by
        SET_PARAM, then RESET_STATE), ENGINE_FEED_SLOT / ENGINE_RESULT_SLOT and the residual
        forwarding (RESIDUAL_ADDR, _WAIT, _BYTE, _OUT: a WRITE_RESIDUAL's values from the ring into
        the engine's input buffer, four bytes each)."""
        st, cmd, eng = self.state, self.engine.cmd, self.engine
        with m.State("ENGINE_RESET_SLOT"):
            m.d.comb += [cmd.valid.eq(1), cmd.payload.op.eq(EngineOp.RESET_SLOT), cmd.payload.index.eq(b.reset_index)]
            with m.If(cmd.ready):
                m.next = "SEND"
        with m.State("ENGINE_PARAMS"):
            rows = self.slice_params
            count = len(next(iter(rows.values())))
            with m.If(b.param_index == count):
                m.next = "ENGINE_RESET"
            with m.Else():
                m.d.comb += [cmd.valid.eq(1), cmd.payload.op.eq(EngineOp.SET_PARAM)]
                with m.Switch(Cat(st["slice_parts"], st["slice_layers"], b.param_index)):
                    for (layers, parts), row in rows.items():
                        for i, (index, value) in enumerate(row):
                            with m.Case(parts | (layers << 2) | (i << (2 + len(st["slice_layers"])))):
                                m.d.comb += [cmd.payload.index.eq(index), cmd.payload.arg.eq(value)]
                with m.If(cmd.ready):
                    m.d.sync += b.param_index.eq(b.param_index + 1)
        with m.State("ENGINE_FEED_SLOT"):
            m.d.comb += [cmd.valid.eq(1), cmd.payload.op.eq(EngineOp.FEED_SLOT), cmd.payload.index.eq(b.req_slot),
                         cmd.payload.arg.eq(field(b.args, FEED_SLOT_REQUEST, 2))]
            with m.If(cmd.ready):
                m.next = "ENGINE_RESULT_SLOT"
        with m.State("ENGINE_RESULT_SLOT"):
            m.d.comb += eng.result.ready.eq(1)
            with m.If(eng.result.valid):
                result = eng.result.payload
                self._set_position(m, b.req_slot, b.slot_position + 1)
                m.d.sync += [b.last_result.argmax.eq(result.token), b.last_result.logit.eq(result.logit),
                             b.last_result.cycles.eq(result.cycles),
                             st["out_valid"].eq(1), st["out_slot"].eq(b.req_slot),
                             st["out_position"].eq(b.slot_position + 1), st["out_logits"].eq(st["slice_parts"][1])]
                with m.If(~st["slice_parts"][0]):       # the residual in was used up
                    m.d.sync += st["in_valid"].eq(0)
                m.next = "SEND"
        # one byte per three cycles, as LOAD_CHUNK's (the ring's output registered twice)
        with m.State("RESIDUAL_ADDR"):
            m.next = "RESIDUAL_WAIT"
        with m.State("RESIDUAL_WAIT"):
            m.next = "RESIDUAL_BYTE"
        with m.State("RESIDUAL_BYTE"):
            m.d.comb += b.chunk.step.eq(1)
            m.d.sync += [b.res_word.eq(Cat(b.res_word[8:], b.byte_r)), b.res_byte.eq(b.res_byte + 1),
                         b.res_last.eq(b.chunk.last)]
            m.next = "RESIDUAL_ADDR"
            with m.If(b.res_byte == 3):
                m.next = "RESIDUAL_OUT"
        with m.State("RESIDUAL_OUT"):
            res = self.residual
            m.d.comb += [res.valid.eq(1), res.payload.index.eq(b.res_index), res.payload.value.eq(b.res_word)]
            with m.If(res.ready):
                m.d.sync += b.res_index.eq(b.res_index + 1)
                m.next = "RESIDUAL_ADDR"
                with m.If(b.res_last):
                    m.next = "SEND"

    def _fsm(self, m, b):
        """The Link's state machine: parse, check, execute, forward a chunk, respond."""
        with m.FSM(name="link") as link_fsm:
            self._parse_states(m, b)
            self._decide_states(m, b)
            self._engine_states(m, b)
            self._chunk_states(m, b)
            if self.reads_back:
                self._verify_states(m, b)
            self._send_states(m, b)
        self.form.fsm_attrs(link_fsm)

        # the CRCs take the byte tx took in the previous cycle (the parser takes none then)
        sender = b.sender
        with m.If(sender.crc_feed):
            m.d.comb += [b.crcs.start.eq(sender.crc_start), b.crcs.data.eq(sender.crc_data),
                         b.crcs.header.eq(sender.crc_header), b.crcs.frame.eq(sender.crc_frame)]
