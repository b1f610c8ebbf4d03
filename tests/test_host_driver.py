"""The driver against the device model over in-process pipes, a pty and a real socket://:
tokens equal the integer reference; connection errors; weights checks; reset recovery."""

import dataclasses
import os
import random
import time
import tty
from contextlib import contextmanager

import pytest

from mmfree_fpga import protocol as P
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.generation import Sampler
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.driver import (
    Driver, DriverError, IncompatibleDeviceError, MemoryFailedError, NoDeviceError, WrongDeviceError, describe,
)
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.host.testing import SMALL_CONFIG, random_checkpoint, reference_tokens
from mmfree_fpga.host.transport import DeviceRunner, FdTransport, TcpDeviceServer, pipe_pair

PROMPT = list(b"def ")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", SMALL_CONFIG, seed=11)


@pytest.fixture(scope="module")
def image(checkpoint):
    return WeightImage.from_checkpoint(checkpoint, "base3")


@pytest.fixture(scope="module")
def greedy_reference(checkpoint):
    return reference_tokens(checkpoint, PROMPT, 40)


@contextmanager
def piped(device, **driver_kw):
    """A driver on one end of an in-process pipe, ``device`` on the other."""
    host_end, device_end = pipe_pair()
    runner = DeviceRunner(device, device_end).start()
    driver = Driver(host_end, **driver_kw)
    try:
        yield driver
    finally:
        driver.close()
        runner.stop()
        device_end.close()


def test_greedy_tokens_over_pipes_equal_the_integer_reference(image, greedy_reference):
    dev = DeviceModel(image.cfg, "base3")
    with piped(dev) as driver:
        info = driver.connect(image.cfg)
        assert "no weights loaded" in describe(info)
        seen = []
        assert driver.ensure_weights(image, progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (image.size, image.size) and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
        tokens = PROMPT + list(driver.generate(PROMPT, 40))
        assert not driver.ensure_weights(image)           # already there: not loaded again
        assert driver.stats.retransmits == 0 and driver.stats.recoveries == 0
    assert tokens == greedy_reference
    assert len(set(tokens[len(PROMPT):])) > 10            # a stream that depends on the state
    assert dev.stats["tokens"] == len(PROMPT) + 39


def test_sampling_on_the_host_equals_reference_sampling(checkpoint, image):
    want = reference_tokens(checkpoint, PROMPT, 25, Sampler(temperature=0.8, top_k=40, seed=3))
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image)
        got = PROMPT + list(driver.generate(PROMPT, 25, Sampler(temperature=0.8, top_k=40, seed=3)))
    assert got == want
    assert want != reference_tokens(checkpoint, PROMPT, 25)


def test_over_a_pty_opened_as_a_serial_port(image, greedy_reference):
    master, slave = os.openpty()
    tty.setraw(slave)
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    runner = DeviceRunner(dev, FdTransport(master, "pty-master")).start()
    try:
        with Driver.open(os.ttyname(slave)) as driver:
            os.close(slave)
            slave = None
            assert driver.transport.bytes_per_s == 115200 / 10
            driver.connect(image.cfg)
            driver.ensure_weights(image)
            tokens = PROMPT + list(driver.generate(PROMPT, 12))
    finally:
        if slave is not None:
            os.close(slave)
        runner.stop()
        runner.transport.close()
    assert tokens == greedy_reference[:len(PROMPT) + 12]


def test_over_socket_url_with_a_served_device(image, greedy_reference):
    dev = DeviceModel(image.cfg, "base3")
    with TcpDeviceServer(dev) as server:
        assert server.url.startswith("socket://127.0.0.1:")
        with Driver.open(server.url) as driver:
            driver.connect(image.cfg)
            assert driver.ensure_weights(image)
            tokens = PROMPT + list(driver.generate(PROMPT, 40))
            with Driver.open(server.url) as second:          # the "UART" is busy
                with pytest.raises(NoDeviceError, match="closed the connection"):
                    second.connect()
        with Driver.open(server.url) as again:                # the device kept its weights
            again.connect(image.cfg)
            assert not again.ensure_weights(image)
            assert PROMPT + list(again.generate(PROMPT, 5)) == greedy_reference[:len(PROMPT) + 5]
    assert tokens == greedy_reference
    assert server.connections == 2 and server.refused == 1


def test_loop_url_echoes_but_is_no_device():
    with Driver.open("loop://") as driver:
        with pytest.raises(NoDeviceError, match="echoes"):
            driver.connect()


class _Noise:
    """A 'device' that answers with line noise (wrong baud rate, wrong port)."""

    def __init__(self):
        self.rng = random.Random(1)

    def receive(self, data, now):
        return bytes(self.rng.randrange(256) for _ in range(len(data)))

    def poll(self, now):
        return b""


def test_line_noise_is_a_wrong_device():
    with piped(_Noise()) as driver:
        with pytest.raises(WrongDeviceError, match="no valid frame"):
            driver.connect()


class _Patched(DeviceModel):
    def __init__(self, cfg, **identity_changes):
        super().__init__(cfg, "base3")
        self.identity_changes = identity_changes

    def identity(self):
        return dataclasses.replace(super().identity(), **self.identity_changes)


@pytest.mark.parametrize("changes,error,match", [
    ({"magic": b"XXXX"}, WrongDeviceError, "not an mmfree-fpga engine"),
    ({"version_major": 2, "version_minor": 0}, IncompatibleDeviceError, "speaks protocol 2.0"),
    ({"formats_id": 1}, IncompatibleDeviceError, "fixed-point formats"),
    ({"image_version": 99}, IncompatibleDeviceError, "image version 99"),
    ({"max_payload": 10}, WrongDeviceError, "payload"),
    ({"status": P.Status.MEMORY_ERROR}, MemoryFailedError, "weight memory failed to start"),
])
def test_identify_checks(image, changes, error, match):
    with piped(_Patched(image.cfg, **changes)) as driver:
        with pytest.raises(error, match=match):
            driver.connect(image.cfg)


def test_geometry_and_packing_mismatches_are_clear(image):
    other = ModelConfig(vocab_size=256, hidden_size=48, num_hidden_layers=1, intermediate_size=64)
    with piped(DeviceModel(other, "base3")) as driver:
        with pytest.raises(IncompatibleDeviceError, match="built for vocab 256, hidden 48, 1 layers"):
            driver.connect(image.cfg, what="the checkpoint X")
    with piped(DeviceModel(image.cfg, "2bit")) as driver:
        driver.connect(image.cfg)
        assert driver.packing == "2bit"
        with pytest.raises(IncompatibleDeviceError, match="--packing 2bit"):
            driver.ensure_weights(image)


def test_whole_model_larger_than_the_device_memory_is_refused_with_the_way_out(image):
    """A device with state slots whose memory holds less than the whole model (a DRAM board built
    for a split) refuses LOAD_BEGIN with its capacity; the driver says to split the model."""
    dev = DeviceModel(image.cfg, "base3", slots=2, capacity=image.size // 2)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        with pytest.raises(IncompatibleDeviceError, match="runs as a slice of a split over several devices"):
            driver.ensure_weights(image)


def test_weights_that_do_not_match_are_reloaded_or_refused(tmp_path, image, greedy_reference):
    other = WeightImage.from_checkpoint(random_checkpoint(tmp_path / "other", SMALL_CONFIG, seed=99), "base3")
    assert other.crc32 != image.crc32
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(other.blob)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        assert not driver.holds(image)
        with pytest.raises(IncompatibleDeviceError, match="holds other weights"):
            driver.ensure_weights(image, allow_load=False)
        assert driver.ensure_weights(image)
        assert driver.holds(image) and driver.info.image_crc == image.crc32
        assert PROMPT + list(driver.generate(PROMPT, 8)) == greedy_reference[:len(PROMPT) + 8]
        assert driver.ensure_weights(image, force=True)


def test_device_reset_mid_stream_is_recovered_exactly(image, greedy_reference):
    dev = DeviceModel(image.cfg, "base3")
    notes = []
    with piped(dev, log=notes.append) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image)
        tokens = list(PROMPT)
        for i, token in enumerate(driver.generate(PROMPT, 40)):
            tokens.append(token)
            if i in (9, 25):
                dev.power_cycle()        # power lost: weights, state and reply cache gone
        stats = driver.stats
    assert tokens == greedy_reference
    assert stats.recoveries == 2 and stats.device_resets == 2 and stats.loads == 3
    assert stats.replayed_tokens == (len(PROMPT) + 9) + (len(PROMPT) + 25)
    assert any("reloading the weights" in n for n in notes)


def test_state_lost_but_weights_kept_is_replayed_without_reload(image, greedy_reference):
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image)
        tokens = list(PROMPT)
        for i, token in enumerate(driver.generate(PROMPT, 20)):
            tokens.append(token)
            if i == 7:                   # another host reset the state behind our back
                dev.receive(P.encode_frame(0, P.Op.RESET_STATE))
        assert driver.stats.recoveries == 1 and driver.stats.loads == 0 and driver.stats.device_resets == 0
    assert tokens == greedy_reference[:len(PROMPT) + 20]


def test_reset_while_sampling_and_during_the_load(checkpoint, image):
    want = reference_tokens(checkpoint, PROMPT, 15, Sampler(temperature=1.0, seed=8))
    dev = DeviceModel(image.cfg, "base3", max_payload=64)      # small buffer: many chunks, logits in pieces
    resets = []

    def progress(done, total):
        if done > total // 2 and not resets:
            resets.append(done)
            dev.power_cycle()

    with piped(dev) as driver:
        driver.connect(image.cfg)
        driver.ensure_weights(image, progress=progress)
        assert driver.holds(image) and resets
        tokens = list(PROMPT)
        for i, token in enumerate(driver.generate(PROMPT, 15, Sampler(temperature=1.0, seed=8))):
            tokens.append(token)
            if i == 5:
                dev.power_cycle()
        assert driver.stats.recoveries == 1 and driver.stats.loads == 2 and driver.stats.device_resets == 2
    assert tokens == want


def test_a_device_that_stops_answering_is_reported_in_bounded_time(image):
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    host_end, device_end = pipe_pair()
    runner = DeviceRunner(dev, device_end).start()
    with Driver(host_end) as driver:
        driver.connect(image.cfg)
        stream = driver.generate(PROMPT, 30)
        next(stream)
        runner.stop()                    # the board hangs: bytes go out, nothing comes back
        start = time.monotonic()
        with pytest.raises(NoDeviceError, match="stopped answering"):
            list(stream)
        assert time.monotonic() - start < 10
    device_end.close()


def test_prompt_outside_the_vocabulary_is_a_user_error(image):
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    with piped(dev) as driver:
        driver.connect(image.cfg)
        with pytest.raises(DriverError.__mro__[1], match="outside the vocabulary"):
            driver.generate([1, 999], 3)
        with pytest.raises(DriverError, match="no logits"):
            driver.logits()
