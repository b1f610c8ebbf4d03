"""The generated Verilog of a byte-stream design as a subprocess: bytes in on stdin, out on stdout.

:func:`build_pipe_sim` compiles ``pipe_harness.cpp`` with Verilator around any component that
has ``i_stream``/``o_stream`` byte streams (the board's UART side of the design); the build is
cached by a hash of the Verilog. :class:`PipeSim` runs it and moves bytes without blocking.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
from pathlib import Path

from mmfree_fpga.errors import UserError

from .runner import simulator_missing, write_verilog

__all__ = ["build_pipe_sim", "PipeSim", "HARNESS"]

HARNESS = Path(__file__).with_name("pipe_harness.cpp")


def build_pipe_sim(design, build_dir, log=None) -> Path:
    """Compile ``design`` (an Elaboratable with i_stream/o_stream bytes) into a harness binary."""
    reason = simulator_missing("verilator")
    if reason:
        raise UserError(reason)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    verilog = write_verilog(design, build_dir / "top.v", name="top")
    key = hashlib.sha256(verilog.read_bytes() + HARNESS.read_bytes()).hexdigest()[:16]
    binary = build_dir / f"Vpipe-{key}"
    if binary.exists():
        return binary
    obj = build_dir / "obj"
    shutil.rmtree(obj, ignore_errors=True)
    if log:
        log(f"building the Verilator simulation in {build_dir} (once per design, 10-60 s)")
    cmd = [shutil.which("verilator"), "--cc", "--exe", "--build", "-j", "1", "--top-module", "top",
           "-O3", "--x-assign", "fast", "--x-initial", "fast", "-Wno-fatal", "-Wno-lint", "-Wno-style",
           "-CFLAGS", "-O2", "--Mdir", str(obj), "-o", "Vsim", str(verilog), str(HARNESS)]
    env = dict(os.environ, MAKEFLAGS="CFG_CXXFLAGS_PCH_I=-include")  # see TOOLCHAIN.md
    proc = subprocess.run(cmd, cwd=build_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError("Verilator build failed:\n" + "\n".join(tail))
    os.replace(obj / "Vsim", binary)
    return binary


class PipeSim:
    """A running harness: ``send`` bytes, ``recv`` what the design has answered so far."""

    def __init__(self, binary: Path):
        self.binary = Path(binary)
        self.proc = subprocess.Popen([str(self.binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        os.set_blocking(self.proc.stdout.fileno(), False)

    def send(self, data: bytes) -> None:
        if data:
            self.proc.stdin.write(data)

    def recv(self, timeout: float = 0.0) -> bytes:
        chunks = []
        fd = self.proc.stdout.fileno()
        wait = timeout
        while True:
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
            wait = 0.0
        return b"".join(chunks)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
