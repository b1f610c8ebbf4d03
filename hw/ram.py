"""Block RAM read ports without read/write collision logic.

Amaranth's synchronous read ports ask for the old data when the same address is written in the
same cycle, and reach Yosys already merged with their register, so Yosys adds collision logic
behind the RAM (on ECP5 a multiplexer and an address comparator after the block RAM's slow
output). A memory whose ports never read an address written in the same cycle can say so with
:data:`NO_RW_CHECK` and be read through :func:`registered_read_port`.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Signal

__all__ = ["NO_RW_CHECK", "registered_read_port", "address_registered_read_port"]

# Memory attribute: Yosys need not make reads of an address written in the same cycle return
# the old data (the designs that set it never do that), so no collision logic goes behind a
# block RAM's output. Simulation keeps Amaranth's semantics. Yosys honours it only on read ports
# that it builds itself from an asynchronous port and a register (memory_dff), hence
# :func:`registered_read_port`.
NO_RW_CHECK = {"no_rw_check": 1}


def registered_read_port(m, memory):
    """A synchronous read port of ``memory`` (``addr``, ``en``, ``data``; the same behaviour as
    ``memory.read_port()``: one cycle latency, ``data`` held while ``en`` is low, old contents
    on a same-cycle write) made of an asynchronous port and a register, which Yosys merges into
    a block RAM port without collision logic when the memory has :data:`NO_RW_CHECK`
    (Amaranth's synchronous ports reach Yosys already merged, and get the logic: on ECP5 a
    multiplexer and an address comparator behind the block RAM's slow output)."""
    port = memory.read_port(domain="comb")
    en = Signal(init=1)
    data = Signal.like(port.data, reset_less=True)
    with m.If(en):
        m.d.sync += data.eq(port.data)
    return SimpleNamespace(addr=port.addr, en=en, data=data)


def address_registered_read_port(m, memory):
    """A one-cycle-latency read port of a LUT RAM (``addr``, ``en``, ``data``) whose register is on
    the address instead of the data: ``data`` is ``memory[address latched while en]``, so the
    address logic ends at a register and the RAM's read and its multiplexer start the next cycle
    (as one registered read, the address logic, the read and the multiplexer were one path: the
    engine's parameter RAM read from the fetcher's state, the ULX3S engine's critical path at 64
    lanes). Not for block RAM, and a write to the latched address shows at once: for memories
    written only while nothing reads them."""
    port = memory.read_port(domain="comb")
    en = Signal(init=1)
    addr_in = Signal.like(port.addr)
    latched = Signal.like(port.addr, reset_less=True)
    with m.If(en):
        m.d.sync += latched.eq(addr_in)
    m.d.comb += port.addr.eq(latched)
    return SimpleNamespace(addr=addr_in, en=en, data=port.data)
