"""The Python device model: image layout and parsing, every command and NAK, the reply cache,
reset, idle timeout, and a fuzz test of the protocol layer."""

import random
import time

import numpy as np
import pytest

from mmfree_fpga import protocol as P
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.image import image_layout
from mmfree_fpga.reference.integer import parse_image
from mmfree_fpga.host.testing import SMALL_CONFIG, random_checkpoint
from mmfree_fpga.reference.checkpoint import load_checkpoint
from mmfree_fpga.reference.export import integer_weights, read_image, write_image
from mmfree_fpga.reference.integer import IntegerModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", SMALL_CONFIG, seed=5)


@pytest.fixture(scope="module")
def image(checkpoint):
    return WeightImage.from_checkpoint(checkpoint, "base3")


class Host:
    """Hand-made frames for the device, one exchange at a time."""

    def __init__(self, device):
        self.device, self.seq, self.now = device, 0, 1000.0

    def raw(self, data: bytes) -> list:
        self.now += 1.0
        out = self.device.receive(data, self.now)
        dec = P.FrameDecoder()
        events = dec.feed(out)
        assert dec.pending == 0 and dec.garbage_bytes == 0, "the device sent something that is not frames"
        return events

    def send(self, op, payload=b"", seq=None):
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
            seq = self.seq
        frame = P.encode_frame(seq, op, payload)
        events = self.raw(frame)
        assert len(events) == 1 and events[0].seq == seq
        return events[0], frame

    def ok(self, op, payload=b""):
        reply, _ = self.send(op, payload)
        assert reply.op == op | P.RESPONSE, (op, reply)
        return reply.payload

    def nak(self, op, payload=b""):
        reply, _ = self.send(op, payload)
        assert reply.op == P.NAK_RESPONSE, (op, reply)
        error, rejected, arg = P.NAK_PAYLOAD.unpack(reply.payload)
        assert rejected == op
        return P.Error(error), arg

    def load(self, blob: bytes, chunk: int = 700):
        self.ok(P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(len(blob), P.crc32_image(blob)))
        for offset in range(0, len(blob), chunk):
            data = P.LOAD_CHUNK_HEADER.pack(offset) + blob[offset:offset + chunk]
            nxt, = P.LOAD_CHUNK_RESPONSE.unpack(self.ok(P.Op.LOAD_CHUNK, data))
            assert nxt == min(offset + chunk, len(blob))
        return P.LOAD_COMMIT_RESPONSE.unpack(self.ok(P.Op.LOAD_COMMIT))

    def feed(self, position, token):
        return P.FEED_TOKEN_RESPONSE.unpack(self.ok(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(position, token)))


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_layout_from_geometry_matches_export_and_parsing_matches_read_image(checkpoint, tmp_path, packing):
    cfg, tensors = load_checkpoint(checkpoint)
    manifest = write_image(integer_weights(cfg, tensors), tmp_path / "img", packing)
    layout = image_layout(cfg, packing)
    assert [(s.name, s.offset, s.size) for s in layout] == \
        [(e["name"], e["offset"], e["size"]) for e in manifest["sections"]]
    blob = (tmp_path / "img" / "weights.bin").read_bytes()
    mine, theirs = parse_image(blob, cfg, packing), read_image(tmp_path / "img")
    assert np.array_equal(mine.emb_q, theirs.emb_q) and np.array_equal(mine.emb_scale, theirs.emb_scale)
    pairs = [(getattr(a, m), getattr(b, m)) for a, b in zip(mine.layers, theirs.layers) for m in a.MATRICES]
    pairs.append((mine.lm_head, theirs.lm_head))
    for x, y in pairs:
        assert np.array_equal(x.trits, y.trits) and np.array_equal(x.a, y.a) and np.array_equal(x.c, y.c)
        assert (x.k_mant, x.k_exp) == (y.k_mant, y.k_exp)
    for x, y in zip(mine.layers, theirs.layers):
        assert np.array_equal(x.lower_bound, y.lower_bound)
    assert WeightImage.from_directory(tmp_path / "img").crc32 == P.crc32_image(blob)


def test_image_from_directory_rejects_a_damaged_image(image, tmp_path, checkpoint):
    cfg, tensors = load_checkpoint(checkpoint)
    write_image(integer_weights(cfg, tensors), tmp_path / "img", "base3")
    data = bytearray((tmp_path / "img" / "weights.bin").read_bytes())
    data[100] ^= 1
    (tmp_path / "img" / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match its manifest"):
        WeightImage.from_directory(tmp_path / "img")


def test_device_computes_the_integer_model_from_the_loaded_bytes(image, checkpoint):
    cfg, tensors = load_checkpoint(checkpoint)
    ref = IntegerModel(integer_weights(cfg, tensors))
    dev = DeviceModel(image.cfg, "base3", seed=1)
    host = Host(dev)
    info = P.Identity.unpack(host.ok(P.Op.IDENTIFY))
    assert not info.weights_loaded and info.geometry == (cfg.V, cfg.d, cfg.L, cfg.I)
    assert host.load(image.blob) == (image.size, image.crc32)
    info = P.Identity.unpack(host.ok(P.Op.IDENTIFY))
    assert info.weights_loaded and (info.image_size, info.image_crc, info.position) == (image.size, image.crc32, 0)
    token = 100
    for position in range(12):
        logits = ref.step(token)
        pos, best, logit, cycles = host.feed(position, token)
        assert (pos, best, logit) == (position + 1, IntegerModel.argmax(logits), int(logits.max()))
        got = []
        for start in range(0, cfg.V, 100):
            count = min(100, cfg.V - start)
            answer = host.ok(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(pos, start, count))
            assert P.READ_LOGITS_HEADER.unpack_from(answer) == (pos, start)
            got.append(np.frombuffer(answer, "<i4", offset=8))
        assert np.array_equal(np.concatenate(got), logits)
        token = best
    assert P.POSITION.unpack(host.ok(P.Op.RESET_STATE)) == (0,)
    ref.reset()
    assert host.feed(0, 7)[1] == IntegerModel.argmax(ref.step(7))


def test_every_rejection_is_a_nak_and_changes_nothing(image):
    dev = DeviceModel(image.cfg, "base3", seed=2)
    host = Host(dev)
    V = image.cfg.V

    def rejected(op, payload, error, arg=None):
        before = dev.fingerprint()
        got_error, got_arg = host.nak(op, payload)
        assert got_error == error, (op, got_error)
        if arg is not None:
            assert got_arg == arg
        assert dev.fingerprint() == before

    rejected(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(0, 1), P.Error.NO_WEIGHTS)
    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(0, 0, 1), P.Error.NO_WEIGHTS)
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + b"x", P.Error.NO_LOAD)
    rejected(P.Op.LOAD_COMMIT, b"", P.Error.NO_LOAD)
    rejected(P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image.size + 1, 0), P.Error.BAD_IMAGE_SIZE, image.size)
    rejected(0x33, b"", P.Error.UNKNOWN_OP)
    rejected(P.Op.NAK, b"", P.Error.UNKNOWN_OP)
    rejected(P.Op.IDENTIFY, b"\0", P.Error.BAD_LENGTH, 0)
    rejected(P.Op.FEED_TOKEN, b"\0" * 7, P.Error.BAD_LENGTH, 8)
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0), P.Error.BAD_LENGTH, 5)

    host.ok(P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image.size, image.crc32 ^ 1))
    # more than MAX_CHUNK data bytes (a frame the payload limit still admits): a length error
    # with the longest LOAD_CHUNK, before the load's own checks; MAX_CHUNK itself is taken
    longest = P.LOAD_CHUNK_HEADER.size + P.MAX_CHUNK
    assert longest < P.MAX_PAYLOAD
    for n in (longest + 1, P.MAX_PAYLOAD):
        rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + image.blob[:n - P.LOAD_CHUNK_HEADER.size],
                 P.Error.BAD_LENGTH, longest)
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(16) + b"x", P.Error.BAD_OFFSET, 0)
    rejected(P.Op.LOAD_COMMIT, b"", P.Error.INCOMPLETE, 0)
    host.ok(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + image.blob[:1000])
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + image.blob[:10], P.Error.BAD_OFFSET, 1000)
    assert P.LOAD_CHUNK_RESPONSE.unpack(host.ok(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(1000)
                                                + image.blob[1000:1000 + P.MAX_CHUNK])) == (1000 + P.MAX_CHUNK,)
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(1000 + P.MAX_CHUNK) + bytes(P.MAX_CHUNK + 1),
             P.Error.BAD_LENGTH, longest)
    tail = image.size - 100
    for offset in range(1000 + P.MAX_CHUNK, tail, 1000):
        host.ok(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(offset) + image.blob[offset:min(offset + 1000, tail)])
    rejected(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(tail) + bytes(200), P.Error.BAD_ARGUMENT, 100)
    host.ok(P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(tail) + image.blob[tail:])
    rejected(P.Op.LOAD_COMMIT, b"", P.Error.CHECKSUM_MISMATCH, image.crc32)
    Host(dev).load(image.blob)

    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(0, 0, 1), P.Error.BAD_ARGUMENT)   # nothing fed yet
    host.feed(0, 65)
    rejected(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(0, 65), P.Error.POSITION_MISMATCH, 1)
    rejected(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(5, 65), P.Error.POSITION_MISMATCH, 1)
    rejected(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, V), P.Error.BAD_ARGUMENT, V)
    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(2, 0, 1), P.Error.POSITION_MISMATCH, 1)
    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(1, V - 1, 2), P.Error.BAD_ARGUMENT)
    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(1, 0, 0), P.Error.BAD_ARGUMENT)
    rejected(P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(1, 0, P.MAX_LOGITS_PER_READ + 1), P.Error.BAD_ARGUMENT)

    # a corrupt payload under a valid header: NAK BAD_CRC with the frame's SEQ, nothing changes
    frame = bytearray(P.encode_frame(77, P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, 3)))
    frame[-4] ^= 0x40
    before = dev.fingerprint()
    events = host.raw(bytes(frame))
    assert [(e.seq, e.op, P.NAK_PAYLOAD.unpack(e.payload)) for e in events] == \
        [(77, P.NAK_RESPONSE, (P.Error.BAD_CRC, P.Op.FEED_TOKEN, 0))]
    # responses (an echo, another device) and corrupt headers get no answer at all
    assert host.raw(P.encode_frame(78, P.Op.FEED_TOKEN | P.RESPONSE, P.FEED_TOKEN_REQUEST.pack(1, 3))) == []
    assert host.raw(bytes((P.SYNC, 79, 6, 8, 0, 0x00))) == []
    assert dev.fingerprint() == before
    assert dev.stats["nak_BAD_CRC"] == 1 and dev.stats["ignored"] == 1


def test_duplicate_command_is_answered_from_the_cache_not_run_twice(image):
    dev = DeviceModel(image.cfg, "base3", seed=3)
    dev.load_image(image.blob)
    host = Host(dev)
    host.feed(0, 10)
    first, frame = host.send(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, 20))
    after_once = dev.fingerprint()
    again = host.raw(frame)              # the response was lost: the host sends the same frame
    assert again == [first] and dev.position == 2 and dev.fingerprint() == after_once
    assert dev.stats["replays"] == 1
    # the same SEQ with other bytes is a new command (a new host that reused the SEQ)
    reply, _ = host.send(P.Op.IDENTIFY, seq=first.seq)
    assert reply.op == P.Op.IDENTIFY | P.RESPONSE
    # a NAK is not cached: after a rejection the cache still holds the last executed command
    host.nak(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(9, 1))
    _, identify_frame = host.send(P.Op.IDENTIFY)
    host.nak(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(9, 1))
    assert host.raw(identify_frame)[0].op == P.Op.IDENTIFY | P.RESPONSE and dev.stats["replays"] == 2


def test_power_cycle_loses_state_weights_and_cache(image):
    dev = DeviceModel(image.cfg, "base3", seed=4)
    dev.load_image(image.blob)
    host = Host(dev)
    boot = P.Identity.unpack(host.ok(P.Op.IDENTIFY)).boot_id
    host.feed(0, 1)
    _, frame = host.send(P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, 2))
    dev.power_cycle()
    info = P.Identity.unpack(host.ok(P.Op.IDENTIFY))
    assert info.boot_id != boot and not info.weights_loaded and info.position == 0 and info.image_crc == 0
    reply = host.raw(frame)              # the old frame is not replayed: it is rejected now
    assert reply[0].op == P.NAK_RESPONSE and P.NAK_PAYLOAD.unpack(reply[0].payload)[0] == P.Error.NO_WEIGHTS


def test_partial_frame_is_dropped_after_the_idle_timeout(image):
    dev = DeviceModel(image.cfg, "base3", seed=5)
    frame = P.encode_frame(1, P.Op.IDENTIFY)
    false_start = bytes((P.SYNC, 0, 0, 100, 0))
    false_start += bytes((P.crc8_header(false_start[1:]),))   # claims 100 payload bytes
    assert dev.receive(false_start + frame[:3], now=10.0) == b""
    assert dev.poll(now=10.0 + P.FRAME_IDLE_TIMEOUT_S / 2) == b""
    assert dev.poll(now=10.0 + 2 * P.FRAME_IDLE_TIMEOUT_S) == b""  # gave up; the real frame is incomplete
    assert dev.stats["idle_drops"] >= 1
    out = dev.receive(frame[3:], now=11.0)
    assert out == b""                    # what is left of the frame has no SYNC: garbage
    out = dev.receive(false_start + frame, now=12.0)
    assert out == b""                    # the real frame sits inside the false start's 100 bytes
    out = dev.poll(now=12.0 + 2 * P.FRAME_IDLE_TIMEOUT_S)
    events = P.FrameDecoder().feed(out)
    assert [e.op for e in events] == [P.Op.IDENTIFY | P.RESPONSE]


def test_settle_drops_what_a_departed_host_left_and_keeps_the_state(image):
    """settle(): the partial frame a host left times out at once (as FRAME_IDLE_TIMEOUT_S of
    silence would drop it) and what that produces is discarded; the weights and the position stay."""
    dev = DeviceModel(image.cfg, "base3", seed=6)
    dev.load_image(image.blob)
    host = Host(dev)
    host.feed(0, 7)
    assert dev.settle() == 0                       # nothing left behind
    false_start = bytes((P.SYNC, 9, P.Op.IDENTIFY, 60, 0))
    false_start += bytes((P.crc8_header(false_start[1:]),))
    feed = P.encode_frame(5, P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, 8))
    assert dev.receive(false_start + feed, now=host.now) == b""   # the feed hides in the false start
    before = dev.stats["tokens"]
    discarded = dev.settle()
    # the rescan behind the dropped false start found the feed and ran it; its answer went nowhere
    assert discarded == P.FRAME_OVERHEAD + P.FEED_TOKEN_RESPONSE.size and dev.stats["tokens"] == before + 1
    assert dev._decoder.pending == 0 and dev.position == 2 and dev.weights_loaded
    assert host.feed(2, 9)[0] == 3


def test_device_with_a_small_buffer_says_so(image):
    dev = DeviceModel(image.cfg, "base3", max_payload=64)
    host = Host(dev)
    assert P.Identity.unpack(host.ok(P.Op.IDENTIFY)).max_payload == 64
    assert host.raw(P.encode_frame(1, P.Op.LOAD_CHUNK, bytes(100))) == []   # over its buffer: not a frame
    with pytest.raises(ValueError):
        DeviceModel(image.cfg, "base3", max_payload=P.MIN_DEVICE_PAYLOAD - 1)


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(5)
        if what == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif what == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif what == 2:
            data.insert(rng.randrange(len(data) + 1), rng.choice((P.SYNC, rng.randrange(256))))
        elif what == 3 and len(data) > 1:
            del data[rng.randrange(len(data))]
        else:
            data = data[:rng.randrange(len(data) + 1)]
    return bytes(data)


def test_fuzz_device_model_never_hangs_and_rejected_frames_change_nothing(image):
    """12,000 random, mutated and re-checksummed frames against the device model.

    The fuzzed model is the protocol layer (``mmfree_fpga/protocol.py``: decoder, lengths,
    CRCs) together with the Python device model. That pair is the executable definition the
    RTL engine implements behind the same transport; it runs thousands of frames a second
    where an RTL simulation runs a few, so malformed input is explored here and the RTL is
    then held to the same streams. Checked for every input: the device answers in bounded
    time, sends only well-formed frames, and if it accepted nothing, its state (position,
    recurrent state, logits, weights, load progress, reply cache, boot id) is unchanged.
    """
    rng = random.Random(20240611)
    dev = DeviceModel(image.cfg, "base3", seed=6)
    dev.load_image(image.blob)
    host = Host(dev)
    for position, token in enumerate((5, 6, 7)):
        host.feed(position, token)
    V, size = image.cfg.V, image.size

    def templates():
        pos = dev.position
        return [
            (P.Op.IDENTIFY, b""), (P.Op.RESET_STATE, b""), (P.Op.LOAD_COMMIT, b""),
            (P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(pos, rng.randrange(V))),
            (P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(rng.randrange(2 ** 32), rng.randrange(2 ** 32))),
            (P.Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(pos, rng.randrange(V), rng.randrange(1, 300))),
            (P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(rng.choice((size, size - 1, 0)), rng.randrange(2 ** 32))),
            (P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(rng.randrange(size)) + rng.randbytes(rng.randrange(1, 200))),
            (rng.randrange(256), rng.randbytes(rng.randrange(20))),
        ]

    counts = {"sent": 0, "rejected": 0, "accepted": 0}
    slowest = 0.0
    t = 0.0
    for i in range(12000):
        op, payload = rng.choice(templates())
        if rng.random() < 0.05:      # keep FEED_TOKEN (the slow command) reachable
            op, payload = P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(dev.position, rng.randrange(V))
        seq = rng.randrange(256)
        kind = rng.randrange(4)
        if kind == 0:
            data = _mutate(rng, P.encode_frame(seq, op, payload))              # framing damage
        elif kind == 1:
            data = P.encode_frame(seq, op & 0x7F, _mutate(rng, payload)[:P.MAX_PAYLOAD])   # semantic damage, valid CRCs
        elif kind == 2:
            data = rng.randbytes(rng.randrange(64))                            # line noise
        else:
            data = P.encode_frame(seq, op, payload)                            # well-formed, maybe nonsensical
        before = dev.fingerprint()
        t += 10.0
        start = time.perf_counter()
        out = dev.receive(data, now=t) + dev.poll(now=t + 1.0)
        slowest = max(slowest, time.perf_counter() - start)
        dec = P.FrameDecoder()
        replies = dec.feed(out)
        assert dec.pending == 0 and dec.garbage_bytes == 0, (i, data.hex())
        counts["sent"] += 1
        if any(r.op != P.NAK_RESPONSE for r in replies):
            counts["accepted"] += 1
        else:
            counts["rejected"] += 1
            assert dev.fingerprint() == before, (i, data.hex(), [P.NAK_PAYLOAD.unpack(r.payload) for r in replies])
        if not dev.weights_loaded and rng.random() < 0.2:
            dev.load_image(image.blob)   # keep the loaded-weights paths reachable
        if i % 1000 == 999:              # still alive and in sync: a fresh command gets its answer
            reply, _ = host.send(P.Op.IDENTIFY, seq=(seq + 128) & 0xFF)
            assert reply.op == P.Op.IDENTIFY | P.RESPONSE
            assert P.Identity.unpack(reply.payload).position == dev.position
    assert counts["sent"] >= 10000
    assert counts["rejected"] > 5000 and counts["accepted"] > 1000, counts
    assert dev.stats["tokens"] > 100 and dev.stats["nak_POSITION_MISMATCH"] > 0 and dev.stats["bad_crc"] > 0
    assert slowest < 2.0
