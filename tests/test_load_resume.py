"""Resumable uploads (LOAD_STATUS) and read-back verification (VERIFY_IMAGE), protocol 1.1.

The device model and the driver over in-process pipes and a served socket: an upload cut off
after k chunks resumes at the device's write pointer with a new driver; a device holding a
partial load of another image, or a prefix whose CRC-32 does not check out, starts over; a 1.0
device gets a full load; ``--verify`` passes on an intact memory and fails with one line on a
corrupted one. The same through the RTL Link behind ``serve --backend rtl`` (block-RAM engine,
the demo image): an interrupted upload resumes and the image verifies.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from mmfree_fpga import protocol as P
from mmfree_fpga.cli import main
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.driver import Driver, IncompatibleDeviceError, VerifyError
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.host.testing import SMALL_CONFIG, random_checkpoint, reference_tokens
from mmfree_fpga.host.transport import DeviceRunner, TcpDeviceServer, pipe_pair

from test_host_cli import _error_line

PROMPT = list(b"def ")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", SMALL_CONFIG, seed=21)


@pytest.fixture(scope="module")
def image(checkpoint):
    return WeightImage.from_checkpoint(checkpoint, "base3")


@pytest.fixture(scope="module")
def other_image(tmp_path_factory):
    ckpt = random_checkpoint(tmp_path_factory.mktemp("ckpt") / "other", SMALL_CONFIG, seed=22)
    return WeightImage.from_checkpoint(ckpt, "base3")


@contextmanager
def piped(device, **driver_kw):
    host_end, device_end = pipe_pair()
    runner = DeviceRunner(device, device_end).start()
    driver = Driver(host_end, **driver_kw)
    try:
        yield driver
    finally:
        driver.close()
        runner.stop()
        device_end.close()


class Interrupted(Exception):
    """The host went away mid-upload (its process killed, its link lost)."""


def interrupt_after(chunks: int):
    """A progress callback that stops the upload after ``chunks`` LOAD_CHUNKs were answered."""
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) > chunks:       # (the first call reports where the upload starts)
            raise Interrupted(done)
    return progress


def upload_cut_off(device, image, chunks: int) -> int:
    """A driver uploads ``image`` into ``device`` and is cut off after ``chunks`` chunks; returns
    the bytes the device took."""
    with piped(device) as driver:
        driver.connect(image.cfg)
        with pytest.raises(Interrupted):
            driver.ensure_weights(image, progress=interrupt_after(chunks))
    return device._load.pointer


def exchange(device, seq, op, payload=b""):
    (frame,) = P.FrameDecoder().feed(device.receive(P.encode_frame(seq, op, payload), now=0.0))
    return frame


def test_load_status_reports_the_open_load(image):
    dev = DeviceModel(image.cfg, "base3")
    status = exchange(dev, 1, P.Op.LOAD_STATUS)
    assert status.op == P.Op.LOAD_STATUS | P.RESPONSE
    assert P.LOAD_STATUS_RESPONSE.unpack(status.payload) == (0, 0, 0, 0)
    exchange(dev, 2, P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image.size, image.crc32))
    exchange(dev, 3, P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + image.blob[:700])
    want = (image.size, image.crc32, 700, P.crc32_image(image.blob[:700]))
    assert P.LOAD_STATUS_RESPONSE.unpack(exchange(dev, 4, P.Op.LOAD_STATUS).payload) == want
    # it changes nothing: a duplicate gives the same bytes, the load goes on
    before = dev.fingerprint()
    assert P.LOAD_STATUS_RESPONSE.unpack(exchange(dev, 4, P.Op.LOAD_STATUS).payload) == want
    assert dev.fingerprint() == before
    assert exchange(dev, 5, P.Op.LOAD_STATUS, b"x").op == P.NAK_RESPONSE          # BAD_LENGTH
    for seq, off in enumerate(range(700, image.size, P.MAX_CHUNK), 6):
        exchange(dev, seq, P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(off) + image.blob[off:off + P.MAX_CHUNK])
    exchange(dev, 100, P.Op.LOAD_COMMIT)
    assert P.LOAD_STATUS_RESPONSE.unpack(exchange(dev, 101, P.Op.LOAD_STATUS).payload) == (0, 0, 0, 0)
    verify = exchange(dev, 102, P.Op.VERIFY_IMAGE)
    assert P.VERIFY_IMAGE_RESPONSE.unpack(verify.payload) == (image.size, image.crc32)


def test_a_1_0_device_knows_neither_op(image):
    dev = DeviceModel(image.cfg, "base3", minor=0)
    for seq, op in ((1, P.Op.LOAD_STATUS), (2, P.Op.VERIFY_IMAGE)):
        nak = exchange(dev, seq, op)
        assert nak.op == P.NAK_RESPONSE and P.NAK_PAYLOAD.unpack(nak.payload) == (P.Error.UNKNOWN_OP, op, 0)
    assert P.Identity.unpack(exchange(dev, 3, P.Op.IDENTIFY).payload).version_minor == 0


@pytest.mark.parametrize("chunks", [1, 5])
def test_an_interrupted_upload_resumes_at_the_device_pointer(checkpoint, image, chunks):
    dev = DeviceModel(image.cfg, "base3", max_payload=256)         # 252-byte chunks: many of them
    pointer = upload_cut_off(dev, image, chunks)
    assert 0 < pointer < image.size
    with piped(dev) as driver:
        driver.connect(image.cfg)
        assert driver.ensure_weights(image, verify=True) is True
        assert driver.stats.resumed_loads == 1 and driver.stats.resumed_bytes == pointer
        assert driver.stats.image_bytes_sent == image.size - pointer
        tokens = list(PROMPT) + list(driver.generate(PROMPT, 10))
    assert dev.weights_loaded and dev.identity().image_crc == image.crc32
    assert tokens == reference_tokens(checkpoint, PROMPT, 10)


def test_a_partial_load_of_another_image_starts_over(image, other_image):
    dev = DeviceModel(image.cfg, "base3", max_payload=256)
    upload_cut_off(dev, other_image, 3)
    logs = []
    with piped(dev, log=logs.append) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image, verify=True)
        assert driver.stats.resumed_loads == 0 and driver.stats.image_bytes_sent == image.size
    assert any("another image" in line for line in logs)
    assert dev.identity().image_crc == image.crc32


def test_a_corrupted_prefix_starts_over(image):
    dev = DeviceModel(image.cfg, "base3", max_payload=256)
    exchange(dev, 1, P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image.size, image.crc32))
    bad = bytearray(image.blob[:200])
    bad[123] ^= 0x40                   # a byte that went wrong on the way in, CRC-16 notwithstanding
    exchange(dev, 2, P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(0) + bytes(bad))
    logs = []
    with piped(dev, log=logs.append) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image, verify=True)
        assert driver.stats.resumed_loads == 0 and driver.stats.image_bytes_sent == image.size
    assert any("do not check out" in line for line in logs)
    assert dev.identity().image_crc == image.crc32


def test_a_complete_but_uncommitted_load_is_only_committed(image):
    dev = DeviceModel(image.cfg, "base3")
    exchange(dev, 1, P.Op.LOAD_BEGIN, P.LOAD_BEGIN_REQUEST.pack(image.size, image.crc32))
    for seq, off in enumerate(range(0, image.size, P.MAX_CHUNK), 2):
        exchange(dev, seq, P.Op.LOAD_CHUNK, P.LOAD_CHUNK_HEADER.pack(off) + image.blob[off:off + P.MAX_CHUNK])
    with piped(dev) as driver:
        driver.connect(image.cfg)
        assert driver.ensure_weights(image) is True
        assert driver.stats.resumed_bytes == image.size and driver.stats.image_bytes_sent == 0
    assert dev.weights_loaded


def test_force_load_starts_from_byte_0(image):
    dev = DeviceModel(image.cfg, "base3", max_payload=256)
    upload_cut_off(dev, image, 2)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image, force=True)
        assert driver.stats.resumed_loads == 0 and driver.stats.image_bytes_sent == image.size


def test_a_1_0_device_gets_a_full_load_and_no_verify(image):
    dev = DeviceModel(image.cfg, "base3", max_payload=256, minor=0)
    upload_cut_off(dev, image, 3)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        assert driver.load_status() is None
        with pytest.raises(IncompatibleDeviceError, match=r"protocol 1\.0, which cannot read its weights back"):
            driver.ensure_weights(image, verify=True)
        assert not dev.weights_loaded          # (refused before anything was sent)
        driver.ensure_weights(image)
        assert driver.stats.resumed_loads == 0 and driver.stats.image_bytes_sent == image.size
    assert dev.weights_loaded


def test_verify_detects_a_corrupted_weight_memory(image):
    dev = DeviceModel(image.cfg, "base3")
    with piped(dev) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image, verify=True)
        dev.corrupt_stored_image(image.size // 2, 0x10)
        with pytest.raises(VerifyError, match="read-back verification failed") as e:
            driver.ensure_weights(image, verify=True)     # (holds it, by IDENTIFY: not reloaded)
        assert f"{image.crc32:08x}" in str(e.value)
        # loading again rewrites the memory
        driver.ensure_weights(image, force=True, verify=True)


def test_run_verify_fails_with_one_line_and_exit_2(checkpoint, image, capsys, tmp_path):
    dev = DeviceModel(image.cfg, "base3")
    with TcpDeviceServer(dev) as server:
        out = tmp_path / "run.json"
        assert main(["run", "--device", server.url, "--checkpoint", str(checkpoint), "--prompt", "def",
                     "--steps", "3", "--verify", "--quiet", "--json-out", str(out)]) == 0
        capsys.readouterr()
        dev.corrupt_stored_image(17)
        err = _error_line(capsys, ["run", "--device", server.url, "--checkpoint", str(checkpoint),
                                   "--steps", "3", "--verify"])
        assert "read-back verification failed" in err and "--force-load" in err


def test_run_verify_on_an_engine_without_read_back_is_one_line(checkpoint, image, capsys):
    dev = DeviceModel(image.cfg, "base3", readback=False)
    dev.load_image(image.blob)
    with TcpDeviceServer(dev) as server:
        err = _error_line(capsys, ["run", "--device", server.url, "--checkpoint", str(checkpoint),
                                   "--steps", "3", "--verify"])
        assert "cannot read its weight memory back" in err and "leave out --verify" in err


# -- the RTL Link behind serve --backend rtl (Verilator; the block-RAM engine, the demo image) ------

@pytest.fixture(scope="module")
def rtl_demo_url():
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    from mmfree_fpga.sim.backends import make_backend
    from mmfree_fpga.sim.runner import simulator_missing
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    backend = make_backend("rtl", ModelConfig.from_checkpoint(DEMO_CHECKPOINT), "base3", None, lanes=16)
    server = TcpDeviceServer(backend).start()
    try:
        yield server.url
    finally:
        server.stop()
        backend.close()


def test_rtl_link_resumes_an_interrupted_upload_and_verifies(rtl_demo_url, tmp_path):
    """A host uploads the demo image into the generated Verilog and is cut off after 20 chunks;
    ``run --verify`` (a new host) resumes at the device's pointer (LOAD_STATUS of the RTL Link),
    the engine reads its block RAM back (VERIFY_IMAGE) and the tokens are the integer model's."""
    import json

    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    image = WeightImage.from_checkpoint(DEMO_CHECKPOINT, "base3")
    with Driver.open(rtl_demo_url) as driver:
        driver.connect(image.cfg)
        with pytest.raises(Interrupted):
            driver.ensure_weights(image, progress=interrupt_after(20))
        taken = driver.stats.image_bytes_sent
        status = driver.load_status()
    assert status.open and (status.size, status.crc32) == (image.size, image.crc32)
    assert status.pointer == taken and status.running_crc32 == P.crc32_image(image.blob[:taken]) and taken > 0
    out = tmp_path / "run.json"
    assert main(["run", "--device", rtl_demo_url, "--prompt", "def", "--steps", "4", "--verify", "--quiet",
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["loaded_weights"] is True and r["resumed_from"] == taken and r["verified"] is True
    assert r["link"]["image_bytes_sent"] == image.size - taken
    assert r["tokens"] == reference_tokens(DEMO_CHECKPOINT, list(b"def"), 4)


def test_serve_baud_paces_the_line_like_a_uart(image):
    """``TcpDeviceServer(baud=)`` (``serve --baud``): an upload takes at least the time the bytes
    take on a line of that rate, 8N1, each direction; the image arrives intact."""
    import time
    baud = 1_000_000
    dev = DeviceModel(image.cfg, "base3")
    with TcpDeviceServer(dev, baud=baud) as server, Driver.open(server.url) as driver:
        driver.connect(image.cfg)
        t0 = time.perf_counter()
        driver.ensure_weights(image)
        seconds = time.perf_counter() - t0
        sent = driver.stats.bytes_sent
    assert dev.identity().image_crc == image.crc32
    assert seconds >= 0.95 * sent * 10 / baud, (seconds, sent)
    with pytest.raises(ValueError, match="baud"):
        TcpDeviceServer(dev, baud=0)
