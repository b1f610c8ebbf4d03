"""cocotb testbench of the engine's generated Verilog (run by ``sim/engine_sim.py``).

The job (parameters, prompt, steps, the memory model's input values) comes as JSON in ``ENGINE_JOB``; the
tokens, argmax logits, cycles per token and read-back logits go to ``ENGINE_RESULT``. The
weights are already in the simulated memory (``+weights=FILE``). Python only wakes for the
few handshakes of each token; while the engine computes, the test waits on ``result.valid``.

With ``"trace": true`` in the job, a second coroutine also records every ``trace`` beat (each
result the engine's writer stores) as the raw payload integer, per step; it wakes on the rising
edge of ``trace__valid`` and then once per cycle while it stays high.
"""

from __future__ import annotations

import json
import os
import random
import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, RisingEdge
from cocotb.utils import get_sim_time

from mmfree_fpga.hw.control import EngineOp, decode_result, encode_command


def _signed32(v: int) -> int:
    return v - (1 << 32) if v & (1 << 31) else v


async def _capture_trace(dut, sink):
    """Append the payload of every cycle with ``trace__valid`` high to ``sink[0]`` (the list of
    the step in progress): values sampled after the cycle settled, i.e. what the writer stores
    at the next clock edge."""
    valid, payload, clk = dut.trace__valid, dut.trace__payload, dut.clk
    await ReadOnly()
    while True:
        if int(valid.value):
            sink[0].append(int(payload.value))
            await RisingEdge(clk)
        else:
            await RisingEdge(valid)
        await ReadOnly()


@cocotb.test()
async def engine_job(dut):
    with open(os.environ["ENGINE_JOB"]) as f:
        job = json.load(f)
    rng = random.Random(job["seed"])
    period_ns = job["period_ns"]
    Clock(dut.clk, period_ns, unit="ns", impl="gpi").start()
    dut.rst.value = 1
    dut.cmd__valid.value = 0
    dut.load__valid.value = 0
    dut.result__ready.value = 0
    dut.logit_req__valid.value = 0
    dut.logit_resp__ready.value = 1
    for port, value in job["mem_inputs"].items():
        getattr(dut, port).value = value
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    async def idle():
        if job["cmd_stall_rate"] > 0:
            while rng.random() < job["cmd_stall_rate"]:
                await FallingEdge(dut.clk)

    async def command(op, index=0, arg=0):
        await idle()
        await FallingEdge(dut.clk)
        dut.cmd__payload.value = encode_command(op, index=index, arg=arg)
        dut.cmd__valid.value = 1
        while not int(dut.cmd__ready.value):
            await FallingEdge(dut.clk)
        await FallingEdge(dut.clk)
        dut.cmd__valid.value = 0

    trace_sink = [[]] if job.get("trace") else None
    if trace_sink is not None:
        cocotb.start_soon(_capture_trace(dut, trace_sink))

    for index, value in job["params"]:
        await command(EngineOp.SET_PARAM, index, value)
    await command(EngineOp.RESET_STATE)

    prompt, steps = job["prompt"], job["steps"]
    tokens = list(prompt)
    argmax_logits, cycles, read_logits, traces = [], [], {}, []
    start_ns = get_sim_time("ns")
    start_wall = time.perf_counter()
    for t in range(len(prompt) + steps - 1):
        if trace_sink is not None:
            trace_sink[0] = []
            traces.append(trace_sink[0])
        await command(EngineOp.FEED_TOKEN, 0, tokens[t])
        if not int(dut.result__valid.value):
            await RisingEdge(dut.result__valid)
        await ReadOnly()
        payload = int(dut.result__payload.value)
        await FallingEdge(dut.clk)
        await idle()
        dut.result__ready.value = 1
        await FallingEdge(dut.clk)
        dut.result__ready.value = 0
        token, logit, n_cycles = decode_result(payload)
        if t >= len(prompt) - 1:
            tokens.append(token)
        argmax_logits.append(logit)
        cycles.append(n_cycles)
        got = {}
        for idx in job["read_logits"]:
            dut.logit_req__payload.value = idx
            dut.logit_req__valid.value = 1
            while not int(dut.logit_req__ready.value):
                await FallingEdge(dut.clk)
            await FallingEdge(dut.clk)
            dut.logit_req__valid.value = 0
            while not int(dut.logit_resp__valid.value):
                await FallingEdge(dut.clk)
            got[idx] = _signed32(int(dut.logit_resp__payload.value))
            await FallingEdge(dut.clk)
        read_logits[t] = got
    sim_cycles = (get_sim_time("ns") - start_ns) / period_ns
    sim_wall_s = time.perf_counter() - start_wall
    with open(os.environ["ENGINE_RESULT"], "w") as f:
        json.dump({"tokens": tokens, "argmax_logits": argmax_logits, "cycles": cycles,
                   "read_logits": read_logits, "sim_cycles": sim_cycles, "sim_wall_s": sim_wall_s,
                   "trace": traces if trace_sink is not None else None}, f)
