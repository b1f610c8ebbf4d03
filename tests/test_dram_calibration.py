"""The DDR3 read-levelling state machine (hw/dram_calibration.py) against a model of a LiteDRAM core
whose PHY returns a lane's read data right only inside given (bitslip, delay) windows.

The model (:class:`WindowedCore`) is the native port of a core (random ``cmd_ready``, write data
taken two cycles after its command, read data a fixed latency after its command, in order) and
the ``ECP5DDRPHY``'s read-levelling controls (per lane a bitslip counter mod 4 and a delay counter
mod 8 that move only while the lane's ``dly_sel`` bit is set; a selected lane is paused and
returns garbage; ``burstdet_seen`` per lane, set by a read at a setting of the lane's burst
window, cleared by ``burstdet_clr``). A lane's bytes read at a setting outside its window come
back rotated by one beat. Every case checks the state machine's choice against
:func:`choose_window` and against the model's own counters after calibration (the adjustments
reached the PHY), and that no read and no pulse broke the selection protocol.
"""

from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from mmfree_fpga.hw.dram_calibration import DramCalibration, choose_window

LANES, BITSLIPS, DELAYS = 2, 4, 8
DATA_WIDTH, ADDRESS_WIDTH = 128, 10
WORDS = 4
LATENCY = 9
INIT_CYCLES = 20


def rect(bitslip, delays):
    return {(bitslip, d) for d in delays}


class WindowedCore:
    """The core's native port and the PHY's read-levelling controls (see the module docstring)."""

    def __init__(self, windows, bursts=None, *, fail_after_reads=None, lose_reads=False, seed=0):
        self.windows = windows
        self.bursts = bursts if bursts is not None else windows
        self.fail_after_reads = fail_after_reads
        self.lose_reads = lose_reads
        self.rng = random.Random(seed)
        self.mem = {}
        self.bitslip = [self.rng.randrange(BITSLIPS) for _ in range(LANES)]   # unknown after reset
        self.delay = [self.rng.randrange(DELAYS) for _ in range(LANES)]
        self.seen = 0
        self.reads = 0
        self.pending_writes = []          # [cycle the data is taken, address]
        self.returns = []                 # [cycle, address, corrupt lanes]
        self.protocol_errors = []

    def read_word(self, addr, cycle, sel):
        word = self.mem.get(addr, 0)
        if self.fail_after_reads is not None and self.reads > self.fail_after_reads:
            bad = range(LANES)
        else:
            bad = [lane for lane in range(LANES)
                   if sel >> lane & 1 or (self.bitslip[lane], self.delay[lane]) not in self.windows[lane]]
        for lane in range(LANES):
            if (self.bitslip[lane], self.delay[lane]) in self.bursts[lane] and not sel >> lane & 1:
                self.seen |= 1 << lane
        nbytes = DATA_WIDTH // 8
        data = [(word >> 8 * b) & 0xFF for b in range(nbytes)]
        for lane in bad:
            idx = list(range(lane, nbytes, LANES))
            vals = [data[i] for i in idx]
            for i, v in zip(idx, vals[1:] + vals[:1]):
                data[i] = v
        return sum(v << 8 * b for b, v in enumerate(data))

    async def run(self, ctx, dut, cycles, user=None):
        """Run ``cycles`` cycles; ``user(ctx, dut, cycle)`` drives the user port each cycle."""
        phy = dut.phy
        for cycle in range(cycles):
            # the model's outputs for this cycle
            ctx.set(dut.init_done, cycle >= INIT_CYCLES)
            ctx.set(dut.native.cmd_ready, cycle >= INIT_CYCLES and self.rng.random() < 0.7)
            take_write = bool(self.pending_writes) and self.pending_writes[0][0] <= cycle
            ctx.set(dut.native.wdata_ready, take_write)
            sel = ctx.get(phy.dly_sel)
            if self.returns and self.returns[0][0] == cycle:
                _, addr = self.returns.pop(0)
                ctx.set(dut.native.rdata_valid, 1)
                ctx.set(dut.native.rdata_data, self.read_word(addr, cycle, sel))
            else:
                ctx.set(dut.native.rdata_valid, 0)
                ctx.set(dut.native.rdata_data, self.rng.getrandbits(DATA_WIDTH))
            ctx.set(phy.burstdet_seen, self.seen)
            if user is not None:
                user(ctx, dut, cycle)
            # what the calibration (or its user) does at this edge
            if ctx.get(dut.native.cmd_valid) and ctx.get(dut.native.cmd_ready):
                addr = ctx.get(dut.native.cmd_addr)
                if ctx.get(dut.native.cmd_we):
                    self.pending_writes.append([cycle + 2, addr])
                else:
                    if sel:
                        self.protocol_errors.append(f"read at cycle {cycle} with dly_sel {sel:b}")
                    self.reads += 1
                    if not self.lose_reads:
                        self.returns.append([cycle + LATENCY, addr])
            if take_write:
                _, addr = self.pending_writes.pop(0)
                if not ctx.get(dut.native.wdata_valid):
                    self.protocol_errors.append(f"write data taken at cycle {cycle} while not valid")
                self.mem[addr] = ctx.get(dut.native.wdata_data)
            pulses = {name: ctx.get(getattr(phy, name))
                      for name in ("rdly_dq_rst", "rdly_dq_inc", "rdly_dq_bitslip_rst", "rdly_dq_bitslip")}
            if any(pulses.values()) and not sel:
                self.protocol_errors.append(f"pulse {pulses} at cycle {cycle} with no lane selected")
            for lane in range(LANES):
                if sel >> lane & 1:
                    if pulses["rdly_dq_rst"]:
                        self.delay[lane] = 0
                    if pulses["rdly_dq_inc"]:
                        self.delay[lane] = (self.delay[lane] + 1) % DELAYS
                    if pulses["rdly_dq_bitslip_rst"]:
                        self.bitslip[lane] = 0
                    if pulses["rdly_dq_bitslip"]:
                        self.bitslip[lane] = (self.bitslip[lane] + 1) % BITSLIPS
            if ctx.get(phy.burstdet_clr):
                self.seen = 0
            await ctx.tick()


def calibrate(windows, bursts=None, *, burstdet=True, cycles=6000, user=None, **model_kw):
    dut = DramCalibration(data_width=DATA_WIDTH, address_width=ADDRESS_WIDTH, lanes=LANES, bitslips=BITSLIPS,
                          delays=DELAYS, words=WORDS, guard=2, settle_cycles=3, burstdet=burstdet,
                          timeout_cycles=300)
    model = WindowedCore(windows, bursts, **model_kw)
    out = {}

    async def bench(ctx):
        await model.run(ctx, dut, cycles, user)
        out.update(ready=ctx.get(dut.ready), error=ctx.get(dut.error),
                   settings=[(ctx.get(dut.settings[lane].bitslip), ctx.get(dut.settings[lane].delay),
                              ctx.get(dut.settings[lane].window)) for lane in range(LANES)],
                   windows=[ctx.get(dut.windows[lane]) for lane in range(LANES)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert model.protocol_errors == []
    return out, model


def window_bits(passing):
    return sum(1 << (b * DELAYS + d) for b, d in passing)


def check_calibrated(windows, bursts=None, **kw):
    out, model = calibrate(windows, bursts, **kw)
    assert out["ready"] == 1 and out["error"] == 0
    bursts = bursts if bursts is not None else windows
    for lane in range(LANES):
        passing = windows[lane] & bursts[lane]
        expected = choose_window(passing, BITSLIPS, DELAYS)
        assert out["settings"][lane] == expected, lane
        assert out["windows"][lane] == window_bits(passing), lane
        # the PHY holds the choice
        assert (model.bitslip[lane], model.delay[lane]) == expected[:2], lane
    return out, model


@pytest.mark.parametrize("windows, expected", [
    # one window per lane, at different bitslips
    ([rect(1, range(2, 6)), rect(2, range(0, 4))], [(1, 3, 4), (2, 1, 4)]),
    # several windows: the widest wins, the first of equal ones
    ([rect(0, [5, 6]) | rect(2, range(1, 6)) | rect(3, range(0, 5)), rect(1, range(8))], [(2, 3, 5), (1, 3, 8)]),
    # a split window (no wrap from delay 7 to 0), a single setting
    ([rect(0, [0, 1, 2, 6, 7]), rect(3, [7])], [(0, 1, 3), (3, 7, 1)]),
    # runs do not continue across bitslips
    ([rect(0, [6, 7]) | rect(1, [0]), rect(2, [3, 4]) | rect(3, [3])], [(0, 6, 2), (2, 3, 2)]),
])
def test_calibration_picks_the_middle_of_the_widest_window(windows, expected):
    out, _ = check_calibrated(windows)
    assert out["settings"] == expected


def test_burst_detection_narrows_the_window():
    windows = [rect(1, range(1, 7)), rect(0, range(8))]
    bursts = [rect(1, range(3, 8)), rect(0, range(2, 8))]
    out, _ = check_calibrated(windows, bursts)
    assert out["settings"] == [(1, 4, 4), (0, 4, 6)]
    # without burstdet, the data alone decides
    out, _ = calibrate(windows, bursts, burstdet=False)
    assert out["ready"] and out["settings"] == [(1, 3, 6), (0, 3, 8)]


def test_random_windows():
    rng = random.Random(7)
    for _ in range(3):
        windows = []
        for _lane in range(LANES):
            b = rng.randrange(BITSLIPS)
            start = rng.randrange(DELAYS)
            windows.append(rect(b, range(start, min(DELAYS, start + rng.randrange(1, 6))))
                           | {(rng.randrange(BITSLIPS), rng.randrange(DELAYS)) for _ in range(3)})
        check_calibrated(windows, seed=rng.randrange(100))


@pytest.mark.parametrize("windows", [[rect(1, range(2, 6)), set()], [set(), set()]])
def test_no_window_is_an_error_and_the_user_port_stays_closed(windows):
    seen = {"cmd_ready": 0, "native_cmd_valid_late": 0}

    def user(ctx, dut, cycle):
        ctx.set(dut.user.cmd_valid, 1)
        ctx.set(dut.user.cmd_addr, 3)
        seen["cmd_ready"] |= ctx.get(dut.user.cmd_ready)
        if ctx.get(dut.error):
            seen["native_cmd_valid_late"] |= ctx.get(dut.native.cmd_valid)

    out, model = calibrate(windows, user=user)
    assert out["error"] == 1 and out["ready"] == 0
    assert seen == {"cmd_ready": 0, "native_cmd_valid_late": 0}
    assert out["windows"][1] == 0 and out["settings"][1][2] == 0
    assert out["windows"][0] == window_bits(windows[0])


def test_a_failed_final_check_is_an_error():
    windows = [rect(1, range(2, 6)), rect(2, range(0, 4))]
    sweep_reads = BITSLIPS * DELAYS * WORDS
    out, model = calibrate(windows, fail_after_reads=sweep_reads)
    assert out["error"] == 1 and out["ready"] == 0
    # the choice was made and applied before the check failed
    assert out["settings"] == [(1, 3, 4), (2, 1, 4)]
    assert (model.bitslip, model.delay) == ([1, 2], [3, 1])


def test_a_controller_that_stops_answering_is_an_error():
    out, model = calibrate([rect(0, range(8))] * LANES, lose_reads=True, cycles=800)
    assert out["error"] == 1 and out["ready"] == 0 and model.reads == WORDS


def test_user_port_is_passed_through_once_ready():
    windows = [rect(3, range(0, 8)), rect(0, range(4, 8))]
    state = {"phase": 0, "data": None}
    word = 0x0123456789ABCDEF_FEDCBA9876543210

    def user(ctx, dut, cycle):
        if not ctx.get(dut.ready):
            return
        u = dut.user
        if state["phase"] == 0:           # a write
            ctx.set(u.cmd_valid, 1)
            ctx.set(u.cmd_we, 1)
            ctx.set(u.cmd_addr, 5)
            ctx.set(u.wdata_valid, 1)
            ctx.set(u.wdata_data, word)
            ctx.set(u.wdata_we, 0xFFFF)
            if ctx.get(u.cmd_ready):
                state["phase"] = 1
        elif state["phase"] == 1:         # its data
            ctx.set(u.cmd_valid, 0)
            if ctx.get(u.wdata_ready):
                state["phase"] = 2
        elif state["phase"] == 2:         # a read of it
            ctx.set(u.wdata_valid, 0)
            ctx.set(u.cmd_valid, 1)
            ctx.set(u.cmd_we, 0)
            if ctx.get(u.cmd_ready):
                state["phase"] = 3
        else:
            ctx.set(u.cmd_valid, 0)
            if ctx.get(u.rdata_valid):
                state["data"] = ctx.get(u.rdata_data)

    out, model = calibrate(windows, user=user)
    assert out["ready"] == 1
    assert model.mem[5] == word and state["data"] == word


@pytest.mark.parametrize("kw, message", [
    ({"bitslips": 3}, "power of two"),
    ({"lanes": 3}, "whole beats"),
    ({"words": 0}, "words must be"),
    ({"base": 1020}, "does not fit"),
])
def test_parameter_errors(kw, message):
    args = dict(data_width=DATA_WIDTH, address_width=ADDRESS_WIDTH, lanes=LANES) | kw
    with pytest.raises(ValueError, match=message):
        DramCalibration(**args)
