"""The Link's parts on their own (hw/link_timers.py, hw/link_crc.py, hw/link_ring.py,
hw/link_check.py, hw/link_respond.py, hw/link_chunk.py): both forms of each behave alike, cycle
for cycle where the Link relies on it, and as the protocol and the device model say."""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.sim import Simulator

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.host.device_model import DeviceModel, Rejected, _Load
from mmfree_fpga.hw.link_chunk import BoundedChunk, CountedChunk
from mmfree_fpga.hw.link_check import ARG_BYTES, REEXECUTED, RequestCheck, SmallRequestCheck
from mmfree_fpga.hw.link_respond import MuxPayload, PayloadKind, ResponseSender, RomPayload
from mmfree_fpga.image import IMAGE_VERSION, image_size

from mmfree_fpga.hw.link_crc import ByteCrcs, SerialCrcs
from mmfree_fpga.hw.link_ring import ReceiveRing
from mmfree_fpga.hw.link_timers import (CountingBootId, CountingIdleTimer, FixedBootId, LfsrBootId, LfsrIdleTimer,
                                        lfsr_jump, lfsr_step)
from mmfree_fpga.protocol import (
    DEVICE_MAGIC, FEED_TOKEN_RESPONSE, HEADER_LEN, LOAD_BEGIN_RESPONSE, LOAD_CHUNK_HEADER, LOAD_CHUNK_RESPONSE, LOAD_COMMIT_RESPONSE,
    LOAD_STATUS_RESPONSE, MAX_CHUNK, MAX_PAYLOAD, MIN_DEVICE_PAYLOAD, NAK_PAYLOAD, POSITION, PROTOCOL_VERSION,
    READ_LOGITS_HEADER, REQUEST_LENGTHS, TRAILER_LEN, VERIFY_IMAGE_RESPONSE, Error, Identity, Op, Packing, Status, crc8_header, crc16_frame, crc32_image,
    encode_frame, formats_id,
)


def run(dut, body, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-6)
    sim.add_testbench(body)
    sim.run()


@pytest.mark.parametrize("timer", [CountingIdleTimer, LfsrIdleTimer])
@pytest.mark.parametrize("cycles", [1, 2, 7, 300])
def test_idle_timer_expires_exactly_after_cycles(timer, cycles):
    """expired rises exactly ``cycles`` clock edges after the last restart (and after reset),
    and stays up until the next restart."""
    dut = timer(cycles)

    async def body(ctx):
        for gap in (cycles + 5, 3, cycles + 2):
            for k in range(gap):
                assert ctx.get(dut.expired) == (k >= cycles), (gap, k)
                await ctx.tick()
            ctx.set(dut.restart, 1)
            await ctx.tick()
            ctx.set(dut.restart, 0)

    run(dut, body)


def test_idle_timer_rejects_zero():
    with pytest.raises(ValueError):
        CountingIdleTimer(0)


@pytest.mark.parametrize("form", [CountingBootId, LfsrBootId])
def test_boot_id_depends_on_the_first_byte_only(form):
    """A counted boot id is fixed by the cycle of the first byte (the count, or the LFSR state
    after that many steps) and differs for a different cycle."""
    ids = []
    for wait in (5, 9):
        dut = form()

        async def body(ctx):
            await ctx.tick().repeat(wait)
            ctx.set(dut.byte, 1)
            await ctx.tick()
            ctx.set(dut.byte, 0)
            first = ctx.get(dut.boot_id)
            await ctx.tick().repeat(10)
            ctx.set(dut.byte, 1)
            await ctx.tick()
            assert ctx.get(dut.boot_id) == first
            ids.append(first)

        run(dut, body)
    if form is CountingBootId:
        assert ids == [5, 9]
    else:
        assert ids == [lfsr_jump(1, 32, 5), lfsr_jump(1, 32, 9)]
    assert lfsr_jump(1, 32, 2) == lfsr_step(lfsr_step(1, 32), 32)


def test_fixed_boot_id():
    dut = FixedBootId(0x1_2345_6789)

    async def body(ctx):
        assert ctx.get(dut.boot_id) == 0x2345_6789

    run(dut, body, clock=False)


@pytest.mark.parametrize("form", [ByteCrcs, SerialCrcs])
def test_crcs_match_the_protocol(form):
    """Header and frame bytes, then image bytes, given whenever ``busy`` is low: the three CRCs
    are the protocol's, and the frame CRC's residue is detected after its trailer."""
    rng = random.Random(4)
    header = bytes(rng.randrange(256) for _ in range(4))
    payload = bytes(rng.randrange(256) for _ in range(9))
    image = bytes(rng.randrange(256) for _ in range(13))
    dut = form()

    async def give(ctx, byte, **flags):
        while ctx.get(dut.busy) or not ctx.get(dut.settled):
            await ctx.tick()
        ctx.set(dut.data, byte)
        for name, value in flags.items():
            ctx.set(getattr(dut, name), value)
        await ctx.tick()
        for name in flags:
            ctx.set(getattr(dut, name), 0)

    async def settle(ctx):
        while ctx.get(dut.busy) or not ctx.get(dut.settled):
            await ctx.tick()

    async def body(ctx):
        ctx.set(dut.start, 1)
        ctx.set(dut.image_start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.image_start, 0)
        for byte in header:
            await give(ctx, byte, header=1, frame=1)
        await settle(ctx)
        assert ctx.get(dut.header_crc) == crc8_header(header)
        hcrc = crc8_header(header)
        await give(ctx, hcrc, frame=1)
        for byte in payload:
            await give(ctx, byte, frame=1)
        await settle(ctx)
        fcrc = crc16_frame(header + bytes([hcrc]) + payload)
        assert ctx.get(dut.frame_crc) == fcrc and not ctx.get(dut.frame_match)
        for byte in fcrc.to_bytes(2, "big"):
            await give(ctx, byte, frame=1)
        await settle(ctx)
        assert ctx.get(dut.frame_match)
        for byte in image:
            await give(ctx, byte, image=1)
        await settle(ctx)
        assert ctx.get(dut.image_crc) == crc32_image(image)

    run(dut, body)


def test_receive_ring_keeps_unread_bytes():
    """Bytes are written at wp until the ring is full (``ready``, a register, falls once fewer
    than two places are free behind ``keep``, so the byte taken meanwhile fills the last one);
    none is overwritten; a byte is read one cycle after its address is given."""
    depth = 8
    dut = ReceiveRing(depth)

    async def body(ctx):
        written = []
        for n in range(20):
            ctx.set(dut.incoming.valid, 1)
            ctx.set(dut.incoming.payload, 0x40 + n)
            ready = ctx.get(dut.incoming.ready)
            assert ctx.get(dut.wrote) == ready
            await ctx.tick()
            if ready:
                written.append(0x40 + n)
        ctx.set(dut.incoming.valid, 0)
        assert written == [0x40 + n for n in range(depth)] and ctx.get(dut.wp) == depth
        assert not ctx.get(dut.incoming.ready)
        for i, byte in enumerate(written):
            ctx.set(dut.addr, i)
            await ctx.tick()
            assert ctx.get(dut.data) == byte
        ctx.set(dut.keep, 4)                 # the first four bytes are read: room for four more
        await ctx.tick().repeat(2)
        assert ctx.get(dut.incoming.ready)

    run(dut, body)


# -- the request check (hw/link_check.py) against the device model's checks ---------------------

class _Stepper:
    """A stand-in for the device model's IntegerModel: the checks only ask whether one is there."""

    def __init__(self, vocab):
        self.vocab = vocab

    def step(self, token):
        return np.zeros(self.vocab, dtype=np.int64)

    def reset(self):
        pass


def _check_cases(rng, image_bytes, max_payload, vocab, per_read, n):
    """Random requests and device states, biased towards the edges each check compares against."""
    ops = [int(op) for op in Op] + [0x00, 0x0A, 0x3F, 0x7E]
    for _ in range(n):
        op = rng.choice(ops)
        state = dict(
            weights_loaded=rng.random() < 0.7, load_open=rng.random() < 0.6, logits_valid=rng.random() < 0.7,
            position=rng.choice([0, 1, 5, 0xFFFFFFFF, rng.randrange(1 << 32)]),
            load_pointer=rng.choice([0, image_bytes, rng.randrange(image_bytes + 1)]),
            load_crc=rng.randrange(1 << 32))
        state["running_crc"] = rng.choice([state["load_crc"], rng.randrange(1 << 32)])
        # the length: mostly the command's own (so the later checks are reached)
        if op in REQUEST_LENGTHS and rng.random() < 0.8:
            length = REQUEST_LENGTHS[op]
        elif op == Op.LOAD_CHUNK and rng.random() < 0.8:
            left = image_bytes - state["load_pointer"]
            length = LOAD_CHUNK_HEADER.size + rng.choice([1, left, left + 1, MAX_CHUNK, MAX_CHUNK + 1,
                                                          rng.randrange(1, MAX_CHUNK + 2)])
        else:
            length = rng.randrange(0, 12)
        length = max(0, min(length, max_payload))
        # the first word: mostly the value the command compares it with
        word0 = rng.choice([{Op.LOAD_BEGIN: image_bytes, Op.LOAD_CHUNK: state["load_pointer"]}.get(op, state["position"]),
                            0xFFFFFFFF, rng.randrange(1 << 32)])
        token = rng.choice([0, vocab - 1, vocab, rng.randrange(1 << 32)])
        start = rng.choice([0, vocab - 1, vocab, rng.randrange(1 << 32)])
        count = rng.choice([0, 1, per_read, per_read + 1, vocab, rng.randrange(1 << 16)])
        args = bytearray(word0.to_bytes(4, "little"))
        if op == Op.READ_LOGITS:
            args += start.to_bytes(4, "little") + count.to_bytes(2, "little")
        else:
            args += token.to_bytes(4, "little")
        payload = bytes(args[:length]) + bytes(rng.randrange(256) for _ in range(length - len(args)))
        cache = dict(cache_valid=rng.random() < 0.5, cache_seq=rng.choice([3, rng.randrange(256)]),
                     cache_op=rng.choice([int(c) for c in Op]))
        yield op, length, payload, state, cache, rng.choice([3, rng.randrange(256)])


def _model_verdict(cfg, max_payload, op, payload, state):
    """(error, arg) of the device model's first failing check, or None: it would execute."""
    model = DeviceModel(cfg, "base3", max_payload=max_payload, seed=1)
    model._model = _Stepper(cfg.V) if state["weights_loaded"] else None
    model._stored = bytearray(model.image_bytes) if state["weights_loaded"] else None
    model._position = state["position"]
    model._logits = np.zeros(cfg.V, dtype=np.int64) if state["logits_valid"] else None
    model._load = (_Load(size=model.image_bytes, crc=state["load_crc"], data=bytearray(model.image_bytes),
                         pointer=state["load_pointer"], running_crc=state["running_crc"])
                   if state["load_open"] else None)
    model._install = lambda blob, crc: None
    try:
        model._execute(op, payload)
    except Rejected as r:
        return int(r.error), r.arg & 0xFFFFFFFF
    return None


@pytest.mark.parametrize("max_payload", [MIN_DEVICE_PAYLOAD, MAX_PAYLOAD])
@pytest.mark.parametrize("form", [RequestCheck, SmallRequestCheck])
def test_request_check_follows_the_device_model(form, max_payload):
    """For random requests and device states, the check rejects exactly what the device model's
    ``_execute`` rejects, with its first failure's error and argument (the small form's argument
    is the value ``arguments[nak_arg_sel]`` names); ``replayable`` and ``crc_failed`` too."""
    cfg = ModelConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1, intermediate_size=8)
    image_bytes = image_size(cfg, "base3")
    dut = form(vocab_size=cfg.V, image_bytes=image_bytes, max_payload=max_payload)
    small = form is SmallRequestCheck
    expected_word0 = {Op.LOAD_BEGIN: lambda s: image_bytes, Op.LOAD_CHUNK: lambda s: s["load_pointer"],
                      Op.FEED_TOKEN: lambda s: s["position"], Op.READ_LOGITS: lambda s: s["position"]}
    cases = list(_check_cases(random.Random(max_payload), image_bytes, max_payload, cfg.V, dut.logits_per_read, 400))
    seen = set()

    async def body(ctx):
        for op, length, payload, state, cache, seq in cases:
            ctx.set(dut.op, op)
            ctx.set(dut.length, length)
            ctx.set(dut.seq, seq)
            args = payload[:ARG_BYTES]
            ctx.set(dut.args, int.from_bytes(args + bytes(ARG_BYTES - len(args)), "little"))
            for name, value in {**state, **cache}.items():
                ctx.set(getattr(dut, name), value)
            if small:     # the parser's comparison of the first payload word
                word0 = int.from_bytes(payload[:4].ljust(4, b"\0"), "little")
                ctx.set(dut.word0_differs, op in expected_word0 and word0 != expected_word0[op](state))
                ctx.set(dut.word0_ones, word0 == 0xFFFFFFFF)
            await ctx.tick().repeat(2)
            ctx.set(dut.in_trailer, 1)
            await ctx.tick().repeat(3)
            ctx.set(dut.in_trailer, 0)
            await ctx.tick()
            want = _model_verdict(cfg, max_payload, op, payload, state)
            got = None
            if ctx.get(dut.rejected):
                arg = dut.arguments[ctx.get(dut.nak_arg_sel)]
                if not small:
                    value = ctx.get(dut.nak_arg)
                elif isinstance(arg, int):
                    value = arg
                else:
                    value = ctx.get(getattr(dut, arg))
                got = (ctx.get(dut.nak_error), value)
            assert got == want, (Op(op).name if op in set(Op) else hex(op), length, payload.hex(), state)
            seen.add(want[0] if want else None)
            assert ctx.get(dut.replayable) == (cache["cache_valid"] and cache["cache_seq"] == seq
                                               and cache["cache_op"] not in REEXECUTED)
            ctx.set(dut.crc_failed, 1)
            await ctx.tick()
            ctx.set(dut.crc_failed, 0)
            assert ctx.get(dut.nak_error) == Error.BAD_CRC
            assert (ctx.get(dut.nak_arg) if not small else dut.arguments[ctx.get(dut.nak_arg_sel)]) == 0

    run(dut, body)
    # every check was reached at least once (BAD_CRC is the frame CRC's, not a check)
    assert seen >= {None} | {int(e) for e in Error if e != Error.BAD_CRC}, seen


# -- the response payload (hw/link_respond.py) against the protocol's encodings ----------------

@pytest.mark.parametrize("form", [MuxPayload, RomPayload])
def test_response_payload_bytes_are_the_protocols(form):
    """Every kind of response, for a few device states: the payload's bytes, read at each index
    (and through the prefetch register ``pb``), are the protocol's encoding of that response;
    READ_LOGITS' data bytes come from ``logit_word`` once ``logit_have``."""
    cfg = ModelConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1, intermediate_size=8)
    image_bytes = image_size(cfg, "base3")
    check = RequestCheck(vocab_size=cfg.V, image_bytes=image_bytes, max_payload=MIN_DEVICE_PAYLOAD)
    small = form is RomPayload
    dut = form(cfg=cfg, packing="base3", lanes=16, max_payload=MIN_DEVICE_PAYLOAD, step_time_ms=7,
               image_bytes=image_bytes, arguments=check.arguments, readback=not small)
    rng = random.Random(7)

    def responses(s):
        loaded = s["weights_loaded"]
        identity = Identity(
            magic=DEVICE_MAGIC, version_major=PROTOCOL_VERSION[0], version_minor=PROTOCOL_VERSION[1],
            boot_id=s["boot_id"], vocab_size=cfg.V, hidden_size=cfg.d, num_layers=cfg.L,
            intermediate_size=cfg.I, lanes=16, packing=int(Packing.from_export_name("base3")),
            image_version=IMAGE_VERSION, formats_id=formats_id(FORMATS), max_payload=MIN_DEVICE_PAYLOAD,
            step_time_ms=7, status=int((Status.WEIGHTS_LOADED if loaded else 0) | (Status.LOADING if s["load_open"] else 0)),
            image_size=image_bytes if loaded else 0, image_crc=s["image_crc"] if loaded else 0,
            position=s["position"])
        out = {
            PayloadKind.IDENTITY: identity.pack(),
            PayloadKind.RESET_STATE: POSITION.pack(0),
            PayloadKind.LOAD_BEGIN: LOAD_BEGIN_RESPONSE.pack(image_bytes, s["load_crc"]),
            PayloadKind.LOAD_CHUNK: LOAD_CHUNK_RESPONSE.pack(s["load_pointer"]),
            PayloadKind.FEED_TOKEN: FEED_TOKEN_RESPONSE.pack(s["position"], s["argmax"], s["logit"], s["cycles"]),
            PayloadKind.LOGITS: READ_LOGITS_HEADER.pack(s["position"], s["read_start"]) + s["logits"],
            PayloadKind.LOAD_STATUS: LOAD_STATUS_RESPONSE.pack(
                *((image_bytes, s["load_crc"], s["load_pointer"], s["running_crc"]) if s["load_open"] else (0,) * 4)),
        }
        if not small:     # (the small form has no read-back)
            out[PayloadKind.VERIFY_IMAGE] = VERIFY_IMAGE_RESPONSE.pack(image_bytes, s["running_crc"])
        if loaded:     # (a LOAD_COMMIT's response is sent, and replayed, only while its weights are loaded)
            out[PayloadKind.LOAD_COMMIT] = LOAD_COMMIT_RESPONSE.pack(image_bytes, s["image_crc"])
        return out

    async def read(ctx, kind, n, logits=b""):
        """The payload's n bytes at indices 0.., each read from pb once pb_ready."""
        out = bytearray()
        ctx.set(dut.kind, kind)
        ctx.set(dut.last, n - 1)
        for j in range(n):
            header = READ_LOGITS_HEADER.size
            data = kind == PayloadKind.LOGITS and j >= header
            ctx.set(dut.index, j)
            ctx.set(dut.logits_data, data)
            if data:
                ctx.set(dut.logit_word, int.from_bytes(logits[4 * ((j - header) // 4):][:4], "little"))
                ctx.set(dut.logit_byte, (j - header) % 4)
                ctx.set(dut.logit_have, 0)
                await ctx.tick().repeat(4)
                assert not ctx.get(dut.pb_ready)     # withheld until the logit has arrived
                ctx.set(dut.logit_have, 1)
            ctx.set(dut.stale, 1)                    # index (and the logit) changed
            await ctx.tick()
            ctx.set(dut.stale, 0)
            for _ in range(10):
                if ctx.get(dut.pb_ready):
                    break
                await ctx.tick()
            assert ctx.get(dut.pb_ready) and ctx.get(dut.pb_last) == (j == n - 1)
            out.append(ctx.get(dut.pb))
        return bytes(out)

    async def body(ctx):
        for trial in range(4):
            loaded = trial % 2 == 1
            load_crc = rng.randrange(1 << 32)
            s = dict(weights_loaded=loaded, load_open=trial >= 2, boot_id=rng.randrange(1 << 32),
                     position=rng.choice([0, 0xFFFFFFFF, rng.randrange(1 << 32)]),
                     load_pointer=rng.randrange(image_bytes + 1), load_crc=load_crc,
                     image_crc=load_crc if small else rng.randrange(1 << 32),   # (small: the image CRC is load_crc)
                     argmax=rng.randrange(cfg.V), logit=rng.randrange(-(1 << 31), 1 << 31),
                     cycles=rng.randrange(1 << 32), read_start=rng.randrange(cfg.V),
                     logits=bytes(rng.randrange(256) for _ in range(8)), running_crc=rng.randrange(1 << 32))
            for name in ("weights_loaded", "load_open", "boot_id", "position", "load_pointer", "load_crc",
                         "read_start", "running_crc"):
                ctx.set(getattr(dut, name), s[name])
            if not small:
                ctx.set(dut.image_crc, s["image_crc"] if loaded else 0)
            ctx.set(dut.result, {"argmax": s["argmax"], "logit": s["logit"], "cycles": s["cycles"]})
            for kind, want in responses(s).items():
                assert await read(ctx, kind, len(want), s["logits"]) == want, kind
            # the NAK, for each argument choice
            running, load_left = rng.randrange(1 << 32), rng.randrange(image_bytes + 1)
            values = {"position": s["position"], "load_pointer": s["load_pointer"], "running_crc": running,
                      "load_left": load_left}
            for sel, arg in enumerate(dut.arguments):
                error, op = rng.choice(list(Error)), rng.randrange(256)
                value = arg if isinstance(arg, int) else values[arg]
                ctx.set(dut.nak_error, error)
                ctx.set(dut.op, op)
                if small:
                    ctx.set(dut.nak_arg_sel, sel)
                    ctx.set(dut.running_crc, running)
                    ctx.set(dut.load_left, load_left)
                else:
                    ctx.set(dut.nak_arg, value)
                assert await read(ctx, PayloadKind.NAK, NAK_PAYLOAD.size) == NAK_PAYLOAD.pack(error, op, value)

    run(dut, body)


# -- the chunk forwarder (hw/link_chunk.py) ------------------------------------------------------

@pytest.mark.parametrize("form", [CountedChunk, BoundedChunk])
@pytest.mark.parametrize("data_bytes", [1, 2, 9])
def test_chunk_forwarder_addresses_the_data_bytes(form, data_bytes):
    """From ``begin`` on, ``addr`` walks the chunk's data bytes in the ring (wrapping around),
    one per ``step``, whatever the pauses between steps; ``last`` marks the final one, after
    which ``active`` falls and ``addr`` follows the next frame again."""
    depth = 16
    dut = form(ring_depth=depth, max_payload=64)
    length = LOAD_CHUNK_HEADER.size + data_bytes
    rng = random.Random(data_bytes)

    async def body(ctx):
        for sp in (3, 12, 31):       # (sp has one bit more than an address: the ring wraps)
            ctx.set(dut.frame_start, sp)
            if form is CountedChunk:
                ctx.set(dut.length, length)
            else:                    # the parse position after the frame's trailer
                ctx.set(dut.frame_end, (sp + HEADER_LEN + length + TRAILER_LEN) % (2 * depth))
            await ctx.tick().repeat(2)
            assert not ctx.get(dut.active)
            ctx.set(dut.begin, 1)
            await ctx.tick()
            ctx.set(dut.begin, 0)
            await ctx.tick()          # (the small form's bound is settled one cycle after the frame)
            addresses = []
            while True:
                assert ctx.get(dut.active)
                for _ in range(rng.randrange(3)):
                    await ctx.tick()
                addresses.append(ctx.get(dut.addr))
                last = ctx.get(dut.last)
                ctx.set(dut.step, 1)
                await ctx.tick()
                ctx.set(dut.step, 0)
                if last:
                    break
                assert len(addresses) <= data_bytes
            assert addresses == [(sp + HEADER_LEN + LOAD_CHUNK_HEADER.size + k) % depth for k in range(data_bytes)]
            assert not ctx.get(dut.active)

    run(dut, body)


# -- the response sender (hw/link_respond.py) ----------------------------------------------------

class _SenderHarness(Elaboratable):
    """The sender with the byte-wide CRCs, wired as the Link wires them."""

    def __init__(self):
        self.sender = ResponseSender(vocab_size=24, max_payload=MIN_DEVICE_PAYLOAD)
        self.crcs = ByteCrcs()

    def elaborate(self, platform):
        m = Module()
        m.submodules.sender, m.submodules.crcs = sender, crcs = self.sender, self.crcs
        m.d.comb += [sender.header_crc.eq(crcs.header_crc), sender.frame_crc.eq(crcs.frame_crc),
                     sender.may_pick.eq(1)]
        with m.If(sender.crc_feed):
            m.d.comb += [crcs.start.eq(sender.crc_start), crcs.data.eq(sender.crc_data),
                         crcs.header.eq(sender.crc_header), crcs.frame.eq(sender.crc_frame)]
        return m


def test_response_sender_frames_a_response():
    """Header, payload (taken from ``pb`` at ``index``) and trailer, sequenced phase by phase as
    the Link's state machine does, with random back-pressure on tx: the bytes are the protocol's
    encoding of the response frame, for several responses one after another."""
    dut = _SenderHarness()
    s = dut.sender
    rng = random.Random(11)
    responses = [(rng.randrange(256), rng.randrange(256), bytes(rng.randrange(256) for _ in range(n)))
                 for n in (1, 4, 12, MIN_DEVICE_PAYLOAD)]

    async def body(ctx):
        for seq, op, payload in responses:
            ctx.set(s.seq, seq)
            ctx.set(s.op, op)
            ctx.set(s.length, len(payload))
            ctx.set(s.restart, 1)
            await ctx.tick()
            ctx.set(s.restart, 0)
            out = bytearray()
            for phase, done in ((s.send_header, s.header_done), (s.send_payload, s.payload_done),
                                (s.send_trailer, s.trailer_done), (None, None)):
                if phase is not None:
                    ctx.set(phase, 1)
                for _ in range(2000):
                    j = ctx.get(s.index)
                    ctx.set(s.pb, payload[j] if j < len(payload) else 0)
                    ctx.set(s.pb_ready, 1)
                    ctx.set(s.payload_ready, 1)
                    ctx.set(s.pb_last, j == len(payload) - 1)
                    ready = rng.random() < 0.5
                    ctx.set(s.tx.ready, ready)
                    finished = ctx.get(done) if phase is not None else ctx.get(s.free)
                    if ready and ctx.get(s.tx.valid):
                        out.append(ctx.get(s.tx.payload))
                    await ctx.tick()
                    if finished:
                        break
                else:
                    raise AssertionError("the phase did not end")
                if phase is not None:
                    ctx.set(phase, 0)
            assert bytes(out) == encode_frame(seq, op, payload)

    run(dut, body)
