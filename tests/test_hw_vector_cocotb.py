"""The vector datapath's generated Verilog: cocotb on Verilator and Icarus, Verilator lint.

All cores go into one test top (``VectorTestTop``) so Verilator builds once (about 40 s here).
"""

from __future__ import annotations

import re
import subprocess

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from mmfree_fpga.hw.argmax import Argmax
from mmfree_fpga.hw.bitlinear_front import BitLinearFront
from mmfree_fpga.hw.elementwise import ElementwiseUnit
from mmfree_fpga.hw.embed_scale import EmbedScale
from mmfree_fpga.hw.output_scale import OutputScale
from mmfree_fpga.hw.scalar_unit import ScalarUnit
from mmfree_fpga.sim.runner import run_cocotb, simulator_missing, write_verilog

# the published models' vocabulary (32000, the Mistral tokenizer): the argmax's longest vector
ARGMAX_MAX = 32000
COCOTB_TESTS = 7        # the @cocotb.test functions in sim/vector_tb.py


class VectorTestTop(wiring.Component):
    """Every vector core side by side, each with its own ports (``front__i__valid``, ...)."""

    def __init__(self, argmax_max: int = ARGMAX_MAX):
        self._cores = {
            "front": BitLinearFront(), "scalar": ScalarUnit(), "outscale": OutputScale(),
            "ew": ElementwiseUnit(), "embed": EmbedScale(), "argmax": Argmax(argmax_max),
        }
        super().__init__({name: Out(core.signature) for name, core in self._cores.items()})

    def elaborate(self, platform):
        m = Module()
        for name, core in self._cores.items():
            m.submodules[name] = core
            wiring.connect(m, wiring.flipped(getattr(self, name)), core)
        return m


@pytest.fixture(scope="module")
def verilog(tmp_path_factory):
    return write_verilog(VectorTestTop(), tmp_path_factory.mktemp("vector_verilog") / "vector_top.v",
                         name="vector_top")


BUILD_ARGS = {
    # C++ at -O0 builds in about a third of the time; the tests are bound by Python anyway
    "verilator": ["-CFLAGS", "-O0"],
    # Icarus under -g2012 never runs the `always @*` of an FSM's ready at time 0
    "icarus": ["-g2005"],
}


# Verilator builds the design with the long cases (a max_features BitLinear, a whole-vocabulary
# argmax); Icarus, about 10x slower per cycle here, runs the same tests without them.
@pytest.mark.parametrize("simulator, full", [("verilator", 1), ("icarus", 0)])
def test_cocotb(simulator, full, verilog, tmp_path):
    reason = simulator_missing(simulator)
    if reason:
        pytest.skip(reason)
    ran = run_cocotb(simulator=simulator, sources=[verilog], toplevel="vector_top",
                     test_module="mmfree_fpga.sim.vector_tb", build_dir=tmp_path / "build",
                     env={"VECTOR_SEED": 17 + full, "VECTOR_FULL": full, "VECTOR_ARGMAX_MAX": ARGMAX_MAX},
                     extra_build_args=BUILD_ARGS[simulator])
    assert ran == COCOTB_TESTS


# Verilator -Wall warnings that Amaranth's Verilog raises, each harmless here:
ACCEPTED_LINT = {
    # Amaranth leaves Verilog to zero-/sign-extend narrower operands of +, -, *, ==, <;
    # the extension is what the Amaranth expression means.
    "WIDTHEXPAND": "implicit operand extension in Amaranth's expressions",
    # Amaranth truncates wide intermediate results (a sum one bit wider than its register, a
    # limb slice) by assignment, and writes comparisons with 0 as a logical NOT of a vector.
    "WIDTHTRUNC": "truncation by assignment in Amaranth's expressions",
    # Every data.View field gets a named debug wire (`front__i__payload.op`) that nothing reads,
    # ports get aliases at module boundaries (`i__ready$55`), and rounding shifts and slices
    # leave bits of intermediate expressions (`$110[23:0]`) unread.
    "UNUSEDSIGNAL": "debug aliases of views and ports, bits dropped by shifts (not top-level ports)",
    # Amaranth declares `reg x = init;` and then assigns x in an always block.
    "PROCASSINIT": "Amaranth's style of declaring a register's init value",
    # Amaranth's FSM state is a binary register with unused codes; each `always @*` that
    # cases on it assigns its default value first, so an unlisted code keeps the default.
    "CASEINCOMPLETE": "Amaranth's FSM `casez` lists only the defined states, after a default",
    # One file holds the whole hierarchy; submodules are named `vector_top.front`.
    "DECLFILENAME": "Amaranth writes every module into the one file named after the top",
}


def test_verilator_lint_has_only_accepted_warnings(verilog):
    reason = simulator_missing("verilator")
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["verilator", "--lint-only", "-Wall", "--top-module", "vector_top", str(verilog)],
                            capture_output=True, text=True, timeout=300)
    found = list(re.finditer(r"^%(Warning|Error)-?([A-Z_]*): .*$", result.stderr, re.M))
    assert found, f"verilator printed no warnings; its output changed? {result.stderr[:2000]}"
    unexpected = [m.group(0) for m in found
                  if m.group(1) == "Error" and "Exiting due to" not in m.group(0)
                  or m.group(1) == "Warning" and m.group(2) not in ACCEPTED_LINT]
    assert not unexpected, "\n".join(unexpected[:20])
    # an unused or undriven top-level port would be a real bug, not an alias
    header = re.search(r"^module vector_top\(([^;]*)\);", verilog.read_text(), re.M)
    ports = {p.strip() for p in header.group(1).split(",")}
    assert ports, "no ports found in the generated Verilog"
    unused = [m.group(0) for m in found if m.group(2) in ("UNUSEDSIGNAL", "UNDRIVEN")
              and (s := re.search(r"(?:used|driven): '(\w+)'", m.group(0))) and s.group(1) in ports]
    assert not unused, "\n".join(unused)
