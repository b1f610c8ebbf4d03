"""hw/linked_engine.py: the Link in front of the real Engine, as the board top wires it.

Amaranth simulator, compared with the device model: the design contract and a short session
(IDENTIFY, RESET, NAKs, LOAD_BEGIN), then a whole image loaded through the link into the engine
(LOAD_STATUS on the way, VERIFY_IMAGE after it) and tokens fed, every response byte compared
(the engine is bit-exact with the integer model; only the cycle count differs, the model
reports 0); and VERIFY_IMAGE reading the engine's block RAM back after a word of it was
overwritten by the testbench: the CRC-32 differs, as the device model's with the same bytes.
"""

from __future__ import annotations

from amaranth.sim import Simulator

from mmfree_fpga.boards.top import check_design
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.hw.linked_engine import LinkedEngine
from mmfree_fpga.protocol import (
    FEED_TOKEN_REQUEST, FEED_TOKEN_RESPONSE, LOAD_BEGIN_REQUEST, LOAD_CHUNK_HEADER, LOAD_STATUS_RESPONSE,
    READ_LOGITS_REQUEST, RESPONSE, VERIFY_IMAGE_RESPONSE, FrameDecoder, Identity, Op, crc32_image, encode_frame,
)

CFG = ModelConfig(vocab_size=24, hidden_size=16, num_hidden_layers=1, intermediate_size=16)
PACKING = "base3"
LANES = 16
BOOT_ID = 0x1234


def make():
    design = LinkedEngine(CFG, lanes=LANES, packing=PACKING, max_payload=256, boot_id=BOOT_ID,
                          idle_timeout_cycles=1 << 20)
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=0, max_payload=256, seed=0)
    model.boot_id = BOOT_ID
    return design, model


def run(design, script, with_ctx=False):
    """Run ``script(exchange)`` (``script(exchange, ctx)`` with ``with_ctx``); ``exchange(data)``
    returns the bytes the design answered."""
    sim = Simulator(design)
    sim.add_clock(1e-6)
    done = []

    async def driver(ctx):
        ctx.set(design.o_stream.ready, 1)

        async def exchange(data: bytes, max_cycles: int = 400_000) -> bytes:
            out, quiet = bytearray(), 0
            data = list(data)
            for _ in range(max_cycles):
                ctx.set(design.i_stream.valid, bool(data))
                if data:
                    ctx.set(design.i_stream.payload, data[0])
                _, _, rx_ready, tx_valid, tx_byte, idle = await ctx.tick().sample(
                    design.i_stream.ready, design.o_stream.valid, design.o_stream.payload, design.link.idle)
                if data and rx_ready:
                    data.pop(0)
                if tx_valid:
                    out.append(tx_byte)
                quiet = quiet + 1 if idle and not data else 0
                if quiet >= 2:
                    return bytes(out)
            raise AssertionError("no answer (hang?)")

        await (script(exchange, ctx) if with_ctx else script(exchange))
        done.append(True)

    sim.add_process(driver)
    while not done:
        sim.advance()


def test_design_contract_and_short_session():
    design, model = make()
    check_design(design)
    seen = []

    async def script(exchange):
        for frame in [encode_frame(1, Op.IDENTIFY), encode_frame(2, Op.RESET_STATE),
                      encode_frame(3, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(0, 1)),
                      encode_frame(4, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(1, 0)),
                      encode_frame(5, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(model.image_bytes, 0)),
                      encode_frame(6, Op.IDENTIFY)]:
            got = await exchange(frame)
            assert got == model.receive(frame, now=0.0)
            seen.append(got)

    run(design, script)
    assert len(seen) == 6 and all(seen)


def test_load_and_feed_through_the_link(tmp_path):
    from conftest import random_model

    from mmfree_fpga.reference.checkpoint import save_checkpoint
    blob = WeightImage.from_checkpoint(save_checkpoint(random_model(CFG, seed=2), tmp_path / "c"), PACKING).blob
    design, model = make()
    dec = FrameDecoder()

    async def script(exchange):
        seq = 0

        async def command(op, payload=b""):
            nonlocal seq
            seq += 1
            frame = encode_frame(seq, op, payload)
            got, want = await exchange(frame), model.receive(frame, now=0.0)
            (resp,) = dec.feed(got)
            assert resp.op == op | RESPONSE
            if op == Op.FEED_TOKEN:    # the engine counts cycles, the model reports 0
                n = FEED_TOKEN_RESPONSE.size - 4
                (want_resp,) = FrameDecoder().feed(want)
                assert resp.payload[:n] == want_resp.payload[:n] and resp.payload[n:] != bytes(4)
            else:
                assert got == want
            return resp.payload

        await command(Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(blob), crc32_image(blob)))
        for off in range(0, len(blob), 252):
            await command(Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(off) + blob[off:off + 252])
            if off == 504:
                status = LOAD_STATUS_RESPONSE.unpack(await command(Op.LOAD_STATUS))
                assert status == (len(blob), crc32_image(blob), 756, crc32_image(blob[:756]))
        await command(Op.LOAD_COMMIT)
        for pos, token in enumerate([3, 7, 7]):
            await command(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(pos, token))
        # the engine's memory read back between tokens; the tokens go on as before
        assert VERIFY_IMAGE_RESPONSE.unpack(await command(Op.VERIFY_IMAGE)) == (len(blob), crc32_image(blob))
        await command(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(3, 0, CFG.V))
        await command(Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(3, 1))
        await command(Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(4, 0, CFG.V))

    run(design, script)


def test_weights_in_the_bitstream(tmp_path):
    """With ``image`` the RAM starts with the weights and the link says so: no upload needed."""
    from conftest import random_model

    from mmfree_fpga.reference.checkpoint import save_checkpoint
    blob = WeightImage.from_checkpoint(save_checkpoint(random_model(CFG, seed=3), tmp_path / "c"), PACKING).blob
    design = LinkedEngine(CFG, lanes=LANES, packing=PACKING, max_payload=256, boot_id=BOOT_ID,
                          idle_timeout_cycles=1 << 20, image=blob)
    model = DeviceModel(CFG, PACKING, lanes=LANES, step_time_ms=0, max_payload=256, seed=0)
    model.boot_id = BOOT_ID
    model.load_image(blob)
    dec = FrameDecoder()
    tokens = []

    async def script(exchange):
        frames = [encode_frame(1, Op.IDENTIFY)]
        frames += [encode_frame(2 + pos, Op.FEED_TOKEN, FEED_TOKEN_REQUEST.pack(pos, token))
                   for pos, token in enumerate([5, 11])]
        frames += [encode_frame(4, Op.READ_LOGITS, READ_LOGITS_REQUEST.pack(2, 0, CFG.V))]
        for frame in frames:
            got, want = await exchange(frame), model.receive(frame, now=0.0)
            (resp,) = dec.feed(got)
            (want_resp,) = FrameDecoder().feed(want)
            if resp.op == Op.FEED_TOKEN | RESPONSE:   # the engine counts cycles, the model reports 0
                n = FEED_TOKEN_RESPONSE.size - 4
                assert resp.payload[:n] == want_resp.payload[:n] and resp.payload[n:] != bytes(4)
                tokens.append(resp.payload)
            else:
                assert got == want
                if resp.op == Op.IDENTIFY | RESPONSE:
                    ident = Identity.unpack(resp.payload)
                    assert ident.weights_loaded and ident.image_crc == crc32_image(blob)
                    assert ident.image_size == len(blob)

    run(design, script)
    assert len(tokens) == 2


def test_verify_image_detects_a_corrupted_memory_word(tmp_path):
    """VERIFY_IMAGE through the Link and the engine's WeightReader: the block RAM read back (CRC-32
    of the image); then the testbench overwrites one word of the RAM (as a faulty memory would)
    and the read-back's CRC-32 is that of the image with that word changed."""
    from conftest import random_model

    from mmfree_fpga.hw.weight_port import image_words
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    blob = WeightImage.from_checkpoint(save_checkpoint(random_model(CFG, seed=4), tmp_path / "c"), PACKING).blob
    design = LinkedEngine(CFG, lanes=LANES, packing=PACKING, max_payload=256, boot_id=BOOT_ID,
                          idle_timeout_cycles=1 << 20, image=blob)
    memory = design.engine.memory
    wb = design.engine.core.beat_bytes
    word = len(blob) // wb // 2
    bad = bytearray(blob)
    bad[word * wb:(word + 1) * wb] = bytes(b ^ 0x81 for b in blob[word * wb:(word + 1) * wb])
    dec = FrameDecoder()
    crcs = []

    async def script(exchange, ctx):
        for seq in (1, 2):
            (resp,) = dec.feed(await exchange(encode_frame(seq, Op.VERIFY_IMAGE)))
            assert resp.op == Op.VERIFY_IMAGE | RESPONSE
            crcs.append(VERIFY_IMAGE_RESPONSE.unpack(resp.payload))
            if seq == 1:
                (store,) = memory.memories           # (one RAM: the image is below a bank)
                ctx.set(store.data[word], image_words(bytes(bad), wb)[word])

    run(design, script, with_ctx=True)
    assert crcs == [(len(blob), crc32_image(blob)), (len(blob), crc32_image(bytes(bad)))]
