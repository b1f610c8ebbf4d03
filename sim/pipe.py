"""The generated Verilog of the board design as a subprocess: bytes in on stdin, out on stdout.

:func:`build_pipe_sim` compiles ``pipe_harness.cpp`` with Verilator around a design with
``i_stream``/``o_stream`` byte streams (the board's UART side) and the activity ports ``idle``
and ``in_frame`` (:class:`~mmfree_fpga.hw.linked_engine.LinkedEngine` with
``activity_ports=True``); the build is cached by a hash of the Verilog, the harness and the
build options. :class:`PipeSim` runs it and moves bytes without blocking.

Time: the design's clock is nominally :data:`PIPE_CLOCK_HZ`. The harness paces the clock to
that many cycles per wall-clock second while a partial frame waits for its next byte, so a
Link built with ``clk_freq=PIPE_CLOCK_HZ`` drops it after ``FRAME_IDLE_TIMEOUT_S`` of wall time,
like a board and like the device model; it runs at full speed while the design works and stops
while the design has nothing to do (``pipe_harness.cpp`` says how).
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import time
from pathlib import Path

from mmfree_fpga.errors import UserError

from .runner import build_verilator_exe, fst_missing, simulator_missing, write_verilog

__all__ = ["build_pipe_sim", "PipeSim", "HARNESS", "PIPE_CLOCK_HZ", "BOOT_PACE_S", "SETTLE_TIMEOUT_S"]

HARNESS = Path(__file__).with_name("pipe_harness.cpp")

# The simulated board's nominal clock: slow enough that Verilator keeps up with it on any
# design served here (a small engine simulates a few hundred thousand cycles per second on one
# core), fast enough that the idle timeout (FRAME_IDLE_TIMEOUT_S of it) is many cycles.
PIPE_CLOCK_HZ = 100_000
# Before the first byte the clock is paced for at most this long (the boot id then depends on
# when the host first speaks); after that an idle design's clock stops.
BOOT_PACE_S = 10.0
# settle(): the longest wait for the design to finish what a departed host left it.
SETTLE_TIMEOUT_S = 30.0


def build_pipe_sim(design, build_dir, log=None, *, waves: bool = False, sources=()) -> Path:
    """Compile ``design`` (i_stream/o_stream bytes, idle/in_frame activity) into a harness binary;
    ``waves``: a separate binary with Verilator's FST tracing (``PipeSim(..., waves=FILE)``).
    ``sources``: further Verilog files the design instantiates (a generated LiteDRAM core); their
    contents are part of the build's cache key."""
    reason = simulator_missing("verilator") or (fst_missing() if waves else None)
    if reason:
        raise UserError(reason)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    verilog = write_verilog(design, build_dir / "top.v", name="top")
    options = ["--trace-fst", "--trace-structs"] if waves else []
    sources = [Path(source).resolve() for source in sources]
    digest = hashlib.sha256(verilog.read_bytes() + HARNESS.read_bytes() + repr(options).encode())
    for source in sources:
        digest.update(source.read_bytes())
    key = digest.hexdigest()[:16]
    binary = build_dir / f"Vpipe{'-fst' if waves else ''}-{key}"
    if binary.exists():
        return binary
    if log:
        log(f"building the Verilator simulation{' with waveform tracing' if waves else ''} in {build_dir} "
            "(once per design, 10-60 s)")
    return build_verilator_exe(sources=[verilog, *sources, HARNESS], top="top", binary=binary,
                               options=[*options, "-CFLAGS", "-O2"], log_reason="Verilator build")


class PipeSim:
    """A running harness: ``send`` bytes, ``recv`` what the design has answered so far.

    ``waves`` (a binary built with ``waves=True``): dump cycles [``waves_from``, ``waves_to``)
    of the design's signals into that FST file. ``cycle`` is the simulated cycle count at the
    design's last idle report.
    """

    def __init__(self, binary: Path, *, clock_hz: float = PIPE_CLOCK_HZ, boot_pace_s: float = BOOT_PACE_S,
                 waves=None, waves_from: int = 0, waves_to: int | None = None):
        self.binary = Path(binary)
        status_r, status_w = os.pipe()
        args = [str(self.binary), f"clock_hz={clock_hz}", f"boot_pace_s={boot_pace_s}", f"status_fd={status_w}"]
        if waves is not None:
            args += [f"waves={Path(waves).resolve()}", f"waves_from={waves_from}"]
            if waves_to is not None:
                args.append(f"waves_to={waves_to}")
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                         pass_fds=(status_w,))
        finally:
            os.close(status_w)
        self._status = status_r
        os.set_blocking(self._status, False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._status_buf = b""
        self.ended = False         # the harness closed its stdout (it exited)
        self.bytes_sent = 0
        self.idle_at = -1          # bytes received by the design when it last reported idle
        self.cycle = 0

    def fileno(self) -> int | None:
        """The harness's stdout: readable when the design has answered something (None once the
        harness has ended)."""
        return None if self.ended else self.proc.stdout.fileno()

    def send(self, data: bytes) -> None:
        if data and not self.ended:
            try:
                self.proc.stdin.write(data)
            except BrokenPipeError:      # the harness is gone: a dead board hears nothing
                self.ended = True
                return
            self.bytes_sent += len(data)

    def recv(self, timeout: float = 0.0) -> bytes:
        chunks = []
        fd = self.proc.stdout.fileno()
        wait = timeout
        while not self.ended:
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                break
            data = os.read(fd, 65536)
            if not data:
                self.ended = True
                break
            chunks.append(data)
            wait = 0.0
        self._read_status()
        return b"".join(chunks)

    def _read_status(self) -> None:
        if self._status is None:
            return
        try:
            while True:
                data = os.read(self._status, 4096)
                if not data:
                    break
                self._status_buf += data
        except BlockingIOError:
            pass
        *lines, self._status_buf = self._status_buf.split(b"\n")
        for line in lines:
            word, bytes_in, cycle = line.split()
            if word == b"idle":
                self.idle_at, self.cycle = int(bytes_in), int(cycle)

    @property
    def quiet(self) -> bool:
        """The design took every byte sent, answered it, and has nothing more to do (as last
        reported: call ``recv`` to refresh)."""
        return self.bytes_sent == 0 or self.idle_at == self.bytes_sent

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> int:
        """Run until the design is quiet (a partial frame timed out, every answer sent; or
        ``timeout``), discarding what it sends; returns the bytes discarded."""
        deadline = time.monotonic() + timeout
        discarded = len(self.recv(0.0))
        while not self.quiet and not self.ended and time.monotonic() < deadline:
            select.select([self.proc.stdout.fileno(), self._status], [], [],
                          max(0.0, min(0.05, deadline - time.monotonic())))
            discarded += len(self.recv(0.0))
        return discarded + len(self.recv(0.0))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)      # (it finishes its work first: a waveform stays whole)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if self._status is not None:
            os.close(self._status)
            self._status = None
