"""hw/link.py: the wire protocol in gateware, compared byte for byte with host/device_model.py.

Every test drives the same bytes into the Link (Amaranth simulator, with a fake engine that
runs reference/integer.py's IntegerModel on what the engine's ``load`` delivered) and into a DeviceModel of
the same geometry, and compares the responses. The harness adds random backpressure and gaps on
every stream, so the handshakes are exercised too.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections import deque

import pytest
from amaranth.hdl import Cat
from amaranth.sim import Simulator

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.image import image_size
from mmfree_fpga.reference.integer import parse_image
from mmfree_fpga.hw.control import EngineOp, command_layout, result_layout
from mmfree_fpga.hw.link import LFSR_TAPS, Link, lfsr_jump, lfsr_step, ring_depth, struct_fields
from mmfree_fpga.protocol import (
    FEED_TOKEN_REQUEST, IDENTITY, LOAD_BEGIN_REQUEST, LOAD_CHUNK_HEADER, LOAD_STATUS_RESPONSE, MAX_CHUNK,
    MAX_PAYLOAD, MIN_DEVICE_PAYLOAD, VERIFY_IMAGE_RESPONSE,
    NAK_PAYLOAD, NAK_RESPONSE, READ_LOGITS_REQUEST, RESPONSE, SYNC, Error, Frame, FrameDecoder,
    Identity, Op, Status, crc8_header, crc32_image, encode_frame,
)
from mmfree_fpga.reference.integer import IntegerModel
from mmfree_fpga.sim.runner import verilator_lint, simulator_missing, write_verilog

CFG = ModelConfig(vocab_size=24, hidden_size=8, num_hidden_layers=1, intermediate_size=8)
PACKING = "base3"
LANES = 16
STEP_MS = 7
BOOT_ID = 0x5EED0001
NO_TIMEOUT = 1 << 20       # cycles: far beyond any test, so partial frames wait like the model's


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from conftest import random_model

    from mmfree_fpga.reference.checkpoint import save_checkpoint
    ckpt = save_checkpoint(random_model(CFG, seed=5), tmp_path_factory.mktemp("link") / "ckpt")
    blob = WeightImage.from_checkpoint(ckpt, PACKING).blob
    assert len(blob) == image_size(CFG, PACKING)
    return blob


class FakeEngine:
    """The engine side of the Link's ``engine`` member: IntegerModel on the bytes ``load`` delivered."""

    def __init__(self, cfg: ModelConfig, packing: str, cycles: int = 0):
        self.cfg, self.packing, self.cycles = cfg, packing, cycles
        self.size = image_size(cfg, packing)
        self.image = bytearray()
        self.model: IntegerModel | None = None
        self.logits = None
        self.log: list[tuple] = []
        self.corrupt: set[int] = set()

    def command(self, op: EngineOp, token: int):
        self.log.append((op.name, token))
        if op == EngineOp.LOAD_RESET:
            self.image.clear()
            self.model, self.logits = None, None
        elif op == EngineOp.RESET_STATE:
            self.logits = None
            if len(self.image) == self.size:
                if self.model is None:
                    self.model = IntegerModel(parse_image(bytes(self.image), self.cfg, self.packing, FORMATS))
                self.model.reset()
        else:
            assert op == EngineOp.FEED_TOKEN, op
            assert self.model is not None, "FEED_TOKEN reached an engine without a complete image"
            assert token < self.cfg.V
            self.logits = self.model.step(token)
            best = IntegerModel.argmax(self.logits)
            return best, int(self.logits[best]), self.cycles
        return None

    def image_byte(self, b: int):
        assert len(self.image) < self.size, "the link wrote past the image"
        self.image.append(b)

    def readback(self, n: int) -> bytes:
        """The stored image's first ``n`` bytes, as the engine's reader sends them (``corrupt``:
        byte offsets whose stored value differs, a faulty memory)."""
        assert n == self.size and len(self.image) == self.size, "read-back of an incomplete image"
        self.log.append(("READBACK", n))
        data = bytearray(self.image)
        for offset in self.corrupt:
            data[offset] ^= 0x04
        return bytes(data)

    def logit(self, index: int) -> int:
        assert self.logits is not None and index < self.cfg.V
        return int(self.logits[index])

    def snapshot(self):
        return (sum(op != "READBACK" for op, _ in self.log), len(self.image))


class Bench:
    """Drives the Link cycle by cycle from one testbench coroutine."""

    def __init__(self, link: Link, engine: FakeEngine, seed: int = 0, backpressure: bool = True):
        self.link, self.engine = link, engine
        self.rng = random.Random(seed)
        self.bp = backpressure
        self.cycle = 0
        self.rx_hold = None
        self.result = None            # (countdown, payload) of the FEED result being offered
        self.logit_queue = deque()    # (countdown, value)
        self.readback = deque()       # bytes of a read-back still to send
        self.driven = {}
        L, E = link, link.engine
        # one packed sample per cycle (each sampled value costs a simulator evaluation)
        fields = [("rx_ready", L.rx.ready), ("tx_valid", L.tx.valid), ("tx_payload", L.tx.payload),
                  ("cmd_valid", E.cmd.valid), ("cmd", E.cmd.payload.as_value()),
                  ("img_valid", E.load.valid), ("img_payload", E.load.payload),
                  ("res_ready", E.result.ready), ("req_valid", E.logit_req.valid),
                  ("req_index", E.logit_req.payload), ("resp_ready", E.logit_resp.ready),
                  ("idle", L.idle)]
        if link.reads_back:
            fields += [("rb_start_valid", L.readback.start.valid), ("rb_start", L.readback.start.payload),
                       ("rb_data_ready", L.readback.data.ready)]
        if link.slots:      # the input buffer's writes (tests/test_hw_link_slices.py)
            fields += [("res_in_valid", L.residual.valid), ("res_in", L.residual.payload.as_value())]
        self.packed = Cat(*[v for _, v in fields])
        self.unpack = []
        offset = 0
        for name, v in fields:
            self.unpack.append((name, offset, (1 << len(v)) - 1))
            offset += len(v)
        self.ports = dict(rx_valid=L.rx.valid, rx_payload=L.rx.payload, tx_ready=L.tx.ready,
                          cmd_ready=E.cmd.ready, img_ready=E.load.ready,
                          res_valid=E.result.valid, res_payload=E.result.payload.as_value(),
                          req_ready=E.logit_req.ready, resp_valid=E.logit_resp.valid,
                          resp_payload=E.logit_resp.payload)
        if link.reads_back:
            self.ports.update(rb_start_ready=L.readback.start.ready, rb_data_valid=L.readback.data.valid,
                              rb_data_payload=L.readback.data.payload.as_value())
        if link.slots:
            self.ports.update(res_in_ready=L.residual.ready)

    def _chance(self, p):
        return not self.bp or self.rng.random() < p

    def _set(self, ctx, signal, value):
        # every set costs a simulator step: only changes are written
        if self.driven.get(id(signal)) != value:
            self.driven[id(signal)] = value
            ctx.set(signal, value)

    async def peek(self, ctx, signals):
        """Values of ``signals`` (one idle cycle; processes cannot read signals otherwise)."""
        _, _, *values = await ctx.tick().sample(*signals)
        self.cycle += 1
        return values

    async def run(self, ctx, data: bytes = b"", *, max_cycles: int = 200_000, until_idle: bool = True,
                  cycles: int = 0) -> bytes:
        """Send ``data``, return what the link sent until it is idle (or for ``cycles`` cycles)."""
        eng, P, rng = self.engine, self.ports, self.rng
        pending = deque(data)
        out = bytearray()
        idle_seen = 0
        for n in range(max_cycles):
            if self.rx_hold is None and pending and self._chance(0.85):
                self.rx_hold = pending.popleft()
            self._set(ctx, P["rx_valid"], self.rx_hold is not None)
            if self.rx_hold is not None:
                self._set(ctx, P["rx_payload"], self.rx_hold)
            tx_ready = self._chance(0.7)
            self._set(ctx, P["tx_ready"], tx_ready)
            cmd_ready = self._chance(0.6)
            self._set(ctx, P["cmd_ready"], cmd_ready)
            img_ready = self._chance(0.8)
            self._set(ctx, P["img_ready"], img_ready)
            if self.result is not None and self.result[0] > 0:
                self.result = (self.result[0] - 1, self.result[1])
            offering = self.result is not None and self.result[0] == 0
            self._set(ctx, P["res_valid"], offering)
            if offering:
                token, logit, cycles = self.result[1]
                self._set(ctx, P["res_payload"], result_layout().const(
                    {"token": token, "logit": logit, "cycles": cycles}).as_value().value)
            req_ready = self._chance(0.7)
            self._set(ctx, P["req_ready"], req_ready)
            if self.logit_queue and self.logit_queue[0][0] > 0:
                self.logit_queue[0] = (self.logit_queue[0][0] - 1, self.logit_queue[0][1])
            resp_offer = bool(self.logit_queue) and self.logit_queue[0][0] == 0
            self._set(ctx, P["resp_valid"], resp_offer)
            if resp_offer:
                self._set(ctx, P["resp_payload"], self.logit_queue[0][1])

            if self.link.slots:
                res_in_ready = self._chance(0.7)
                self._set(ctx, P["res_in_ready"], res_in_ready)
            reads_back = self.link.reads_back
            if reads_back:
                rb_start_ready = not self.readback and self._chance(0.6)
                self._set(ctx, P["rb_start_ready"], rb_start_ready)
                rb_offer = bool(self.readback) and self._chance(0.8)
                self._set(ctx, P["rb_data_valid"], rb_offer)
                if rb_offer:
                    self._set(ctx, P["rb_data_payload"], self.readback[0] | (len(self.readback) == 1) << 8)

            _, _, word = await ctx.tick().sample(self.packed)
            v = {name: (word >> off) & mask for name, off, mask in self.unpack}
            self.cycle += 1
            if self.rx_hold is not None and v["rx_ready"]:
                self.rx_hold = None
            if v["tx_valid"] and tx_ready:
                out.append(v["tx_payload"])
            if v["cmd_valid"] and cmd_ready:
                cmd = command_layout().from_bits(v["cmd"])
                if self.link.slots:
                    res = eng.command(cmd.op, cmd.arg, index=int(cmd.index))
                else:
                    assert cmd.index == 0, cmd
                    res = eng.command(cmd.op, cmd.arg)
                if res is not None:
                    assert self.result is None
                    self.result = (rng.randrange(0, 12) if self.bp else 0, res)
            if v["img_valid"] and img_ready:
                eng.image_byte(v["img_payload"])
            if self.link.slots and v["res_in_valid"] and res_in_ready:
                eng.residual_value(v["res_in"])
            if offering and v["res_ready"]:
                self.result = None
            if v["req_valid"] and req_ready:
                self.logit_queue.append((rng.randrange(0, 4) if self.bp else 0, eng.logit(v["req_index"])))
            if resp_offer and v["resp_ready"]:
                self.logit_queue.popleft()
            if reads_back:
                if v["rb_start_valid"] and rb_start_ready:
                    self.readback.extend(eng.readback(v["rb_start"]))
                if rb_offer and v["rb_data_ready"]:
                    self.readback.popleft()
            idle = v["idle"]
            if cycles:
                if n + 1 >= cycles:
                    return bytes(out)
                continue
            busy = (pending or self.rx_hold is not None or self.result is not None or self.logit_queue
                    or self.readback)
            idle_seen = idle_seen + 1 if idle and not busy else 0
            if until_idle and idle_seen >= 2:
                return bytes(out)
        raise AssertionError(f"the link did not go idle within {max_cycles} cycles (hang?)")


@pytest.fixture(params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["ecp5", "small"])
def small(request):
    """Both forms of the Link: the default (ECP5 timing) and the small one (iCE40 area; the slow
    set, except for the tests below that take the small form in the default suite too)."""
    return request.param


@pytest.fixture(params=[False, True], ids=["ecp5", "small"])
def small_too(request):
    """Both forms in the default suite (the session and the NAK cases)."""
    return request.param


def make_link(max_payload=MAX_PAYLOAD, **kw):
    """A Link; the default form reads back (VERIFY_IMAGE), the small form cannot."""
    kw.setdefault("idle_timeout_cycles", NO_TIMEOUT)
    kw.setdefault("boot_id", BOOT_ID)
    kw.setdefault("readback", not kw.get("small", False))
    return Link(CFG, packing=PACKING, lanes=LANES, max_payload=max_payload, step_time_ms=STEP_MS, **kw)


def make_model(max_payload=MAX_PAYLOAD, readback=True):
    """The device model of :func:`make_link`'s Link (``readback``: as the Link's)."""
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=STEP_MS, max_payload=max_payload, seed=1,
                        readback=readback)
    model.boot_id = BOOT_ID
    return model


def simulate(link, body, *, seed=0, backpressure=True, cycles=0):
    engine = FakeEngine(CFG, PACKING, cycles=cycles)
    bench = Bench(link, engine, seed=seed, backpressure=backpressure)
    sim = Simulator(link)
    sim.add_clock(1e-6)

    finished = []

    async def driver(ctx):
        await body(ctx, bench)
        finished.append(True)

    # a process, not a testbench: its writes settle once per cycle instead of once per write
    sim.add_process(driver)
    while not finished:
        sim.advance()
    return bench


def decode(data: bytes):
    dec = FrameDecoder(MAX_PAYLOAD)
    frames = dec.feed(data)
    assert dec.pending == 0 and dec.garbage_bytes == 0, f"stray bytes in the link's output {data.hex()}"
    assert all(isinstance(f, Frame) and f.op & RESPONSE for f in frames)
    return frames


def nak_of(frame):
    assert frame.op == NAK_RESPONSE
    error, op, arg = NAK_PAYLOAD.unpack(frame.payload)
    return Error(error), op, arg


class Session:
    """Sends the same bytes to the Link and the DeviceModel, checks identical answers."""

    def __init__(self, ctx, bench, model):
        self.ctx, self.bench, self.model = ctx, bench, model
        self.seq = 0

    async def send(self, data: bytes) -> list:
        got = await self.bench.run(self.ctx, data)
        want = self.model.receive(data, now=0.0)
        assert got == want, f"link {got.hex()} != model {want.hex()} for {data.hex()}"
        return decode(got)

    async def command(self, op, payload=b"", seq=None):
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
            seq = self.seq
        frame = encode_frame(seq, op, payload)
        return frame, await self.send(frame)

    async def expect(self, op, payload=b"", *, seq=None):
        """A command that must succeed: returns the response payload."""
        _, frames = await self.command(op, payload, seq=seq)
        assert len(frames) == 1 and frames[0].op == op | RESPONSE, frames
        return frames[0].payload

    async def nak(self, op, payload, error, arg=None):
        _, frames = await self.command(op, payload)
        assert len(frames) == 1
        e, rejected, got_arg = nak_of(frames[0])
        assert (e, rejected) == (error, op & 0xFF)
        if arg is not None:
            assert got_arg == arg
        return got_arg

    async def load(self, blob, chunk):
        await self.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(blob), crc32_image(blob)))
        for off in range(0, len(blob), chunk):
            await self.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + blob[off:off + chunk])
        await self.expect(Op.LOAD_COMMIT)


# -- unit pieces ------------------------------------------------------------------------------

def test_struct_fields_follow_the_protocol_layouts():
    assert struct_fields(FEED_TOKEN_REQUEST) == [(0, 32), (32, 32)]
    assert struct_fields(READ_LOGITS_REQUEST) == [(0, 32), (32, 32), (64, 16)]
    identity = struct_fields(IDENTITY)
    assert identity[0] == (0, 32) and sum(w for _, w in identity) == 8 * IDENTITY.size
    assert ring_depth(MAX_PAYLOAD) == 2048 and ring_depth(MIN_DEVICE_PAYLOAD) == 128
    with pytest.raises(ValueError, match="max_payload"):
        Link(CFG, max_payload=MIN_DEVICE_PAYLOAD - 1)


# -- scripted sessions -----------------------------------------------------------------------------

@pytest.mark.parametrize("max_payload", [MIN_DEVICE_PAYLOAD, MAX_PAYLOAD])
def test_session_matches_device_model(image, max_payload, small_too):
    """IDENTIFY, RESET, a whole load, feeds, logit reads and duplicates of each: identical bytes."""
    small = small_too and max_payload == MIN_DEVICE_PAYLOAD
    link, model = make_link(max_payload, small=small), make_model(max_payload, readback=not small)
    chunk = max_payload - LOAD_CHUNK_HEADER.size

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        ident = Identity.unpack(await s.expect(Op.IDENTIFY))
        assert (ident.boot_id, ident.max_payload, ident.lanes, ident.step_time_ms) == \
            (BOOT_ID, max_payload, LANES, STEP_MS)
        assert ident.geometry == (CFG.V, CFG.d, CFG.L, CFG.I) and not ident.weights_loaded
        assert await s.expect(Op.RESET_STATE) == bytes(4)
        # a load in chunks of every size up to the device's maximum, a duplicate of each
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))
        assert Identity.unpack(await s.expect(Op.IDENTIFY)).status == 2
        assert await s.expect(Op.LOAD_STATUS) == LOAD_STATUS_RESPONSE.pack(len(image), crc32_image(image), 0, 0)
        off, sizes = 0, [1, 2, 3, chunk, 17, chunk - 1]
        while off < len(image):
            n = min(sizes[off % len(sizes)], len(image) - off)
            frame, _ = await s.command(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + image[off:off + n])
            off += n
            if off % 3 == 0:
                await s.send(frame)                      # duplicate: replayed, not written twice
            if off % 5 == 0:                             # where the load stands (what a resuming host asks)
                status_frame, _ = await s.command(Op.LOAD_STATUS)
                assert LOAD_STATUS_RESPONSE.unpack((await s.send(status_frame))[0].payload) == \
                    (len(image), crc32_image(image), off, crc32_image(image[:off]))
        await s.expect(Op.LOAD_COMMIT)
        assert bytes(bench.engine.image) == image
        assert await s.expect(Op.LOAD_STATUS) == bytes(LOAD_STATUS_RESPONSE.size)   # no load open
        if not small:                                    # the stored image read back, twice
            frame, _ = await s.command(Op.VERIFY_IMAGE)
            (again,) = await s.send(frame)
            assert VERIFY_IMAGE_RESPONSE.unpack(again.payload) == (len(image), crc32_image(image))
            assert bench.engine.log.count(("READBACK", len(image))) == 2
        ident = Identity.unpack(await s.expect(Op.IDENTIFY))
        assert ident.weights_loaded and ident.image_crc == crc32_image(image) and ident.image_size == len(image)
        feeds = 0
        for pos, token in enumerate([3, 0, CFG.V - 1, 17, 17, 5]):
            frame, frames = await s.command(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(pos, token))
            feeds += 1
            await s.send(frame)                          # the lost-response retransmission
            await s.send(frame + frame)                  # twice more
        assert bench.engine.log.count(("FEED_TOKEN", 17)) == 2 and model.stats["tokens"] == feeds
        pos = feeds
        per_read = min(256, (max_payload - 8) // 4)
        for start, count in [(0, 1), (0, min(per_read, CFG.V)), (CFG.V - 1, 1), (3, 7)]:
            frame, _ = await s.command(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(pos, start, count))
            await s.send(frame)
        await s.expect(Op.RESET_STATE)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 9))
        # a new load drops the weights
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), 0))
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1), Error.NO_WEIGHTS)

    simulate(link, body, seed=max_payload)


def test_preloaded_image(image, small):
    """Weights in the bitstream: loaded from the start (IDENTIFY's status, size and CRC-32), fed at
    once, dropped by LOAD_BEGIN and replaced by a new load, as the device model does."""
    link = make_link(MIN_DEVICE_PAYLOAD, image=image, small=small)
    model = make_model(MIN_DEVICE_PAYLOAD, readback=not small)
    model.load_image(image)

    async def body(ctx, bench):
        bench.engine.image = bytearray(image)
        bench.engine.model = IntegerModel(parse_image(image, CFG, PACKING, FORMATS))
        s = Session(ctx, bench, model)
        ident = Identity.unpack(await s.expect(Op.IDENTIFY))
        assert ident.weights_loaded and ident.image_crc == crc32_image(image) and ident.image_size == len(image)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 4))
        if not small:
            assert await s.expect(Op.VERIFY_IMAGE) == VERIFY_IMAGE_RESPONSE.pack(len(image), crc32_image(image))
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))
        assert not Identity.unpack(await s.expect(Op.IDENTIFY)).weights_loaded
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1), Error.NO_WEIGHTS)
        await s.load(image, 60)
        ident = Identity.unpack(await s.expect(Op.IDENTIFY))
        assert ident.weights_loaded and ident.image_crc == crc32_image(image)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 4))

    simulate(link, body, seed=9)


def test_memory_error_shows_in_identify(small):
    """``memory_error`` (a DRAM that failed its read levelling) sets IDENTIFY's MEMORY_ERROR bit
    while it is high, in both forms; the rest of the identity is unchanged."""
    link = make_link(MIN_DEVICE_PAYLOAD, small=small, memory_status=True)

    async def body(ctx, bench):
        statuses = []
        for seq, error in ((1, 0), (2, 1), (3, 0)):
            ctx.set(link.memory_error, error)
            frames = decode(await bench.run(ctx, encode_frame(seq, Op.IDENTIFY)))
            assert len(frames) == 1 and frames[0].op == Op.IDENTIFY | RESPONSE
            statuses.append(Identity.unpack(frames[0].payload).status)
        assert statuses == [0, Status.MEMORY_ERROR, 0]

    simulate(link, body, seed=5)


def test_verify_image_reads_back_and_sees_a_corrupted_memory(image):
    """VERIFY_IMAGE (default form): the engine's stored bytes, read back, through the image CRC;
    a corrupted byte of the memory changes the CRC (as the device model's, corrupted alike) and
    nothing else: the load state, IDENTIFY's committed CRC and the tokens stay."""
    link, model = make_link(MIN_DEVICE_PAYLOAD), make_model(MIN_DEVICE_PAYLOAD)

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        await s.nak(Op.VERIFY_IMAGE, b"", Error.NO_WEIGHTS, 0)
        await s.load(image, 60)
        assert await s.expect(Op.VERIFY_IMAGE) == VERIFY_IMAGE_RESPONSE.pack(len(image), crc32_image(image))
        for offset in (len(image) - 1, 0, len(image) // 2):
            bench.engine.corrupt.add(offset)
            model.corrupt_stored_image(offset, 0x04)
            size, crc = VERIFY_IMAGE_RESPONSE.unpack(await s.expect(Op.VERIFY_IMAGE))
            assert size == len(image) and crc != crc32_image(image)
        assert Identity.unpack(await s.expect(Op.IDENTIFY)).image_crc == crc32_image(image)
        assert await s.expect(Op.LOAD_STATUS) == bytes(LOAD_STATUS_RESPONSE.size)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 3))
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + b"x", Error.NO_LOAD)

    simulate(link, body, seed=21)


def test_every_nak_case(image, small_too):
    """Each NAK of the protocol, with its error code and arg, as the device model answers it."""
    link = make_link(MIN_DEVICE_PAYLOAD, small=small_too)
    model = make_model(MIN_DEVICE_PAYLOAD, readback=not small_too)
    size = len(image)

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        for op in (0x00, 0x0A, 0x42, Op.NAK):
            await s.nak(op, b"", Error.UNKNOWN_OP, 0)
        for op, n in [(Op.IDENTIFY, 1), (Op.RESET_STATE, 4), (Op.LOAD_BEGIN, 7), (Op.LOAD_COMMIT, 2),
                      (Op.FEED_TOKEN, 9), (Op.READ_LOGITS, 9), (Op.LOAD_STATUS, 1)]:
            await s.nak(op, bytes(n), Error.BAD_LENGTH)
        if small_too:       # (no read-back in the small form: an unknown op, whatever its length)
            await s.nak(Op.VERIFY_IMAGE, b"x", Error.UNKNOWN_OP, 0)
            await s.nak(Op.VERIFY_IMAGE, b"", Error.UNKNOWN_OP, 0)
        else:
            await s.nak(Op.VERIFY_IMAGE, b"x", Error.BAD_LENGTH, 0)
            await s.nak(Op.VERIFY_IMAGE, b"", Error.NO_WEIGHTS, 0)
        await s.nak(Op.LOAD_CHUNK, bytes(4), Error.BAD_LENGTH, 5)
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + b"x", Error.NO_LOAD)
        await s.nak(Op.LOAD_COMMIT, b"", Error.NO_LOAD)
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 0), Error.NO_WEIGHTS)
        await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(0, 0, 1), Error.NO_WEIGHTS)
        await s.nak(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(size + 1, 0), Error.BAD_IMAGE_SIZE, size)
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(size, crc32_image(image) ^ 1))
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(1) + b"x", Error.BAD_OFFSET, 0)
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + image[:50])
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + b"x", Error.BAD_OFFSET, 50)
        await s.nak(Op.LOAD_COMMIT, b"", Error.INCOMPLETE, 50)
        off = 50
        while off < size - 30:
            await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + image[off:off + 60])
            off += 60
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + bytes(size - off + 1), Error.BAD_ARGUMENT,
                    size - off)
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + image[off:])
        await s.nak(Op.LOAD_COMMIT, b"", Error.CHECKSUM_MISMATCH, crc32_image(image))
        assert Identity.unpack(await s.expect(Op.IDENTIFY)).status == 2     # the load stays open
        await s.load(image, 60)
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, CFG.V), Error.BAD_ARGUMENT, CFG.V)
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(1, 0), Error.POSITION_MISMATCH, 0)
        per_read = link.logits_per_read
        await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(0, 0, 1), Error.BAD_ARGUMENT, per_read)  # no step yet
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 2))
        await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(0, 0, 1), Error.POSITION_MISMATCH, 1)
        for start, count in [(0, 0), (0, 15), (CFG.V - 1, 2), (0xFFFFFFFF, 1)]:
            await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(1, start, count), Error.BAD_ARGUMENT, per_read)
        await s.expect(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(1, CFG.V - per_read, per_read))
        # a frame whose CRC-16 fails: NAK BAD_CRC; one whose header fails: silence
        frame = bytearray(encode_frame(0x33, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(1, 4)))
        frame[-3] ^= 0x10
        (bad,) = await s.send(bytes(frame))
        assert nak_of(bad) == (Error.BAD_CRC, Op.FEED_TOKEN, 0) and bad.seq == 0x33
        frame = bytearray(encode_frame(0x34, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(1, 4)))
        frame[3] ^= 0x01
        assert await s.send(bytes(frame)) == []
        # a response frame (an echo) is ignored, a valid one and a corrupt one
        echo = encode_frame(0x35, Op.FEED_TOKEN | RESPONSE, bytes(16))
        assert await s.send(echo) == []
        assert await s.send(echo[:-1] + bytes([echo[-1] ^ 1])) == []
        assert model.stats["nak_BAD_ARGUMENT"] >= 7

    simulate(link, body, seed=7)


def test_load_chunk_longer_than_max_chunk(image, small):
    """A LOAD_CHUNK with more than MAX_CHUNK data bytes, in a frame that max_payload still admits:
    NAK BAD_LENGTH with the longest LOAD_CHUNK as its argument, whatever the load's state, as the
    device model answers it; nothing changes."""
    longest = LOAD_CHUNK_HEADER.size + MAX_CHUNK
    assert longest < MAX_PAYLOAD
    link, model = make_link(MAX_PAYLOAD, small=small), make_model(MAX_PAYLOAD)

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        state = list(link.state.values())
        for n in (longest + 1, MAX_PAYLOAD):
            await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + bytes(n - LOAD_CHUNK_HEADER.size),
                        Error.BAD_LENGTH, longest)
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + image[:10])
        before = (await bench.peek(ctx, state), bench.engine.snapshot())
        for n in (longest + 1, MAX_PAYLOAD):
            data = (image[10:] + bytes(n))[:n - LOAD_CHUNK_HEADER.size]
            await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(10) + data, Error.BAD_LENGTH, longest)
        assert (await bench.peek(ctx, state), bench.engine.snapshot()) == before
        # MAX_CHUNK data bytes is a LOAD_CHUNK's longest: checked further (here: past the image)
        await s.nak(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(10) + bytes(MAX_CHUNK), Error.BAD_ARGUMENT,
                    len(image) - 10)
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(10) + image[10:])
        await s.expect(Op.LOAD_COMMIT)
        assert bytes(bench.engine.image) == image

    simulate(link, body, seed=13, backpressure=False)


def test_last_position_cannot_advance(image, small):
    link, model = make_link(small=small), make_model()

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        await s.load(image, 1000)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1))
        # both devices jump to the last position (a test hook; the protocol cannot get there fast)
        ctx.set(link.state["position"], 0xFFFFFFFF)
        model._position = 0xFFFFFFFF
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0xFFFFFFFF, 1), Error.BAD_ARGUMENT, 0xFFFFFFFF)
        await s.expect(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(0xFFFFFFFF, 0, 4))

    simulate(link, body, seed=3)


def test_garbage_false_syncs_and_resynchronisation(image, small):
    link, model = make_link(small=small), make_model()

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        ident = encode_frame(1, Op.IDENTIFY)
        reset = encode_frame(2, Op.RESET_STATE)
        assert len(await s.send(b"\x00\xff\x13" + ident + b"garbage" + reset + b"\xa5")) == 2
        # a false SYNC whose header happens to hold a small length swallows a real frame's
        # start; the rescan after the failed CRC finds the frame behind it
        false_start = bytes([SYNC, 9, Op.IDENTIFY, 3, 0])
        false_start += bytes([crc8_header(false_start[1:])])
        frames = await s.send(false_start + encode_frame(3, Op.IDENTIFY) + encode_frame(4, Op.RESET_STATE))
        assert [f.op for f in frames] == [NAK_RESPONSE, Op.IDENTIFY | RESPONSE, Op.RESET_STATE | RESPONSE]
        # bytes split anywhere
        blob = encode_frame(5, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), 1))
        for part in (blob[:1], blob[1:4], blob[4:9], blob[9:]):
            await s.send(part)
        # a header claiming more than max_payload is dropped at once
        big = bytes([SYNC, 6, Op.LOAD_CHUNK, 0xFF, 0xFF])
        await s.send(big + bytes([crc8_header(big[1:])]) + encode_frame(7, Op.IDENTIFY))
        # a length mismatch the CRC cannot see: a frame cut short is completed by the next
        # frame's bytes, fails its CRC, and the rescan finds the next frame
        cut = encode_frame(8, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1))[:-3]
        frames = await s.send(cut + encode_frame(9, Op.IDENTIFY))
        assert nak_of(frames[0])[0] == Error.BAD_CRC and frames[-1].op == Op.IDENTIFY | RESPONSE

    simulate(link, body, seed=11)


@pytest.mark.parametrize("max_payload", [MIN_DEVICE_PAYLOAD, 256, MAX_PAYLOAD])
def test_header_length_limit(max_payload, small):
    """A header whose LEN exceeds max_payload is dropped at once (whatever its low byte); a
    frame of exactly max_payload bytes is taken whole (here: a BAD_LENGTH NAK)."""
    link, model = make_link(max_payload, small=small), make_model(max_payload)
    lengths = sorted({n for n in (max_payload + 1, max_payload + 0x80, max_payload + 0x100, 0xFF, 0x1FF,
                                  0x8000 | (max_payload & 0xFF), 0xFFFF) if max_payload < n <= 0xFFFF})

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        for seq, length in enumerate(lengths):
            header = bytes([SYNC, seq, Op.IDENTIFY, length & 0xFF, length >> 8])
            frames = await s.send(header + bytes([crc8_header(header[1:])]) + encode_frame(seq, Op.IDENTIFY))
            assert [f.op for f in frames] == [Op.IDENTIFY | RESPONSE], hex(length)
        await s.nak(Op.IDENTIFY, bytes(range(7, 7 + max_payload)) if max_payload < 250
                    else bytes(max_payload), Error.BAD_LENGTH, 0)

    simulate(link, body, seed=max_payload, backpressure=False)


def test_idle_timeout_drops_a_partial_frame(small):
    timeout = 300
    link, model = make_link(idle_timeout_cycles=timeout, small=small), make_model()

    async def body(ctx, bench):
        # a frame cut short, then silence: dropped after the timeout; the next frame is answered
        cut = encode_frame(1, Op.IDENTIFY)[:-1]
        assert await bench.run(ctx, cut) == model.receive(cut, now=0.0) == b""
        out = await bench.run(ctx, cycles=timeout + 100)
        assert out == model.poll(now=1.0) == b""
        assert model._decoder.pending == 0
        frame = encode_frame(2, Op.IDENTIFY)
        got = await bench.run(ctx, frame)
        assert got == model.receive(frame, now=1.0) and len(decode(got)) == 1
        # a partial frame hides a complete one behind a false SYNC: the abandon's rescan finds it
        inner = encode_frame(3, Op.RESET_STATE)
        false_start = bytes([4, Op.IDENTIFY, 20, 0])
        data = bytes([SYNC]) + false_start + bytes([crc8_header(false_start)]) + inner
        assert await bench.run(ctx, data) == model.receive(data, now=2.0) == b""
        got = await bench.run(ctx, cycles=timeout + 200)
        want = model.poll(now=3.0)
        assert got == want and [f.op for f in decode(got)] == [Op.RESET_STATE | RESPONSE]

    simulate(link, body, seed=2, backpressure=False)


def test_cycles_and_boot_id_counter(image, small):
    """The engine's cycle count reaches the response; a counter boot id differs between boots."""
    ids = []
    for gap in (5, 40):
        link = make_link(boot_id=None, small=small)

        async def body(ctx, bench):
            await bench.run(ctx, cycles=gap)
            frames = decode(await bench.run(ctx, encode_frame(1, Op.IDENTIFY)))
            ids.append(Identity.unpack(frames[0].payload).boot_id)
            out = await bench.run(ctx, b"".join(
                [encode_frame(2, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))]
                + [encode_frame(3 + i, Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + image[off:off + 1000])
                   for i, off in enumerate(range(0, len(image), 1000))]))
            assert len(decode(out)) == -(-len(image) // 1000) + 1
            decode(await bench.run(ctx, encode_frame(100, Op.LOAD_COMMIT)))
            (resp,) = decode(await bench.run(ctx, encode_frame(101, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1))))
            assert resp.op == Op.FEED_TOKEN | RESPONSE and resp.payload[-4:] == (123456).to_bytes(4, "little")

        simulate(link, body, seed=gap, backpressure=False, cycles=123456)
    assert ids[0] != ids[1]


# -- fuzz ----------------------------------------------------------------------------------------

def _mutate(rng, frame: bytes, previous: bytes) -> bytes:
    b = bytearray(frame)
    kind = rng.randrange(10)
    if kind == 0:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(1, len(b)):]
    elif kind == 2:
        b[rng.randrange(len(b))] = SYNC
    elif kind == 3:
        b = bytearray(rng.randbytes(rng.randrange(1, 12))) + b
    elif kind == 4:
        b = bytearray(previous)                                     # a duplicate
    elif kind == 5:
        b = bytearray(encode_frame(b[1], rng.randrange(256), bytes(b[6:-2])))
    elif kind == 6:                                                 # wrong length, valid CRCs
        payload = bytes(b[6:-2])
        payload = payload[:-1] if payload and rng.random() < 0.5 else payload + rng.randbytes(rng.randrange(1, 4))
        b = bytearray(encode_frame(b[1], b[2], payload))
    elif kind == 7:
        b += encode_frame(rng.randrange(256), rng.choice(list(Op)), rng.randbytes(rng.randrange(12)))
    elif kind == 8:
        b = bytearray(rng.randbytes(rng.randrange(1, 20)))
    return bytes(b)


def _fuzz_frame(rng, model, image) -> bytes:
    """A plausible command for the model's current state (right position/offset most of the time)."""
    seq = rng.randrange(256)
    pos = model.position if rng.random() < 0.85 else rng.randrange(3)
    load = model._load
    op = rng.choices([Op.FEED_TOKEN, Op.READ_LOGITS, Op.IDENTIFY, Op.RESET_STATE, Op.LOAD_CHUNK,
                      Op.LOAD_COMMIT, Op.LOAD_BEGIN, Op.LOAD_STATUS, Op.VERIFY_IMAGE, None],
                     [30, 15, 6, 8, 12, 8, 2, 3, 1, 4])[0]
    if op == Op.FEED_TOKEN:
        payload = FEED_TOKEN_REQUEST.pack(pos, rng.randrange(CFG.V + 2))
    elif op == Op.READ_LOGITS:
        count = rng.randrange(6) if rng.random() < 0.9 else rng.randrange(16)
        payload = READ_LOGITS_REQUEST.pack(pos, rng.randrange(CFG.V), count)
    elif op == Op.LOAD_CHUNK:
        off = load.pointer if load and rng.random() < 0.7 else rng.randrange(64)
        data = image[off:off + rng.randrange(1, 40)]
        if rng.random() < 0.1:                       # wrong data: the commit's CRC check fails
            data = rng.randbytes(len(data))
        payload = LOAD_CHUNK_HEADER.pack(off) + data
    elif op == Op.LOAD_BEGIN:
        payload = LOAD_BEGIN_REQUEST.pack(len(image) + rng.choice([0, 0, 0, 1]), crc32_image(image))
    elif op is None:
        op, payload = rng.randrange(256), rng.randbytes(rng.randrange(12))
    else:
        payload = b""
    return encode_frame(seq, op, payload)


async def finish_load(s):
    """Complete the model's open load (and so the link's): chunks, commit, or a new LOAD_BEGIN
    after corrupt data went in. A pending partial frame may swallow a command: retry."""
    image = s.image
    for _ in range(400):
        load = s.model._load
        if load is None:
            return
        if load.pointer < len(image):
            data = image[load.pointer:load.pointer + 60]
            await s.command(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(load.pointer) + data)
        else:
            _, answer = await s.command(Op.LOAD_COMMIT)
            if any(f.op == NAK_RESPONSE and nak_of(f)[0] == Error.CHECKSUM_MISMATCH for f in answer):
                await s.command(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))
    raise AssertionError("the load did not complete")


@pytest.mark.parametrize("small, n_exchanges", [
    # short runs in the default suite, the full ones in the slow set; the small form parses and
    # sends about four times slower (bit-serial CRCs)
    (False, 700), pytest.param(False, 1400, marks=pytest.mark.slow),
    (True, 200), pytest.param(True, 1400, marks=pytest.mark.slow)], ids=["ecp5", "ecp5-long", "small", "small-long"])
def test_fuzz_matches_device_model(image, small, n_exchanges):
    """Thousands of valid, corrupt and mutated frames: the same bytes out, no hang, and no state
    change (device registers, engine commands, image bytes) in any exchange in which the model
    executed no command."""
    n_exchanges = int(os.environ.get("LINK_FUZZ_EXCHANGES", n_exchanges))
    link, model = make_link(MIN_DEVICE_PAYLOAD, small=small), make_model(MIN_DEVICE_PAYLOAD, readback=not small)

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        s.image = image
        state = list(link.state.values())
        await s.load(image, 60)
        # (a seed whose 200-exchange run still reaches every NAK: the short small-form run has
        # little margin for the rare ones, those of an open load)
        rng = random.Random(1245)
        previous = encode_frame(0, Op.IDENTIFY)
        checked = frames = 0
        for i in range(n_exchanges):
            data = b""
            for _ in range(rng.choice([1, 1, 2, 3])):
                frame = _fuzz_frame(rng, model, image)
                data += _mutate(rng, frame, previous) if rng.random() < 0.5 else frame
                previous = frame
                frames += 1
            before = (await bench.peek(ctx, state), bench.engine.snapshot(), model.stats["commands"])
            await s.send(data)
            if model.stats["commands"] == before[2]:
                checked += 1
                after = (await bench.peek(ctx, state), bench.engine.snapshot())
                assert after == before[:2], f"exchange {i} executed nothing, yet the state changed"
            if model._load is not None and rng.random() < 0.12:
                await finish_load(s)
        stats = model.stats
        print(f"fuzz: {frames} frames in {n_exchanges} exchanges, {bench.cycle} cycles, {dict(stats)}")
        scale = n_exchanges / 1400       # the coverage floors were set for 1400 exchanges
        assert frames > 2400 * scale and checked > n_exchanges // 4, (frames, checked)
        assert stats["tokens"] > 200 * scale and stats["replays"] > 20 * scale and stats["bad_crc"] > 50 * scale, stats
        assert all(stats[f"nak_{e.name}"] for e in Error), stats
        assert sum(op == "FEED_TOKEN" for op, _ in bench.engine.log) == stats["tokens"]

    simulate(link, body, seed=99)


# -- generated Verilog -----------------------------------------------------------------------------

ACCEPTED_LINT = {
    "WIDTHEXPAND": "implicit operand extension in Amaranth's expressions",
    "WIDTHTRUNC": "Amaranth's `!x` for `x == 0` and its shift-then-truncate bit_select",
    "UNUSEDSIGNAL": "debug aliases of views and unused library outputs (not top-level ports)",
    "PROCASSINIT": "Amaranth's style of declaring a register's init value",
    # Amaranth's FSM state (and the opcode / byte-index switches) are cased without listing
    # every code; each `always @*` assigns the default value first, so an unlisted code keeps it.
    "CASEINCOMPLETE": "Amaranth's `casez` lists only the defined states/cases, after a default",
    "DECLFILENAME": "Amaranth writes every module into the one file named after the top",
}
_TOP_PORTS = {f"{s}__{m}" for s in ("rx", "tx", "engine__cmd", "engine__load", "engine__result",
                                     "engine__logit_req", "engine__logit_resp", "readback__start",
                                     "readback__data")
              for m in ("payload", "valid", "ready")}


@pytest.mark.parametrize("max_payload, boot_id", [(MIN_DEVICE_PAYLOAD, None), (MAX_PAYLOAD, 1)])
def test_verilator_lint_has_only_accepted_warnings(tmp_path, max_payload, boot_id, small):
    reason = simulator_missing("verilator")
    if reason:
        pytest.skip(reason)
    source = write_verilog(Link(CFG, packing=PACKING, lanes=LANES, max_payload=max_payload, boot_id=boot_id,
                                small=small, readback=not small),
                           tmp_path / "top.v")
    bad = verilator_lint(source, ACCEPTED_LINT, _TOP_PORTS)
    assert not bad, "\n".join(bad[:20])


def _prime_factors(n: int) -> set[int]:
    out, p = set(), 2
    while p * p <= n:
        while n % p == 0:
            out.add(p)
            n //= p
        p += 1
    return out | ({n} if n > 1 else set())


@pytest.mark.parametrize("width", sorted(LFSR_TAPS))
def test_lfsr_taps_are_maximal_length(width):
    """The small form's counters: every LFSR in the table has period 2^width - 1 (the order of
    its step is exactly that: the step to that power is the identity, to no proper divisor
    of it), and lfsr_jump agrees with stepping."""
    period = (1 << width) - 1
    assert all(lfsr_jump(1 << i, width, period) == 1 << i for i in range(width))
    for q in _prime_factors(period):
        assert any(lfsr_jump(1 << i, width, period // q) != 1 << i for i in range(width)), q
    state = 1
    for _ in range(100):
        state = lfsr_step(state, width)
    assert lfsr_jump(1, width, 100) == state
