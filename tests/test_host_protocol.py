"""The wire protocol: CRCs against Amaranth's catalog (software and a simulated Processor),
frame round trips, resynchronisation after garbage, the opcode table."""

import os
import random
import zlib

import pytest
from amaranth.lib.crc import Processor, catalog
from amaranth.sim import Simulator

from mmfree_fpga import protocol as P
from mmfree_fpga.config import FORMATS, Formats


def _catalog_algorithms():
    for name in dir(catalog):
        algorithm = getattr(catalog, name)
        if name.startswith("CRC") and getattr(algorithm, "crc_width", 0) >= 8:
            yield name, algorithm


@pytest.mark.parametrize("name,algorithm", list(_catalog_algorithms()))
def test_table_crc_matches_amaranth_catalog(name, algorithm):
    rng = random.Random(name)
    compute = P.table_crc(algorithm)
    for data in (b"", b"123456789", bytes(rng.randrange(256) for _ in range(61))):
        assert compute(data) == algorithm(data_width=8).compute(data), name


def test_protocol_crcs_are_the_named_catalog_algorithms():
    rng = random.Random(1)
    for n in (0, 1, 5, 100, 1031):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert P.crc16_frame(data) == P.FRAME_CRC(data_width=8).compute(data)
        assert P.crc8_header(data) == P.HEADER_CRC(data_width=8).compute(data)
        assert P.crc32_image(data) == P.IMAGE_CRC(data_width=8).compute(data) == zlib.crc32(data)
    assert P.crc16_frame(b"123456789") == 0x29B1      # CRC-16/IBM-3740 check value
    assert P.crc8_header(b"123456789") == 0xDF        # CRC-8/AUTOSAR check value
    half = 7
    data = b"123456789"
    assert P.crc32_image(data[half:], P.crc32_image(data[:half])) == 0xCBF43926


def test_frame_crc_ends_on_the_residue_the_hardware_checks():
    """Every byte after SYNC, CRC included, through CRC-16/IBM-3740 ends on its residue (0)."""
    frame = P.encode_frame(7, P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(3, 42))
    params = P.FRAME_CRC(data_width=8)
    assert params.residue() == 0
    assert params.compute(frame[1:]) == params.residue()
    assert P.HEADER_CRC(data_width=8).compute(frame[1:5]) == frame[5]


def _run_processor(algorithm, data: bytes) -> tuple[int, int]:
    dut = Processor(algorithm(data_width=8))
    result = {}

    async def testbench(ctx):
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        for byte in data:
            ctx.set(dut.data, byte)
            ctx.set(dut.valid, 1)
            await ctx.tick()
        ctx.set(dut.valid, 0)
        result["crc"], result["match"] = ctx.get(dut.crc), ctx.get(dut.match_detected)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return result["crc"], result["match"]


def test_amaranth_processor_validates_frames_in_hardware():
    """The gateware check: a Processor fed the frame after SYNC asserts match_detected."""
    frame = P.encode_frame(0x5A, P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(64) + bytes(range(40)))
    assert _run_processor(P.FRAME_CRC, frame[1:]) == (0, 1)
    assert _run_processor(P.HEADER_CRC, frame[1:6])[1] == 1
    assert _run_processor(P.HEADER_CRC, frame[1:5])[0] == frame[5]
    broken = bytearray(frame)
    broken[9] ^= 0x10
    assert _run_processor(P.FRAME_CRC, bytes(broken[1:]))[1] == 0


def test_encode_decode_round_trip_whole_and_byte_by_byte():
    rng = random.Random(2)
    frames = [(rng.randrange(256), rng.randrange(256), bytes(rng.randrange(256) for _ in range(n)))
              for n in (0, 1, 2, 5, 51, 255, 256, 1000, P.MAX_PAYLOAD)]
    stream = b"".join(P.encode_frame(*f) for f in frames)
    for chunking in ("whole", "bytes", "random"):
        dec = P.FrameDecoder()
        events = []
        if chunking == "whole":
            events = dec.feed(stream)
        elif chunking == "bytes":
            for i in range(len(stream)):
                events += dec.feed(stream[i:i + 1])
        else:
            i = 0
            while i < len(stream):
                n = rng.randrange(1, 300)
                events += dec.feed(stream[i:i + n])
                i += n
        assert [(e.seq, e.op, e.payload) for e in events] == frames, chunking
        assert all(isinstance(e, P.Frame) for e in events)
        assert dec.pending == 0 and dec.garbage_bytes == 0
        assert [e.crc for e in events] == [int.from_bytes(P.encode_frame(*f)[-2:], "big") for f in frames]


def test_encode_rejects_what_does_not_fit():
    with pytest.raises(ValueError):
        P.encode_frame(0, 1, bytes(P.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        P.encode_frame(256, 1)
    dec = P.FrameDecoder()
    head = bytes((1, 1, 0xFF, 0xFF))   # length 65535 > MAX_PAYLOAD with a valid header CRC
    assert dec.feed(bytes((P.SYNC,)) + head + bytes((P.crc8_header(head),))) == []
    assert dec.header_errors == 1 and dec.pending == 0


def _garbage(rng: random.Random) -> bytes:
    junk = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    for _ in range(rng.randrange(0, 3)):
        junk.insert(rng.randrange(len(junk) + 1), P.SYNC)
    if rng.random() < 0.3:   # a false start whose header passes its CRC-8
        head = bytes((rng.randrange(256), rng.randrange(256), *rng.randrange(P.MAX_PAYLOAD + 1).to_bytes(2, "little")))
        junk += bytes((P.SYNC,)) + head + bytes((P.crc8_header(head),))
    return bytes(junk)


def test_decoder_resynchronises_after_garbage():
    rng = random.Random(3)
    frames = [(i & 0xFF, rng.randrange(1, 8) | P.RESPONSE, bytes(rng.randrange(256) for _ in range(rng.randrange(60))))
              for i in range(400)]
    stream = b"".join(_garbage(rng) + P.encode_frame(*f) for f in frames) + _garbage(rng)
    dec = P.FrameDecoder()
    events = []
    for i in range(0, len(stream), 97):
        events += dec.feed(stream[i:i + 97])
    while dec.pending:          # the line goes idle: false starts waiting for bytes are given up
        events += dec.abandon()
    good = [(e.seq, e.op, e.payload) for e in events if isinstance(e, P.Frame)]
    assert good == frames
    assert dec.garbage_bytes > 0 and dec.header_errors > 0


def test_decoder_reports_corrupt_payload_with_trusted_header_and_recovers():
    a = P.encode_frame(9, P.Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(1, 2))
    b = P.encode_frame(10, P.Op.IDENTIFY)
    bad = bytearray(a)
    bad[8] ^= 0x01
    events = P.FrameDecoder().feed(bytes(bad) + b)
    assert events == [P.BadFrame(seq=9, op=P.Op.FEED_TOKEN, length=8), P.Frame(10, P.Op.IDENTIFY, b"", events[1].crc)]
    bad_header = bytearray(a)
    bad_header[3] ^= 0x04   # length field: the header CRC rejects it at once, no waiting
    dec = P.FrameDecoder()
    events = dec.feed(bytes(bad_header) + b)
    assert [type(e) for e in events] == [P.Frame] and events[0].seq == 10
    assert dec.header_errors >= 1


def test_decoder_memory_is_bounded_by_one_frame():
    dec = P.FrameDecoder()
    rng = random.Random(4)
    for _ in range(50):
        dec.feed(os.urandom(2000) + bytes((P.SYNC,)) * rng.randrange(3))
        assert dec.pending <= P.HEADER_LEN + P.MAX_PAYLOAD + P.TRAILER_LEN


def test_opcode_table_and_payload_sizes():
    values = [op.value for op in P.Op]
    assert len(set(values)) == len(values) and all(v < P.RESPONSE for v in values)
    assert P.NAK_RESPONSE == 0xFF
    for op in P.Op:
        if op not in (P.Op.NAK, P.Op.LOAD_CHUNK):
            assert op in P.REQUEST_LENGTHS
    assert P.LOAD_CHUNK_HEADER.size + P.MAX_CHUNK <= P.MAX_PAYLOAD
    assert P.READ_LOGITS_HEADER.size + 4 * P.MAX_LOGITS_PER_READ <= P.MAX_PAYLOAD
    assert P.IDENTITY.size <= P.MIN_DEVICE_PAYLOAD
    assert len({e.value for e in P.Error}) == len(P.Error)
    assert {p.name_in_export for p in P.Packing} == {"2bit", "base3"}
    assert all(P.Packing.from_export_name(p.name_in_export) == p for p in P.Packing)


def test_identity_round_trip():
    info = P.Identity(magic=P.DEVICE_MAGIC, version_major=1, version_minor=0, boot_id=0xDEADBEEF,
                      vocab_size=32000, hidden_size=1024, num_layers=24, intermediate_size=2816, lanes=64,
                      packing=P.Packing.BASE3, image_version=1, formats_id=P.formats_id(), max_payload=P.MAX_PAYLOAD,
                      step_time_ms=250, status=P.Status.WEIGHTS_LOADED, image_size=123456, image_crc=0x12345678,
                      position=77)
    payload = info.pack()
    assert len(payload) == P.IDENTITY.size
    assert P.Identity.unpack(payload) == info
    assert info.weights_loaded and info.geometry == (32000, 1024, 24, 2816)


def test_formats_id_identifies_the_fixed_point_formats():
    assert P.formats_id(FORMATS) == P.formats_id(Formats())
    assert P.formats_id(Formats(x_frac=15)) != P.formats_id(FORMATS)
