"""Protocol 1.2's layer slices and state slots: the slice image, the new ops against the device
model (every NAK, no state change on a NAK, retransmissions answered from the reply cache), a
chain of slices bit-exact with the integer model, and ``run --device A,B[,C]`` over ``serve``
processes: tokens equal to ``reference --integer`` on the demo model and a 4-layer random
checkpoint, several prompts in flight equal to running them one by one, a device that stops
answering or dies mid-run ends the run with one error naming it, in bounded time."""

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest

from mmfree_fpga import protocol as P
from mmfree_fpga.cli import main
from mmfree_fpga.config import FORMAT_SETS, PERF_MODEL, ModelConfig
from mmfree_fpga.planner import stage_cycles
from mmfree_fpga.errors import UserError
from mmfree_fpga.generation import Sampler
from mmfree_fpga.host.device_model import DeviceModel, parse_slice
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.host.pipeline import Pipeline, PipelineError, schedule_cycles
from mmfree_fpga.host.testing import TINY_CONFIG, random_checkpoint, reference_tokens, serve_many
from mmfree_fpga.image import image_layout
from mmfree_fpga.image_slice import PART_EMBEDDING, Slice, chain_error, cut_image, slice_image_size, slice_layout, whole_slice
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
from mmfree_fpga.reference.integer import IntegerModel, block, embed, parse_image

FOUR_LAYERS = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=4, intermediate_size=64)
Op, S, E = P.Op, P.SliceOp, P.Error


@pytest.fixture(scope="module")
def checkpoint4(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "four", FOUR_LAYERS, seed=11)


@pytest.fixture(scope="module")
def image4(checkpoint4):
    return WeightImage.from_checkpoint(checkpoint4, "base3")


# -- the slice image -------------------------------------------------------------------------------

def test_slice_images_are_the_whole_layout_restricted_and_parse_to_the_same_weights(image4):
    cfg = FOUR_LAYERS
    assert cut_image(image4.blob, cfg, "base3", whole_slice(cfg)) == image4.blob
    assert slice_layout(cfg, "base3", whole_slice(cfg)) == image_layout(cfg, "base3")
    whole = {s.name: s for s in image_layout(cfg, "base3")}
    for sl in (Slice(0, 1, True, False), Slice(1, 3, False, False), Slice(3, 4, False, True), Slice(0, 0, True, False),
               Slice(4, 4, False, True), Slice(2, 4, False, True)):
        layout = slice_layout(cfg, "base3", sl)
        blob = cut_image(image4.blob, cfg, "base3", sl)
        assert len(blob) == slice_image_size(cfg, "base3", sl)
        names = [s.name for s in layout]
        assert names == [n for n in whole if (n.startswith("layers.") and sl.first <= int(n.split(".")[1]) < sl.end)
                         or (n.startswith("lm_head.") and sl.head) or (n.startswith("embedding.") and sl.embedding)]
        for s in layout:
            assert s.offset % 16 == 0 and blob[s.offset:s.offset + s.size] == \
                image4.blob[whole[s.name].offset:whole[s.name].offset + s.size]
        model = parse_slice(blob, cfg, "base3", sl)
        ref = parse_image(image4.blob, cfg, "base3")
        for mine, theirs in zip(model.layers, ref.layers[sl.first:sl.end], strict=True):
            assert np.array_equal(mine.i_proj.trits, theirs.i_proj.trits)
            assert np.array_equal(mine.lower_bound, theirs.lower_bound)
            assert mine.down_proj.k_mant == theirs.down_proj.k_mant
        assert (model.lm_head is not None) == sl.head and (model.emb_q is not None) == sl.embedding
    # the slices of a split add up to the image but for padding
    split = [Slice(0, 1, True, False), Slice(1, 3, False, False), Slice(3, 4, False, True)]
    assert chain_error(split, cfg) is None
    assert abs(sum(slice_image_size(cfg, "base3", s) for s in split) - image4.size) < 16 * len(split)
    assert "device 1 starts at layer 2" in chain_error([split[0], Slice(2, 3, False, False), split[2]], cfg)
    assert "does not end the model" in chain_error(split[:2], cfg)
    assert "holds the embedding" in chain_error([split[0], Slice(1, 4, True, True)], cfg)
    with pytest.raises(ValueError):
        Slice(2, 2, False, False)
    with pytest.raises(ValueError):
        Slice(3, 2, True, False)


def test_a_chain_of_slices_is_the_integer_model_bit_for_bit_in_every_slot(image4):
    cfg = FOUR_LAYERS
    split = [Slice(0, 1, True, False), Slice(1, 3, False, False), Slice(3, 4, False, True)]
    models = [parse_slice(cut_image(image4.blob, cfg, "base3", sl), cfg, "base3", sl, slots=2) for sl in split]
    refs = [IntegerModel(parse_image(image4.blob, cfg, "base3")) for _ in range(2)]
    rng = np.random.default_rng(3)
    for _ in range(6):
        for slot in (1, 0):          # two sequences interleaved, each its own state
            token = int(rng.integers(cfg.V))
            x = models[0].run(slot, token=token)
            x = models[1].run(slot, x=x)
            assert np.array_equal(models[2].run(slot, x=x), refs[slot].step(token))


# -- the ops against the device model -----------------------------------------------------------------

class Host:
    """Hand-made frames, one exchange at a time."""

    def __init__(self, device):
        self.device, self.seq, self.now = device, 0, 1000.0

    def send(self, op, payload=b"", seq=None):
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
        frame = P.encode_frame(self.seq if seq is None else seq, op, payload)
        self.now += 1.0
        dec = P.FrameDecoder()
        events = dec.feed(self.device.receive(frame, self.now))
        assert len(events) == 1 and dec.pending == 0, events
        return events[0], frame

    def ok(self, op, payload=b""):
        reply, _ = self.send(op, payload)
        assert reply.op == op | P.RESPONSE, (P.op_name(op), reply, P.NAK_PAYLOAD.unpack(reply.payload)
                                             if reply.op == P.NAK_RESPONSE else None)
        return reply.payload

    def nak(self, op, payload=b""):
        """The NAK's (error, arg); the device's state must be what it was."""
        before = self.device.fingerprint()
        reply, _ = self.send(op, payload)
        assert reply.op == P.NAK_RESPONSE, (P.op_name(op), reply)
        error, rejected, arg = P.NAK_PAYLOAD.unpack(reply.payload)
        assert rejected == op and self.device.fingerprint() == before
        return E(error), arg

    def load_slice(self, blob, sl, chunk=700):
        self.ok(S.LOAD_SLICE, P.LOAD_SLICE_REQUEST.pack(len(blob), P.crc32_image(blob), sl.first, sl.end, sl.parts))
        for offset in range(0, len(blob), chunk):
            self.ok(Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(offset) + blob[offset:offset + chunk])
        self.ok(Op.LOAD_COMMIT)

    def write(self, slot, position, values, start=0):
        data = np.asarray(values, dtype="<i4").tobytes()
        return P.WRITE_RESIDUAL_RESPONSE.unpack(self.ok(S.WRITE_RESIDUAL, P.WRITE_RESIDUAL_HEADER.pack(
            slot, position, start) + data))

    def feed(self, slot, position, token=0):
        return P.FEED_SLOT_RESPONSE.unpack(self.ok(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(slot, position, token)))

    def read(self, slot, position, start, count, dtype="<i4"):
        answer = self.ok(S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(slot, position, start, count))
        assert P.READ_OUTPUT_HEADER.unpack_from(answer) == (slot, position, start)
        return np.frombuffer(answer, dtype=dtype, offset=P.READ_OUTPUT_HEADER.size).astype(np.int64)


def _device(**kw):
    kw.setdefault("slots", 3)
    return DeviceModel(FOUR_LAYERS, "base3", seed=1, **kw)


def test_devices_without_slots_or_of_minor_1_answer_the_slice_ops_unknown_op():
    for device in (DeviceModel(FOUR_LAYERS, "base3", seed=1), DeviceModel(FOUR_LAYERS, "base3", seed=1, minor=1)):
        host = Host(device)
        for op in S:
            assert host.nak(op, bytes(P.SLICE_REQUEST_LENGTHS.get(op, 9))) == (E.UNKNOWN_OP, 0)
    with pytest.raises(ValueError):
        DeviceModel(FOUR_LAYERS, "base3", minor=1, slots=2)


def test_slice_info_load_slice_and_their_naks(image4):
    cfg, host = FOUR_LAYERS, Host(_device(capacity=9000))
    sl = Slice(1, 3, False, False)
    blob = cut_image(image4.blob, cfg, "base3", sl)
    info = P.SliceInfo.unpack(host.ok(S.SLICE_INFO))
    assert info == P.SliceInfo(slots=3, parts=0, first_layer=0, end_layer=0, load_parts=0, load_first_layer=0,
                               load_end_layer=0, capacity=9000, element_bytes=4)
    req = P.LOAD_SLICE_REQUEST
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob), 0, 1, 3, 0)[:-1]) == (E.BAD_LENGTH, req.size)
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob), 0, 1, 5, 0)) == (E.BAD_ARGUMENT, 4)      # past the layers
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob), 0, 3, 1, 0)) == (E.BAD_ARGUMENT, 4)      # end < first
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob), 0, 2, 2, 0)) == (E.BAD_ARGUMENT, 4)      # empty
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob), 0, 1, 3, 4)) == (E.BAD_ARGUMENT, 4)      # unknown part
    assert host.nak(S.LOAD_SLICE, req.pack(len(blob) + 1, 0, 1, 3, 0)) == (E.BAD_IMAGE_SIZE, len(blob))
    big = Slice(0, 4, True, True)
    assert host.nak(S.LOAD_SLICE, req.pack(image4.size, 0, 0, 4, 3)) == (E.BAD_IMAGE_SIZE, 9000)  # over capacity
    assert slice_image_size(cfg, "base3", big) == image4.size > 9000
    host.ok(S.LOAD_SLICE, req.pack(len(blob), P.crc32_image(blob), 1, 3, 0))
    info = P.SliceInfo.unpack(host.ok(S.SLICE_INFO))
    assert (info.load_first_layer, info.load_end_layer, info.load_parts, info.parts) == (1, 3, 0, 0)
    assert P.LOAD_STATUS_RESPONSE.unpack(host.ok(Op.LOAD_STATUS)) == (len(blob), P.crc32_image(blob), 0, 0)
    host.load_slice(blob, sl)
    info = P.SliceInfo.unpack(host.ok(S.SLICE_INFO))
    assert (info.first_layer, info.end_layer, info.parts, info.load_parts) == (1, 3, 0, 0)
    ident = P.Identity.unpack(host.ok(Op.IDENTIFY))
    assert ident.weights_loaded and (ident.image_size, ident.image_crc) == (len(blob), P.crc32_image(blob))
    # the legacy feed needs the embedding and the head: NO_WEIGHTS with the slice's parts
    assert host.nak(Op.FEED_TOKEN, P.FEED_TOKEN_REQUEST.pack(0, 5)) == (E.NO_WEIGHTS, 0)
    assert host.nak(Op.READ_LOGITS, P.READ_LOGITS_REQUEST.pack(0, 0, 1)) == (E.NO_WEIGHTS, 0)
    # a whole image from LOAD_BEGIN is the whole slice
    host2 = Host(_device())
    host2.ok(Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image4.size, P.crc32_image(image4.blob)))
    for off in range(0, image4.size, 1000):
        host2.ok(Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(off) + image4.blob[off:off + 1000])
    host2.ok(Op.LOAD_COMMIT)
    info = P.SliceInfo.unpack(host2.ok(S.SLICE_INFO))
    assert (info.first_layer, info.end_layer, info.parts) == (0, 4, 3)


def test_residual_in_and_out_naks_and_bit_exact_results(image4):
    cfg = FOUR_LAYERS
    first, middle, last = Slice(0, 1, True, False), Slice(1, 3, False, False), Slice(3, 4, False, True)
    hosts = [Host(_device()) for _ in range(3)]
    for h, sl in zip(hosts, (first, middle, last)):
        h.load_slice(cut_image(image4.blob, cfg, "base3", sl), sl)
    h0, h1, h2 = hosts
    fresh = Host(_device())
    x = np.arange(cfg.d) - 16
    hdr = P.WRITE_RESIDUAL_HEADER
    # checks before anything changes, in the documented order
    assert fresh.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 0) + bytes(4)) == (E.NO_WEIGHTS, 0)
    assert h0.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 0) + bytes(4)) == (E.NO_WEIGHTS, PART_EMBEDDING)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 0)) == (E.BAD_LENGTH, hdr.size + 4)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 0) + bytes(6)) == (E.BAD_LENGTH, hdr.size + 4)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(3, 0, 0) + bytes(4)) == (E.BAD_ARGUMENT, 3)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 1, 0) + bytes(4)) == (E.POSITION_MISMATCH, 0)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 4) + bytes(4)) == (E.BAD_OFFSET, 0)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 0) + bytes(4 * (cfg.d + 1))) == (E.BAD_ARGUMENT, cfg.d)
    assert h1.write(0, 0, x[:10]) == (0, 0, 10)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(0, 0, 12) + bytes(4)) == (E.BAD_OFFSET, 10)
    assert h1.nak(S.WRITE_RESIDUAL, hdr.pack(1, 0, 10) + bytes(4)) == (E.BAD_OFFSET, 0)   # another slot's buffer
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(0, 0, 0)) == (E.INCOMPLETE, 10)
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(1, 0, 0)) == (E.INCOMPLETE, 0)
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(0, 0, 7)) == (E.BAD_ARGUMENT, 0)   # a token without the embedding
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(0, 2, 0)) == (E.POSITION_MISMATCH, 0)
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(5, 0, 0)) == (E.BAD_ARGUMENT, 3)
    assert h0.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(0, 0, cfg.V)) == (E.BAD_ARGUMENT, cfg.V)
    assert h1.nak(S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(0, 0, 0, 1)) == (E.BAD_ARGUMENT, 255)   # no output yet
    assert h1.nak(S.RESET_SLOT, bytes([3])) == (E.BAD_ARGUMENT, 3)
    assert h1.nak(S.RESET_SLOT, b"") == (E.BAD_LENGTH, 1)
    assert h1.write(0, 0, x[10:], start=10) == (0, 0, cfg.d)
    # three tokens of two sequences through the chain, against the integer model
    refs = [IntegerModel(parse_image(image4.blob, cfg, "base3")) for _ in range(2)]
    for h in hosts:
        h.ok(S.RESET_SLOT, bytes([1]))
    h1.ok(S.RESET_SLOT, bytes([0]))          # drops the buffer written for slot 0
    assert h1.nak(S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(0, 0, 0)) == (E.INCOMPLETE, 0)
    for position, tokens in enumerate([(3, 200), (17, 9), (250, 1)]):
        for slot, token in enumerate(tokens):
            p, best, logit, cycles = h0.feed(slot, position, token)
            assert (p, best, logit, cycles) == (position + 1, 0, 0, 0)
            res = h0.read(slot, position + 1, 0, cfg.d)
            assert h0.nak(S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(slot, position + 1, 1, cfg.d)) == \
                (E.BAD_ARGUMENT, 255)
            assert h1.write(slot, position, res) == (slot, position, cfg.d)
            h1.feed(slot, position)
            res = np.concatenate([h1.read(slot, position + 1, 0, 5), h1.read(slot, position + 1, 5, cfg.d - 5)])
            h2.write(slot, position, res[:16])
            h2.write(slot, position, res[16:], start=16)
            p, best, logit, _ = h2.feed(slot, position)
            want = refs[slot].step(token)
            assert (p, best, logit) == (position + 1, int(np.argmax(want)), int(want[np.argmax(want)]))
            logits = np.concatenate([h2.read(slot, position + 1, 0, 200), h2.read(slot, position + 1, 200, 56)])
            assert np.array_equal(logits, want)
            assert h2.nak(S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(slot, position, 0, 1)) == \
                (E.POSITION_MISMATCH, position + 1)
        # the output buffer holds the last feed's (slot 1): slot 0's is gone
        assert h2.nak(S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(0, position + 1, 0, 1)) == (E.BAD_ARGUMENT, 255)
    assert P.Identity.unpack(h2.ok(Op.IDENTIFY)).position == 3      # slot 0's position


def test_retransmitted_slice_ops_run_once(image4):
    """The same frame again (a lost answer) gets the cached answer and changes nothing more."""
    cfg = FOUR_LAYERS
    sl = Slice(1, 4, False, True)
    blob = cut_image(image4.blob, cfg, "base3", sl)
    device = _device()
    host = Host(device)
    reply, frame = host.send(S.LOAD_SLICE, P.LOAD_SLICE_REQUEST.pack(len(blob), P.crc32_image(blob), 1, 4, 2))
    state = device.fingerprint()
    assert host.device.receive(frame, host.now + 1) == P.encode_frame(reply.seq, reply.op, reply.payload)
    assert device.fingerprint() == state
    for off in range(0, len(blob), 900):
        host.ok(Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(off) + blob[off:off + 900])
    host.ok(Op.LOAD_COMMIT)
    weights = parse_image(image4.blob, cfg, "base3")
    x, _ = block(embed(weights, 42), np.zeros(cfg.d, dtype=np.int64), weights.layers[0], cfg)
    for op, payload in [(S.RESET_SLOT, bytes([2])),
                        (S.WRITE_RESIDUAL, P.WRITE_RESIDUAL_HEADER.pack(2, 0, 0) + x[:20].astype("<i4").tobytes()),
                        (S.WRITE_RESIDUAL, P.WRITE_RESIDUAL_HEADER.pack(2, 0, 20) + x[20:].astype("<i4").tobytes()),
                        (S.FEED_SLOT, P.FEED_SLOT_REQUEST.pack(2, 0, 0)),
                        (S.READ_OUTPUT, P.READ_OUTPUT_REQUEST.pack(2, 1, 0, 64))]:
        reply, frame = host.send(op, payload)
        assert reply.op == op | P.RESPONSE, (op, reply)
        state, replays = device.fingerprint(), device.stats["replays"]
        for _ in range(2):
            assert host.device.receive(frame, host.now + 1) == P.encode_frame(reply.seq, reply.op, reply.payload)
        assert device.fingerprint() == state and device.stats["replays"] == replays + 2
    assert device.stats["slice_feeds"] == 1 and device.slot_position(2) == 1
    # the one feed's logits are the integer model's
    want = IntegerModel(parse_image(image4.blob, cfg, "base3")).step(42)
    assert np.array_equal(np.frombuffer(reply.payload, dtype="<i4", offset=P.READ_OUTPUT_HEADER.size), want[:64])


def test_the_cycle_model_reports_the_performance_model_per_slice(image4):
    from mmfree_fpga.config import PERF_MODEL
    from mmfree_fpga.planner import stage_cycles
    cfg = FOUR_LAYERS
    device = DeviceModel(cfg, "base3", seed=1, slots=2, lanes=16, cycle_model=PERF_MODEL)
    device.load_image(image4.blob)
    host = Host(device)
    assert host.feed(0, 0, 5)[3] == round(PERF_MODEL.cycles_per_token(cfg, 16))
    sl = Slice(0, 2, True, False)
    device.load_image(cut_image(image4.blob, cfg, "base3", sl), sl)
    assert host.feed(1, 0, 5)[3] == round(stage_cycles(cfg, 16, 2, True, False))
    assert schedule_cycles([(0, 0, 0, 0, 10), (1, 1, 0, 0, 20), (2, 0, 1, 0, 10), (3, 1, 1, 0, 20),
                            (4, 0, 0, 1, 10), (5, 1, 0, 1, 20)], 2, [1, 1]) == 70


# -- runs over serve processes ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_devices():
    with serve_many(DEMO_CHECKPOINT, 3) as (urls, _):
        yield urls


@pytest.fixture(scope="module")
def four_devices(checkpoint4):
    with serve_many(checkpoint4, 3, "--cycle-model", "--lanes", "16") as (urls, _):
        yield urls


def _run(capsys, tmp_path, argv):
    """``mmfree-fpga run ARGV``: (its JSON, its stdout)."""
    path = tmp_path / "run.json"
    assert main(["run", *argv, "--json-out", str(path)]) == 0
    return json.loads(path.read_text()), capsys.readouterr().out


def test_demo_over_two_and_three_devices_gives_the_integer_reference(demo_devices, capsys, tmp_path):
    want = reference_tokens(DEMO_CHECKPOINT, list(b"def "), 16)
    for n in (3, 2):
        result, out = _run(capsys, tmp_path, ["--device", ",".join(demo_devices[:n]), "--steps", "16"])
        assert result["tokens"] == want and result["split_planned"] and len(result["devices"]) == n
        assert "split over" in out and result["devices"][0]["embedding"] and result["devices"][-1]["head"]
        for a, b in zip(result["devices"], result["devices"][1:]):
            assert a["end_layer"] == b["first_layer"]
    # the devices now hold the 2-device split: used as they are
    result, out = _run(capsys, tmp_path, ["--device", ",".join(demo_devices[:2]), "--steps", "16", "--no-load"])
    assert result["tokens"] == want and not result["split_planned"] and "as the devices hold it" in out
    assert not any(d["loaded_weights"] for d in result["devices"])


def test_four_layer_checkpoint_over_two_and_three_devices_and_prompts_in_flight(four_devices, checkpoint4, capsys,
                                                                                 tmp_path):
    prompts = [[5, 6, 7], [200], [1, 2, 3, 4, 5], [9, 9]]
    want = [reference_tokens(checkpoint4, p, 12) for p in prompts]
    for n in (2, 3):
        base = ["--device", ",".join(four_devices[:n]), "--checkpoint", str(checkpoint4), "--steps", "12"]
        result, _ = _run(capsys, tmp_path, base + ["--prompt-ids", "5,6,7"])
        assert result["tokens"] == want[0]
        ids = ";".join(",".join(map(str, p)) for p in prompts)
        result, _ = _run(capsys, tmp_path, base + ["--prompt-ids", ids])
        assert result["tokens"] == want and result["in_flight"] == 4
        feeds = sum(len(w) - 1 for w in want)
        assert all(d["feeds"] == feeds for d in result["devices"]) and result["tokens_through_chain"] == feeds
        # the devices' cycles: the performance model's per slice; in flight, the makespan beats one device
        for d in result["devices"]:
            assert d["cycles"] == feeds * round(stage_cycles(FOUR_LAYERS, 16, d["end_layer"] - d["first_layer"],
                                                             d["embedding"], d["head"]))
        assert sum(result["device_cycles"]) >= result["pipeline_cycles"] >= max(result["device_cycles"])
        one_device = 1e6 / PERF_MODEL.cycles_per_token(FOUR_LAYERS, 16)
        assert result["tokens_per_mcycle"] > (1.8 if n == 3 else 1.4) * one_device, result["tokens_per_mcycle"]
    # sampling reads the last device's logits: as reference --integer samples them, prompt by prompt
    sampled = [reference_tokens(checkpoint4, p, 8, Sampler(temperature=0.8, top_k=20, seed=4)) for p in prompts[:2]]
    result, _ = _run(capsys, tmp_path, base + ["--prompt-ids", "5,6,7;200", "--steps", "8", "--temperature", "0.8",
                                     "--top-k", "20", "--seed", "4"])
    assert result["tokens"] == sampled
    # --batch: copies in flight, each the same tokens
    result, _ = _run(capsys, tmp_path, base + ["--prompt-ids", "200", "--batch", "3"])
    assert result["tokens"] == [want[1]] * 3


def test_a_device_that_stops_answering_or_dies_ends_the_run_naming_it(tmp_path):
    """SIGSTOP (the device stops answering, its socket stays open), then SIGKILL (it dies), each
    after the 5th token of a long run: one PipelineError naming the device, in bounded time."""
    checkpoint = random_checkpoint(tmp_path / "tiny", TINY_CONFIG, seed=3)
    with serve_many(checkpoint, 2) as (urls, procs):
        for how in (signal.SIGSTOP, signal.SIGKILL):
            with Pipeline(urls, TINY_CONFIG, checkpoint) as pipe:
                pipe.prepare()
                victim = pipe.stages[1]
                seen, when = [], []

                def on_token(i, token):
                    seen.append(token)
                    if len(seen) == 5:
                        os.kill(procs[1].pid, how)
                        when.append(time.monotonic())

                with pytest.raises(PipelineError) as caught:
                    pipe.run([[1, 2], [3]], 400, on_token=on_token)
                took = time.monotonic() - when[0]
            message = str(caught.value)
            assert urls[1] in message and victim.slice.text() in message and "\n" not in message, message
            assert ("stopped answering" if how == signal.SIGSTOP else "lost the link") in message, message
            assert took < 15, took
            assert len(seen) <= 6          # a token of the other sequence may have been under way; none after
            if how == signal.SIGSTOP:
                os.kill(procs[1].pid, signal.SIGCONT)


def test_devices_without_slices_and_bad_device_lists_are_one_line_errors(four_devices, checkpoint4, capsys, tmp_path):
    with serve_many(checkpoint4, 1, "--slots", "0") as (urls, _):
        argv = ["run", "--device", f"{four_devices[0]},{urls[0]}", "--checkpoint", str(checkpoint4), "--steps", "2"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot hold a layer slice" in err[0] and urls[0] in err[0], err
        # a device without slots still runs whole models: several prompts one after another
        result, _ = _run(capsys, tmp_path, ["--device", urls[0], "--checkpoint", str(checkpoint4), "--steps", "4",
                                            "--prompt-ids", "5,6,7;200"])
        assert result["tokens"] == [reference_tokens(checkpoint4, p, 4) for p in ([5, 6, 7], [200])]
    assert main(["run", "--device", "socket://127.0.0.1:1,", "--steps", "2"]) == 2
    assert "an empty URL" in capsys.readouterr().err


# -- in-process devices: recovery of a reset device, resumed slice uploads -------------------------------

def test_a_device_reset_mid_run_is_reloaded_and_replayed(image4, checkpoint4):
    """A power cycle of the middle device, then of the first, mid-run: each is reloaded with its
    slice and every slot replayed (outputs checked); the tokens stay the integer model's."""
    from mmfree_fpga.host.transport import TcpDeviceServer
    devices = [DeviceModel(FOUR_LAYERS, "base3", seed=i, slots=4) for i in range(3)]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(TcpDeviceServer(d)).url for d in devices]
        prompts = [[5, 6, 7], [200, 3]]
        with Pipeline(urls, FOUR_LAYERS, checkpoint4) as pipe:
            assert pipe.prepare() is True
            seen = []

            def on_token(i, token):
                seen.append(token)
                if len(seen) in (4, 11):
                    devices[1 if len(seen) == 4 else 0].power_cycle()

            result = pipe.run(prompts, 10, on_token=on_token)
            assert result.tokens == [reference_tokens(checkpoint4, p, 10) for p in prompts]
            for k in (0, 1):
                stats = pipe.stages[k].driver.stats
                assert stats.recoveries == 1 and stats.replayed_tokens > 0 and stats.loads == 2, (k, stats)
            assert pipe.stages[2].driver.stats.recoveries == 0


def test_an_interrupted_slice_upload_resumes_only_for_the_same_slice(image4):
    from mmfree_fpga.host.driver import Driver
    from mmfree_fpga.host.transport import DeviceRunner, pipe_pair

    @contextlib.contextmanager
    def piped(device):
        host_end, device_end = pipe_pair()
        runner = DeviceRunner(device, device_end).start()
        driver = Driver(host_end)
        try:
            driver.connect(FOUR_LAYERS)
            yield driver
        finally:
            driver.close()
            runner.stop()
            device_end.close()

    class Cut(Exception):
        pass

    def cut_after(chunks):
        seen = []

        def progress(done, total):
            seen.append(done)
            if len(seen) > chunks:
                raise Cut()
        return progress

    a = image4.cut(Slice(0, 2, True, False))
    b = image4.cut(Slice(2, 4, False, True))
    device = DeviceModel(FOUR_LAYERS, "base3", seed=1, slots=2)
    with piped(device) as driver:
        driver.chunk.size = driver.chunk.maximum = 512
        with pytest.raises(Cut):
            driver.load_weights(a, cut_after(3))
    pointer = device._load.pointer
    assert pointer == 3 * 512 and device._load.slice == a.slice
    with piped(device) as driver:
        driver.load_weights(a)
        assert driver.stats.resumed_bytes == pointer and driver.holds(a) and not driver.holds(b)
        assert driver.held_slice() == a.slice
    with piped(device) as driver:
        with pytest.raises(Cut):
            driver.load_weights(b, cut_after(1))
    with piped(device) as driver:            # the open load is b's: a starts over from byte 0
        driver.load_weights(a)
        assert driver.stats.resumed_loads == 0 and driver.stats.image_bytes_sent == a.size and driver.holds(a)


def test_the_slice_ops_keep_the_protocol_tables():
    """Codes apart from Op's, fixed request lengths, answers that a reply cache of 16 bytes holds."""
    assert not {int(o) for o in S} & {int(o) for o in Op}
    assert set(P.SLICE_REQUEST_LENGTHS) == set(S) - {S.WRITE_RESIDUAL}
    assert max(P.SLICE_REQUEST_LENGTHS.values()) <= P.MIN_DEVICE_PAYLOAD
    for changes_state in (P.LOAD_SLICE_RESPONSE, P.RESET_SLOT_RESPONSE, P.WRITE_RESIDUAL_RESPONSE,
                          P.FEED_SLOT_RESPONSE):
        assert changes_state.size <= 16
    assert P.WRITE_RESIDUAL_HEADER.size + 4 * P.MAX_RESIDUAL_PER_WRITE <= P.MAX_PAYLOAD
    assert P.SLICE_INFO_RESPONSE.size == 16 and P.PROTOCOL_VERSION == (1, P.MINOR_SLICES)
    assert P.residual_element_bytes(FORMAT_SETS["narrow"]) == 4 and P.residual_element_bytes(FORMAT_SETS["wide"]) == 8
    assert P.op_name(0x0E) == "FEED_SLOT" and P.op_name(0x06) == "FEED_TOKEN" and P.op_name(0x55) == "op 0x55"


def test_more_prompts_than_sequences_in_flight_reuse_the_slots(checkpoint4):
    from mmfree_fpga.host.transport import TcpDeviceServer
    devices = [DeviceModel(FOUR_LAYERS, "base3", seed=i, slots=2) for i in range(2)]
    prompts = [[5, 6, 7], [200], [1, 2, 3, 4, 5], [9, 9], [31]]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(TcpDeviceServer(d)).url for d in devices]
        with Pipeline(urls, FOUR_LAYERS, checkpoint4) as pipe:
            pipe.prepare()
            result = pipe.run(prompts, 6)
            assert result.in_flight == 2 and result.tokens == [reference_tokens(checkpoint4, p, 6) for p in prompts]
            assert result.makespan_cycles == 0 and result.generated == 30      # the devices count no cycles
            with pytest.raises(UserError):
                pipe.run([[5], [FOUR_LAYERS.V]], 2)
