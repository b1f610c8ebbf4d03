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

__all__ = ["NO_RW_CHECK", "registered_read_port"]

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
