"""The driver through the fault proxy: corrupted, lost, duplicated and delayed bytes and frames,
garbage and device resets; tokens must equal the integer reference and the run must finish."""

import random
import socket
import time
from contextlib import contextmanager

import pytest

from mmfree_fpga import protocol as P
from mmfree_fpga.generation import Sampler
from mmfree_fpga.host.device_model import DeviceModel
from mmfree_fpga.host.driver import Driver
from mmfree_fpga.host.faults import FaultConfig, FaultInjector, FaultyLink, TcpFaultProxy
from mmfree_fpga.host.image import WeightImage
from mmfree_fpga.host.testing import TINY_CONFIG, random_checkpoint, reference_tokens
from mmfree_fpga.host.transport import DeviceRunner, TcpDeviceServer, pipe_pair

PROMPT = [1, 2, 3, 4]

# what the brief asks for: 1% byte corruption and 1% frame loss; plus a little of the rest
NOISY = dict(byte_corrupt=0.01, frame_drop=0.01, byte_drop=0.001, byte_duplicate=0.001,
             frame_duplicate=0.01, frame_delay=0.01, max_delay_s=0.02, garbage=0.01)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_CONFIG, seed=21)


@pytest.fixture(scope="module")
def image(checkpoint):
    return WeightImage.from_checkpoint(checkpoint, "base3")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return reference_tokens(checkpoint, PROMPT, 200)


@contextmanager
def faulty(device, to_device: FaultConfig, to_host: FaultConfig, seed: int):
    """driver -- FaultyLink -- device, all in-process."""
    host_end, link_host = pipe_pair("host")
    link_device, device_end = pipe_pair("device")
    runner = DeviceRunner(device, device_end).start()
    link = FaultyLink(link_host, link_device, to_device, to_host, seed=seed, on_reset=device.power_cycle)
    driver = Driver(host_end)
    try:
        yield driver, link
    finally:
        driver.close()
        link.close()
        runner.stop()
        device_end.close()


def _frames(rng, n):
    return [P.encode_frame(i & 0xFF, rng.randrange(1, 8), rng.randbytes(rng.randrange(50))) for i in range(n)]


def test_injector_without_faults_passes_the_stream_unchanged():
    rng = random.Random(1)
    stream = b"".join(b"noise" + f for f in _frames(rng, 50)) + b"\xa5\x01"
    inj = FaultInjector(FaultConfig(), seed=1)
    out = b""
    for i in range(0, len(stream), 13):
        out += b"".join(b for _, b in inj.process(stream[i:i + 13]))
    out += b"".join(b for _, b in inj.flush())
    assert out == stream and inj.stats["frames"] == 50


def test_injector_faults_are_what_was_asked_and_reproducible():
    rng = random.Random(2)
    frames = _frames(rng, 200)
    stream = b"".join(frames)

    def run(config, seed):
        inj = FaultInjector(config, seed=seed, on_reset=lambda: resets.append(inj.stats["frames"]))
        return b"".join(b for _, b in inj.process(stream)), inj.stats

    resets = []
    out, stats = run(FaultConfig(frame_drop=1.0), 3)
    assert out == b"" and stats["frames_dropped"] == 200
    out, stats = run(FaultConfig(frame_duplicate=1.0), 3)
    assert out == b"".join(f + f for f in frames)
    out, stats = run(FaultConfig(byte_corrupt=1.0), 3)
    assert len(out) == len(stream) and all(a != b for a, b in zip(out, stream))
    out, stats = run(FaultConfig(reset_at=(5, 77)), 3)
    assert out == stream and resets == [5, 77]
    out, stats = run(FaultConfig(garbage=1.0), 3)
    assert stats["garbage_bytes"] > 200 and len(out) == len(stream) + stats["garbage_bytes"]
    dec = P.FrameDecoder()
    got = dec.feed(out)
    while dec.pending:
        got += dec.abandon()
    assert [e for e in got if isinstance(e, P.Frame) and not e.is_response] != []
    noisy = FaultConfig(**NOISY)
    assert run(noisy, 4)[0] == run(noisy, 4)[0] != run(noisy, 5)[0]
    delayed = FaultInjector(FaultConfig(frame_delay=1.0, max_delay_s=0.5), seed=6).process(stream)
    assert any(d > 0 for d, _ in delayed) and all(0 <= d <= 0.5 for d, _ in delayed)


def _generate(driver, image, steps, sampler=None):
    driver.connect(image.cfg)
    driver.ensure_weights(image)
    return PROMPT + list(driver.generate(PROMPT, steps, sampler))


def test_one_percent_corruption_and_loss_gives_the_reference_tokens(image, reference):
    dev = DeviceModel(image.cfg, "base3")
    start = time.monotonic()
    with faulty(dev, FaultConfig(**NOISY), FaultConfig(**NOISY), seed=7) as (driver, link):
        tokens = _generate(driver, image, 40)
        stats = link.stats
    assert tokens == reference[:len(PROMPT) + 40]
    assert stats["bytes_corrupted"] > 20 and stats["frames_dropped"] > 0 and stats["garbage_bytes"] > 0
    assert driver.stats.retransmits > 10 and driver.stats.bad_crc_naks > 0 and dev.stats["replays"] > 0
    assert time.monotonic() - start < 60


def test_device_resets_under_faults_are_recovered_exactly(image, reference):
    dev = DeviceModel(image.cfg, "base3")
    with faulty(dev, FaultConfig(**NOISY), FaultConfig(**NOISY), seed=8) as (driver, link):
        driver.connect(image.cfg)
        driver.ensure_weights(image)
        frames = link.to_device.stats["frames"]
        link.to_device.config.reset_at = (frames + 20, frames + 45)     # mid-stream, twice
        tokens = PROMPT + list(driver.generate(PROMPT, 40))
        assert link.to_device.stats["resets"] == 2
        # a reset during the reload of the first recovery restarts that load instead
        assert driver.stats.recoveries >= 1 and driver.stats.device_resets == 2 and driver.stats.loads >= 2
    assert tokens == reference[:len(PROMPT) + 40]


def test_sampling_under_faults_reads_logits_in_smaller_pieces(checkpoint, image):
    sampler = lambda: Sampler(temperature=0.7, top_k=50, seed=5)   # noqa: E731
    want = reference_tokens(checkpoint, PROMPT, 12, sampler())
    dev = DeviceModel(image.cfg, "base3")
    dev.load_image(image.blob)
    with faulty(dev, FaultConfig(**NOISY), FaultConfig(**NOISY), seed=9) as (driver, link):
        tokens = _generate(driver, image, 12, sampler())
        assert driver.logits_read.size < P.MAX_LOGITS_PER_READ
    assert tokens == want


def test_tcp_fault_proxy_in_front_of_a_served_device(image, reference):
    dev = DeviceModel(image.cfg, "base3")
    with TcpDeviceServer(dev) as server, \
            TcpFaultProxy(server.port, FaultConfig(**NOISY), FaultConfig(**NOISY), seed=10,
                          on_reset=dev.power_cycle) as proxy:
        assert proxy.url.startswith("socket://127.0.0.1:") and proxy.port != server.port
        with Driver.open(proxy.url) as driver:
            tokens = _generate(driver, image, 40)
        stats = proxy.link_stats()
    assert tokens == reference[:len(PROMPT) + 40]
    assert stats["bytes_corrupted"] > 0 and driver.stats.retransmits > 0


def test_fault_proxy_refuses_non_loopback_addresses():
    with pytest.raises(Exception, match="loopback"):
        TcpFaultProxy(1, FaultConfig(), FaultConfig(), target_host="192.0.2.1")
    with pytest.raises(Exception, match="loopback"):
        TcpFaultProxy(1, FaultConfig(), FaultConfig(), host="0.0.0.0")


@pytest.mark.slow
def test_200_tokens_with_faults_and_resets(image, reference):
    dev = DeviceModel(image.cfg, "base3")
    to_device = FaultConfig(**NOISY, reset_at=(60,))          # the first load is cut short
    with faulty(dev, to_device, FaultConfig(**NOISY), seed=11) as (driver, link):
        driver.connect(image.cfg)
        driver.ensure_weights(image)
        frames = link.to_device.stats["frames"]
        to_device.reset_at = (60,) + tuple(frames + k for k in (30, 110, 190, 270))
        tokens = PROMPT + list(driver.generate(PROMPT, 200))
        # resets that land in a reload restart that load; the driver sees the boot id change once
        assert link.to_device.stats["resets"] == 5 and driver.stats.device_resets >= 2
        assert driver.stats.recoveries >= 1
    assert tokens == reference


# -- mmfree-fpga proxy ---------------------------------------------------------------------------

def _error_line(capsys, argv) -> str:
    from mmfree_fpga.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmfree-fpga {argv[0]}: error: "), err
    return err[0]


def test_proxy_command_between_run_and_a_served_device(image, reference, tmp_path):
    """``mmfree-fpga proxy`` in front of a served device: the driver through it gets the reference
    tokens; Ctrl-C stops it (exit 0) and its JSON counts the faults it made."""
    import json
    import queue
    import re
    import signal
    import subprocess
    import sys
    import threading

    dev = DeviceModel(image.cfg, "base3")
    out_json = tmp_path / "proxy.json"
    with TcpDeviceServer(dev) as server:
        proc = subprocess.Popen([sys.executable, "-m", "mmfree_fpga.cli", "proxy", "--target", server.url,
                                 "--rate", "0.01", "--seed", "3", "--json-out", str(out_json)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        try:
            url = re.search(r"proxy on (socket://127\.0\.0\.1:\d+)", lines.get(timeout=60)).group(1)
            with Driver.open(url) as driver:
                tokens = _generate(driver, image, 40)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                errors = proc.stderr.read()
                proc.stdout.close()
                proc.stderr.close()
    assert rc == 0, errors
    assert tokens == reference[:len(PROMPT) + 40]
    result = json.loads(out_json.read_text())
    assert result["url"] == url and result["target"] == server.url and result["clients"] == 1
    assert result["to_device"]["byte_corrupt"] == 0.01 and result["stats"]["frames"] > 100
    assert result["stats"]["bytes_corrupted"] > 0 and driver.stats.retransmits > 0


def test_proxy_errors_are_one_line_and_exit_2(capsys):
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]           # bound, not listening: nothing answers there
        assert "nothing listens at 127.0.0.1" in _error_line(capsys, ["proxy", "--target", str(port)])
    assert "not a TCP port" in _error_line(capsys, ["proxy", "--target", "70000"])
    assert "loopback" in _error_line(capsys, ["proxy", "--target", "socket://192.0.2.1:80"])
    assert "not a probability" in _error_line(capsys, ["proxy", "--target", "1", "--rate", "2"])
    assert "NAME=P" in _error_line(capsys, ["proxy", "--target", "1", "--fault", "bogus=0.1"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "cannot listen on 127.0.0.1" in _error_line(
            capsys, ["proxy", "--target", str(busy.getsockname()[1]), "--port", str(busy.getsockname()[1])])
