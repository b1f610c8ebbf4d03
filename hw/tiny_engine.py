"""The tiny engine: the whole token step on one sequential datapath, for the iCE40UP5K.

Same control interface as :class:`~.engine.Engine` (:class:`~.control.ControlSignature`), so
:class:`~.linked_engine.LinkedEngine` puts the serial link in front of either. Bit-exact with
``reference/integer.py``: it runs the program of :mod:`.tiny_program` as
:class:`~.tiny_isa.Machine` specifies it, cycle for cycle (:func:`~.tiny_isa.op_cycles`).

Parts (each a component of its own):

* :class:`~.tiny_fetch.TinyFetch`: the program ROM, ``pc``, ``RA``, the instruction register
  and its decoded form;
* :class:`~.tiny_alu.TinyALU`: ``A``, ``X`` and the units of the ALU ops;
* :class:`~.tiny_matvec.TinyMatVec`: ``MATVEC``, one trit per cycle;
* :class:`~.tiny_weights.WeightStore`: the weight image (block RAM, or the iCE40's SPRAMs),
  written from ``load``;
* here: the sequencer (the states an instruction passes through), the address unit (the base
  registers ``B``, ``P``, the loop index, the operand / store address), the registers ``R``,
  the vector and q memories, the sigmoid table, and the control front (commands, results,
  logit reads).

An instruction's states: DECODE (the instruction register, the chosen base register and the
index-plus-P sum, the decoded op and control flow, all registered), ADDR (only for an
instruction that reads or writes a memory at its address, and ``LOOP``: the address, and
LOOP's count comparison, registered), ISSUE (memory reads issued; stores and control end here),
then for an op with an operand OPER (``X`` loaded; a weight operand first waits a cycle for
the registered SPRAM output in OWAIT, a 32-bit one a second read in OWAIT2 / OPER2), then the
ALU's cycles (EXEC and what the op adds) or MATVEC's. Every extra cycle and register keeps a
decision off a long path into the next state's registers.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory

from mmfree_fpga.config import FORMATS, ModelConfig
from mmfree_fpga.errors import DesignError
from mmfree_fpga.reference.integer import sigmoid_table

from .control import ControlSignature, EngineOp
from .tiny_alu import TinyALU, carry_select, op_cases
from .tiny_fetch import TinyFetch
from .tiny_isa import (B_BITS, DATA_BITS, DIRECT_OPS, LOOP_COUNT_BITS, MATVEC_COLS, MATVEC_OUT, MATVEC_ROWS,
                       MATVEC_TRITS, N_BASES, N_REGS, RES_LOGIT, TARGET_BITS, W_SIZE, Kind, Op)
from .tiny_matvec import TinyMatVec
from .tiny_program import RESET_PC, TOKEN_PC, token_program
from .tiny_weights import weight_store

__all__ = ["TinyEngine", "carry_select"]


class TinyEngine(wiring.Component):
    """The tiny engine for ``cfg`` (base3 images only).

    ``image``: initial contents of the weight memory (simulation; None: written by ``load``).
    ``spram``: build the weight memory from iCE40 ``SB_SPRAM256KA`` blocks (no initial
    contents, so ``image`` must be None).

    Members: those of :class:`~.control.ControlSignature`. ``cmd`` and ``logit_req`` are taken
    while idle (a command first), ``load`` bytes while idle; ``FEED_TOKEN``'s result counts the
    cycles from taking the command to offering the result.
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
        if self.image_bytes >= 1 << B_BITS:
            raise DesignError(f"the weight image ({self.image_bytes} bytes) exceeds the tiny engine's "
                            f"{1 << B_BITS}-byte address space")
        self.image = image
        self.spram = spram
        self.weights = weight_store(self.w_depth, image=image, spram=spram)
        super().__init__(ControlSignature())

    def elaborate(self, platform):
        m = Module()
        lay = self.layout
        m.submodules.fetch = fetch = TinyFetch(self.program)
        m.submodules.alu = alu = TinyALU(FORMATS)
        m.submodules.matvec = mv = TinyMatVec(lay.vm_depth, lay.qm_depth, FORMATS)
        m.submodules.weights = wts = self.weights
        m.d.comb += [wts.load.valid.eq(self.load.valid), wts.load.payload.eq(self.load.payload),
                     self.load.ready.eq(wts.load.ready)]

        m.submodules.regs = regs = Memory(shape=DATA_BITS, depth=N_REGS, init=[])
        m.submodules.vmem = vmem = Memory(shape=32, depth=lay.vm_depth, init=[])
        m.submodules.qmem = qmem = Memory(shape=8, depth=lay.qm_depth, init=[])
        table = [int(t) for t in sigmoid_table(FORMATS)]
        m.submodules.tab = tab = Memory(shape=16, depth=len(table), init=table)
        s = SimpleNamespace(fetch=fetch, alu=alu, mv=mv, wts=wts, reg_rp=regs.read_port(), reg_wp=regs.write_port(),
                            vm_rp=vmem.read_port(), vm_wp=vmem.write_port(), qm_rp=qmem.read_port(),
                            qm_wp=qmem.write_port(), tab_rp=tab.read_port(), token=Signal(32), for_token=Signal())
        f = fetch.instr
        m.d.comb += [alu.op.eq(fetch.op), alu.last_in_exec.eq(fetch.last_in_exec), alu.flag.eq(f.flag),
                     alu.cond.eq(f.reg), alu.token.eq(s.token)]
        m.d.comb += [s.qm_rp.addr.eq(mv.q_addr), mv.q_data.eq(s.qm_rp.data.as_signed()),
                     mv.w_data.eq(wts.rdata)]
        self._address_unit(m, s)
        self._operand(m, s)
        self._front(m, s)
        with m.FSM(name="ctl") as ctl_fsm:
            self._control_states(m, s)
            self._instruction_states(m, s)
        # one flip-flop per state (Yosys recodes the FSM): no state decoding on the control paths
        ctl_fsm.state.attrs["fsm_encoding"] = "one-hot"
        return m

    def _address_unit(self, m, s):
        """The base registers, ``P``, the loop index ``i`` (and ``i + 1`` beside it: no adder
        before LOOP's comparison), the operand / store address and LOOP's comparison."""
        word, f = s.fetch.word, s.fetch.instr
        s.bases = [Signal(B_BITS, name=f"b{k}") for k in range(N_BASES)]
        s.P = Signal(B_BITS)
        s.i = Signal(16)
        s.i1 = Signal(17, init=1)
        s.base_r = Signal(B_BITS)       # the chosen base register, registered in DECODE
        s.addr_ip = Signal(B_BITS)      # the index and P terms' sum, registered in DECODE
        s.addr = Signal(B_BITS)         # imm + base_r + addr_ip, registered in ADDR
        s.loop_more = Signal()          # LOOP's comparison, registered in ADDR
        m.d.comb += [s.alu.i.eq(s.i), s.mv.cols.eq(s.bases[MATVEC_COLS]), s.mv.rows.eq(s.bases[MATVEC_ROWS]),
                     s.mv.trits.eq(s.bases[MATVEC_TRITS]), s.mv.out.eq(s.bases[MATVEC_OUT])]
        s.kind_size_log2 = Signal(2)
        with m.Switch(word.kind):
            for k, size in W_SIZE.items():
                if size > 1:
                    with m.Case(k):
                        m.d.comb += s.kind_size_log2.eq(size.bit_length() - 1)
        s.bsel_val = Signal(B_BITS)
        with m.Switch(word.bsel):
            for k in range(N_BASES):
                with m.Case(k):
                    m.d.comb += s.bsel_val.eq(s.bases[k])
        with m.If(s.alu.set_p):
            m.d.sync += s.P.eq(s.alu.sig_idx)
        s.loop_count = Mux(f.fb, s.base_r, f.imm[TARGET_BITS:TARGET_BITS + LOOP_COUNT_BITS])

    def _operand(self, m, s):
        """A weight operand as OPER takes it, registered with ``w_q``: the low 16 bits (the byte
        chosen by the address and extended, or the word) and the sign of the rest; zero if the
        operand is no weight (the byte choice and its sign extension stay off the operand
        multiplexer's path into X). And the operand: each source gated by its bit of the one-hot
        kind, then ORed."""
        kh, f, rdata, N = s.fetch.kind, s.fetch.instr, s.wts.rdata, DATA_BITS
        w_q = Signal(16)                  # the weight store's output, registered (operand reads)
        m.d.sync += w_q.eq(rdata)
        w_lo = Signal(16)
        w_sign = Signal()
        rd_byte = Mux(s.addr[0], rdata[8:], rdata[:8])
        byte_sign = ~f.flag & rd_byte[7]
        with m.If(kh[Kind.W8]):
            m.d.sync += [w_lo.eq(Cat(rd_byte, byte_sign.replicate(8))), w_sign.eq(byte_sign)]
        with m.Elif(kh[Kind.W16]):
            m.d.sync += [w_lo.eq(rdata), w_sign.eq(~f.flag & rdata[15])]
        with m.Elif(kh[Kind.W32]):     # (the low half, unsigned; the high half follows in OPER2)
            m.d.sync += [w_lo.eq(rdata), w_sign.eq(0)]
        with m.Else():
            m.d.sync += [w_lo.eq(0), w_sign.eq(0)]

        def term(bit, value):
            t = Signal(N, name=f"x_{Kind(bit).name.lower()}")
            m.d.comb += t.eq(Mux(kh[bit], value, 0))
            return t
        x_in = Signal(signed(N))
        m.d.comb += x_in.eq(term(Kind.IMM, f.imm) | term(Kind.R, s.reg_rp.data)
                            | term(Kind.VM, s.vm_rp.data.as_signed()) | term(Kind.TAB, s.tab_rp.data)
                            | Cat(w_lo, w_sign.replicate(N - 16)))
        m.d.comb += [s.alu.x.eq(x_in), s.alu.x_hi.eq(w_q)]
        s.w_addr_hi = Signal(B_BITS - 1)    # the word after the operand's (registered in ISSUE)

    def _front(self, m, s):
        """The result and logit streams' payloads, the cycle count."""
        s.res_token = Signal(32)
        s.res_logit = Signal(signed(32))
        s.cycles = Signal(32)
        s.logit_index = Signal(range(max(2, self.cfg.V)))
        m.d.comb += [self.result.payload.token.eq(s.res_token), self.result.payload.logit.eq(s.res_logit),
                     self.result.payload.cycles.eq(s.cycles), self.logit_resp.payload.eq(s.vm_rp.data.as_signed())]
        with m.If(s.for_token):
            m.d.sync += s.cycles.eq(s.cycles + 1)

    def _next_instr(self, m, s, npc):
        """Leave the current instruction: read the instruction at npc (decoded next cycle)."""
        m.d.comb += [s.fetch.jump.eq(1), s.fetch.target.eq(npc)]
        m.next = "DECODE"

    def _control_states(self, m, s):
        """Idle (taking commands, image bytes, logit requests), starting a program, the result,
        a logit read."""
        with m.State("IDLE"):
            m.d.comb += [self.cmd.ready.eq(1), s.wts.accept.eq(1), self.logit_req.ready.eq(~self.cmd.valid)]
            # commands and logit requests are registered first (START, LREAD): no path from
            # the Link's logic into the program ROM's address or the vector memory's
            with m.If(self.cmd.valid):
                with m.Switch(self.cmd.payload.op):
                    with m.Case(EngineOp.RESET_STATE):
                        m.d.sync += s.for_token.eq(0)
                        m.next = "START"
                    with m.Case(EngineOp.FEED_TOKEN):
                        m.d.sync += [s.for_token.eq(1), s.token.eq(self.cmd.payload.arg), s.cycles.eq(1)]
                        m.next = "START"
                    with m.Case(EngineOp.LOAD_RESET):
                        m.d.comb += s.wts.rewind.eq(1)
            with m.Elif(self.logit_req.valid):
                m.d.sync += s.logit_index.eq(self.logit_req.payload)
                m.next = "LREAD"
        with m.State("START"):
            self._next_instr(m, s, Mux(s.for_token, TOKEN_PC, RESET_PC))
        with m.State("LREAD"):
            m.d.comb += s.vm_rp.addr.eq(self.layout.logits + s.logit_index)
            m.next = "LOGIT"
        with m.State("LOGIT"):
            m.d.comb += [self.logit_resp.valid.eq(1), s.vm_rp.en.eq(0)]
            with m.If(self.logit_resp.ready):
                m.next = "IDLE"
        with m.State("RESULT"):
            m.d.comb += self.result.valid.eq(1)
            with m.If(self.result.ready):
                m.next = "IDLE"

    def _instruction_states(self, m, s):
        fetch, alu, f, kh = s.fetch, s.alu, s.fetch.instr, s.fetch.kind
        with m.State("DECODE"):
            word = fetch.word
            m.d.comb += fetch.decode.eq(1)
            m.d.sync += [s.base_r.eq(Mux(word.fb, s.bsel_val, 0)),
                         s.addr_ip.eq(Mux(word.fi, s.i << s.kind_size_log2, 0) + Mux(word.fp, s.P, 0))]
            with m.If(fetch.addr_cycle):
                m.next = "ADDR"
            with m.Else():
                m.next = "ISSUE"
        with m.State("ADDR"):
            m.d.sync += [s.addr.eq(f.imm + s.base_r + s.addr_ip), s.loop_more.eq(s.i1 < s.loop_count)]
            m.next = "ISSUE"
        with m.State("ISSUE"):
            self._issue(m, s)
        with m.State("OPER"):
            # the operand, from the memory read issued in ISSUE
            m.d.comb += alu.load_x.eq(1)
            with m.If(kh[Kind.W32]):
                m.d.comb += s.wts.raddr.eq(s.w_addr_hi)
                m.next = "OWAIT2"
            with m.Else():
                m.d.comb += [alu.prep.eq(1), alu.start.eq(1)]
                m.next = "EXEC"
        # a weight operand: the store's output is registered (w_q) before it is used: one cycle
        # more per 16-bit read
        with m.State("OWAIT"):
            m.next = "OPER"
        with m.State("OWAIT2"):
            m.next = "OPER2"
        with m.State("OPER2"):
            m.d.comb += [alu.load_x_hi.eq(1), alu.prep.eq(1), alu.start.eq(1)]
            m.next = "EXEC"
        with m.State("EXEC"):
            with m.If(alu.done):
                self._next_instr(m, s, fetch.pc1)
        with m.State("MATVEC"):
            m.d.comb += [s.mv.run.eq(1), s.vm_wp.addr.eq(s.mv.vm_addr), s.vm_wp.data.eq(s.mv.vm_data),
                         s.vm_wp.en.eq(s.mv.vm_en)]
            with m.If(s.mv.w_read):
                m.d.comb += s.wts.raddr.eq(s.mv.w_addr)
            with m.If(s.mv.done):
                self._next_instr(m, s, fetch.pc1)

    def _issue(self, m, s):
        """ISSUE: the operand reads (used by OPER) issued; stores and control end here."""
        fetch, alu, f, A = s.fetch, s.alu, s.fetch.instr, s.alu.a
        m.d.comb += [alu.prep.eq(1), alu.clear.eq(1), s.mv.start.eq(1), s.reg_rp.addr.eq(f.reg), s.vm_rp.addr.eq(s.addr),
                     s.wts.raddr.eq(s.addr[1:]), s.tab_rp.addr.eq(s.addr)]
        m.d.sync += s.w_addr_hi.eq(s.addr[1:] + 1)      # (a W32 operand's high half)
        # the next instruction of the ops that end here, from registers decoded in DECODE
        jump = (fetch.is_loop & s.loop_more) | (fetch.is_br & alu.cond_ok) | fetch.is_call
        with m.If(fetch.ends_in_issue):
            self._next_instr(m, s, Mux(fetch.is_ret, fetch.ra, Mux(jump, f.imm[:TARGET_BITS], fetch.pc1)))
        with m.Switch(fetch.op):
            with m.Case(*op_cases(Op.ST)):
                m.d.comb += [s.reg_wp.addr.eq(f.reg), s.reg_wp.data.eq(A), s.reg_wp.en.eq(1)]
            with m.Case(*op_cases(Op.STV)):
                m.d.comb += [s.vm_wp.addr.eq(s.addr), s.vm_wp.data.eq(A[:32]), s.vm_wp.en.eq(1)]
            with m.Case(*op_cases(Op.STQ)):
                m.d.comb += [s.qm_wp.addr.eq(s.addr), s.qm_wp.data.eq(A[:8]), s.qm_wp.en.eq(1)]
            with m.Case(*op_cases(Op.SETP)):
                m.d.sync += s.P.eq(A[:B_BITS])
            with m.Case(*op_cases(Op.SETB)):
                with m.Switch(f.bsel):
                    for k in range(N_BASES):
                        with m.Case(k):
                            m.d.sync += s.bases[k].eq(f.imm[:B_BITS])
            with m.Case(*op_cases(Op.RES)):
                with m.If(f.reg[0] == RES_LOGIT):
                    m.d.sync += s.res_logit.eq(A[:32])
                with m.Else():
                    m.d.sync += s.res_token.eq(A[:32])
            with m.Case(*op_cases(Op.LOOP)):
                m.d.sync += [s.i.eq(Mux(s.loop_more, s.i1, 0)), s.i1.eq(Mux(s.loop_more, s.i1 + 1, 1))]
            with m.Case(*op_cases(Op.CALL)):
                m.d.comb += fetch.call.eq(1)
            with m.Case(*op_cases(Op.BR, Op.RET, Op.NOP)):
                pass
            with m.Case(*op_cases(Op.MATVEC)):
                m.next = "MATVEC"
            with m.Case(*op_cases(Op.END)):
                with m.If(s.for_token):
                    m.d.sync += s.for_token.eq(0)
                    m.next = "RESULT"
                with m.Else():
                    m.next = "IDLE"
            with m.Case(*op_cases(*DIRECT_OPS)):
                m.d.comb += alu.start.eq(1)
                m.next = "EXEC"
            with m.Default():
                with m.If(s.fetch.kind[Kind.W8] | s.fetch.kind[Kind.W16] | s.fetch.kind[Kind.W32]):
                    m.next = "OWAIT"
                with m.Else():
                    m.next = "OPER"
