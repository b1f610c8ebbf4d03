"""8N1 UART: a transmitter and a receiver with ``amaranth.lib.stream`` byte ports.

Both cores run in the ``sync`` domain and time bits with an integer clock divider,
``divisor = round(clk_freq / baud)`` clock cycles per bit. :func:`uart_divisor` refuses a
clock/baud pair whose rounding error exceeds ``max_error`` (2.5 % by default): 8N1 framing
samples the stop bit 9.5 bit times after the start edge, so the two ends of a link together
may drift by less than 0.5 / 9.5 ~= 5 %, and each end gets half of that.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTTransmitter", "UARTReceiver", "uart_divisor", "baud_error", "MAX_BAUD_ERROR",
           "MIN_DIVISOR"]

MAX_BAUD_ERROR = 0.025
# the receiver needs a few cycles per bit: a 2-stage synchroniser delay and a half-bit wait
MIN_DIVISOR = 4


def baud_error(clk_freq: float, baud: float, divisor: int) -> float:
    """Relative error of the bit rate a divisor gives: ``(clk_freq / divisor - baud) / baud``."""
    return (clk_freq / divisor - baud) / baud


def uart_divisor(clk_freq: float, baud: float, max_error: float = MAX_BAUD_ERROR) -> int:
    """Clock cycles per bit for ``baud`` at ``clk_freq``; ValueError if the error is too large.

    The message states the numbers (divisor, actual rate, error) and what to change.
    """
    if not clk_freq > 0 or not baud > 0:
        raise ValueError(f"clock frequency and baud rate must be positive, got {clk_freq} Hz and {baud} baud")
    divisor = max(1, round(clk_freq / baud))
    if divisor < MIN_DIVISOR:
        raise ValueError(f"{baud:g} baud needs at least {MIN_DIVISOR} clock cycles per bit; "
                         f"a {clk_freq / 1e6:g} MHz clock gives {clk_freq / baud:.2f}: "
                         f"use a baud rate of at most {clk_freq / MIN_DIVISOR:.0f} or a faster clock")
    err = baud_error(clk_freq, baud, divisor)
    if abs(err) > max_error:
        raise ValueError(f"{baud:g} baud at {clk_freq / 1e6:g} MHz: divisor {divisor} gives "
                         f"{clk_freq / divisor:.0f} baud, {100 * err:+.2f} % off (limit "
                         f"{100 * max_error:g} %); choose a clock that is a multiple of the baud rate "
                         f"or another baud rate")
    return divisor


class UARTTransmitter(wiring.Component):
    """8N1 serial transmitter.

    Members
    -------
    data : In(stream.Signature(8))
        Bytes to send. ``ready`` is high while the line is idle and in the last cycle of a stop
        bit, so back-to-back bytes leave with no gap (one byte every ``10 * divisor`` cycles).
    tx : Out(1, init=1)
        The serial line, registered; idles high.

    Parameters
    ----------
    clk_freq, baud : the divider is ``uart_divisor(clk_freq, baud, max_error)``.
    """

    def __init__(self, *, clk_freq: float, baud: float, max_error: float = MAX_BAUD_ERROR):
        self.divisor = uart_divisor(clk_freq, baud, max_error)
        super().__init__({
            "data": In(stream.Signature(unsigned(8))),
            "tx": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        timer = Signal(range(self.divisor))
        # bits still to send after the one on the line: 8 data bits + stop bit
        bits_left = Signal(range(10))
        shreg = Signal(9)
        busy = Signal()

        last_cycle = busy & (timer == 0) & (bits_left == 0)
        m.d.comb += self.data.ready.eq(~busy | last_cycle)

        with m.If(busy):
            with m.If(timer == 0):
                with m.If(bits_left == 0):
                    m.d.sync += busy.eq(0)
                with m.Else():
                    m.d.sync += [
                        self.tx.eq(shreg[0]),
                        shreg.eq(shreg >> 1),
                        bits_left.eq(bits_left - 1),
                        timer.eq(self.divisor - 1),
                    ]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)

        with m.If(self.data.valid & self.data.ready):
            m.d.sync += [
                busy.eq(1),
                self.tx.eq(0),  # start bit
                shreg.eq(Cat(self.data.payload, 1)),
                bits_left.eq(9),
                timer.eq(self.divisor - 1),
            ]
        return m


class UARTReceiver(wiring.Component):
    """8N1 serial receiver with a 2-flip-flop synchroniser and mid-bit sampling.

    A falling edge starts a frame; the start bit is checked half a bit later (a glitch shorter
    than that is ignored), then every bit is sampled one bit time apart, near its middle.

    Members
    -------
    rx : In(1, init=1)
        The serial line (asynchronous to the clock).
    data : Out(stream.Signature(8))
        Received bytes. The output holds one byte; a byte that completes while the previous one
        is still waiting is dropped and ``overrun`` pulses.
    framing_error : Out(1)
        One-cycle pulse when a stop bit reads low; that byte is dropped and the receiver waits
        for the line to go high (so a break produces one error, not a stream of zero bytes).
    overrun : Out(1)
        One-cycle pulse when a byte is dropped because ``data`` was not taken in time.

    Parameters
    ----------
    clk_freq, baud : the divider is ``uart_divisor(clk_freq, baud, max_error)``.
    """

    def __init__(self, *, clk_freq: float, baud: float, max_error: float = MAX_BAUD_ERROR):
        self.divisor = uart_divisor(clk_freq, baud, max_error)
        super().__init__({
            "rx": In(1, init=1),
            "data": Out(stream.Signature(unsigned(8))),
            "framing_error": Out(1),
            "overrun": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rx = Signal(init=1)
        m.submodules.rx_sync = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(self.divisor))
        bit = Signal(range(8))
        shreg = Signal(8)

        m.d.sync += [self.framing_error.eq(0), self.overrun.eq(0)]
        with m.If(self.data.ready):
            m.d.sync += self.data.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(self.divisor // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer == 0):
                    with m.If(~rx):
                        m.d.sync += [timer.eq(self.divisor - 1), bit.eq(0)]
                        m.next = "DATA"
                    with m.Else():
                        m.next = "IDLE"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], rx)), timer.eq(self.divisor - 1), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("STOP"):
                with m.If(timer == 0):
                    with m.If(rx):
                        with m.If(self.data.valid & ~self.data.ready):
                            m.d.sync += self.overrun.eq(1)
                        with m.Else():
                            m.d.sync += [self.data.payload.eq(shreg), self.data.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.framing_error.eq(1)
                        m.next = "BREAK"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("BREAK"):
                with m.If(rx):
                    m.next = "IDLE"
        return m
