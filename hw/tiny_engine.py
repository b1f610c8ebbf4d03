"""The tiny engine: the whole token step on one sequential datapath, for the iCE40UP5K.

Same control interface as :class:`~.engine.Engine` (``cmd``, ``load``, ``result``,
``logit_req`` / ``logit_resp``; see :mod:`.engine`), so :class:`~.linked_engine.LinkedEngine`
puts the serial link in front of either. Bit-exact with ``reference/integer.py``: it runs the
program of :mod:`.tiny_program` as :class:`~.tiny_isa.Machine` specifies it.

Datapath: the 48-bit (:data:`~.tiny_isa.DATA_BITS`) accumulator ``A``, an operand register ``X``, one adder/comparator, a
shifter that moves 1 or 8 places per cycle, a 32 x 33-bit multiplier (DSPs), a shared
restoring divider / square root (one bit per cycle), the sigmoid-interval logic. Memories:
the program ROM, 16 registers of 48 bits, the vector memory (32-bit words), the q memory, the
sigmoid table, the base3 decoder ROM (block RAM) and the weight image (16-bit words; the four
SPRAMs on the iCE40, written a byte at a time from ``load``).

Timing: an instruction without an operand (stores, control) takes two cycles (decode: the
instruction register, the chosen base register and the index-plus-P sum, the op, the control
flow and the operand kind decoded into registers; issue), plus an address cycle when it stores
to a memory (``LOOP`` takes it too: its count comparison is registered there); one with an operand four (decode, issue the read, operand, execute), plus
the address cycle for a memory operand, a wait for the registered SPRAM output for a weight (two
and a second operand cycle for a 32-bit one) and the extra cycles of ``MUL`` (1), ``SHR`` (one per
step, plus one), ``MAX``/``MIN`` (1), ``BITLEN`` (2), ``DIV`` (96: two per quotient bit) and ``SQRT`` (72);
:func:`~.tiny_isa.op_cycles` counts them. The extra cycles and registers are for the clock: the
iCE40 target is 40 MHz; BENCHMARKS.md has what place and route reaches. ``MATVEC`` is a unit
of its own: one trit per cycle (each image byte read once, decoded by the ROM into five trits;
the q operand registered before the accumulator), each row's sum written to the vector memory.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.reference.integer import sigmoid_table

from .control import ControlSignature, EngineOp
from .vector_common import msb_index
from .tiny_isa import (ADDR_CYCLE_OPS, B_BITS, DATA_BITS, DIRECT_OPS, FIELDS, LOOP_COUNT_BITS, MATVEC_COLS, MATVEC_OUT,
                       MATVEC_ROWS, MATVEC_TRITS, MEMORY_KINDS, N_BASES, N_REGS, NO_OPERAND_OPS, PROG_DEPTH, RES_LOGIT,
                       TARGET_BITS, W_SIZE, WORD_BITS, Cond, Kind, Op, encode, sig_frac_bits)
from .tiny_program import RESET_PC, TOKEN_PC, token_program
from .trits import base3_decode_table
from .weight_port import SPRAM_MAX, SPRAM_WORDS, spram_block

__all__ = ["TinyEngine", "carry_select"]


def carry_select(m, a, b, c_in, name: str):
    """``a + b + c_in`` modulo 2^len(a) (``a`` and ``b`` the same width) as a carry-select
    adder: the high half is added for both carries out of the low half, then chosen. On the
    iCE40 one carry chain of 37 or 49 bits was the critical path (29 MHz). The two high adders
    are kept apart (``keep``), or Yosys shares them into one with the carry multiplexed in, and
    the second is written as ``~(~a + ~b)`` (= a + b + 1): as ``a + b + 1`` Yosys made it an
    increment of the first, in series with it."""
    w = len(a)
    h = w // 2
    lo = Signal(h + 1, name=f"{name}_lo")
    hi0 = Signal(w - h, name=f"{name}_hi0", attrs={"keep": 1})
    hi1 = Signal(w - h, name=f"{name}_hi1", attrs={"keep": 1})
    m.d.comb += [lo.eq(a[:h] + b[:h] + c_in), hi0.eq(a[h:] + b[h:]), hi1.eq(~(~a[h:] + ~b[h:]))]
    return Cat(lo[:h], Mux(lo[h], hi1, hi0))


class TinyEngine(wiring.Component):
    """The tiny engine for ``cfg`` (base3 images only).

    ``image``: initial contents of the weight memory (simulation; None: written by ``load``).
    ``spram``: build the weight memory from iCE40 ``SB_SPRAM256KA`` blocks (no initial
    contents, so ``image`` must be None).
    """

    lanes = 1

    def __init__(self, cfg: ModelConfig, *, packing: str = "base3", image: bytes | None = None,
                 spram: bool = False):
        from mmfree_fpga.image import image_size
        self.cfg = cfg
        self.packing = packing
        self.program, self.layout = token_program(cfg, packing)
        self.image_bytes = image_size(cfg, packing)
        self.w_depth = -(-self.image_bytes // 2)
        if spram and image is not None:
            raise ValueError("SPRAM has no initial contents: image must be None")
        if spram and self.w_depth > SPRAM_WORDS * SPRAM_MAX:
            raise UserError(f"the weight image ({self.image_bytes} bytes) does not fit the iCE40UP5K's "
                            f"{SPRAM_MAX} SPRAMs ({2 * SPRAM_WORDS * SPRAM_MAX} bytes)")
        if self.image_bytes >= 1 << B_BITS:
            raise UserError(f"the weight image ({self.image_bytes} bytes) exceeds the tiny engine's "
                            f"{1 << B_BITS}-byte address space")
        self.image = image
        self.spram = spram
        super().__init__(ControlSignature())

    # -- memories -----------------------------------------------------------------
    def _weight_memory(self, m, addr, rdata, we, wdata, wlane, waddr):
        """16-bit words; reads one cycle late; a write (one byte lane) wins over a read.
        ``waddr``: the write's address (a register, equal to ``addr`` while ``we``): the SPRAMs'
        write enables are decoded from it alone, not through the read address multiplexer."""
        if not self.spram:
            init = []
            if self.image is not None:
                blob = bytes(self.image) + bytes(2 * self.w_depth - len(self.image))
                init = [blob[2 * k] | (blob[2 * k + 1] << 8) for k in range(self.w_depth)]
            m.submodules.wmem = mem = Memory(shape=16, depth=self.w_depth, init=init)
            rp = mem.read_port()
            wp = mem.write_port(granularity=8)
            m.d.comb += [rp.addr.eq(addr), wp.addr.eq(addr), rdata.eq(rp.data),
                         wp.data.eq(Cat(wdata, wdata)),
                         wp.en.eq(Mux(we, Mux(wlane, 0b10, 0b01), 0))]
            return
        deep = -(-self.w_depth // SPRAM_WORDS)
        bank = addr[14:16] if deep > 1 else Const(0, 1)
        wbank = waddr[14:16] if deep > 1 else Const(0, 1)
        bank_r = Signal.like(bank)
        m.d.sync += bank_r.eq(bank)
        outs = []
        for b in range(deep):
            dout = Signal(16, name=f"spram{b}_out")
            m.submodules[f"spram{b}"] = spram_block(addr[:14], Cat(wdata, wdata),
                                                    Mux(wlane, Const(0b1100, 4), Const(0b0011, 4)),
                                                    we & (wbank == b), dout)
            outs.append(dout)
        with m.Switch(bank_r):
            for b in range(deep):
                with m.Case(b):
                    m.d.comb += rdata.eq(outs[b])

    def elaborate(self, platform):
        m = Module()
        lay = self.layout
        fmt = FORMATS
        N = DATA_BITS

        # program ROM, registers, vector / q memories, sigmoid table, base3 decoder
        m.submodules.rom = rom = Memory(shape=WORD_BITS, depth=PROG_DEPTH,
                                        init=[encode(ins) for ins in self.program])
        m.submodules.regs = regs = Memory(shape=N, depth=N_REGS, init=[])
        m.submodules.vmem = vmem = Memory(shape=32, depth=lay.vm_depth, init=[])
        m.submodules.qmem = qmem = Memory(shape=8, depth=lay.qm_depth, init=[])
        table = [int(t) for t in sigmoid_table(fmt)]
        m.submodules.tab = tab = Memory(shape=16, depth=len(table), init=table)
        m.submodules.b3 = b3 = Memory(shape=10, depth=256, init=base3_decode_table())
        rom_rp = rom.read_port()
        reg_rp, reg_wp = regs.read_port(), regs.write_port()
        vm_rp, vm_wp = vmem.read_port(), vmem.write_port()
        qm_rp, qm_wp = qmem.read_port(), qmem.write_port()
        tab_rp = tab.read_port()
        b3_rp = b3.read_port()

        w_addr = Signal(B_BITS - 1)       # word address (SPRAM: bank above bit 14)
        w_rdata = Signal(16)
        w_we = Signal()
        w_wdata = Signal(8)               # (a write's byte and lane: registers)
        w_lane = Signal()
        ld_addr = Signal(B_BITS - 1)      # an image byte's word address (a register)
        self._weight_memory(m, w_addr, w_rdata, w_we, w_wdata, w_lane, ld_addr)
        w_q = Signal(16)                  # w_rdata, registered (operand reads)
        w_addr_hi = Signal(B_BITS - 1)    # the word after the operand's (registered in ISSUE)
        m.d.sync += w_q.eq(w_rdata)

        # -- architectural state --
        A = Signal(signed(N))
        X = Signal(signed(N))
        P = Signal(B_BITS)
        i = Signal(16)
        i1 = Signal(17, init=1)           # i + 1, kept beside i (no adder before LOOP's comparison)
        RA = Signal(range(PROG_DEPTH))
        pc = Signal(range(PROG_DEPTH))
        bases = [Signal(B_BITS, name=f"b{k}") for k in range(N_BASES)]
        token = Signal(32)
        res_token = Signal(32)
        res_logit = Signal(signed(32))
        cycles = Signal(32)
        for_token = Signal()

        # -- the instruction: the ROM's output while decoding (fields ``d``), then the instruction
        #    register ``ir`` (fields ``f``): no path starts at the ROM's clock-to-out but DECODE's
        def fields(word):
            out, pos = {}, 0
            for name, width in FIELDS:
                out[name] = word[pos:pos + width]
                pos += width
            return out
        ir = Signal(WORD_BITS)
        d = fields(rom_rp.data)
        f = fields(ir)
        kind, reg, imm = f["kind"], f["reg"], f["imm"].as_signed()
        flag = f["flag"]

        # address of the operand / store
        kind_size_log2 = Signal(2)
        with m.Switch(d["kind"]):
            for k, size in W_SIZE.items():
                if size > 1:
                    with m.Case(k):
                        m.d.comb += kind_size_log2.eq(size.bit_length() - 1)
        bsel_val = Signal(B_BITS)
        with m.Switch(d["bsel"]):
            for k in range(N_BASES):
                with m.Case(k):
                    m.d.comb += bsel_val.eq(bases[k])
        # (the base register chosen by the instruction, and the sum of its index and P terms,
        # registered while decoding; the immediate, the base and that sum are added into the
        # register addr in ADDR)
        base_r = Signal(B_BITS)
        addr_ip = Signal(B_BITS)
        addr = Signal(B_BITS)
        kh = Signal(len(Kind))     # the operand kind, one-hot (decoded in DECODE)
        # the op, one-hot (decoded in DECODE): the op's cases in ISSUE, OPER and EXEC are
        # one flip-flop each, not a comparison of five bits (one LUT level less on the iCE40's
        # control paths)
        op_oh = Signal(1 << dict(FIELDS)["op"])

        def on(*ops):
            """Case patterns that match op_oh for any of ``ops``."""
            return ["-" * (len(op_oh) - 1 - o) + "1" + "-" * o for o in ops]
        ex_go = Signal()           # the op ends in EXEC (decoded in DECODE)
        EXEC_MORE = (Op.MAX, Op.MIN, Op.CSGN, Op.MUL, Op.SHR, Op.BITLEN, Op.DIV, Op.SQRT)
        # ISSUE's control flow, decoded in DECODE into registers: the op is one that ends in
        # ISSUE (iss_go), and which address follows (RA, the target, or pc1 = pc + 1)
        pc1 = Signal(range(PROG_DEPTH))
        iss_go, iss_ret, iss_call, iss_loop, iss_br = (Signal(name=n) for n in
                                                       ("iss_go", "iss_ret", "iss_call", "iss_loop", "iss_br"))
        # the instruction takes the ADDR cycle (decoded from the ROM's output: takes_addr_cycle)
        d_addr_cycle = Signal()
        d_op = d["op"]
        direct = Cat(d_op == o for o in (*NO_OPERAND_OPS, *DIRECT_OPS, Op.MATVEC)).any()
        m.d.comb += d_addr_cycle.eq(Cat(d_op == o for o in ADDR_CYCLE_OPS).any()
                                    | (~direct & Cat(d["kind"] == k for k in MEMORY_KINDS).any()))
        target = imm[:TARGET_BITS]

        # -- ALU pieces --
        # A == 0, registered every cycle: BR's condition is evaluated in ISSUE, and A holds its
        # value from DECODE on (the zero test of A in DECODE, shared by Yosys with BITLEN's
        # trees, was the iCE40's critical path)
        a_zero = Signal()
        m.d.sync += a_zero.eq(A == 0)
        a_neg = A[N - 1]
        cond_ok = Signal()
        with m.Switch(reg):
            with m.Case(Cond.ALWAYS):
                m.d.comb += cond_ok.eq(1)
            with m.Case(Cond.EQ):
                m.d.comb += cond_ok.eq(a_zero)
            with m.Case(Cond.NE):
                m.d.comb += cond_ok.eq(~a_zero)
            with m.Case(Cond.LT):
                m.d.comb += cond_ok.eq(a_neg)
            with m.Case(Cond.GE):
                m.d.comb += cond_ok.eq(~a_neg)
            with m.Case(Cond.GT):
                m.d.comb += cond_ok.eq(~a_neg & ~a_zero)
            with m.Case(Cond.LE):
                m.d.comb += cond_ok.eq(a_neg | a_zero)

        # multiplier: A[31:0] signed x X[31:0] (signed, or unsigned with flag), one cycle + register
        xm = Signal(signed(33))
        m.d.comb += xm.eq(Mux(flag, Cat(X[:32], Const(0, 1)), Cat(X[:32], X[31])).as_signed())
        prod = Signal(signed(65))
        m.d.sync += prod.eq(A[:32].as_signed() * xm)

        # LOOP's comparison, registered in ADDR (from the program ROM's output in DECODE, through
        # the base register multiplexer, it was the iCE40's critical path; in ISSUE, on the way
        # to the ROM's address, it was the next)
        loop_more = Signal()

        # shifter / bit length / divider state
        count = Signal(7)             # DIV / SQRT steps
        blen = Signal(6)              # BITLEN's result
        rem = Signal(35)
        root = Signal(N // 2)

        # -- the one adder: (A or 0, maybe inverted) + (X or 0, maybe inverted) + carry in, its
        #    five control bits registered a cycle ahead, so each operand bit is one LUT:
        #    LD 0 + X, ADD A + X, SUB A + ~X + 1 (also the compare of MAX / MIN), ABS / CSGN
        #    (~A + 1 or A), the TAKE of MAX / MIN (0 + X, or A kept), the rounding increment A + 1
        #    The adder is off (its sum 0) while A takes another source (a_sel_r's bit 2, below), so
        #    A's input is the sum ORed with that source: one LUT after the carry chain's end.
        a_en, a_inv, b_en, b_inv, c_in = (Signal(name=n) for n in ("a_en", "a_inv", "b_en", "b_inv", "c_in"))
        a_sel_r = Signal(3)
        HOLD, SUM, SH, PROD, SMALL, SATV = 0, 1, 4, 5, 6, 7     # bit 2: a source other than the adder
        add_off = a_sel_r[2]
        add_a = Signal(N)
        add_b = Signal(N)
        m.d.comb += [add_a.eq(Mux(add_off, 0, Mux(a_en, A[:N], 0) ^ a_inv.replicate(N))),
                     add_b.eq(Mux(add_off, 0, Mux(b_en, X[:N], 0) ^ b_inv.replicate(N)))]
        add_s = Signal(N + 1)
        m.d.comb += add_s.eq(carry_select(m, Cat(add_a, add_a[N - 1]), Cat(add_b, add_b[N - 1]),
                                          c_in & ~add_off, "add"))

        def adder_for():
            """Set the adder for the EXEC cycle of the instruction (from OPER, OPER2 or ISSUE;
            CSGN sets it in EXEC, from X, for its TAKE cycle)."""
            neg = A[N - 1]
            with m.Switch(op_oh):
                with m.Case(*on(Op.LD)):
                    m.d.sync += [a_en.eq(0), a_inv.eq(0), b_en.eq(1), b_inv.eq(0), c_in.eq(0)]
                with m.Case(*on(Op.ADD)):
                    m.d.sync += [a_en.eq(1), a_inv.eq(0), b_en.eq(1), b_inv.eq(0), c_in.eq(0)]
                with m.Case(*on(Op.SUB, Op.MAX, Op.MIN)):
                    m.d.sync += [a_en.eq(1), a_inv.eq(0), b_en.eq(1), b_inv.eq(1), c_in.eq(1)]
                with m.Case(*on(Op.ABS)):
                    m.d.sync += [a_en.eq(1), a_inv.eq(neg), b_en.eq(0), b_inv.eq(0), c_in.eq(neg)]

        a_lt_x = add_s[N]            # in SUB mode: A < X (signed)

        # -- the divider / square root step: one subtractor for both
        # (the square root takes two cycles per root bit: a radicand bit shifted in, then the trial)
        is_div = Signal()             # the op is DIV (decoded in DECODE)
        div_last = Signal()           # the division's last step (count == N - 1)
        m.d.comb += div_last.eq(count == N - 1)
        r2 = Cat(A[N - 1], rem[:34])
        trial = Mux(is_div, X[:34], Cat(Const(1, 2), root))
        diff = Signal(37)
        m.d.comb += diff.eq(carry_select(m, Cat(r2, Const(0, 2)), ~Cat(trial, Const(0, 37 - len(trial))),
                                         Const(1, 1), "diff"))
        diff_r = Signal(37)           # registered difference (DIV and SQRT apply it a cycle later)
        ge_r = ~diff_r[36]
        dv_ph = Signal()              # 1: the cycle that applies diff_r

        # -- the shifter: one of A >> 1, A >> 8, A << 1 (bit 0: the quotient bit); its mode is a
        #    register set in the cycle before, with a_sel_r
        sh_mode = Signal(2)
        R1, R8, L1 = range(3)
        m.d.sync += sh_mode.eq(L1)    # (DIV and SQRT's shift; SHR's steps set it where they differ)
        sh = Signal(N)
        with m.Switch(sh_mode):
            with m.Case(R1):
                m.d.comb += sh.eq(A >> 1)
            with m.Case(R8):
                m.d.comb += sh.eq(A >> 8)
            with m.Case(L1):
                m.d.comb += sh.eq(Cat(ge_r & is_div, A[:N - 1]))

        # sigmoid interval of A; it, and A saturated to int32, are registered every cycle: the ops
        # that take them (SIGP, SAT) hold A in the cycle before EXEC (ISSUE), so they see their own A.
        # (A's comparison trees were a path into A's own enable: Yosys makes a Mux that keeps A
        # into the register's enable, the iCE40's critical path)
        frac_bits = sig_frac_bits(fmt)
        n_tab = 1 << fmt.sig_table_log2
        hi_bit = frac_bits + fmt.sig_table_log2 - 1          # |y| >= 2^hi_bit is outside the table
        upper = A[hi_bit:]
        sig_lo = a_neg & ~upper.all()
        sig_hi = ~a_neg & upper.any()
        sig_idx = Signal(fmt.sig_table_log2)
        sig_frac = Signal(frac_bits + 1)
        with m.If(sig_lo):
            m.d.sync += [sig_idx.eq(0), sig_frac.eq(0)]
        with m.Elif(sig_hi):
            m.d.sync += [sig_idx.eq(n_tab - 1), sig_frac.eq(1 << frac_bits)]
        with m.Else():
            m.d.sync += [sig_idx.eq(A[frac_bits:hi_bit + 1] ^ (n_tab // 2)), sig_frac.eq(A[:frac_bits])]

        # -- what A takes this cycle: a_sel_r, a register set in the cycle before (so A's update
        #    depends on no state or data decoding), except in SHIFT; SMALL is one of the small
        #    non-negative values chosen by small_sel (also a register), SATV A saturated to int32
        a_sel = Signal(3)
        small_sel = Signal(3)
        S_I, S_TOKEN, S_SIG, S_COUNT, S_ROOT = range(5)
        # (MAX / MIN: the comparison is registered (lt_r, every cycle, straight from the adder's
        #  sign: no op decoding behind the carry chain), and A keeps its value in TAKE unless it
        #  says to load X; is_min_r turns it around for MIN)
        minmax_r = Signal()
        is_min_r = Signal()
        lt_r = Signal()
        m.d.sync += lt_r.eq(a_lt_x)
        m.d.comb += a_sel.eq(Mux(minmax_r & (lt_r == is_min_r), HOLD, a_sel_r))
        m.d.sync += [a_sel_r.eq(HOLD), minmax_r.eq(0)]
        small = Signal(32)
        with m.Switch(small_sel):
            with m.Case(S_I):
                m.d.comb += small.eq(i)
            with m.Case(S_TOKEN):
                m.d.comb += small.eq(token)
            with m.Case(S_SIG):
                m.d.comb += small.eq(sig_frac)
            with m.Case(S_COUNT):
                m.d.comb += small.eq(blen)
            with m.Case(S_ROOT):
                m.d.comb += small.eq(root)
        sat_ovf = ~A[31:].all() & A[31:].any()
        satv = Signal(N)
        m.d.sync += satv.eq(Cat(Mux(sat_ovf, (~a_neg).replicate(31), A[:31]),
                                Mux(sat_ovf, a_neg.replicate(N - 31), A[31:])))
        other = Signal(N)             # the source other than the adder (0 while the adder's)
        with m.Switch(a_sel_r):
            with m.Case(SH):
                m.d.comb += other.eq(sh)
            with m.Case(PROD):
                m.d.comb += other.eq(prod[:N])
            with m.Case(SMALL):
                m.d.comb += other.eq(small)
            with m.Case(SATV):
                m.d.comb += other.eq(satv)
        with m.If(a_sel != HOLD):
            m.d.sync += A.eq(add_s[:N] | other)
        # the A source and small value an instruction's EXEC cycle takes
        pre_sel = Signal(3)
        pre_small = Signal(3)
        with m.Switch(op_oh):
            with m.Case(*on(Op.LD, Op.ADD, Op.SUB, Op.ABS)):
                m.d.comb += pre_sel.eq(SUM)
            with m.Case(*on(Op.SAT)):
                m.d.comb += pre_sel.eq(SATV)
            with m.Case(*on(Op.SIGP)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_SIG)]
            with m.Case(*on(Op.GETI)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_I)]
            with m.Case(*on(Op.GETT)):
                m.d.comb += [pre_sel.eq(SMALL), pre_small.eq(S_TOKEN)]
            with m.Case(*on(Op.SQRT)):         # (its first step shifts; DIV's first cycle holds A)
                m.d.comb += pre_sel.eq(SH)

        # BITLEN's first stage: per byte of 2A + 1, whether it has a one, and its top one's index
        bl_any = Signal(N // 8)
        bl_idx = Signal(3 * (N // 8))

        # -- SHR's steps: EXEC turns the count into step counts (sh_c8 right-by-8 steps, then
        #    sh_c1 right- or left-by-1 steps, then with rounding the increment and one more right
        #    step); each SHIFT cycle A takes the step registered in the cycle before (sh_act, with
        #    a_sel_r and sh_mode) and the next is decided from the counts: no comparison of the
        #    count with constants on the path into A's select (the iCE40's critical path)
        SA_NONE, SA_DONE, SA_ROUND, SA_R8, SA_R1 = range(5)
        sh_act = Signal(3)
        sh_c8 = Signal(3)
        sh_c1 = Signal(6)
        sh_left = Signal()
        sh_rnd = Signal()     # the rounding increment is still to come

        # -- matrix unit state --
        row_bits = max(1, lay.vm_depth.bit_length())
        col_bits = max(1, lay.qm_depth.bit_length())
        mv_r = Signal(row_bits)
        mv_c = Signal(col_bits)
        mv_ba = Signal(B_BITS)    # the next weight byte to decode
        mv_p1 = Signal()          # a weight word read is in flight (its byte lane in mv_lane)
        mv_lane = Signal()
        mv_p2 = Signal()          # a decoder lookup is in flight
        mv_next = Signal(10)      # the five trits of the next byte
        mv_nvalid = Signal()
        mv_tq = Signal(10)        # the trits of the current byte, next in bits 1:0
        mv_tn = Signal(range(6))
        mv_issue_done = Signal()
        mv_s1 = Signal()          # stage 1 valid: its trit, last-column flag, row
        mv_s1_trit = Signal(2)
        mv_s1_last = Signal()
        mv_s1_row = Signal(row_bits)
        mv_s2 = Signal()          # stage 2 valid: the signed operand (q, ~q or 0; +1 in mv_s2_neg)
        mv_s2_op = Signal(fmt.acc_bits)
        mv_s2_neg = Signal()
        mv_s2_last = Signal()
        mv_s2_row = Signal(row_bits)
        mv_acc = Signal(signed(fmt.acc_bits))
        mv_cols_m1 = Signal(col_bits)   # the last column and row (registered at the start)
        mv_rows_m1 = Signal(row_bits)

        # -- load stream: image bytes at the write pointer --
        wptr = Signal(B_BITS)
        logit_index = Signal(range(max(2, self.cfg.V)))

        # -- control --
        m.d.comb += [self.result.payload.token.eq(res_token), self.result.payload.logit.eq(res_logit),
                     self.result.payload.cycles.eq(cycles)]
        m.d.comb += self.logit_resp.payload.eq(vm_rp.data.as_signed())

        with m.If(for_token):
            m.d.sync += cycles.eq(cycles + 1)

        def next_instr(npc):
            """Leave the current instruction: read the instruction at npc (decoded next cycle)."""
            m.d.comb += rom_rp.addr.eq(npc)
            m.d.sync += pc.eq(npc)
            m.next = "DECODE"

        # A weight operand as OPER takes it, registered with w_q: the low 16 bits (the byte
        # chosen by the address and extended, or the word) and the sign of the rest; zero if the
        # operand is no weight. (The byte choice and its sign extension ahead of the operand
        # multiplexer into X were the iCE40's critical path.)
        w_lo = Signal(16)
        w_sign = Signal()
        rd_byte = Mux(addr[0], w_rdata[8:], w_rdata[:8])
        byte_sign = ~flag & rd_byte[7]
        with m.If(kh[Kind.W8]):
            m.d.sync += [w_lo.eq(Cat(rd_byte, byte_sign.replicate(8))), w_sign.eq(byte_sign)]
        with m.Elif(kh[Kind.W16]):
            m.d.sync += [w_lo.eq(w_rdata), w_sign.eq(~flag & w_rdata[15])]
        with m.Elif(kh[Kind.W32]):     # (the low half, unsigned; the high half follows in OPER2)
            m.d.sync += [w_lo.eq(w_rdata), w_sign.eq(0)]
        with m.Else():
            m.d.sync += [w_lo.eq(0), w_sign.eq(0)]

        # an image byte is written in the cycle after IDLE took it, from registers (the FSM's
        # decoding into the SPRAMs' write enables was one of the iCE40's longest paths); the
        # next weight read is at least three cycles later (START, DECODE, ISSUE)
        ld_we = Signal()
        m.d.sync += ld_we.eq(0)
        with m.If(ld_we):
            m.d.comb += [w_addr.eq(ld_addr), w_we.eq(1)]

        # default ROM address: the current pc (so a held instruction stays readable)
        m.d.comb += rom_rp.addr.eq(pc)

        with m.FSM(name="ctl") as ctl_fsm:
            with m.State("IDLE"):
                m.d.comb += [self.cmd.ready.eq(1), self.load.ready.eq(1), self.logit_req.ready.eq(~self.cmd.valid)]
                with m.If(self.load.valid):
                    m.d.sync += [ld_we.eq(1), ld_addr.eq(wptr[1:]), w_wdata.eq(self.load.payload),
                                 w_lane.eq(wptr[0]), wptr.eq(wptr + 1)]
                # commands and logit requests are registered first (START, LREAD): no path from
                # the Link's logic into the program ROM's address or the vector memory's
                with m.If(self.cmd.valid):
                    with m.Switch(self.cmd.payload.op):
                        with m.Case(EngineOp.RESET_STATE):
                            m.d.sync += for_token.eq(0)
                            m.next = "START"
                        with m.Case(EngineOp.FEED_TOKEN):
                            m.d.sync += [for_token.eq(1), token.eq(self.cmd.payload.arg), cycles.eq(1)]
                            m.next = "START"
                        with m.Case(EngineOp.LOAD_RESET):
                            m.d.sync += wptr.eq(0)
                with m.Elif(self.logit_req.valid):
                    m.d.sync += logit_index.eq(self.logit_req.payload)
                    m.next = "LREAD"

            with m.State("START"):
                next_instr(Mux(for_token, TOKEN_PC, RESET_PC))

            with m.State("LREAD"):
                m.d.comb += vm_rp.addr.eq(lay.logits + logit_index)
                m.next = "LOGIT"

            with m.State("LOGIT"):
                m.d.comb += [self.logit_resp.valid.eq(1), vm_rp.en.eq(0)]
                with m.If(self.logit_resp.ready):
                    m.next = "IDLE"

            with m.State("DECODE"):
                # the instruction, its decoded op and kind, its base register and index-plus-P sum, registered
                d_imm = d["imm"].as_signed()
                m.d.sync += [count.eq(0), is_div.eq(d_op == Op.DIV), pc1.eq(pc + 1),
                             kh.eq(Const(1, len(Kind)) << d["kind"]), op_oh.eq(Const(1, len(op_oh)) << d_op),
                             ex_go.eq(~Cat(d_op == o for o in EXEC_MORE).any()),
                             iss_go.eq(Cat(d_op == o for o in NO_OPERAND_OPS if o != Op.END).any()),
                             iss_ret.eq(d_op == Op.RET), iss_call.eq(d_op == Op.CALL),
                             iss_loop.eq(d_op == Op.LOOP), iss_br.eq(d_op == Op.BR)]
                m.d.sync += [ir.eq(rom_rp.data),
                             base_r.eq(Mux(d["fb"], bsel_val, 0)),
                             addr_ip.eq(Mux(d["fi"], i << kind_size_log2, 0) + Mux(d["fp"], P, 0))]
                with m.If(d_addr_cycle):
                    m.next = "ADDR"
                with m.Else():
                    m.next = "ISSUE"

            with m.State("ADDR"):
                m.d.sync += [addr.eq(imm + base_r + addr_ip),
                             loop_more.eq(i1 < Mux(f["fb"], base_r, imm[TARGET_BITS:TARGET_BITS + LOOP_COUNT_BITS]))]
                m.next = "ISSUE"

            with m.State("ISSUE"):
                # operand reads (used by OPER); stores and control finish here
                adder_for()
                m.d.comb += [reg_rp.addr.eq(reg), vm_rp.addr.eq(addr), w_addr.eq(addr[1:]), tab_rp.addr.eq(addr)]
                # the matrix unit's start state, set whatever the op (only MATVEC reads it): no
                # op decoding in these registers' enables
                m.d.sync += [mv_cols_m1.eq(bases[MATVEC_COLS] - 1), mv_rows_m1.eq(bases[MATVEC_ROWS] - 1),
                             mv_r.eq(0), mv_c.eq(0), mv_ba.eq(bases[MATVEC_TRITS]), mv_p1.eq(0), mv_p2.eq(0),
                             mv_nvalid.eq(0), mv_tn.eq(0), mv_issue_done.eq(0), mv_s1.eq(0), mv_s2.eq(0), mv_acc.eq(0),
                             rem.eq(0), root.eq(0), dv_ph.eq(0),     # (and DIV / SQRT's)
                             w_addr_hi.eq(addr[1:] + 1)]             # (a W32 operand's high half)
                # the next instruction of the ops that end here, from registers decoded in DECODE
                jump = (iss_loop & loop_more) | (iss_br & cond_ok) | iss_call
                with m.If(iss_go):
                    next_instr(Mux(iss_ret, RA, Mux(jump, target, pc1)))
                with m.Switch(op_oh):
                    with m.Case(*on(Op.ST)):
                        m.d.comb += [reg_wp.addr.eq(reg), reg_wp.data.eq(A), reg_wp.en.eq(1)]
                    with m.Case(*on(Op.STV)):
                        m.d.comb += [vm_wp.addr.eq(addr), vm_wp.data.eq(A[:32]), vm_wp.en.eq(1)]
                    with m.Case(*on(Op.STQ)):
                        m.d.comb += [qm_wp.addr.eq(addr), qm_wp.data.eq(A[:8]), qm_wp.en.eq(1)]
                    with m.Case(*on(Op.SETP)):
                        m.d.sync += P.eq(A[:B_BITS])
                    with m.Case(*on(Op.SETB)):
                        with m.Switch(f["bsel"]):
                            for k in range(N_BASES):
                                with m.Case(k):
                                    m.d.sync += bases[k].eq(imm[:B_BITS])
                    with m.Case(*on(Op.RES)):
                        with m.If(reg[0] == RES_LOGIT):
                            m.d.sync += res_logit.eq(A[:32])
                        with m.Else():
                            m.d.sync += res_token.eq(A[:32])
                    with m.Case(*on(Op.LOOP)):
                        m.d.sync += [i.eq(Mux(loop_more, i1, 0)), i1.eq(Mux(loop_more, i1 + 1, 1))]
                    with m.Case(*on(Op.CALL)):
                        m.d.sync += RA.eq(pc1)
                    with m.Case(*on(Op.BR, Op.RET, Op.NOP)):
                        pass
                    with m.Case(*on(Op.MATVEC)):
                        m.next = "MATVEC"
                    with m.Case(*on(Op.END)):
                        with m.If(for_token):
                            m.d.sync += for_token.eq(0)
                            m.next = "RESULT"
                        with m.Else():
                            m.next = "IDLE"
                    with m.Case(*on(*DIRECT_OPS)):
                        m.d.sync += [a_sel_r.eq(pre_sel), small_sel.eq(pre_small)]
                        m.next = "EXEC"
                    with m.Default():
                        with m.If(kh[Kind.W8] | kh[Kind.W16] | kh[Kind.W32]):
                            m.next = "OWAIT"
                        with m.Else():
                            m.next = "OPER"

            with m.State("OPER"):
                # the operand, from the memory read issued in ISSUE: each source gated by its bit of
                # the one-hot kind register kh, then ORed (a multiplexer on the binary kind after
                # the SPRAM's output was one of the iCE40's longest paths)
                def term(bit, value):
                    t = Signal(N, name=f"x_{Kind(bit).name.lower()}")
                    m.d.comb += t.eq(Mux(kh[bit], value, 0))
                    return t
                x_in = Signal(signed(N))
                m.d.comb += x_in.eq(term(Kind.IMM, imm) | term(Kind.R, reg_rp.data) | term(Kind.VM, vm_rp.data.as_signed())
                                    | term(Kind.TAB, tab_rp.data) | Cat(w_lo, w_sign.replicate(N - 16)))
                with m.If(kh[Kind.W32]):
                    m.d.comb += w_addr.eq(w_addr_hi)
                m.d.sync += X.eq(x_in)
                with m.If(kh[Kind.W32]):
                    m.next = "OWAIT2"
                with m.Else():
                    m.d.sync += a_sel_r.eq(pre_sel)
                    adder_for()
                    m.next = "EXEC"

            # a weight operand: the SPRAM's output is registered (w_q) before it is used (its
            # output, far from the logic, through the sign extension into X was the iCE40's
            # critical path): one cycle more per 16-bit read
            with m.State("OWAIT"):
                m.next = "OPER"
            with m.State("OWAIT2"):
                m.next = "OPER2"

            with m.State("OPER2"):
                hi = Cat(X[:16], w_q)
                x_in2 = Mux(flag, hi, hi.as_signed())
                m.d.sync += [X.eq(x_in2), a_sel_r.eq(pre_sel)]
                adder_for()
                m.next = "EXEC"

            with m.State("EXEC"):
                # A takes a_sel_r (set in the cycle before); multi-cycle ops set it for the next.
                # The ops that end here (ex_go) were decoded in DECODE.
                npc = pc1
                with m.If(ex_go | (is_div & div_last & dv_ph)):
                    next_instr(npc)
                with m.Switch(op_oh):
                    with m.Case(*on(Op.MAX, Op.MIN)):
                        # compare now (lt_r); in TAKE, A := 0 + X or A kept
                        m.d.sync += [is_min_r.eq(op_oh[Op.MIN]), minmax_r.eq(1),
                                     a_en.eq(0), a_inv.eq(0), b_en.eq(1), b_inv.eq(0), c_in.eq(0),
                                     a_sel_r.eq(SUM)]
                        m.next = "TAKE"
                    with m.Case(*on(Op.SIGP)):
                        m.d.sync += P.eq(sig_idx)
                    with m.Case(*on(Op.CSGN)):
                        # -A or A in TAKE, as X's sign says
                        neg = X[N - 1]
                        m.d.sync += [a_en.eq(1), a_inv.eq(neg), b_en.eq(0), b_inv.eq(0), c_in.eq(neg),
                                     a_sel_r.eq(SUM)]
                        m.next = "TAKE"
                    with m.Case(*on(Op.MUL)):
                        # the product register is written at the end of this cycle
                        m.d.sync += a_sel_r.eq(PROD)
                        m.next = "TAKE"
                    with m.Case(*on(Op.SHR)):
                        # s in [-63, 63] (tiny_isa: _shr); rounding: (s - 1) // 8 steps of 8,
                        # (s - 1) % 8 of 1, the increment, a last step of 1; else s // 8, s % 8
                        sc = X[:8].as_signed()
                        sm1 = Signal(8)
                        m.d.comb += sm1.eq(sc - 1)
                        m.d.sync += [a_en.eq(1), a_inv.eq(0), b_en.eq(0), b_inv.eq(0), c_in.eq(1),
                                     sh_act.eq(SA_NONE), sh_left.eq(0), sh_rnd.eq(0), sh_c8.eq(0), sh_c1.eq(0)]
                        with m.If(sc > 0):
                            with m.If(flag):
                                m.d.sync += [sh_c8.eq(sm1[3:6]), sh_c1.eq(sm1[:3]), sh_rnd.eq(1)]
                            with m.Else():
                                m.d.sync += [sh_c8.eq(sc[3:6]), sh_c1.eq(sc[:3])]
                        with m.Elif(sc < 0):
                            m.d.sync += [sh_c1.eq(-sc), sh_left.eq(1)]
                        m.next = "SHIFT"
                    with m.Case(*on(Op.BITLEN)):
                        # bit length of A >= 0 = index of the top one of 2A + 1, in two registered
                        # stages (one tree was the iCE40's critical path): each byte's top one here,
                        # the top byte's in BITLEN2 into count, then A := count in TAKE
                        v = Cat(Const(1, 1), A[:N - 1])
                        for k in range(N // 8):
                            any_k, idx_k = msb_index(v[8 * k:8 * k + 8], 8)
                            m.d.sync += [bl_any[k].eq(any_k), bl_idx[3 * k:3 * k + 3].eq(idx_k)]
                        m.next = "BITLEN2"
                    with m.Case(*on(Op.DIV)):
                        # restoring division, one quotient bit per two cycles (2N), quotient in
                        # A: the trial difference is registered (diff_r), then applied
                        with m.If(~dv_ph):
                            m.d.sync += [diff_r.eq(diff), dv_ph.eq(1), a_sel_r.eq(SH)]
                        with m.Else():
                            m.d.sync += [rem.eq(Mux(ge_r, diff_r, r2)), count.eq(count + 1), dv_ph.eq(0)]
                    with m.Case(*on(Op.SQRT)):
                        # restoring square root: even steps shift a radicand bit into rem (one
                        # cycle), odd steps also try the next root bit (two: the difference is
                        # registered, then applied); N steps, then A := root in TAKE
                        with m.If(~count[0]):
                            m.d.sync += [rem.eq(r2), count.eq(count + 1)]
                        with m.Elif(~dv_ph):
                            m.d.sync += [diff_r.eq(diff), dv_ph.eq(1), a_sel_r.eq(SH)]
                        with m.Else():
                            m.d.sync += [rem.eq(Mux(ge_r, diff_r, r2)), root.eq(Cat(ge_r, root[:-1])),
                                         count.eq(count + 1), dv_ph.eq(0)]
                            with m.If(count == N - 1):
                                m.d.sync += [a_sel_r.eq(SMALL), small_sel.eq(S_ROOT)]
                                m.next = "TAKE"
                            with m.Else():
                                m.d.sync += a_sel_r.eq(SH)

            with m.State("BITLEN2"):
                _, top = msb_index(bl_any, N // 8)
                m.d.sync += [blen.eq(Cat(bl_idx.word_select(top, 3), top)), a_sel_r.eq(SMALL),
                             small_sel.eq(S_COUNT)]
                m.next = "TAKE"

            with m.State("TAKE"):
                # the last cycle of MAX/MIN, CSGN, MUL, BITLEN, SQRT: A takes a_sel_r
                next_instr(pc1)

            with m.State("SHIFT"):
                # A takes this step (registered in the cycle before); the counts decide the next
                with m.If(sh_act == SA_DONE):
                    next_instr(pc1)
                with m.Elif(sh_c8 != 0):
                    m.d.sync += [sh_act.eq(SA_R8), sh_c8.eq(sh_c8 - 1), a_sel_r.eq(SH), sh_mode.eq(R8)]
                with m.Elif(sh_c1 != 0):
                    m.d.sync += [sh_act.eq(SA_R1), sh_c1.eq(sh_c1 - 1), a_sel_r.eq(SH),
                                 sh_mode.eq(Mux(sh_left, L1, R1))]
                with m.Elif(sh_rnd):
                    m.d.sync += [sh_act.eq(SA_ROUND), sh_rnd.eq(0), sh_c1.eq(1), a_sel_r.eq(SUM)]
                with m.Else():
                    m.d.sync += sh_act.eq(SA_DONE)

            with m.State("MATVEC"):
                out = bases[MATVEC_OUT]
                # producer: weight byte -> (read) -> decoder ROM -> mv_next, one byte in flight
                m.d.sync += [mv_p1.eq(0), mv_p2.eq(0)]
                with m.If(~mv_nvalid & ~mv_p1 & ~mv_p2 & ~mv_issue_done):
                    m.d.comb += w_addr.eq(mv_ba[1:])
                    m.d.sync += [mv_p1.eq(1), mv_lane.eq(mv_ba[0]), mv_ba.eq(mv_ba + 1)]
                with m.If(mv_p1):
                    m.d.comb += b3_rp.addr.eq(Mux(mv_lane, w_rdata[8:], w_rdata[:8]))
                    m.d.sync += mv_p2.eq(1)
                with m.If(mv_p2):
                    m.d.sync += [mv_next.eq(b3_rp.data), mv_nvalid.eq(1)]
                # consumer: one trit per cycle -> stage 1 (q read)
                m.d.sync += mv_s1.eq(0)
                have = mv_tn != 0
                c_next = mv_c + 1
                r_next = mv_r + 1
                last_col = mv_c == mv_cols_m1
                with m.If(have & ~mv_issue_done):
                    m.d.comb += qm_rp.addr.eq(mv_c)
                    m.d.sync += [mv_s1.eq(1), mv_s1_trit.eq(mv_tq[:2]), mv_s1_last.eq(last_col),
                                 mv_s1_row.eq(mv_r)]
                    with m.If(last_col):
                        m.d.sync += [mv_c.eq(0), mv_r.eq(r_next)]
                        with m.If(mv_r == mv_rows_m1):
                            m.d.sync += mv_issue_done.eq(1)
                    with m.Else():
                        m.d.sync += mv_c.eq(c_next)
                    with m.If((mv_tn == 1) & mv_nvalid):
                        m.d.sync += [mv_tq.eq(mv_next), mv_tn.eq(5), mv_nvalid.eq(0)]
                    with m.Else():
                        m.d.sync += [mv_tq.eq(mv_tq >> 2), mv_tn.eq(mv_tn - 1)]
                with m.Elif(~have & mv_nvalid & ~mv_issue_done):
                    m.d.sync += [mv_tq.eq(mv_next), mv_tn.eq(5), mv_nvalid.eq(0)]
                # stage 1: the operand of acc + q, acc - q = acc + ~q + 1, or acc, registered (from
                # the q memory's output through the trit's choice into the accumulator's carry
                # chain was the iCE40's critical path)
                q = qm_rp.data.as_signed()
                neg = mv_s1_trit == 3
                q_ext = Signal(signed(fmt.acc_bits))
                m.d.comb += q_ext.eq(Mux(mv_s1_trit[0], q, 0))
                m.d.sync += [mv_s2.eq(mv_s1), mv_s2_op.eq(q_ext ^ neg.replicate(fmt.acc_bits)), mv_s2_neg.eq(neg),
                             mv_s2_last.eq(mv_s1_last), mv_s2_row.eq(mv_s1_row)]
                # stage 2: accumulate (one carry chain); write the row's sum after its last column
                total = Signal(signed(fmt.acc_bits))
                m.d.comb += total.eq(mv_acc + mv_s2_op.as_signed() + mv_s2_neg)
                with m.If(mv_s2):
                    with m.If(mv_s2_last):
                        m.d.comb += [vm_wp.addr.eq(out + mv_s2_row), vm_wp.data.eq(total), vm_wp.en.eq(1)]
                        m.d.sync += mv_acc.eq(0)
                    with m.Else():
                        m.d.sync += mv_acc.eq(total)
                with m.If(mv_issue_done & ~mv_s1 & ~mv_s2):
                    next_instr(pc1)

            with m.State("RESULT"):
                m.d.comb += self.result.valid.eq(1)
                with m.If(self.result.ready):
                    m.next = "IDLE"
        # one flip-flop per state (Yosys recodes the FSM): no state decoding on the control paths
        ctl_fsm.state.attrs["fsm_encoding"] = "one-hot"
        return m
