# amaranth: UnusedElaboratable=no
"""cocotb testbench of :class:`~mmfree_fpga.hw.matvec.TernaryMatVec`'s generated Verilog.

Run through :func:`mmfree_fpga.sim.runner.run_cocotb` (see ``tests/test_hw_matvec.py``); the
design's parameters come in the environment (``MATVEC_*``, written by :func:`unit_env`) so
this module rebuilds the same unit object for its stream encodings.

The pure-Python half (jobs, their stream payloads and expected results from
``reference.integer.matvec``) is shared with the Amaranth-simulator tests.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from mmfree_fpga.config import FORMATS
from mmfree_fpga.hw.matvec import TernaryMatVec
from mmfree_fpga.reference.integer import matvec

__all__ = ["MatVecJob", "Stimulus", "new_buffer", "encode_jobs", "random_jobs", "edge_jobs",
           "unit_env", "unit_from_env", "drive"]

_Q_MIN = -(1 << (FORMATS.act_bits - 1))
_Q_MAX = (1 << (FORMATS.act_bits - 1)) - 1


# -- stimulus and reference (no simulator needed) -------------------------------------------

@dataclass
class MatVecJob:
    """One command: the matrix, its packing, and q (None: reuse the buffered q)."""

    trits: np.ndarray
    packing: str
    q: np.ndarray | None = None


@dataclass
class Stimulus:
    """Payload integers for each input stream and the expected ``(acc, last)`` results."""

    cmd: list[int] = field(default_factory=list)
    act: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    expected: list[tuple[int, bool]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)   # rows * cols / lanes of each command


def new_buffer(unit: TernaryMatVec) -> np.ndarray:
    """Model of the unit's activation buffer after reset (its memory starts zeroed)."""
    return np.zeros(unit.max_cols, dtype=np.int64)


def encode_jobs(unit: TernaryMatVec, jobs, buffered: np.ndarray | None = None) -> Stimulus:
    """Stream payloads for ``jobs`` and the results ``reference.integer.matvec`` gives.

    ``buffered`` models the activation buffer (:func:`new_buffer`); it is updated in place, so
    one array carries the state across several calls against the same unit.
    """
    stim = Stimulus()
    if buffered is None:
        buffered = new_buffer(unit)
    for job in jobs:
        rows, cols = job.trits.shape
        stim.cmd.append(unit.cmd_payload(rows, cols, load=job.q is not None, packing=job.packing))
        if job.q is not None:
            buffered[:cols] = job.q
            stim.act += unit.act_beats(job.q)
        stim.weights += unit.weight_beats(job.trits, job.packing)
        acc = matvec(job.trits, buffered[:cols])
        stim.expected += [(int(a), r == rows - 1) for r, a in enumerate(acc)]
        stim.groups.append(rows * cols // unit.lanes)
    return stim


def random_jobs(unit: TernaryMatVec, rng: random.Random, count: int, *, max_rows: int | None = None,
                max_cols: int | None = None) -> list[MatVecJob]:
    """Random shapes, packings, trit densities and q; some jobs reuse the buffered q."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    max_rows = min(max_rows or unit.max_rows, unit.max_rows)
    max_groups = min(max_cols or unit.max_cols, unit.max_cols) // unit.lanes
    jobs = []
    for _ in range(count):
        rows = rng.randint(1, max_rows)
        cols = unit.lanes * rng.randint(1, max_groups)
        p_zero = rng.choice([0.0, 1 / 3, 0.8])
        trits = nprng.choice([-1, 0, 1], size=(rows, cols), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
        q = None if rng.random() < 0.25 else nprng.integers(_Q_MIN, _Q_MAX + 1, cols)
        jobs.append(MatVecJob(trits, rng.choice(unit.packings), q))
    return jobs


def edge_jobs(unit: TernaryMatVec, rows: int = 3) -> list[MatVecJob]:
    """All +1 / all -1 / all 0 trits against q all -128 / all 127, at the longest rows."""
    cols = unit.max_cols
    full = {t: np.full((rows, cols), t) for t in (1, -1, 0)}
    low, high = np.full(cols, _Q_MIN), np.full(cols, _Q_MAX)
    jobs = []
    for k, (t, q) in enumerate([(1, low), (-1, low), (1, high), (-1, high), (0, low), (0, high)]):
        jobs.append(MatVecJob(full[t], unit.packings[k % len(unit.packings)], q))
    # one row, one group: the shortest command, then a reuse of the buffered q
    jobs.append(MatVecJob(np.ones((1, unit.lanes), dtype=np.int64), unit.packings[-1],
                          np.arange(unit.lanes) - unit.lanes // 2))
    jobs.append(MatVecJob(-np.ones((2, unit.lanes), dtype=np.int64), unit.packings[0], None))
    return jobs


# -- design parameters through the environment ------------------------------------------------

def unit_env(unit: TernaryMatVec, **extra) -> dict[str, str]:
    """Environment that lets :func:`unit_from_env` rebuild ``unit``, plus test settings."""
    params = {"lanes": unit.lanes, "packings": list(unit.packings), "weight_bytes": unit.weight_bytes,
              "max_rows": unit.max_rows, "max_cols": unit.max_cols}
    env = {"MATVEC_PARAMS": json.dumps(params)}
    env.update({f"MATVEC_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def unit_from_env() -> TernaryMatVec:
    return TernaryMatVec(**json.loads(os.environ["MATVEC_PARAMS"]))


# -- cocotb ------------------------------------------------------------------------------

class _Source:
    """Drives one input stream from a list of payloads, idling at random before each beat."""

    def __init__(self, dut, name: str, items, idle: float):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.name, self.items, self.idle = name, items, idle
        self.index, self.offered, self._driven = 0, False, None

    def drive(self, rng: random.Random):
        if not self.offered and self.index < len(self.items) and (self.idle == 0 or rng.random() >= self.idle):
            self.offered = True
            self.payload.value = self.items[self.index]
        if self._driven != self.offered:     # valid holds until the transfer, as streams require
            self.valid.value = int(self.offered)
            self._driven = self.offered

    def transferred(self) -> bool:
        if self.offered and int(self.ready.value):
            self.index += 1
            self.offered = False
            return True
        return False


async def _reset(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns", impl="gpi").start())
    for name in ("cmd", "act", "weights"):
        getattr(dut, f"{name}__valid").value = 0
    dut.out__ready.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0


async def drive(dut, unit: TernaryMatVec, stim: Stimulus, *, idle: float, stall: float,
                rng: random.Random, max_cycles: int = 200_000):
    """Run ``stim`` through the DUT, checking every result as it leaves.

    Inputs idle with probability ``idle`` before each beat, ``out.ready`` drops with
    probability ``stall``. Returns (cycle of each command transfer, cycle of each result
    transfer), counting the first cycle of this call as 0.
    """
    sources = [_Source(dut, name, items, idle) for name, items in
               (("cmd", stim.cmd), ("act", stim.act), ("weights", stim.weights))]
    cmd_cycles, out_cycles = [], []
    ready_driven = None
    cycle = 0
    while len(out_cycles) < len(stim.expected):
        assert cycle < max_cycles, f"timeout: {len(out_cycles)} of {len(stim.expected)} results"
        await FallingEdge(dut.clk)
        for source in sources:
            source.drive(rng)
        ready = stall == 0 or rng.random() >= stall
        if ready != ready_driven:
            dut.out__ready.value = int(ready)
            ready_driven = ready
        await ReadOnly()
        if sources[0].transferred():
            cmd_cycles.append(cycle)
        sources[1].transferred()
        sources[2].transferred()
        if ready and int(dut.out__valid.value):
            got = unit.unpack_out(int(dut.out__payload.value))
            want = stim.expected[len(out_cycles)]
            assert got == want, f"result {len(out_cycles)} (cycle {cycle}): got {got}, expected {want}"
            out_cycles.append(cycle)
        cycle += 1
    for source in sources:
        assert source.index == len(source.items), \
            f"{source.name}: {len(source.items) - source.index} beats left over"
    return cmd_cycles, out_cycles


@cocotb.test()
async def random_traffic_with_stalls(dut):
    """Random and edge-case jobs, random idle cycles on every input, random out back-pressure."""
    unit = unit_from_env()
    rng = random.Random(int(os.environ.get("MATVEC_SEED", "1")))
    buffered = new_buffer(unit)
    await _reset(dut)
    for idle, stall in ((0.3, 0.3), (0.6, 0.1), (0.1, 0.7)):
        jobs = random_jobs(unit, rng, 6, max_rows=6) + edge_jobs(unit, rows=2)
        rng.shuffle(jobs)
        await drive(dut, unit, encode_jobs(unit, jobs, buffered), idle=idle, stall=stall, rng=rng)


@cocotb.test()
async def throughput_without_stalls(dut):
    """Every input valid and out ready: exact cycle counts, alone and back to back."""
    unit = unit_from_env()
    rng = random.Random(2)
    await _reset(dut)
    rows, cols = unit.max_rows, unit.max_cols
    jobs = [MatVecJob(np.array(rng.choices([-1, 0, 1], k=rows * cols)).reshape(rows, cols), p,
                      np.array(rng.choices(range(-128, 128), k=cols))) for p in unit.packings]
    # one row per group: every group ends a row, the worst case for the result FIFO
    jobs.append(MatVecJob(np.ones((rows, unit.lanes), dtype=np.int64), unit.packings[-1],
                          np.full(unit.lanes, -128)))
    for job in jobs:       # alone: the unit idles between commands
        stim = encode_jobs(unit, [job])
        cmd_cycles, out_cycles = await drive(dut, unit, stim, idle=0, stall=0, rng=rng)
        took = out_cycles[-1] - cmd_cycles[0]
        assert took == stim.groups[0] + unit.latency, \
            f"{job.packing} {job.trits.shape}: {took} cycles, expected {stim.groups[0]} + {unit.latency}"
        await ClockCycles(dut.clk, 3)
        await ReadOnly()
        assert int(dut.out__valid.value) == 0, "a result beyond the expected ones"
    stim = encode_jobs(unit, jobs)     # back to back
    cmd_cycles, out_cycles = await drive(dut, unit, stim, idle=0, stall=0, rng=rng)
    gaps = [b - a for a, b in zip(cmd_cycles, cmd_cycles[1:])]
    assert gaps == [g + 3 for g in stim.groups[:-1]], f"command gaps {gaps}, groups {stim.groups}"
    assert out_cycles[-1] - cmd_cycles[-1] == stim.groups[-1] + unit.latency
