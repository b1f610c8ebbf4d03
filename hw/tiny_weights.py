"""The tiny engine's weight memory: the image in 16-bit words, written a byte at a time from the
``load`` stream, read by the datapath and the matrix unit.

Two stores with one signature (:class:`WeightStore`): :class:`BlockRamWeights` (an Amaranth
memory, optionally with initial contents: simulation) and :class:`SpramWeights` (the
iCE40UP5K's ``SB_SPRAM256KA`` blocks, 16 Ki words each, no initial contents).
:func:`weight_store` picks one.
"""

from __future__ import annotations

import abc

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree_fpga.errors import DesignError

from .tiny_isa import B_BITS
from .weight_port import SPRAM_MAX, SPRAM_WORDS, spram_block

__all__ = ["WeightStore", "BlockRamWeights", "SpramWeights", "weight_store", "WORD_ADDR_BITS"]

WORD_ADDR_BITS = B_BITS - 1      # a 16-bit word's address (byte address >> 1)


class WeightStore(wiring.Component, metaclass=abc.ABCMeta):
    """The weight image as ``depth`` 16-bit words (byte ``2k`` in bits 7:0 of word ``k``).

    Members
    -------
    load : In(stream.Signature(8))
        Image bytes, in order from the write pointer; taken while ``accept``. A byte is written
        in the cycle after it was taken, from registers.
    accept : In(1)
        ``load`` may be taken this cycle (``load.ready`` follows it).
    rewind : In(1)
        The write pointer returns to byte 0 (``LOAD_RESET``).
    raddr : In(WORD_ADDR_BITS)
        The word to read; ``rdata`` has it one cycle later. Ignored in the cycle a byte is
        written (the reader must not read then: the engine takes bytes only while idle).
    rdata : Out(16)
        The word ``raddr`` named in the cycle before.
    """

    def __init__(self, depth: int):
        self.depth = depth
        super().__init__({"load": In(stream.Signature(8)), "accept": In(1), "rewind": In(1),
                          "raddr": In(WORD_ADDR_BITS), "rdata": Out(16)})

    def elaborate(self, platform):
        m = Module()
        wptr = Signal(B_BITS)
        we = Signal()                     # a byte is written this cycle, from these registers
        waddr = Signal(WORD_ADDR_BITS)
        wbyte = Signal(8)
        wlane = Signal()
        m.d.comb += self.load.ready.eq(self.accept)
        m.d.sync += we.eq(0)
        with m.If(self.accept & self.load.valid):
            m.d.sync += [we.eq(1), waddr.eq(wptr[1:]), wbyte.eq(self.load.payload), wlane.eq(wptr[0]),
                         wptr.eq(wptr + 1)]
        with m.If(self.rewind):
            m.d.sync += wptr.eq(0)
        addr = Signal(WORD_ADDR_BITS)
        m.d.comb += addr.eq(Mux(we, waddr, self.raddr))
        self.memory(m, addr, we, waddr, wbyte, wlane)
        return m

    @abc.abstractmethod
    def memory(self, m: Module, addr, we, waddr, wbyte, wlane):
        """Add the memory: read ``addr`` into ``rdata`` a cycle later; while ``we`` write
        ``wbyte`` into lane ``wlane`` of word ``addr`` (= ``waddr``, a register)."""


class BlockRamWeights(WeightStore):
    """The weight store in an Amaranth memory (block RAM); ``image``: its initial contents
    (bytes; None: zeros)."""

    def __init__(self, depth: int, image: bytes | None = None):
        self.image = image
        super().__init__(depth)

    def memory(self, m, addr, we, waddr, wbyte, wlane):
        init = []
        if self.image is not None:
            blob = bytes(self.image) + bytes(2 * self.depth - len(self.image))
            init = [blob[2 * k] | (blob[2 * k + 1] << 8) for k in range(self.depth)]
        m.submodules.mem = mem = Memory(shape=16, depth=self.depth, init=init)
        rp = mem.read_port()
        wp = mem.write_port(granularity=8)
        m.d.comb += [rp.addr.eq(addr), wp.addr.eq(addr), self.rdata.eq(rp.data),
                     wp.data.eq(Cat(wbyte, wbyte)), wp.en.eq(Mux(we, Mux(wlane, 0b10, 0b01), 0))]


class SpramWeights(WeightStore):
    """The weight store in ``SB_SPRAM256KA`` blocks (as many as ``depth`` needs). The blocks'
    write enables are decoded from the write's own address register, not from the read address
    multiplexer, keeping that multiplexer off the write-enable paths."""

    def __init__(self, depth: int):
        if depth > SPRAM_WORDS * SPRAM_MAX:
            raise DesignError(f"the weight image ({2 * depth} bytes) does not fit the iCE40UP5K's "
                            f"{SPRAM_MAX} SPRAMs ({2 * SPRAM_WORDS * SPRAM_MAX} bytes)")
        super().__init__(depth)

    def memory(self, m, addr, we, waddr, wbyte, wlane):
        blocks = -(-self.depth // SPRAM_WORDS)
        lo = (SPRAM_WORDS - 1).bit_length()
        bank = addr[lo:lo + 2] if blocks > 1 else Const(0, 1)
        wbank = waddr[lo:lo + 2] if blocks > 1 else Const(0, 1)
        bank_r = Signal.like(bank)
        m.d.sync += bank_r.eq(bank)
        outs = []
        for b in range(blocks):
            dout = Signal(16, name=f"spram{b}_out")
            m.submodules[f"spram{b}"] = spram_block(addr[:lo], Cat(wbyte, wbyte),
                                                    Mux(wlane, Const(0b1100, 4), Const(0b0011, 4)),
                                                    we & (wbank == b), dout)
            outs.append(dout)
        with m.Switch(bank_r):
            for b in range(blocks):
                with m.Case(b):
                    m.d.comb += self.rdata.eq(outs[b])


def weight_store(depth: int, *, image: bytes | None = None, spram: bool = False) -> WeightStore:
    """The store of ``depth`` words: SPRAM blocks (``spram``; no initial contents, so ``image``
    must be None) or block RAM with ``image`` as its initial contents."""
    if spram:
        if image is not None:
            raise ValueError("SPRAM has no initial contents: image must be None")
        return SpramWeights(depth)
    return BlockRamWeights(depth, image)
