"""cocotb testbench of the tiny engine's generated Verilog (:class:`~mmfree_fpga.hw.tiny_engine.TinyEngine`).

Run through :func:`mmfree_fpga.sim.runner.run_cocotb` by ``tests/test_tiny_engine.py``. The
environment names a JSON file (``TINY_CASE``) with the image file, the tokens and the expected
results (argmax, its logit, cycles, some logits), which the pytest side computes with the
integer model and the instruction-set simulator. The testbench uploads the image through the
``load`` stream (as the Link does on the iCEBreaker), resets the state and feeds the tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from mmfree_fpga.hw.control import EngineOp, decode_result, encode_command


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >> 31 else v


async def _handshake(dut, name: str, payload: int):
    """Offer one transfer on stream ``name`` until the cycle in which it is taken."""
    getattr(dut, f"{name}__payload").value = payload
    getattr(dut, f"{name}__valid").value = 1
    while True:
        await ReadOnly()
        taken = bool(getattr(dut, f"{name}__ready").value)
        await RisingEdge(dut.clk)
        if taken:
            break
    getattr(dut, f"{name}__valid").value = 0


async def _receive(dut, name: str) -> int:
    """Take one transfer from stream ``name``."""
    getattr(dut, f"{name}__ready").value = 1
    while True:
        await ReadOnly()
        value = int(getattr(dut, f"{name}__payload").value) if getattr(dut, f"{name}__valid").value else None
        await RisingEdge(dut.clk)
        if value is not None:
            break
    getattr(dut, f"{name}__ready").value = 0
    return value


@cocotb.test()
async def tokens_match_the_integer_model(dut):
    case = json.loads(Path(os.environ["TINY_CASE"]).read_text())
    image = Path(case["image"]).read_bytes()
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    for name in ("cmd", "load", "logit_req"):
        getattr(dut, f"{name}__valid").value = 0
    for name in ("result", "logit_resp"):
        getattr(dut, f"{name}__ready").value = 0
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    await _handshake(dut, "cmd", encode_command(EngineOp.LOAD_RESET))
    for byte in image:
        await _handshake(dut, "load", byte)
    await _handshake(dut, "cmd", encode_command(EngineOp.RESET_STATE))
    for step in case["steps"]:
        await _handshake(dut, "cmd", encode_command(EngineOp.FEED_TOKEN, arg=step["token"]))
        word = await _receive(dut, "result")
        got = dict(zip(("argmax", "logit", "cycles"), decode_result(word)))
        want = {key: step[key] for key in got}
        assert got == want, f"token {step['token']}: {got} != {want}"
        for index, value in step["logits"].items():
            await _handshake(dut, "logit_req", int(index))
            assert _signed32(await _receive(dut, "logit_resp")) == value, f"logit {index}"
