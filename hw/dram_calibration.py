"""Read levelling of a DDR3 PHY without a CPU: a hardware calibration between a LiteDRAM core's
native user port and its user.

A DDR3 PHY captures read data with a strobe (DQS) that the memory sends with the data; where in
the system clock's cycle the captured data lands depends on the board, the chip and the clock,
so the PHY offers, per byte lane, a *bitslip* (which of the ``bitslips`` positions of the
deserialised burst starts a word) and a *read delay* (``delays`` settings of the read-strobe
window). LiteX sets them from its CPU's BIOS (``sdram_read_leveling``); here
:class:`DramCalibration` does the same in hardware, once, after the core's init sequence:

1. wait for ``init_done``; write ``words`` words of a fixed pseudo-random pattern at ``base``
   (by default the last ``words`` words of the memory, away from the weight image) through the
   native port;
2. sweep every (bitslip, delay) pair, all lanes at once: bitslip outer, delay inner; at each,
   read the pattern back and compare it lane by lane (byte ``b`` of a native word belongs to lane
   ``b % lanes``: the DDR3 burst's beats are ``8 lanes`` bits wide, lane 0 in the low byte).
   A lane *passes* a setting when all its bytes are right and, with ``burstdet``, the PHY saw a
   read burst on that lane's strobe (``burstdet_seen``);
3. per lane, the widest run of passing consecutive delays at one bitslip wins (the first of
   equal runs); the lane's delay is the run's middle (``start + (length - 1) // 2``);
4. a lane without any passing setting is a calibration failure: ``error`` rises and stays, and
   ``ready`` stays low (the user port stays closed);
5. otherwise each lane is set to its choice (reset, then as many increments as the choice), and
   the pattern is read once more: all lanes must pass, else ``error``;
6. ``ready`` rises and stays; from then on the user port is passed through combinationally.

A watchdog turns a write or read test that does not finish (the controller stopped answering)
into ``error`` too: a failure is never a silent hang.

PHY control (``phy``, as LiteDRAM's ``ECP5DDRPHY`` takes it, its CSRs made ports): a lane's
controls act only while its bit of ``dly_sel`` is set (the ``ECP5DDRPHY`` pauses the lane's
``DQSBUFM`` meanwhile); ``rdly_dq_rst`` / ``rdly_dq_inc`` reset / increment the read delay (mod
``delays``), ``rdly_dq_bitslip_rst`` / ``rdly_dq_bitslip`` the bitslip (mod ``bitslips``), by one
per cycle they are high. An adjustment selects its lanes for ``guard`` cycles, pulses, keeps
them selected ``guard`` cycles more, deselects them and waits ``settle_cycles`` before the next
read. ``burstdet_clr`` clears the sticky ``burstdet_seen`` bits before each test's reads.
"""

from __future__ import annotations

import random

from amaranth.hdl import Array, Cat, Const, Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .dram_port import native_port_signature

__all__ = ["read_leveling_signature", "lane_settings_layout", "DramCalibration", "calibration_pattern",
           "choose_window"]


def read_leveling_signature(lanes: int) -> wiring.Signature:
    """The read-levelling controls of a PHY, from the controller's side (member names as the
    generated core's ports): ``dly_sel`` (lanes the pulses act on), the four pulses, and
    ``burstdet_clr`` / ``burstdet_seen`` (per lane: a read burst was detected since the clear)."""
    return wiring.Signature({
        "dly_sel": Out(lanes),
        "rdly_dq_rst": Out(1), "rdly_dq_inc": Out(1),
        "rdly_dq_bitslip_rst": Out(1), "rdly_dq_bitslip": Out(1),
        "burstdet_clr": Out(1), "burstdet_seen": In(lanes),
    })


def lane_settings_layout(bitslips: int, delays: int) -> data.StructLayout:
    """One lane's choice: ``bitslip``, ``delay``, and ``window`` (passing delays in the run the
    delay is the middle of; 0 until chosen)."""
    return data.StructLayout({"bitslip": range(bitslips), "delay": range(delays), "window": range(delays + 1)})


def calibration_pattern(words: int, data_width: int, seed: int = 0x5EED) -> list[int]:
    """The ``words`` native words written and read back (pseudo-random, fixed by ``seed``)."""
    rng = random.Random(seed)
    return [rng.getrandbits(data_width) for _ in range(words)]


def choose_window(passing, bitslips: int, delays: int):
    """The reference of the hardware's choice for one lane: ``passing`` is a set of (bitslip,
    delay) pairs; returns (bitslip, delay, window) or None when nothing passes."""
    best = None
    for b in range(bitslips):
        start = length = 0
        for d in range(delays):
            if (b, d) in passing:
                if length == 0:
                    start = d
                length += 1
                if best is None or length > best[2]:
                    best = (b, start, length)
            else:
                length = 0
    if best is None:
        return None
    b, start, length = best
    return b, start + (length - 1) // 2, length


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


class DramCalibration(wiring.Component):
    """Read levelling of a DDR3 PHY behind a LiteDRAM native port (see the module docstring).

    Parameters
    ----------
    data_width, address_width : int
        The core's native port (``DramCore.data_width`` / ``address_width``).
    lanes : int
        Byte lanes of the memory's data bus (``databits / 8``); ``data_width`` is a multiple.
    bitslips, delays : int
        Settings of the PHY per lane (``ECP5DDRPHY``: 4 and 8, its ``PhySettings``), powers of
        two (the PHY's counters wrap).
    words : int
        Native words of the test pattern (read back at every setting).
    base : int or None
        Word address of the pattern; None: the last ``words`` words of the address space.
    guard, settle_cycles : int
        Cycles a lane stays selected before and after its pulses; cycles after deselecting
        before the next read.
    burstdet : bool
        A setting passes only if the PHY also saw the lane's read burst (``burstdet_seen``).
    timeout_cycles : int
        The watchdog: a write or read test taking longer is a failure.

    Members
    -------
    user : In(native_port_signature(data_width, address_width))
        From the core's user (its master side); closed (no ``cmd_ready``, ``wdata_ready``,
        ``rdata_valid``) until ``ready``, then connected to ``native`` combinationally.
    native : Out(native_port_signature(data_width, address_width))
        To the core's native user port.
    init_done : In(1)
        The core's ``init_done``.
    phy : Out(read_leveling_signature(lanes))
        To the PHY's read-levelling controls.
    ready : Out(1)
        Calibrated: the user port is open (stays high; a register, so the pass-through's
        multiplexers hang off one flip-flop).
    error : Out(1)
        Calibration failed: a lane without any passing setting, a failed final check, or a test
        that did not finish (stays high, from the cycle after the failure; ``ready`` stays low).
    settings : Out(data.ArrayLayout(lane_settings_layout(bitslips, delays), lanes))
        Per lane, the chosen setting (valid once ``ready`` or ``error``).
    windows : Out(data.ArrayLayout(bitslips * delays, lanes))
        Per lane, the settings that passed the sweep (bit ``bitslip * delays + delay``).

    Duration: ``bitslips x delays`` tests, each ``2 guard + settle_cycles`` plus the reads'
    round trip, then one adjustment per lane and the final check (about 3,200 cycles, 43 us at
    75 MHz, for two lanes with the defaults and a 30-cycle read round trip).
    """

    def __init__(self, *, data_width: int, address_width: int, lanes: int, bitslips: int = 4, delays: int = 8,
                 words: int = 8, base: int | None = None, guard: int = 8, settle_cycles: int = 32,
                 burstdet: bool = True, timeout_cycles: int = 4096, seed: int = 0x5EED):
        for name, value in (("bitslips", bitslips), ("delays", delays)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if lanes < 1 or data_width % (8 * lanes):
            raise ValueError(f"a native word of {data_width} bits does not hold whole beats of {lanes} byte lanes")
        if words < 1 or words > 1 << address_width:
            raise ValueError(f"words must be between 1 and the address space, got {words}")
        if base is None:
            base = (1 << address_width) - words
        if not 0 <= base <= (1 << address_width) - words:
            raise ValueError(f"the pattern at word {base} does not fit {address_width} address bits")
        if guard < 1 or settle_cycles < 1 or timeout_cycles < 1:
            raise ValueError("guard, settle_cycles and timeout_cycles must be at least 1")
        self._dw, self._aw, self._lanes = data_width, address_width, lanes
        self._bitslips, self._delays = bitslips, delays
        self._words, self._base = words, base
        self._guard, self._settle, self._timeout = guard, settle_cycles, timeout_cycles
        self._burstdet = burstdet
        self.pattern = calibration_pattern(words, data_width, seed)
        super().__init__({
            "user": In(native_port_signature(data_width, address_width)),
            "native": Out(native_port_signature(data_width, address_width)),
            "init_done": In(1),
            "phy": Out(read_leveling_signature(lanes)),
            "ready": Out(1),
            "error": Out(1),
            "settings": Out(data.ArrayLayout(lane_settings_layout(bitslips, delays), lanes)),
            "windows": Out(data.ArrayLayout(bitslips * delays, lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        dw, lanes, words = self._dw, self._lanes, self._words
        nb, nd = self._bitslips, self._delays
        user, native, phy = self.user, self.native, self.phy
        all_lanes = (1 << lanes) - 1

        # -- the user port: closed until ready, then passed through ---------------------------------
        cmd_valid, cmd_we, cmd_addr = Signal(), Signal(), Signal(self._aw)
        wdata_valid, wdata_data = Signal(), Signal(dw)
        with m.If(self.ready):
            m.d.comb += [native.cmd_valid.eq(user.cmd_valid), native.cmd_we.eq(user.cmd_we),
                         native.cmd_addr.eq(user.cmd_addr), user.cmd_ready.eq(native.cmd_ready),
                         native.wdata_valid.eq(user.wdata_valid), native.wdata_we.eq(user.wdata_we),
                         native.wdata_data.eq(user.wdata_data), user.wdata_ready.eq(native.wdata_ready),
                         user.rdata_valid.eq(native.rdata_valid), user.rdata_data.eq(native.rdata_data),
                         native.rdata_ready.eq(user.rdata_ready)]
        with m.Else():
            m.d.comb += [native.cmd_valid.eq(cmd_valid), native.cmd_we.eq(cmd_we), native.cmd_addr.eq(cmd_addr),
                         native.wdata_valid.eq(wdata_valid), native.wdata_we.eq(Const(-1, dw // 8)),
                         native.wdata_data.eq(wdata_data), native.rdata_ready.eq(1)]

        # -- the pattern, the read-back comparison (one register stage) ------------------------------
        pattern = Array(Const(word, dw) for word in self.pattern)
        cmd_n = Signal(range(words + 1))          # commands taken
        wd_n = Signal(range(words + 1))           # write data words taken
        rd_n = Signal(range(words + 1))           # read words returned
        m.d.comb += [cmd_addr.eq(self._base + cmd_n), wdata_data.eq(pattern[wd_n])]
        got_valid = Signal()
        got = Signal(dw)
        got_n = Signal(range(words))
        m.d.sync += [got_valid.eq(0), got.eq(native.rdata_data), got_n.eq(rd_n)]
        diff = Signal(dw)
        m.d.comb += diff.eq(got ^ pattern[got_n])
        lane_bad = Signal(lanes)
        for lane in range(lanes):
            m.d.comb += lane_bad[lane].eq(Cat(diff.word_select(b, 8) for b in range(lane, dw // 8, lanes)).any())
        passing = Signal(lanes)                   # lanes right in every word of the current test
        with m.If(got_valid):
            m.d.sync += passing.eq(passing & ~lane_bad)

        # -- the sweep and the per-lane window search ---------------------------------------------------
        bs = Signal(range(nb))
        dly = Signal(range(nd))
        run_start = [Signal(range(nd), name=f"run_start{lane}") for lane in range(lanes)]
        run_len = [Signal(range(nd + 1), name=f"run_len{lane}") for lane in range(lanes)]
        best_bs = [Signal(range(nb), name=f"best_bs{lane}") for lane in range(lanes)]
        best_start = [Signal(range(nd), name=f"best_start{lane}") for lane in range(lanes)]
        best_len = [Signal(range(nd + 1), name=f"best_len{lane}") for lane in range(lanes)]
        for lane in range(lanes):
            m.d.comb += [self.settings[lane].bitslip.eq(best_bs[lane]),
                         self.settings[lane].delay.eq(best_start[lane] + ((best_len[lane] - 1) >> 1)),
                         self.settings[lane].window.eq(best_len[lane])]

        # -- adjustments ----------------------------------------------------------------------------------
        adj_sel = Signal(lanes)
        adj_rst_bs, adj_rst_dly = Signal(), Signal()
        adj_inc_bs = Signal(range(nb))
        adj_inc_dly = Signal(range(nd))
        counter = Signal(range(max(self._guard, self._settle, self._timeout) + 1))
        apply_lane = Signal(range(lanes))
        verifying = Signal()                      # the final check (else the sweep, or applying)
        applying = Signal()

        def adjust(sel, *, rst_bs=0, rst_dly=0, inc_bs=0, inc_dly=0):
            m.d.sync += [adj_sel.eq(sel), adj_rst_bs.eq(rst_bs), adj_rst_dly.eq(rst_dly),
                         adj_inc_bs.eq(inc_bs), adj_inc_dly.eq(inc_dly), counter.eq(self._guard - 1)]
            m.next = "ADJ_SELECT"

        def start_test():
            m.d.sync += [cmd_n.eq(0), rd_n.eq(0), passing.eq(all_lanes), counter.eq(self._timeout - 1)]
            m.d.comb += phy.burstdet_clr.eq(1)
            m.next = "TEST"

        with m.FSM():
            with m.State("WAIT_INIT"):
                with m.If(self.init_done):
                    m.d.sync += [cmd_n.eq(0), wd_n.eq(0), counter.eq(self._timeout - 1)]
                    m.next = "WRITE"

            with m.State("WRITE"):
                m.d.comb += [cmd_valid.eq(cmd_n != words), cmd_we.eq(1), wdata_valid.eq(wd_n != words)]
                with m.If(native.cmd_ready & (cmd_n != words)):
                    m.d.sync += cmd_n.eq(cmd_n + 1)
                with m.If(native.wdata_ready & (wd_n != words)):
                    m.d.sync += wd_n.eq(wd_n + 1)
                m.d.sync += counter.eq(counter - 1)
                with m.If((cmd_n == words) & (wd_n == words)):
                    m.d.sync += [bs.eq(0), dly.eq(0)]
                    adjust(all_lanes, rst_bs=1, rst_dly=1)
                with m.Elif(counter == 0):
                    m.next = "ERROR"

            with m.State("ADJ_SELECT"):
                m.d.comb += phy.dly_sel.eq(adj_sel)
                m.d.sync += counter.eq(counter - 1)
                with m.If(counter == 0):
                    m.next = "ADJ_RESET"

            with m.State("ADJ_RESET"):
                m.d.comb += [phy.dly_sel.eq(adj_sel), phy.rdly_dq_bitslip_rst.eq(adj_rst_bs),
                             phy.rdly_dq_rst.eq(adj_rst_dly)]
                m.next = "ADJ_STEP"

            with m.State("ADJ_STEP"):
                m.d.comb += phy.dly_sel.eq(adj_sel)
                with m.If(adj_inc_bs != 0):
                    m.d.comb += phy.rdly_dq_bitslip.eq(1)
                    m.d.sync += adj_inc_bs.eq(adj_inc_bs - 1)
                with m.Elif(adj_inc_dly != 0):
                    m.d.comb += phy.rdly_dq_inc.eq(1)
                    m.d.sync += adj_inc_dly.eq(adj_inc_dly - 1)
                with m.Else():
                    m.d.sync += counter.eq(self._guard - 1)
                    m.next = "ADJ_DESELECT"

            with m.State("ADJ_DESELECT"):
                m.d.comb += phy.dly_sel.eq(adj_sel)
                m.d.sync += counter.eq(counter - 1)
                with m.If(counter == 0):
                    m.d.sync += counter.eq(self._settle - 1)
                    m.next = "SETTLE"

            with m.State("SETTLE"):
                m.d.sync += counter.eq(counter - 1)
                with m.If(counter == 0):
                    with m.If(applying):
                        with m.If(apply_lane == lanes - 1):
                            m.d.sync += [applying.eq(0), verifying.eq(1)]
                            start_test()
                        with m.Else():
                            m.d.sync += apply_lane.eq(apply_lane + 1)
                            m.next = "APPLY"
                    with m.Else():
                        start_test()

            with m.State("TEST"):
                m.d.comb += [cmd_valid.eq(cmd_n != words), cmd_we.eq(0)]
                with m.If(native.cmd_ready & (cmd_n != words)):
                    m.d.sync += cmd_n.eq(cmd_n + 1)
                with m.If(native.rdata_valid & (rd_n != words)):
                    m.d.sync += [rd_n.eq(rd_n + 1), got_valid.eq(1)]
                m.d.sync += counter.eq(counter - 1)
                with m.If((rd_n == words) & ~got_valid):
                    m.next = "JUDGE"
                with m.Elif(counter == 0):
                    m.next = "ERROR"

            with m.State("JUDGE"):
                ok = Signal(lanes)
                m.d.comb += ok.eq(passing & phy.burstdet_seen if self._burstdet else passing)
                with m.If(verifying):
                    with m.If(ok == all_lanes):
                        m.d.sync += self.ready.eq(1)
                        m.next = "READY"
                    with m.Else():
                        m.next = "ERROR"
                with m.Else():
                    for lane in range(lanes):
                        self._record(m, lane, ok[lane], bs, dly, run_start[lane], run_len[lane],
                                     best_bs[lane], best_start[lane], best_len[lane])
                    with m.If(dly != nd - 1):
                        m.d.sync += dly.eq(dly + 1)
                        adjust(all_lanes, inc_dly=1)
                    with m.Elif(bs != nb - 1):
                        m.d.sync += [bs.eq(bs + 1), dly.eq(0)]
                        adjust(all_lanes, rst_dly=1, inc_bs=1)
                    with m.Else():
                        m.next = "DECIDE"

            with m.State("DECIDE"):
                with m.If(Cat(length == 0 for length in best_len).any()):
                    m.next = "ERROR"
                with m.Else():
                    m.d.sync += [applying.eq(1), apply_lane.eq(0)]
                    m.next = "APPLY"

            with m.State("APPLY"):
                adjust(Const(1, lanes) << apply_lane, rst_bs=1, rst_dly=1,
                       inc_bs=Array(self.settings[lane].bitslip for lane in range(lanes))[apply_lane],
                       inc_dly=Array(self.settings[lane].delay for lane in range(lanes))[apply_lane])

            with m.State("READY"):
                pass

            with m.State("ERROR"):
                m.d.sync += self.error.eq(1)
        return m

    def _record(self, m, lane, ok, bs, dly, run_start, run_len, best_bs, best_start, best_len):
        """One lane's window search after a sweep test (the run restarts at each bitslip)."""
        nd = self._delays
        m.d.sync += self.windows[lane].bit_select(bs * nd + dly, 1).eq(ok)
        length = Signal(range(nd + 1), name=f"length{lane}")
        start = Signal(range(nd), name=f"start{lane}")
        m.d.comb += [length.eq(run_len + 1), start.eq(run_start)]
        with m.If(run_len == 0):
            m.d.comb += start.eq(dly)
        with m.If(ok):
            m.d.sync += [run_start.eq(start), run_len.eq(length)]
            with m.If(length > best_len):
                m.d.sync += [best_bs.eq(bs), best_start.eq(start), best_len.eq(length)]
        with m.If(~ok | (dly == nd - 1)):
            m.d.sync += run_len.eq(0)
