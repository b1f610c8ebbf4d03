"""hw/link.py with state slots: protocol 1.2's six slice ops in gateware, byte for byte against
host/device_model.py (DeviceModel(slots=2)), with a fake engine that runs the device model's
SliceModel on what the Link's ``load``, ``residual`` and SET_PARAM commands gave it."""

from __future__ import annotations

import numpy as np
import pytest

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.host.device_model import DeviceModel, parse_slice
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.hw.control import EngineOp
from mmfree_fpga.hw.engine import Param, engine_params
from mmfree_fpga.hw.link import Link
from mmfree_fpga.image_slice import Slice, cut_image, slice_image_size, whole_slice
from mmfree_fpga.protocol import (
    FEED_SLOT_REQUEST, FEED_SLOT_RESPONSE, FEED_TOKEN_REQUEST, LOAD_BEGIN_REQUEST, LOAD_CHUNK_HEADER,
    LOAD_SLICE_REQUEST, MAX_PAYLOAD, READ_LOGITS_REQUEST, READ_OUTPUT_REQUEST, RESET_SLOT_REQUEST,
    WRITE_RESIDUAL_HEADER, Error, Identity, Op, SliceInfo, SliceOp, crc32_image,
)
from mmfree_fpga.reference.integer import IntegerModel, wire_logits

from test_hw_link import BOOT_ID, NO_TIMEOUT, Bench, Session, nak_of

CFG = ModelConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2, intermediate_size=16)
PACKING = "base3"
LANES = 16
STEP_MS = 7
SLOTS = 2


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from conftest import random_model
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    ckpt = save_checkpoint(random_model(CFG, seed=11), tmp_path_factory.mktemp("link_slices") / "ckpt")
    return WeightImage.from_checkpoint(ckpt, PACKING).blob


class SliceEngine:
    """The engine side of a Link with slots: SliceModel (``parse_slice``) of the loaded bytes,
    for the slice the SET_PARAM registers L, EMBEDDING and HEAD name (the layers' numbers do not
    change the arithmetic); state per slot, the input and output buffers."""

    def __init__(self, cfg, packing, cycles=0):
        self.cfg, self.packing, self.cycles = cfg, packing, cycles
        self.params = dict(engine_params(cfg, packing, LANES, sl=whole_slice(cfg)))
        self.image = bytearray()
        self.model = None
        self.inbuf = np.zeros(cfg.d, dtype=np.int64)
        self.output = None
        self.log = []

    def _slice(self):
        return Slice(0, self.params[Param.L], bool(self.params[Param.EMBEDDING]), bool(self.params[Param.HEAD]))

    def command(self, op, arg, index=0):
        self.log.append((op.name, index, arg))
        if op == EngineOp.LOAD_RESET:
            self.image.clear()
            self.model = None
        elif op == EngineOp.SET_PARAM:
            self.params[index] = arg
        elif op == EngineOp.RESET_STATE:
            sl = self._slice()
            if len(self.image) == slice_image_size(self.cfg, self.packing, sl):
                self.model = parse_slice(bytes(self.image), self.cfg, self.packing, sl, SLOTS)
        elif op == EngineOp.RESET_SLOT:
            assert index < SLOTS
            if self.model is not None:
                self.model.reset(index)
        else:
            assert op in (EngineOp.FEED_TOKEN, EngineOp.FEED_SLOT), op
            assert self.model is not None, f"{op.name} reached an engine without a complete image"
            slot = index if op == EngineOp.FEED_SLOT else 0
            sl = self._slice()
            if sl.embedding:
                assert arg < self.cfg.V
                out = self.model.run(slot, token=arg)
            else:
                assert arg == 0
                out = self.model.run(slot, x=self.inbuf.copy())
            if sl.head:
                self.output = wire_logits(out)
                best = IntegerModel.argmax(out)
                return best, int(self.output[best]), self.cycles
            self.output = out
            return 0, 0, self.cycles
        return None

    def image_byte(self, b):
        self.image.append(b)

    def residual_value(self, word):
        index, value = word & 0xF, (word >> 4) & 0xFFFFFFFF
        self.inbuf[index] = value - (1 << 32) if value & (1 << 31) else value

    def readback(self, n):
        assert n == len(self.image), "read-back of a size other than the stored image's"
        self.log.append(("READBACK", 0, n))
        return bytes(self.image)

    def logit(self, index):
        assert self.output is not None and index < len(self.output)
        return int(self.output[index])


def make_pair(max_payload=MAX_PAYLOAD):
    link = Link(CFG, packing=PACKING, lanes=LANES, max_payload=max_payload, step_time_ms=STEP_MS,
                idle_timeout_cycles=NO_TIMEOUT, boot_id=BOOT_ID, readback=True, slots=SLOTS)
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=STEP_MS, max_payload=max_payload, seed=1,
                        slots=SLOTS)
    model.boot_id = BOOT_ID
    return link, model


def simulate(link, body, seed=0):
    from amaranth.sim import Simulator
    bench = Bench(link, SliceEngine(CFG, PACKING), seed=seed)
    sim = Simulator(link)
    sim.add_clock(1e-6)
    finished = []

    async def driver(ctx):
        await body(ctx, bench)
        finished.append(True)

    sim.add_process(driver)
    while not finished:
        sim.advance()
    return bench


def residual_bytes(values):
    return np.asarray(values, dtype="<i4").tobytes()


def test_link_residual_layout_is_what_the_fake_engine_decodes():
    link, _ = make_pair()
    layout = link.residual.payload.shape()
    assert (layout["index"].offset, layout["value"].offset, layout["value"].shape.width) == (0, 4, 32)


@pytest.mark.parametrize("slots", [1, 3, 4])
def test_links_of_other_slot_counts_elaborate_cleanly(slots):
    """(warnings are errors here: no case of a slot switch out of its value's range)"""
    from amaranth.back import rtlil
    rtlil.convert(Link(CFG, packing=PACKING, lanes=LANES, boot_id=BOOT_ID, readback=True, slots=slots))


def test_slice_ops_match_device_model(image):
    """The six slice ops, their NAK cases and duplicates, on two slots, two slices and the whole
    model: the same bytes as the device model; the engine computed what SliceModel computes."""
    link, model = make_pair()
    d = CFG.d
    head = Slice(1, 2, False, True)
    first = Slice(0, 1, True, False)
    reference = parse_slice(cut_image(image, CFG, PACKING, first), CFG, PACKING, first, SLOTS)
    residual = [reference.run(0, token=t) for t in (5, 11)]      # realistic residuals in

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        assert Identity.unpack(await s.expect(Op.IDENTIFY)).version_minor == 2
        assert SliceInfo.unpack(await s.expect(SliceOp.SLICE_INFO)).slots == SLOTS
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0), Error.NO_WEIGHTS)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + bytes(4), Error.NO_WEIGHTS)
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 0, 0, 1), Error.NO_WEIGHTS)
        await s.nak(SliceOp.RESET_SLOT, RESET_SLOT_REQUEST.pack(SLOTS), Error.BAD_ARGUMENT, SLOTS)
        await s.expect(SliceOp.RESET_SLOT, RESET_SLOT_REQUEST.pack(1))
        await s.nak(SliceOp.RESET_SLOT, b"", Error.BAD_LENGTH, 1)
        size = slice_image_size(CFG, PACKING, head)
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, 0, 1, 3, 2), Error.BAD_ARGUMENT, CFG.L)
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, 0, 1, 2, 6), Error.BAD_ARGUMENT, CFG.L)
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, 0, 2, 1, 2), Error.BAD_ARGUMENT, CFG.L)
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size + 16, 0, 1, 2, 2), Error.BAD_IMAGE_SIZE, size)
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, 0, 1, 2, 2)[:-1], Error.BAD_LENGTH)
        # layer 1 and the head
        blob = cut_image(image, CFG, PACKING, head)
        await s.expect(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, crc32_image(blob), 1, 2, 2))
        await s.expect(SliceOp.SLICE_INFO)
        await s.expect(Op.LOAD_STATUS)
        for off in range(0, size, 200):
            frame, _ = await s.command(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + blob[off:off + 200])
            await s.send(frame)
        await s.expect(Op.LOAD_STATUS)
        await s.expect(Op.LOAD_COMMIT)
        info = SliceInfo.unpack(await s.expect(SliceOp.SLICE_INFO))
        assert (info.parts, info.first_layer, info.end_layer) == (2, 1, 2)
        assert Identity.unpack(await s.expect(Op.IDENTIFY)).image_size == size
        await s.expect(Op.VERIFY_IMAGE)
        await s.nak(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1), Error.NO_WEIGHTS, 2)
        await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(0, 0, 1), Error.NO_WEIGHTS, 2)
        # slot 0's residual in two writes, with every WRITE_RESIDUAL / FEED_SLOT error on the way
        x = residual_bytes(residual[0])
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0), Error.INCOMPLETE, 0)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 3) + x[:8], Error.BAD_OFFSET, 0)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + x[:3], Error.BAD_LENGTH)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + x[:9], Error.BAD_LENGTH)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(2, 0, 0) + x[:8], Error.BAD_ARGUMENT, SLOTS)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 1, 0) + x[:8], Error.POSITION_MISMATCH, 0)
        frame, _ = await s.command(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + x[:40])
        await s.send(frame)                                 # a duplicate: replayed
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 12) + x[:8], Error.BAD_OFFSET, 10)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 10) + x[:28], Error.BAD_ARGUMENT, d - 10)
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0), Error.INCOMPLETE, 10)
        await s.expect(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 10) + x[40:])
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 3), Error.BAD_ARGUMENT, 0)
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(1, 0, 0), Error.INCOMPLETE, 0)
        frame, _ = await s.command(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0))
        await s.send(frame)                                 # replayed, not run twice
        assert sum(op == "FEED_SLOT" for op, _, _ in bench.engine.log) == 1
        for start, count in [(0, 1), (0, CFG.V), (CFG.V - 3, 3)]:
            frame, _ = await s.command(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 1, start, count))
            await s.send(frame)
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 1, CFG.V - 3, 4), Error.BAD_ARGUMENT)
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 0, 0, 1), Error.POSITION_MISMATCH, 1)
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 0, 0, 1), Error.BAD_ARGUMENT)
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0), Error.POSITION_MISMATCH, 1)
        # slot 1 between slot 0's steps; its output replaces slot 0's
        await s.expect(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(1, 0, 0) + residual_bytes(residual[1]))
        await s.expect(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(1, 0, 0))
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 1, 0, 1), Error.BAD_ARGUMENT)
        await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 1, 0, CFG.V))
        await s.expect(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 1, 0) + residual_bytes(residual[1]))
        await s.expect(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 1, 0))
        await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 2, 0, CFG.V))
        await s.expect(SliceOp.RESET_SLOT, RESET_SLOT_REQUEST.pack(0))
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 0, 0, 1), Error.BAD_ARGUMENT)
        await s.expect(Op.RESET_STATE)
        # the embedding and layer 0: a token in, the residual out
        blob = cut_image(image, CFG, PACKING, first)
        await s.expect(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(len(blob), crc32_image(blob), 0, 1, 1))
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + blob[:1000])
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(1000) + blob[1000:])
        await s.expect(Op.LOAD_COMMIT)
        await s.nak(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + x[:8], Error.NO_WEIGHTS, 1)
        await s.nak(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(1, 0, CFG.V), Error.BAD_ARGUMENT, CFG.V)
        await s.expect(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(1, 0, 5))
        out = await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 1, 0, d))
        assert np.frombuffer(out[9:], "<i4").tolist() == [int(v) for v in residual[0]]
        await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 1, 3, 5))
        await s.nak(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 1, 3, d - 2), Error.BAD_ARGUMENT)
        # the head alone (a slice of no layers)
        alone = Slice(2, 2, False, True)
        blob = cut_image(image, CFG, PACKING, alone)
        await s.expect(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(len(blob), crc32_image(blob), 2, 2, 2))
        await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + blob)
        await s.expect(Op.LOAD_COMMIT)
        await s.expect(SliceOp.WRITE_RESIDUAL, WRITE_RESIDUAL_HEADER.pack(0, 0, 0) + residual_bytes(residual[1]))
        await s.expect(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(0, 0, 0))
        await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(0, 1, 0, CFG.V))
        # the whole model again: FEED_TOKEN, and FEED_SLOT on slot 1
        await s.expect(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(image), crc32_image(image)))
        await s.expect(SliceOp.SLICE_INFO)
        for off in range(0, len(image), 1000):
            await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + image[off:off + 1000])
        await s.expect(Op.LOAD_COMMIT)
        await s.expect(SliceOp.SLICE_INFO)
        await s.expect(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 7))
        await s.expect(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(1, 0, CFG.V))
        await s.expect(SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(1, 0, 7))
        await s.nak(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(1, 0, 1), Error.BAD_ARGUMENT)
        await s.expect(SliceOp.READ_OUTPUT, READ_OUTPUT_REQUEST.pack(1, 1, 0, CFG.V))
        assert model.stats["nak_UNKNOWN_OP"] == 0

    simulate(link, body, seed=3)


def test_tiny_and_slotless_links_answer_slice_ops_unknown(image):
    """Without slots (every build that does not ask for them, and the iCE40 small form, which
    has none) the slice ops are unknown, as a 1.2 device without slots answers them."""
    with pytest.raises(ValueError, match="small form"):
        Link(CFG, packing=PACKING, lanes=LANES, small=True, slots=2)
    link = Link(CFG, packing=PACKING, lanes=LANES, idle_timeout_cycles=NO_TIMEOUT, boot_id=BOOT_ID, readback=True)
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=0, seed=1)
    model.boot_id = BOOT_ID

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        for op in SliceOp:
            _, frames = await s.command(op, b"")
            assert nak_of(frames[0])[0] == Error.UNKNOWN_OP

    from test_hw_link import FakeEngine
    from amaranth.sim import Simulator
    bench = Bench(link, FakeEngine(CFG, PACKING), seed=1)
    sim = Simulator(link)
    sim.add_clock(1e-6)
    done = []

    async def driver(ctx):
        await body(ctx, bench)
        done.append(True)

    sim.add_process(driver)
    while not done:
        sim.advance()


def _random_slice_frame(rng, model, image):
    """A slice op (or FEED_TOKEN / READ_LOGITS / RESET_STATE) with fields near the device's state:
    right and wrong slots, positions, starts, counts, tokens and lengths."""
    import random as _random  # noqa: F401  (rng is a random.Random)
    inp = model._input
    if inp is not None and inp.pointer == CFG.d and rng.random() < 0.7:      # a complete residual: feed it
        return SliceOp.FEED_SLOT, FEED_SLOT_REQUEST.pack(inp.slot, inp.position, 0)
    slot = rng.choice([0, 1, 1, 0, SLOTS, 255])
    pos = model.slot_position(slot) if slot < SLOTS else 0
    pos = rng.choice([pos, pos, pos, pos + 1, max(pos - 1, 0), 0xFFFFFFFF])
    op = rng.choice([SliceOp.WRITE_RESIDUAL] * 4 + [SliceOp.FEED_SLOT] * 3 + [SliceOp.READ_OUTPUT] * 3
                    + [SliceOp.RESET_SLOT, SliceOp.SLICE_INFO, Op.FEED_TOKEN, Op.READ_LOGITS, Op.RESET_STATE])
    if op == SliceOp.WRITE_RESIDUAL and slot < SLOTS and rng.random() < 0.5:
        # a write that the device takes: the rest of this slot's residual (as much as fits a frame)
        inp, pos = model._input, model.slot_position(slot)
        start = inp.pointer if inp is not None and (inp.slot, inp.position) == (slot, pos) and inp.pointer < CFG.d else 0
        n = min(CFG.d - start, 20)
        return op, WRITE_RESIDUAL_HEADER.pack(slot, pos, start) + residual_bytes(
            [rng.randrange(-(1 << 18), 1 << 18) for _ in range(n)])
    if op == SliceOp.FEED_SLOT and slot < SLOTS and rng.random() < 0.5:
        return op, FEED_SLOT_REQUEST.pack(slot, model.slot_position(slot), rng.randrange(CFG.V) if rng.random() < 0.5
                                          else 0)
    if op == SliceOp.WRITE_RESIDUAL:
        inp = model._input
        start = rng.choice([0, 0, inp.pointer if inp is not None else 0, rng.randrange(0, 20)])
        n = rng.choice([1, 2, 4, 6, 16, 16 - start if start < 16 else 1, 31])
        data = bytes(rng.randrange(256) for _ in range(4 * n + rng.choice([0, 0, 0, 0, 1, 2, 3, -1])))
        return op, WRITE_RESIDUAL_HEADER.pack(slot, pos, start) + data
    if op == SliceOp.FEED_SLOT:
        return op, FEED_SLOT_REQUEST.pack(slot, pos, rng.choice([0, 0, 3, CFG.V - 1, CFG.V, 1 << 31]))
    if op == SliceOp.READ_OUTPUT:
        return op, READ_OUTPUT_REQUEST.pack(slot, pos, rng.choice([0, 0, 3, CFG.d - 1, CFG.V - 1, 1 << 30]),
                                            rng.choice([0, 1, 5, CFG.d, CFG.V, 29, 30, 300]))
    if op == SliceOp.RESET_SLOT:
        return op, RESET_SLOT_REQUEST.pack(slot) + (b"\0" if rng.random() < 0.1 else b"")
    if op == Op.FEED_TOKEN:
        return op, FEED_TOKEN_REQUEST.pack(model.position, rng.choice([0, 5]))
    if op == Op.READ_LOGITS:
        return op, READ_LOGITS_REQUEST.pack(model.position, 0, rng.choice([1, 4]))
    return op, b""


@pytest.mark.parametrize("max_payload", [128])
def test_fuzz_slice_ops_match_device_model(image, max_payload):
    """Random slice ops around the state (every slice kind loaded in turn, duplicates between):
    the same bytes as the device model, exchange after exchange."""
    import random
    link, model = make_pair(max_payload)
    rng = random.Random(22)
    kinds = [Slice(1, 2, False, False), Slice(0, 1, True, False), Slice(2, 2, False, True), Slice(1, 2, False, True),
             whole_slice(CFG)]

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        previous = None
        for sl in kinds:
            blob = cut_image(image, CFG, PACKING, sl)
            await s.expect(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(len(blob), crc32_image(blob), sl.first, sl.end,
                                                                       sl.parts))
            chunk = max_payload - LOAD_CHUNK_HEADER.size
            for off in range(0, len(blob), chunk):
                await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + blob[off:off + chunk])
            await s.expect(Op.LOAD_COMMIT)
            for _ in range(50):
                if previous is not None and rng.random() < 0.15:
                    await s.send(previous)                  # a duplicate (replayed or re-executed)
                    continue
                op, payload = _random_slice_frame(rng, model, image)
                previous, _ = await s.command(op, payload)
        assert model.stats["slice_feeds"] > 15 and model.stats["naks"] > 30 and model.stats["replays"] > 5

    simulate(link, body, seed=22)


def test_link_announces_its_capacity_in_slice_info(image):
    """SLICE_INFO's capacity: a Link given one (a DRAM engine's: the DRAM's size, which may be less
    than the whole image) announces it, byte for byte as ``DeviceModel(capacity=...)``, refuses a
    larger slice with BAD_IMAGE_SIZE and the capacity, and a slice within it loads; without one, the whole image (the block-RAM engine's). LinkedEngine's DRAM
    engine takes the DRAM's size from its native port's widths."""
    from mmfree_fpga.hw.linked_engine import LinkedEngine
    head = Slice(1, 2, False, True)
    size = slice_image_size(CFG, PACKING, head)
    whole = slice_image_size(CFG, PACKING, whole_slice(CFG))
    capacity = size + 100
    assert capacity < whole
    link = Link(CFG, packing=PACKING, lanes=LANES, step_time_ms=STEP_MS, idle_timeout_cycles=NO_TIMEOUT,
                boot_id=BOOT_ID, readback=True, slots=SLOTS, capacity=capacity)
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=STEP_MS, seed=1, slots=SLOTS, capacity=capacity)
    model.boot_id = BOOT_ID
    blob = cut_image(image, CFG, PACKING, head)

    async def body(ctx, bench):
        s = Session(ctx, bench, model)
        assert SliceInfo.unpack(await s.expect(SliceOp.SLICE_INFO)).capacity == capacity
        # a slice larger than the capacity (the whole model) is refused with the capacity, and so is
        # the whole image through LOAD_BEGIN
        await s.nak(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(whole, 0, 0, CFG.L, 3), Error.BAD_IMAGE_SIZE,
                    capacity)
        await s.nak(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(whole, 0), Error.BAD_IMAGE_SIZE, capacity)
        await s.nak(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(whole + 1, 0), Error.BAD_IMAGE_SIZE, whole)
        await s.expect(SliceOp.LOAD_SLICE, LOAD_SLICE_REQUEST.pack(size, crc32_image(blob), 1, 2, 2))
        for off in range(0, size, 200):
            await s.expect(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + blob[off:off + 200])
        await s.expect(Op.LOAD_COMMIT)
        info = SliceInfo.unpack(await s.expect(SliceOp.SLICE_INFO))
        assert (info.parts, info.first_layer, info.end_layer, info.capacity) == (2, 1, 2, capacity)

    simulate(link, body)
    with pytest.raises(ValueError, match="capacity"):
        Link(CFG, packing=PACKING, lanes=LANES, slots=SLOTS, capacity=1 << 32)
    assert make_pair()[0].capacity == whole
    dram = LinkedEngine(CFG, lanes=LANES, packing=PACKING, memory="sdram", native_data_width=16,
                        native_address_width=24, slots=SLOTS)
    assert dram.link.capacity == 32 * 2 ** 20
    bram = LinkedEngine(CFG, lanes=LANES, packing=PACKING, slots=SLOTS)
    assert bram.link.capacity == whole
    with pytest.raises(ValueError, match="capacity"):
        LinkedEngine(CFG, lanes=LANES, packing=PACKING, slots=SLOTS, capacity=1000)
