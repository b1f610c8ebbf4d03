"""``mmfree-fpga serve`` and ``mmfree-fpga run``: the served device over socket://, the tokens of
``reference --integer``, Ctrl-C, and one clear line with exit code 2 for every user error."""

import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.generation import decode_text
from mmfree_fpga.host.testing import SMALL_CONFIG, TINY_CONFIG, random_checkpoint, reference_tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", SMALL_CONFIG, seed=31)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Reader:
    """Collects a pipe's lines in a thread, so a slow or silent child never blocks the test."""

    def __init__(self, stream):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.text: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for line in stream:
            self.text.append(line)
            self.lines.put(line)

    def line(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def rest(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.text)


@contextlib.contextmanager
def serve_child(args, *, url_timeout: float = 180):
    """``mmfree-fpga serve --port 0 ARGS`` in a child process: yields (url, stdout reader); on
    leaving, Ctrl-C, and the child must exit 0 saying it stopped."""
    # The child gets Ctrl-C's default disposition even when the suite runs as a background job
    # (a shell starts those with SIGINT ignored, and an ignored signal stays ignored across exec).
    proc = subprocess.Popen([sys.executable, "-m", "mmfree_fpga.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child_out, child_err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        url = None
        while url is None:
            try:
                line = child_out.line(timeout=url_timeout)
            except queue.Empty:
                raise AssertionError(f"serve printed no URL within {url_timeout} s; "
                                     f"stderr: {''.join(child_err.text)!r}") from None
            found = re.search(r"socket://127\.0\.0\.1:\d+", line)
            url = found.group(0) if found else None
        yield url, child_out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            rest, errors = child_out.rest(), child_err.rest()
            proc.stdout.close()
            proc.stderr.close()
    assert rc == 0, errors
    assert "stopped" in rest


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmfree-fpga {argv[0]}: error: "), err
    return lines[0]


def test_serve_then_run_gives_the_integer_reference_and_ctrl_c_exits_0(checkpoint, tmp_path, capsys):
    with serve_child(["--backend", "model", "--checkpoint", str(checkpoint)]) as (url, _):
        out_json = tmp_path / "run.json"
        assert main(["run", "--device", url, "--checkpoint", str(checkpoint), "--prompt", "def ",
                     "--steps", "24", "--json-out", str(out_json)]) == 0
        printed = capsys.readouterr().out
        result = json.loads(out_json.read_text())
        want = reference_tokens(checkpoint, list(b"def "), 24)
        assert result["tokens"] == want
        assert result["text"] == decode_text(want, 256) and result["text"] in printed
        assert result["tokens_per_s"] > 0 and result["loaded_weights"] is True
        assert "tokens/s" in printed

        assert main(["run", "--device", url, "--checkpoint", str(checkpoint), "--prompt", "def ",
                     "--steps", "6", "--quiet", "--json-out", str(out_json)]) == 0
        again = json.loads(out_json.read_text())
        assert again["loaded_weights"] is False and again["tokens"] == want[:4 + 6]

        same_shape = random_checkpoint(tmp_path / "same", SMALL_CONFIG, seed=2)
        err = _error_line(capsys, ["run", "--device", url, "--checkpoint", str(same_shape), "--no-load",
                                   "--steps", "2"])
        assert "holds other weights" in err and "--no-load" in err

        other = random_checkpoint(tmp_path / "tiny", TINY_CONFIG, seed=1)
        err = _error_line(capsys, ["run", "--device", url, "--checkpoint", str(other), "--prompt-ids", "1,2",
                                   "--steps", "2", "--json-out", str(tmp_path / "never.json")])
        assert "built for vocab 256, hidden 32" in err and not (tmp_path / "never.json").exists()


@pytest.mark.parametrize("backend", ["model", pytest.param("rtl", marks=pytest.mark.slow)])
def test_serve_formats_wide_the_host_exports_in_the_device_formats(checkpoint, tmp_path, backend):
    """A device in the wide formats: the host exports the image in the formats IDENTIFY names and
    the tokens equal reference --integer --formats wide (greedy: the argmax is taken on full width);
    rtl: the Link and the wide engine's generated Verilog, the image read back (--verify)."""
    with serve_child(["--backend", backend, "--formats", "wide", "--checkpoint", str(checkpoint)],
                     url_timeout=900) as (url, _):
        out_json = tmp_path / "run.json"
        assert main(["run", "--device", url, "--checkpoint", str(checkpoint), "--prompt", "def ",
                     "--steps", "16", "--quiet", "--verify", "--json-out", str(out_json)]) == 0
        result = json.loads(out_json.read_text())
        assert result["verified"] is True
        assert result["tokens"] == reference_tokens(checkpoint, list(b"def "), 16, formats="wide")


def test_run_errors_are_one_line_and_exit_2(checkpoint, capsys):
    common = ["--checkpoint", str(checkpoint), "--steps", "2"]
    assert "cannot open device 'bogus://x'" in _error_line(capsys, ["run", "--device", "bogus://x"] + common)
    port = _free_port()
    assert "no device listening at socket://127.0.0.1" in _error_line(
        capsys, ["run", "--device", f"socket://127.0.0.1:{port}"] + common)
    assert "cannot open device /dev/ttyMMFREE0" in _error_line(capsys, ["run", "--device", "/dev/ttyMMFREE0"] + common)
    assert "--timeout" in _error_line(capsys, ["run", "--device", "loop://", "--timeout", "0"] + common)


def test_run_on_a_loopback_port_says_no_device_answers(checkpoint, capsys):
    err = _error_line(capsys, ["run", "--device", "loop://", "--checkpoint", str(checkpoint), "--steps", "1"])
    assert "echoes what the host sends but no device answers" in err


def test_serve_errors_are_one_line_and_exit_2(checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "cannot listen on 127.0.0.1" in _error_line(
            capsys, ["serve", "--backend", "model", "--port", str(port), "--checkpoint", str(checkpoint)])
    assert "--port must be in [0, 65535]" in _error_line(capsys, ["serve", "--backend", "model", "--port", "70000", "--checkpoint", str(checkpoint)])
    assert "no config.json" in _error_line(capsys, ["serve", "--checkpoint", "/nonexistent/ckpt"])
