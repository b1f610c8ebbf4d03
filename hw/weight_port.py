"""The weight port: how the engine reads ``weights.bin``, whatever memory holds it.

One abstraction for every board and for simulation: a *request* stream of (word address,
length in beats) and a *response* stream of beats of ``beat_bytes`` bytes, in request order,
with arbitrary latency and stalls. Word ``n`` holds image bytes ``[n * beat_bytes, (n + 1) *
beat_bytes)``, byte 0 in the low bits. The engine keeps several requests in flight, so a
memory that pipelines them hides its latency.

Implementations (one component, :class:`WeightMemory`, three back ends):

* on-chip RAM initialised from the exported image (``init=`` the image bytes): small models,
  ECP5 block RAM, and Amaranth's own simulator;
* on-chip RAM written only through ``write`` (``init=None``): boards whose RAM has no initial
  contents; the engine's load stream drives ``write``. On an iCE40 platform (or with
  ``spram=True``) this store is made of ``SB_SPRAM256KA`` instances (16k x 16 bits each, at most
  four on the UP5K), which Yosys does not infer by itself: one address for reads and writes
  (writes win; the engine does not read while it loads);
* on an ECP5 platform (or with ``dp16kd=True``) a banked block-RAM store is made of ``DP16KD``
  instances with their output register (``REGMODE_B="OUTREG"``), which Yosys's block-RAM mapping
  never uses: the same read latency as the generic banked store, whose first register it
  replaces (:func:`_dp16kd_store`);
* ``readmemh=True``: a Verilog memory (:data:`STORE_VERILOG`) that reads the image at time 0
  from the file named by the plusarg ``+weights=FILE`` (:func:`write_hex`), so one simulator
  build serves every image and no Python runs per word.

``model=True`` puts a memory model in front of the store, for projecting tokens/s on boards
with external DRAM: a bandwidth limit (``bandwidth``, bytes per cycle in Q8; 0 = one beat per
cycle), a latency (``latency`` cycles from reading a beat to offering it) and random stalls of
the response (``stall_rate``/256 of the cycles, from an LFSR). ``synthetic`` makes every beat a
hash of its address instead of the store's contents: pseudo-random trits for geometries too large
to hold (cycle counts only; the tokens are meaningless). These are run-time inputs, so one build
covers every setting.

Read-back: :class:`WeightReader` sits between the engine and its memory (any of the above, or
a DRAM behind its adapter) and, while the engine is idle, takes the port over to read the image
back from word 0 as a byte stream (:class:`ReadbackSignature`): the Link's VERIFY_IMAGE runs
those bytes through its image CRC.
"""

from __future__ import annotations

from pathlib import Path

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .ram import NO_RW_CHECK, registered_read_port

__all__ = ["ADDR_BITS", "LEN_BITS", "weight_request_layout", "weight_port_signature", "write_layout",
           "WeightMemory", "spram_banks", "image_words", "write_hex", "STORE_VERILOG", "STORE_MODULE",
           "readback_layout", "ReadbackSignature", "WeightReader"]

ADDR_BITS = 28      # word address
LEN_BITS = 24       # beats per request

STORE_MODULE = "mmfree_weight_store"
STORE_VERILOG = """\
// Weight store of mmfree-fpga simulations: a synchronous RAM that loads +weights=FILE
// ($readmemh, one word per line) at time 0. Written by hw/weight_port.py.
module mmfree_weight_store #(parameter WIDTH = 32, parameter DEPTH = 1024, parameter ABITS = 10) (
    input clk,
    input [ABITS-1:0] raddr,
    output reg [WIDTH-1:0] rdata,
    input we,
    input [ABITS-1:0] waddr,
    input [WIDTH-1:0] wdata
);
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    reg [8*1024-1:0] path;
    initial begin
        if ($value$plusargs("weights=%s", path)) $readmemh(path, mem);
    end
    always @(posedge clk) begin
        if (we) mem[waddr] <= wdata;
        rdata <= mem[raddr];
    end
endmodule
"""


def weight_request_layout() -> data.StructLayout:
    return data.StructLayout({"addr": unsigned(ADDR_BITS), "length": unsigned(LEN_BITS)})


def weight_port_signature(beat_bytes: int) -> wiring.Signature:
    """The master's view (the engine): ``req`` out, ``resp`` in."""
    return wiring.Signature({
        "req": Out(stream.Signature(weight_request_layout())),
        "resp": In(stream.Signature(data.ArrayLayout(unsigned(8), beat_bytes))),
    })


def write_layout(beat_bytes: int) -> data.StructLayout:
    """A word write from the load stream: ``en``, word ``addr``, ``data``."""
    return data.StructLayout({"en": 1, "addr": unsigned(ADDR_BITS), "data": unsigned(8 * beat_bytes)})


def image_words(blob: bytes, beat_bytes: int) -> list[int]:
    """The image as memory words (the last one zero-padded)."""
    blob = bytes(blob) + bytes(-len(blob) % beat_bytes)
    return [int.from_bytes(blob[k:k + beat_bytes], "little") for k in range(0, len(blob), beat_bytes)]


def write_hex(blob: bytes, beat_bytes: int, path) -> Path:
    """A ``$readmemh`` file of the image for the ``readmemh`` store."""
    path = Path(path)
    digits = 2 * beat_bytes
    path.write_text("".join(f"{w:0{digits}x}\n" for w in image_words(blob, beat_bytes)))
    return path


class WeightMemory(wiring.Component):
    """A word memory behind the weight port (see the module docstring).

    Parameters
    ----------
    beat_bytes : int
        Bytes per word and per response beat.
    depth : int
        Words of storage.
    init : bytes or None
        Initial contents (the image); ignored with ``readmemh``.
    readmemh : bool
        Use the Verilog store that reads ``+weights=FILE`` (simulation of generated Verilog).
    model : bool
        Add the bandwidth/latency/stall/synthetic model (the run-time inputs below).
    fifo_depth : int or None
        Beats the response FIFO holds: with the model, the largest latency at full rate;
        without it, 3 sustain one beat per cycle from a store of one block (more from a banked
        store, whose reads take 3 cycles: :data:`RAM_BANK_WORDS`). None: 64 with the model,
        else :data:`STORE_FIFO_DEPTH`.
    spram : bool or None
        Build the store from iCE40 SPRAM instances (needs ``init=None``, no ``readmemh``);
        None: when elaborated for an iCE40 platform with ``init=None``.
    dp16kd : bool or None
        Build a banked store (``depth`` > :data:`RAM_BANK_WORDS`) from ECP5 ``DP16KD``
        instances with their output register (no ``readmemh``, no ``spram``); None: when
        elaborated for an ECP5 platform and the store is banked.

    Members
    -------
    port : In(weight_port_signature(beat_bytes))
        ``req`` accepted while no request is being read (a request of length 0 is dropped);
        ``resp`` one beat per word.
    write : In(write_layout(beat_bytes))
        Word writes (the engine's image loader).
    bandwidth, latency, stall_rate, synthetic : In(...)
        Only with ``model``: Q8 bytes/cycle (0: unlimited), cycles, stall probability x256,
        hash data instead of stored data.

    Testbench observation point (not a port): ``memories``, once elaborated, the ``Memory``
    components of a generic RAM store in bank order (word ``w`` is entry ``w % RAM_BANK_WORDS``
    of bank ``w // RAM_BANK_WORDS``); empty for SPRAM, DP16KD and readmemh stores.
    """

    def __init__(self, *, beat_bytes: int, depth: int, init: bytes | None = None,
                 readmemh: bool = False, model: bool = False, fifo_depth: int | None = None,
                 spram: bool | None = None, dp16kd: bool | None = None):
        self._beat_bytes = beat_bytes
        self._depth = depth
        self._init = init
        self._readmemh = readmemh
        self._model = model
        self._fifo_depth = fifo_depth if fifo_depth is not None else 64 if model else STORE_FIFO_DEPTH
        self._spram = spram
        self._dp16kd = dp16kd
        self.memories: list[Memory] = []
        if dp16kd and (readmemh or spram or depth <= RAM_BANK_WORDS):
            raise ValueError(f"a DP16KD store is a banked block-RAM store: depth > {RAM_BANK_WORDS} "
                             "words, without readmemh or spram")
        if spram and (init is not None or readmemh):
            raise ValueError("an SPRAM store has no initial contents: use init=None without readmemh")
        if spram:
            spram_banks(8 * beat_bytes, depth)      # raises when it does not fit
        if init is not None and len(image_words(init, beat_bytes)) > depth:
            raise ValueError(f"the image ({len(init)} bytes) does not fit {depth} words of {beat_bytes} bytes")
        members = {
            "port": In(weight_port_signature(beat_bytes)),
            "write": In(write_layout(beat_bytes)),
        }
        if model:
            members.update({"bandwidth": In(16), "latency": In(16), "stall_rate": In(8), "synthetic": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        wb = self._beat_bytes
        width = 8 * wb
        abits = max(1, (self._depth - 1).bit_length())

        raddr = Signal(abits)
        rdata = Signal(width)
        read_latency = 1                      # cycles from raddr to rdata
        spram = self._spram
        if spram is None:
            spram = (self._init is None and not self._readmemh
                     and getattr(platform, "family", None) == "ice40")
        if spram:
            _spram_store(m, width, self._depth, raddr, rdata, self.write.en, self.write.addr[:abits],
                         self.write.data)
        elif self._readmemh:
            m.submodules.store = Instance(
                STORE_MODULE, p_WIDTH=width, p_DEPTH=self._depth, p_ABITS=abits,
                i_clk=ClockSignal("sync"), i_raddr=raddr, o_rdata=rdata,
                i_we=self.write.en, i_waddr=self.write.addr[:abits], i_wdata=self.write.data)
        else:
            init = image_words(self._init, wb) if self._init is not None else []
            dp16kd = self._dp16kd
            if dp16kd is None:
                dp16kd = self._depth > RAM_BANK_WORDS and getattr(platform, "family", None) == "ecp5"
            self.memories = []
            if dp16kd:
                read_latency = _dp16kd_store(m, width, self._depth, init, raddr, rdata, self.write.en,
                                             self.write.addr[:abits], self.write.data)
            else:
                read_latency = _ram_store(m, width, self._depth, init, raddr, rdata, self.write.en,
                                          self.write.addr[:abits], self.write.data, self.memories)

        # -- the reader: one word per cycle while a request lasts --------------------------------
        busy = Signal()
        addr = Signal(ADDR_BITS)
        left = Signal(LEN_BITS)
        req = self.port.req
        m.d.comb += req.ready.eq(~busy)
        with m.If(req.valid & req.ready & (req.payload.length != 0)):
            m.d.sync += [busy.eq(1), addr.eq(req.payload.addr), left.eq(req.payload.length)]

        depth = self._fifo_depth
        now = Signal(32)
        m.d.sync += now.eq(now + 1)
        entry = data.StructLayout({"data": unsigned(width), "due": unsigned(32 if self._model else 0)})
        # (buffered, except for the SPRAM store of the small iCE40 builds: the response beat comes
        # from a register, not from a LUT RAM's read multiplexer)
        fifo_cls = SyncFIFO if spram else SyncFIFOBuffered
        m.submodules.fifo = fifo = fifo_cls(width=entry.size, depth=depth)
        beat = stream.Signature(unsigned(width)).create(path=("beat",))     # the FIFO's output
        may_issue = Signal()
        issue = busy & may_issue
        m.d.comb += raddr.eq(addr[:abits])
        with m.If(issue):
            m.d.sync += [addr.eq(addr + 1), left.eq(left - 1)]
            with m.If(left == 1):
                m.d.sync += busy.eq(0)
        # The store's read data is registered once (`word`) before the FIFO: a store of many block
        # RAMs ends in a wide output multiplexer behind the RAMs' slow clock-to-out (ECP5).
        # (a banked store adds two cycles: `inflight` is then three stages)
        flight = [Signal(name=f"inflight{k}") for k in range(read_latency)]
        read_addrs = [Signal(ADDR_BITS, name=f"read_addr{k}") for k in range(read_latency)]
        m.d.sync += [flight[0].eq(issue), read_addrs[0].eq(addr)]
        for k in range(1, read_latency):
            m.d.sync += [flight[k].eq(flight[k - 1]), read_addrs[k].eq(read_addrs[k - 1])]
        read_addr = read_addrs[-1]
        stored = Signal()                     # `word` holds a beat read read_latency + 1 cycles ago
        m.d.sync += stored.eq(flight[-1])
        in_pipe = sum(flight) + stored

        word = Signal(width, reset_less=True)
        if self._model:
            m.d.sync += word.eq(Mux(self.synthetic, _hash_word(read_addr, wb), rdata))
            credit = Signal(20)
            cost = wb << 8
            unlimited = self.bandwidth == 0
            m.d.comb += may_issue.eq((fifo.level + in_pipe < depth) & (unlimited | (credit >= cost)))
            gained = Mux(credit + self.bandwidth > 2 * cost, 2 * cost, credit + self.bandwidth)
            m.d.sync += credit.eq(Mux(issue & ~unlimited, gained - cost, gained))
            due = Signal(32)
            # + 1 cycle in `word`, + 1 in the output register (when there is one)
            m.d.sync += due.eq(now + self.latency - (1 if spram else 2))
            lfsr = Signal(16, init=0xACE1)
            m.d.sync += lfsr.eq(Cat(lfsr[1:], lfsr[0] ^ lfsr[2] ^ lfsr[3] ^ lfsr[5]))
            stall = lfsr[:8] < self.stall_rate
            out = Signal(entry)
            m.d.comb += out.eq(fifo.r_data)
            ready_time = (now - out.due)[-1] == 0          # now >= due, modulo 2^32
            m.d.comb += [
                beat.valid.eq(fifo.r_rdy & ready_time & ~stall),
                beat.payload.eq(out.data),
                fifo.r_en.eq(beat.ready & ready_time & ~stall),
            ]
            due_r = Signal(32)
            m.d.sync += due_r.eq(due)
            m.d.comb += [fifo.w_en.eq(stored), fifo.w_data.eq(Cat(word, due_r))]
        else:
            m.d.sync += word.eq(rdata)
            m.d.comb += may_issue.eq(fifo.level + in_pipe < depth)
            out = Signal(entry)
            m.d.comb += [
                out.eq(fifo.r_data),
                beat.valid.eq(fifo.r_rdy),
                beat.payload.eq(out.data),
                fifo.r_en.eq(beat.ready),
                fifo.w_en.eq(stored), fifo.w_data.eq(word),
            ]
        resp = self.port.resp
        if spram:
            wiring.connect(m, beat, wiring.flipped(resp))
        else:
            # the beat is registered once more before it leaves: the FIFO's storage (LUT RAM, or
            # a block RAM with its slow clock-to-out) would otherwise start a long path into the
            # beat's destinations, which are spread over the engine
            with m.If(beat.ready):
                m.d.sync += [resp.valid.eq(beat.valid), resp.payload.eq(beat.payload)]
            m.d.comb += beat.ready.eq(~resp.valid | resp.ready)
        return m


# Response FIFO of a store without the model: its reads take at most four cycles (a banked
# store's three and the word register), so 16 beats keep one beat per cycle flowing with room to
# spare; and 16 words are one column of LUT RAM on ECP5 (TRELLIS_DPR16X4), whose registered read
# data leaves fast, where a deeper FIFO becomes a block RAM with its slow clock-to-out.
STORE_FIFO_DEPTH = 16

# Words per bank of a block-RAM store. A deep store is split into banks of this many words, each
# bank's read data registered before the multiplexer that picks the addressed bank: on ECP5 the
# block RAM's clock-to-out (about 6 ns without its output register, which Yosys does not use) plus
# a multiplexer over many RAMs spread across the die would not fit one 100 MHz cycle. 1024 words
# is one DP16KD deep in its 18-bit mode (Yosys's choice for a wide store).
RAM_BANK_WORDS = 1024


def _banks(depth: int) -> tuple[int, int]:
    """(word-address bits within a bank, banks) of a banked store ``depth`` words deep."""
    return (RAM_BANK_WORDS - 1).bit_length(), -(-depth // RAM_BANK_WORDS)


def _bank_select(m, raddr, bb, outs, rdata):
    """``rdata`` := the bank output (``outs``, registered twice after the RAM) that the read
    address ``raddr`` named three cycles before (its bank bits delayed to match)."""
    n = len(outs)
    sel = Signal(range(n), name="bank_sel")
    sel_r = Signal(range(n), name="bank_sel_r")
    sel_rr = Signal(range(n), name="bank_sel_rr")
    m.d.sync += [sel.eq(raddr[bb:]), sel_r.eq(sel), sel_rr.eq(sel_r)]
    with m.Switch(sel_rr):
        for b in range(n):
            with m.Case(b):
                m.d.comb += rdata.eq(outs[b])


def _ram_store(m, width, depth, init, raddr, rdata, we, waddr, wdata, memories) -> int:
    """A synchronous RAM (``Memory``, initialised with ``init``), in banks of
    :data:`RAM_BANK_WORDS` words when deeper than that (each appended to ``memories``); returns
    its read latency (1, or 3 when banked: bank outputs registered twice, then selected)."""
    if depth <= RAM_BANK_WORDS:
        m.submodules.store = store = Memory(shape=unsigned(width), depth=depth, init=init, attrs=NO_RW_CHECK)
        memories.append(store)
        rp = registered_read_port(m, store)
        wp = store.write_port()
        m.d.comb += [rp.addr.eq(raddr), rdata.eq(rp.data), wp.en.eq(we), wp.addr.eq(waddr), wp.data.eq(wdata)]
        return 1
    bb, n = _banks(depth)
    outs = []
    for b in range(n):
        words = min(RAM_BANK_WORDS, depth - b * RAM_BANK_WORDS)
        bank = Memory(shape=unsigned(width), depth=words,
                      init=init[b * RAM_BANK_WORDS:b * RAM_BANK_WORDS + words], attrs=NO_RW_CHECK)
        m.submodules[f"store{b}"] = bank
        memories.append(bank)
        rp = registered_read_port(m, bank)
        wp = bank.write_port()
        # two registers: the first has the RAM as its only source and the second as its only
        # sink, so the placer can put it beside the RAM (a single register is pulled towards the
        # multiplexer, leaving long routing behind the RAM's slow clock-to-out)
        q1 = Signal(width, name=f"bank{b}_q1", reset_less=True)
        q = Signal(width, name=f"bank{b}_q", reset_less=True)
        m.d.sync += [q1.eq(rp.data), q.eq(q1)]
        m.d.comb += [rp.addr.eq(raddr[:bb]), wp.en.eq(we & (waddr[bb:] == b)), wp.addr.eq(waddr[:bb]),
                     wp.data.eq(wdata)]
        outs.append(q)
    _bank_select(m, raddr, bb, outs, rdata)
    return 3


DP16KD_WIDTH = 18         # DP16KD in its 1024 x 18 mode: one bank of RAM_BANK_WORDS words
DP16KD_INIT_WORDS = 16    # words per INITVAL_xx parameter (each word in 20 bits)


def _dp16kd_store(m, width, depth, init, raddr, rdata, we, waddr, wdata) -> int:
    """The banked store of :func:`_ram_store` made of ECP5 ``DP16KD`` instances, 1024 x 18 bits
    each (port A writes, port B reads), read through the block RAM's output register: its
    clock-to-out is ~4 ns shorter than the RAM array's (which Yosys's mapping uses). The output
    register takes the place of the first of the generic store's two registers per bank, so the
    read latency is the same, 3. Bit, address and ``INITVAL`` conventions are those of Yosys's
    own DP16KD mapping (share/lattice/brams_map_16kd.v): in the x18 mode the word address is on
    AD[13:4], AD[1:0] are the byte write enables, and ``INITVAL_xx`` holds words 16 xx .. 16 xx
    + 15, word i in bits [20 i, 20 i + 18)."""
    bb, n = _banks(depth)
    slices = -(-width // DP16KD_WIDTH)
    padded = slices * DP16KD_WIDTH
    wdata_p = Signal(padded, name="dp16kd_wdata")
    m.d.comb += wdata_p.eq(wdata)
    mask = (1 << DP16KD_WIDTH) - 1
    outs = []
    for b in range(n):
        words = init[b * RAM_BANK_WORDS:(b + 1) * RAM_BANK_WORDS]
        wen = Signal(name=f"bank{b}_we")
        m.d.comb += wen.eq(we & (waddr[bb:] == b))
        douts = []
        for k in range(slices):
            dout = Signal(DP16KD_WIDTH, name=f"bank{b}_{k}_dout")
            params = {"DATA_WIDTH_A": 18, "DATA_WIDTH_B": 18, "REGMODE_A": "NOREG", "REGMODE_B": "OUTREG",
                      "RESETMODE": "SYNC", "ASYNC_RESET_RELEASE": "SYNC", "CSDECODE_A": "0b000",
                      "CSDECODE_B": "0b000", "WRITEMODE_A": "NORMAL", "WRITEMODE_B": "NORMAL", "GSR": "AUTO"}
            for j in range(RAM_BANK_WORDS // DP16KD_INIT_WORDS):
                v = 0
                for i in range(DP16KD_INIT_WORDS):
                    w = j * DP16KD_INIT_WORDS + i
                    if w < len(words):
                        v |= ((words[w] >> (k * DP16KD_WIDTH)) & mask) << (20 * i)
                params[f"INITVAL_{j:02X}"] = Const(v, 20 * DP16KD_INIT_WORDS)
            ports = {"CLKA": ClockSignal("sync"), "CLKB": ClockSignal("sync"),
                     "CEA": Const(1, 1), "OCEA": Const(1, 1), "WEA": wen, "RSTA": Const(0, 1),
                     "CEB": Const(1, 1), "OCEB": Const(1, 1), "WEB": Const(0, 1), "RSTB": Const(0, 1)}
            for c in range(3):
                ports[f"CSA{c}"] = ports[f"CSB{c}"] = Const(0, 1)
            for a in range(14):
                if a < 2:
                    ports[f"ADA{a}"], ports[f"ADB{a}"] = Const(1, 1), Const(0, 1)
                elif a < 4:
                    ports[f"ADA{a}"] = ports[f"ADB{a}"] = Const(0, 1)
                else:
                    ports[f"ADA{a}"], ports[f"ADB{a}"] = waddr[a - 4], raddr[a - 4]
            for d in range(DP16KD_WIDTH):
                ports[f"DIA{d}"] = wdata_p[k * DP16KD_WIDTH + d]
                ports[f"DIB{d}"] = Const(0, 1)
                ports[f"DOB{d}"] = dout[d]
            m.submodules[f"store{b}_{k}"] = Instance(
                "DP16KD", **{f"p_{name}": v for name, v in params.items()},
                **{(f"o_{name}" if name.startswith("DO") else f"i_{name}"): v for name, v in ports.items()})
            douts.append(dout)
        q = Signal(width, name=f"bank{b}_q", reset_less=True)
        m.d.sync += q.eq(Cat(*douts)[:width])
        outs.append(q)
    _bank_select(m, raddr, bb, outs, rdata)
    return 3


SPRAM_WORDS = 16384       # SB_SPRAM256KA: 16k words of 16 bits
SPRAM_WIDTH = 16
SPRAM_MAX = 4             # iCE40UP5K


def spram_banks(width: int, depth: int) -> tuple[int, int]:
    """(SPRAMs side by side, SPRAMs deep) for a ``width``-bit, ``depth``-word store; ValueError
    when that needs more than the UP5K's four."""
    wide, deep = -(-width // SPRAM_WIDTH), -(-depth // SPRAM_WORDS)
    if wide * deep > SPRAM_MAX:
        raise ValueError(f"a {depth} x {width}-bit store needs {wide * deep} iCE40 SPRAMs, "
                         f"the UP5K has {SPRAM_MAX}")
    return wide, deep


def spram_block(addr, din, maskwren, wren, dout) -> Instance:
    """One iCE40 ``SB_SPRAM256KA`` (16k x 16 bits, synchronous read): ``addr`` 14 bits, ``din`` /
    ``dout`` 16 bits, ``maskwren`` a 4-bit nibble write mask, ``wren`` the write enable; always
    selected and powered."""
    return Instance("SB_SPRAM256KA",
                    i_ADDRESS=addr, i_DATAIN=din, i_MASKWREN=maskwren, i_WREN=wren,
                    i_CHIPSELECT=Const(1, 1), i_CLOCK=ClockSignal("sync"), i_STANDBY=Const(0, 1),
                    i_SLEEP=Const(0, 1), i_POWEROFF=Const(1, 1), o_DATAOUT=dout)


def _spram_store(m, width, depth, raddr, rdata, we, waddr, wdata):
    """A synchronous RAM of SB_SPRAM256KA blocks: reads (one cycle latency) and writes share
    the address, writes win."""
    wide, deep = spram_banks(width, depth)
    abits = len(raddr)
    addr = Signal(max(abits, 14))
    m.d.comb += addr.eq(Mux(we, waddr, raddr))
    bank = addr[14:] if deep > 1 else Const(0, 1)
    bank_r = Signal.like(bank)
    m.d.sync += bank_r.eq(bank)
    outs = []
    for b in range(deep):
        sel = bank == b
        words = []
        for k in range(wide):
            dout = Signal(SPRAM_WIDTH, name=f"spram_{b}_{k}_out")
            din = Signal(SPRAM_WIDTH, name=f"spram_{b}_{k}_in")
            m.d.comb += din.eq(wdata[SPRAM_WIDTH * k:SPRAM_WIDTH * (k + 1)])
            m.submodules[f"spram_{b}_{k}"] = spram_block(addr[:14], din, Const(0xF, 4), we & sel, dout)
            words.append(dout)
        outs.append(Cat(*words)[:width])
    if deep == 1:
        m.d.comb += rdata.eq(outs[0])
    else:
        with m.Switch(bank_r):
            for b in range(deep):
                with m.Case(b):
                    m.d.comb += rdata.eq(outs[b])


def _hash_word(addr, beat_bytes: int):
    """Pseudo-random bytes from a word address: base3 bytes below 243, so every trit is used."""
    parts = []
    for k in range(beat_bytes):
        x = (addr * 0x9E3779B1 + (k + 1) * 0x85EBCA77)[:32]
        x = (x ^ (x >> 15))[:32]
        x = (x * 0x2C1B3C6D)[:32]
        b = (x >> 24)[:8]
        parts.append(Mux(b >= 243, b - 128, b)[:8])
    return Cat(*parts)



def readback_layout() -> data.StructLayout:
    """A read-back byte: ``byte`` and ``last`` (the last byte asked for)."""
    return data.StructLayout({"byte": unsigned(8), "last": unsigned(1)})


class ReadbackSignature(wiring.Signature):
    """Reading the stored image back, as the engine presents it (the Link holds the flipped side).

    Members
    -------
    start : In(stream.Signature(unsigned(32)))
        Read this many bytes (at least 1) from image byte 0; taken only while the engine is idle.
    data : Out(stream.Signature(readback_layout()))
        The bytes in order, ``last`` on the final one; one per cycle at most.
    """

    def __init__(self):
        super().__init__({
            "start": In(stream.Signature(unsigned(32))),
            "data": Out(stream.Signature(readback_layout())),
        })


class WeightReader(wiring.Component):
    """The weight port shared by the engine and a read-back of the image (module docstring).

    While no read-back runs, ``engine`` and ``memory`` are connected through (every member, one
    multiplexer level selected by a register). A ``start`` taken while ``idle`` takes the port
    over: it requests the image's words from 0 in requests of at most :attr:`BURST` beats and
    sends the bytes of each beat, lowest first, on ``data`` until the count asked for (the rest
    of the last beat is dropped); then the engine has the port again.

    Parameters: ``beat_bytes`` (bytes per beat of the port).

    Members
    -------
    engine : In(weight_port_signature(beat_bytes))
        The engine's side of the port (it makes the requests); stalled during a read-back.
    memory : Out(weight_port_signature(beat_bytes))
        To the memory.
    readback : Out(ReadbackSignature())
        The read-back (``start`` in, ``data`` out).
    idle : In(1)
        The engine has no request outstanding and makes none (it is between commands): a
        ``start`` is taken only then.
    busy : Out(1)
        A read-back is running.

    Throughput: ``beat_bytes`` bytes per ``beat_bytes + 1`` cycles while the memory keeps up.
    """

    BURST = 1 << 12        # beats per request (LEN_BITS allows more; this keeps the counts short)

    def __init__(self, *, beat_bytes: int):
        self.beat_bytes = beat_bytes
        super().__init__({
            "engine": In(weight_port_signature(beat_bytes)),
            "memory": Out(weight_port_signature(beat_bytes)),
            "readback": Out(ReadbackSignature()),
            "idle": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        wb = self.beat_bytes
        lb = (wb - 1).bit_length()
        eng, mem, rb = self.engine, self.memory, self.readback
        active = self.busy
        req_addr = Signal(ADDR_BITS)            # next word to request
        req_left = Signal(32 - lb + 1)          # words still to request
        bytes_left = Signal(32)                 # bytes still to send, the one offered included
        beat = Signal(8 * wb)                   # the beat being sent, shifted: its next byte lowest
        have = Signal()                         # beat holds bytes to send
        k = Signal(range(wb)) if wb > 1 else Const(0, 1)     # that byte's index in the beat

        # the engine's port, passed through unless a read-back runs
        with m.If(active):
            m.d.comb += [eng.req.ready.eq(0), eng.resp.valid.eq(0),
                         mem.resp.ready.eq(~have)]
        with m.Else():
            m.d.comb += [mem.req.valid.eq(eng.req.valid), mem.req.payload.eq(eng.req.payload),
                         eng.req.ready.eq(mem.req.ready),
                         eng.resp.valid.eq(mem.resp.valid), mem.resp.ready.eq(eng.resp.ready)]
        m.d.comb += eng.resp.payload.eq(mem.resp.payload)

        # start
        n = rb.start.payload
        m.d.comb += rb.start.ready.eq(~active & self.idle)
        with m.If(rb.start.valid & rb.start.ready & (n != 0)):
            m.d.sync += [active.eq(1), req_addr.eq(0), req_left.eq((n + (wb - 1)) >> lb),
                         bytes_left.eq(n), have.eq(0)]

        # requests, in bursts
        burst = Mux(req_left > self.BURST, self.BURST, req_left)
        with m.If(active & (req_left != 0)):
            m.d.comb += [mem.req.valid.eq(1), mem.req.payload.addr.eq(req_addr),
                         mem.req.payload.length.eq(burst)]
            with m.If(mem.req.ready):
                m.d.sync += [req_addr.eq(req_addr + burst), req_left.eq(req_left - burst)]

        # beats -> bytes
        with m.If(active & mem.resp.valid & ~have):
            m.d.sync += [beat.eq(mem.resp.payload), have.eq(1)]
            if wb > 1:
                m.d.sync += k.eq(0)
        last = bytes_left == 1
        m.d.comb += [rb.data.valid.eq(have), rb.data.payload.byte.eq(beat[:8]), rb.data.payload.last.eq(last)]
        with m.If(rb.data.valid & rb.data.ready):
            m.d.sync += [beat.eq(beat >> 8), bytes_left.eq(bytes_left - 1)]
            if wb > 1:
                m.d.sync += k.eq(k + 1)
            with m.If(last):
                m.d.sync += [have.eq(0), active.eq(0)]
            with m.Elif(k == wb - 1):
                m.d.sync += have.eq(0)
        return m
