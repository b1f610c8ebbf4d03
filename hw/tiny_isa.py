"""The instruction set of the tiny engine (:mod:`.tiny_engine`), its encoding and a simulator.

The iCE40UP5K (5280 logic cells, 8 DSPs) cannot hold the pipelined vector cores of
:mod:`.engine`. The tiny engine replaces them with one sequential 48-bit datapath run by a
program in block RAM: every per-element computation of ``reference/integer.py`` (normalise,
statistics, quantise, output scale, sigmoid, SiLU, MLGRU, GLU, argmax) is a short loop of
instructions, and only the ternary matrix-vector product has a unit of its own. This module is
the executable specification: :class:`Machine` runs a program exactly as the hardware does
(the hardware tests compare against it), and :mod:`.tiny_program` writes the token step for a
model geometry.

Machine state
-------------
* ``A``: the :data:`DATA_BITS`-bit signed accumulator; every operation reads or writes it. A
  result outside its range is a program error (:class:`ProgramFault` here; the hardware
  wraps): :mod:`.tiny_program` keeps every value within it for every input the number formats
  allow (its docstring has the bounds);
* ``R[0..N_REGS-1]``: :data:`N_REGS` registers of the same width; ``B[0..N_BASES-1]``:
  :data:`N_BASES` :data:`B_BITS`-bit base registers (addresses, counts);
* ``P``: a :data:`B_BITS`-bit pointer added to addresses; ``i``: the loop index (one loop level);
* ``RA``: the return address (one call level); ``res[RES_TOKEN]``, ``res[RES_LOGIT]``: the
  result (token, logit);
* memories: ``VM`` (vector memory, 32-bit signed words), ``QM`` (the int8 quantised input of
  the next matrix), ``W`` (the weight image, bytes, read as 8/16/32-bit little-endian
  values), ``TAB`` (the sigmoid table, read only).

Instruction word (:data:`WORD_BITS` bits): the fields of :data:`FIELDS` from bit 0 (``reg``
wide enough to name one of :data:`N_REGS` registers, ``bsel`` one of :data:`N_BASES`, ``imm``
:data:`IMM_BITS` bits, signed).

The operand ``X`` of an instruction is selected by ``kind`` (:class:`Kind`): the immediate, a
register ``R[reg]``, or a memory word at the address ``imm + (fi ? i * size) + (fp ? P) +
(fb ? B[bsel])`` (``size`` = bytes of a ``W`` value, 1 otherwise). ``flag`` reads ``W``
values unsigned, makes ``MUL`` treat ``X`` as unsigned, and makes ``SHR`` round.
Control instructions take a :data:`TARGET_BITS`-bit target from the low bits of ``imm``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from mmfree_fpga.config import FORMATS, Formats
from mmfree_fpga.errors import DesignError

__all__ = ["START_CYCLES", "Op", "Kind", "Cond", "Instr", "WORD_BITS", "FIELDS", "IMM_BITS", "B_BITS", "PROG_DEPTH",
           "N_REGS", "N_BASES", "DATA_BITS", "W_SIZE", "DIV_X_BITS", "RES_TOKEN", "RES_LOGIT",
           "MATVEC_COLS", "MATVEC_TRITS", "MATVEC_OUT", "MATVEC_ROWS", "MATVEC_OVERHEAD",
           "encode", "decode", "Asm", "Machine", "sig_index", "sig_frac_bits", "NO_OPERAND_OPS", "DIRECT_OPS",
           "MEMORY_KINDS", "ADDR_CYCLE_OPS", "TARGET_BITS", "LOOP_COUNT_BITS", "takes_addr_cycle", "op_cycles"]

IMM_BITS = 21
B_BITS = 18            # base registers, P, addresses
PROG_DEPTH = 512       # instruction ROM words
TARGET_BITS = (PROG_DEPTH - 1).bit_length()     # a control target: imm[TARGET_BITS - 1:0]
LOOP_COUNT_BITS = IMM_BITS - TARGET_BITS - 1    # a LOOP's immediate count: the bits above the target, below the sign
N_REGS = 16            # the registers R
N_BASES = 8            # the base registers B
DATA_BITS = 48         # A, R and X
DIV_X_BITS = 33        # DIV's divisor: 0 < X < 2^DIV_X_BITS
RES_TOKEN, RES_LOGIT = 0, 1                     # RES's reg: which result A sets
# the base registers MATVEC reads: columns, the trits' byte address in W, the output's VM
# address, rows
MATVEC_COLS, MATVEC_TRITS, MATVEC_OUT, MATVEC_ROWS = 1, 2, 4, 5


class Op(enum.IntEnum):
    NOP = 0
    LD = 1       # A := X
    ADD = 2      # A := A + X
    SUB = 3      # A := A - X
    MUL = 4      # A := sext32(A[31:0]) * (flag ? X[31:0] : sext32(X[31:0]))
    MAX = 5      # A := max(A, X) (two EXEC cycles: compare, then take X)
    MIN = 6      # A := min(A, X)
    SHR = 8      # s = X: s > 0: A >> s (flag: rounded, (A + 2^(s-1)) >> s); s < 0: A << -s
    CSGN = 9     # A := -A if X < 0 (two EXEC cycles)
    ABS = 10     # A := |A|
    SAT = 11     # A := clamp(A, int32)
    BITLEN = 12  # A := bit length of A (A >= 0)
    SQRT = 13    # A := floor(sqrt(A)) (A >= 0)
    DIV = 14     # A := A // X (A >= 0, 0 < X < 2^DIV_X_BITS)
    SIGP = 15    # sigmoid interval of A: P := index, A := fraction (see sig_index)
    GETI = 16    # A := i
    GETT = 17    # A := the token of FEED_TOKEN
    ST = 18      # R[reg] := A
    STV = 19     # VM[addr] := A[31:0]
    STQ = 20     # QM[addr] := A[7:0]
    SETP = 21    # P := A[17:0]
    SETB = 22    # B[bsel] := imm
    RES = 23     # res[reg] := A[31:0] (reg: RES_TOKEN or RES_LOGIT)
    LOOP = 24    # i := i + 1; if i < count: pc := target else i := 0 (count = fb ? B[bsel] : imm[19:9])
    BR = 25      # if cond(reg) holds for A: pc := target
    CALL = 26    # RA := pc + 1; pc := target
    RET = 27     # pc := RA
    MATVEC = 28  # VM[B[OUT] + r] := sum_c T[r][c] QM[c], r < B[ROWS], c < B[COLS], T base3 at W[B[TRITS]]
                 # (B[...]: the base registers MATVEC_*)
    END = 29     # stop (the result is offered when the program ran for FEED_TOKEN)


class Kind(enum.IntEnum):
    IMM = 0
    R = 1
    VM = 2
    W8 = 3
    W16 = 4
    W32 = 5
    TAB = 6


class Cond(enum.IntEnum):
    ALWAYS = 0
    EQ = 1       # A == 0
    NE = 2
    LT = 3       # A < 0
    GE = 4
    GT = 5
    LE = 6


W_SIZE = {Kind.W8: 1, Kind.W16: 2, Kind.W32: 4}

# (name, width) from bit 0; ``reg`` also holds BR's Cond and RES's index
FIELDS = (("op", int(max(Op)).bit_length()), ("reg", (N_REGS - 1).bit_length()),
          ("kind", int(max(Kind)).bit_length()), ("fi", 1), ("fp", 1), ("fb", 1),
          ("bsel", (N_BASES - 1).bit_length()), ("flag", 1), ("imm", IMM_BITS))
WORD_BITS = sum(w for _, w in FIELDS)


@dataclass(frozen=True)
class Instr:
    op: Op
    reg: int = 0
    kind: Kind = Kind.IMM
    fi: int = 0
    fp: int = 0
    fb: int = 0
    bsel: int = 0
    flag: int = 0
    imm: int = 0

    def __post_init__(self):
        lo, hi = -(1 << (IMM_BITS - 1)), (1 << (IMM_BITS - 1))
        if not lo <= self.imm < hi:
            raise DesignError(f"immediate {self.imm} of {self.op.name} does not fit {IMM_BITS} bits")


def encode(ins: Instr) -> int:
    word, pos = 0, 0
    for name, width in FIELDS:
        v = int(getattr(ins, name)) & ((1 << width) - 1)
        word |= v << pos
        pos += width
    return word


def decode(word: int) -> Instr:
    vals, pos = {}, 0
    for name, width in FIELDS:
        vals[name] = (word >> pos) & ((1 << width) - 1)
        pos += width
    imm = vals["imm"]
    if imm >> (IMM_BITS - 1):
        imm -= 1 << IMM_BITS
    vals["imm"] = imm
    return Instr(op=Op(vals["op"]), reg=vals["reg"], kind=Kind(vals["kind"]), fi=vals["fi"], fp=vals["fp"],
                 fb=vals["fb"], bsel=vals["bsel"], flag=vals["flag"], imm=imm)


class Asm:
    """A program being written: ``emit`` instructions, ``label``s, targets by label name."""

    def __init__(self):
        self.code: list[tuple[Instr, str | None]] = []
        self.labels: dict[str, int] = {}

    @property
    def pc(self) -> int:
        return len(self.code)

    def label(self, name: str):
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = self.pc

    def emit(self, op: Op, target: str | None = None, **kw):
        self.code.append((Instr(op, **kw), target))

    def assemble(self) -> list[Instr]:
        if len(self.code) > PROG_DEPTH:
            raise DesignError(f"the tiny engine's program has {len(self.code)} instructions, its ROM "
                            f"{PROG_DEPTH}: the model has too many layers for this engine")
        out = []
        for ins, target in self.code:
            if target is not None:
                t = self.labels[target]
                count = (ins.imm >> TARGET_BITS) if ins.op == Op.LOOP else 0
                ins = Instr(**{**ins.__dict__, "imm": (count << TARGET_BITS) | t})
            out.append(ins)
        return out


def sig_frac_bits(fmt: Formats = FORMATS) -> int:
    """Bits of the fraction within one sigmoid table interval (what SIGP leaves in A)."""
    return fmt.x_frac - fmt.sig_step_log2


def sig_index(y: int, fmt: Formats = FORMATS) -> tuple[int, int]:
    """(table index, fraction) of the sigmoid of the Q(x_frac) value ``y``: below the table the
    first entry with fraction 0, above it the last interval with the full fraction (so the
    interpolation gives the last entry), exactly ``reference.integer.sigmoid``."""
    frac_bits = sig_frac_bits(fmt)
    n = 1 << fmt.sig_table_log2
    idx = (y >> frac_bits) + n // 2
    if idx < 0:
        return 0, 0
    if idx >= n:
        return n - 1, 1 << frac_bits
    return idx, y & ((1 << frac_bits) - 1)


def _data(v: int) -> int:
    """v, which must fit the datapath (DATA_BITS signed)."""
    if not -(1 << (DATA_BITS - 1)) <= v < (1 << (DATA_BITS - 1)):
        raise ProgramFault(f"value {v} exceeds the {DATA_BITS}-bit datapath")
    return v


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


class ProgramFault(RuntimeError):
    """The program broke an operand rule (a check the hardware does not make)."""


@dataclass
class Machine:
    """Runs a program on memories, as the tiny engine does.

    ``image``: the weight image bytes; ``vm_depth``: vector memory words; ``qm_depth``: int8
    words; ``table``: the sigmoid table. ``cycles`` counts clock cycles by :meth:`cost`.
    """

    program: list[Instr]
    image: bytes
    vm_depth: int
    qm_depth: int
    table: tuple
    fmt: Formats = FORMATS
    A: int = 0
    R: list = field(default_factory=lambda: [0] * N_REGS)
    B: list = field(default_factory=lambda: [0] * N_BASES)
    P: int = 0
    i: int = 0
    RA: int = 0
    res: list = field(default_factory=lambda: [0, 0])     # [RES_TOKEN], [RES_LOGIT]
    token: int = 0
    steps: int = 0
    cycles: int = 0

    def __post_init__(self):
        self.VM = np.zeros(self.vm_depth, dtype=np.int64)
        self.QM = np.zeros(self.qm_depth, dtype=np.int64)
        self.W = np.frombuffer(bytes(self.image), dtype=np.uint8)

    # -- operands -------------------------------------------------------------
    def addr(self, ins: Instr, size: int = 1) -> int:
        a = ins.imm + (self.i * size if ins.fi else 0) + (self.P if ins.fp else 0) + (
            self.B[ins.bsel] if ins.fb else 0)
        return a & ((1 << B_BITS) - 1)

    def w_value(self, a: int, size: int, unsigned: bool) -> int:
        if a % size or a + size > len(self.W):
            raise ProgramFault(f"W read of {size} bytes at {a}")
        v = int.from_bytes(self.W[a:a + size].tobytes(), "little")
        if not unsigned and v >> (8 * size - 1):
            v -= 1 << (8 * size)
        return v

    def operand(self, ins: Instr) -> int:
        k = ins.kind
        if k == Kind.IMM:
            return ins.imm
        if k == Kind.R:
            return self.R[ins.reg]
        if k == Kind.VM:
            a = self.addr(ins)
            if a >= self.vm_depth:
                raise ProgramFault(f"VM read at {a}")
            return int(self.VM[a])
        if k in W_SIZE:
            size = W_SIZE[k]
            return self.w_value(self.addr(ins, size), size, bool(ins.flag))
        if k == Kind.TAB:
            a = self.addr(ins)
            if a >= len(self.table):
                raise ProgramFault(f"TAB read at {a}")
            return int(self.table[a])
        raise ProgramFault(f"operand kind {k}")

    # -- execution --------------------------------------------------------------
    def run(self, pc: int, max_steps: int = 50_000_000) -> None:
        """Run from ``pc`` until END."""
        prog = self.program
        while True:
            ins = prog[pc]
            self.steps += 1
            if self.steps > max_steps:
                raise ProgramFault("step limit")
            op = ins.op
            nxt = pc + 1
            if op in _ALU:
                x = self.operand(ins) if op not in DIRECT_OPS else 0
                self.cycles += op_cycles(ins, self.A, x, self.fmt)
                self.A = _data(_ALU[op](self, ins, x))
            else:
                self.cycles += op_cycles(ins, self.A, 0, self.fmt, self.B)
            if op in _ALU:
                pass
            elif op == Op.ST:
                self.R[ins.reg] = self.A
            elif op == Op.STV:
                a = self.addr(ins)
                if a >= self.vm_depth:
                    raise ProgramFault(f"VM write at {a}")
                self.VM[a] = _s32(self.A)
            elif op == Op.STQ:
                a = self.addr(ins)
                if a >= self.qm_depth:
                    raise ProgramFault(f"QM write at {a}")
                v = self.A & 0xFF
                self.QM[a] = v - 256 if v >= 128 else v
            elif op == Op.SETP:
                self.P = self.A & ((1 << B_BITS) - 1)
            elif op == Op.SETB:
                self.B[ins.bsel] = ins.imm & ((1 << B_BITS) - 1)
            elif op == Op.RES:
                self.res[ins.reg & 1] = _s32(self.A)     # RES_TOKEN or RES_LOGIT
            elif op == Op.LOOP:
                count = self.B[ins.bsel] if ins.fb else (ins.imm >> TARGET_BITS) & ((1 << LOOP_COUNT_BITS) - 1)
                self.i += 1
                if self.i < count:
                    nxt = ins.imm & (PROG_DEPTH - 1)
                else:
                    self.i = 0
            elif op == Op.BR:
                if _COND[Cond(ins.reg)](self.A):
                    nxt = ins.imm & (PROG_DEPTH - 1)
            elif op == Op.CALL:
                self.RA = pc + 1
                nxt = ins.imm & (PROG_DEPTH - 1)
            elif op == Op.RET:
                nxt = self.RA
            elif op == Op.MATVEC:
                self.matvec()
            elif op == Op.END:
                return
            elif op != Op.NOP:
                raise ProgramFault(f"op {op}")
            pc = nxt

    def matvec(self) -> None:
        from mmfree_fpga.packing import unpack_trits_base3
        cols, base, out, rows = (self.B[k] for k in (MATVEC_COLS, MATVEC_TRITS, MATVEC_OUT, MATVEC_ROWS))
        n = rows * cols
        nbytes = -(-n // 5)
        trits = unpack_trits_base3(self.W[base:base + nbytes].tobytes(), n).reshape(rows, cols).astype(np.int64)
        acc = trits @ self.QM[:cols]
        if out + rows > self.vm_depth:
            raise ProgramFault("MATVEC output beyond VM")
        self.VM[out:out + rows] = acc


# clock cycles of the hardware (hw/tiny_engine.py): DECODE, ADDR (only for an instruction that
# addresses a memory: the operand or store address is registered before the memories see it;
# and for LOOP: its comparison is registered),
# ISSUE, then OPER (a weight operand: after a wait for the registered SPRAM output; a 32-bit
# weight: a second wait and OPER2), then EXEC and the op's extra cycles;
# stores and control finish in ISSUE.
MATVEC_OVERHEAD = 7
# cycles of a FEED_TOKEN before the program's first instruction: accepting it, starting
START_CYCLES = 2
# ops that finish in ISSUE
NO_OPERAND_OPS = {Op.ST, Op.STV, Op.STQ, Op.SETP, Op.SETB, Op.RES, Op.LOOP, Op.BR, Op.CALL, Op.RET, Op.NOP, Op.END}
# ops that execute on A alone (ISSUE, then EXEC: no operand read)
DIRECT_OPS = {Op.ABS, Op.SAT, Op.BITLEN, Op.SQRT, Op.SIGP, Op.GETI, Op.GETT}
# operand kinds read from a memory at the computed address
MEMORY_KINDS = {Kind.VM, Kind.TAB, Kind.W8, Kind.W16, Kind.W32}
# ops that take the ADDR cycle whatever their kind: the stores to a memory, and LOOP (its count
# comparison is registered there, not on the path from the program ROM to its own address)
ADDR_CYCLE_OPS = {Op.STV, Op.STQ, Op.LOOP}


def takes_addr_cycle(ins: Instr) -> bool:
    """Whether the instruction takes the ADDR cycle: it reads or writes a memory at its computed
    address, or it is a LOOP (:data:`ADDR_CYCLE_OPS`)."""
    if ins.op in ADDR_CYCLE_OPS:
        return True
    operand = ins.op not in NO_OPERAND_OPS and ins.op not in DIRECT_OPS and ins.op != Op.MATVEC
    return operand and ins.kind in MEMORY_KINDS


def shift_steps(s: int, rnd: bool) -> int:
    """Cycles of the SHIFT state for a shift by s (right 8 or 1 places per cycle, +1 for rounding;
    left 1 place per cycle), plus the cycle that decides the first step and the one that ends it."""
    n = 0
    added = False
    while s != 0:
        if s > 0:
            if rnd and s == 1 and not added:
                added = True
            elif s >= (9 if rnd else 8):
                s -= 8
            else:
                s -= 1
        else:
            s += 1
        n += 1
    return n + 2


def op_cycles(ins: Instr, a: int, x: int, fmt: Formats = FORMATS, bases=None) -> int:
    """Clock cycles of one instruction: DECODE, ADDR where it takes it, then what
    :func:`_op_cycles` counts."""
    return 1 + takes_addr_cycle(ins) + _op_cycles(ins, a, x, fmt, bases)


def _op_cycles(ins: Instr, a: int, x: int, fmt: Formats, bases) -> int:
    op = ins.op
    if op in NO_OPERAND_OPS:
        return 1
    if op == Op.MATVEC:
        return 1 + MATVEC_OVERHEAD + bases[MATVEC_ROWS] * bases[MATVEC_COLS]
    if op in (Op.ABS, Op.SAT, Op.SIGP, Op.GETI, Op.GETT):
        return 2
    if op == Op.BITLEN:
        return 4
    if op == Op.SQRT:
        return DATA_BITS + DATA_BITS // 2 + 2     # odd steps: two cycles
    # OPER (+ a wait for the registered weight read; W32: a second read and wait, OPER2)
    oper = 2 + {Kind.W8: 1, Kind.W16: 1, Kind.W32: 3}.get(ins.kind, 0)
    if op == Op.MUL:
        return oper + 2
    if op == Op.DIV:
        return oper + 2 * DATA_BITS               # two cycles per quotient bit
    if op in (Op.MAX, Op.MIN, Op.CSGN):
        return oper + 2
    if op == Op.SHR:
        return oper + 1 + shift_steps(x, bool(ins.flag) and x > 0)
    return oper + 1


def _shr(m: Machine, ins: Instr, s: int) -> int:
    a = m.A
    if not -63 <= s <= 63:
        raise ProgramFault(f"shift by {s}")
    if s > 0:
        return (a + (1 << (s - 1))) >> s if ins.flag else a >> s
    return a << (-s)


def _mul(m: Machine, ins: Instr, x: int) -> int:
    if not -(1 << 31) <= m.A < (1 << 31):
        raise ProgramFault(f"MUL of A = {m.A} (not 32-bit)")
    xv = x & 0xFFFFFFFF if ins.flag else _s32(x)
    if (not ins.flag and not -(1 << 31) <= x < (1 << 31)) or (ins.flag and not 0 <= x < (1 << 32)):
        raise ProgramFault(f"MUL by X = {x} (not 32-bit)")
    return m.A * xv


def _bitlen(m: Machine, ins: Instr, x: int) -> int:
    if m.A < 0:
        raise ProgramFault("BITLEN of a negative A")
    return m.A.bit_length()


def _sqrt(m: Machine, ins: Instr, x: int) -> int:
    if m.A < 0:
        raise ProgramFault("SQRT of a negative A")
    return math.isqrt(m.A)


def _div(m: Machine, ins: Instr, x: int) -> int:
    if m.A < 0 or not 0 < x < (1 << DIV_X_BITS):
        raise ProgramFault(f"DIV {m.A} // {x}")
    return m.A // x


def _sigp(m: Machine, ins: Instr, x: int) -> int:
    if not -(1 << 31) <= m.A < (1 << 31):
        raise ProgramFault("SIGP of a value wider than 32 bits")
    idx, frac = sig_index(m.A, m.fmt)
    m.P = idx
    return frac


_ALU = {
    Op.LD: lambda m, ins, x: x,
    Op.ADD: lambda m, ins, x: m.A + x,
    Op.SUB: lambda m, ins, x: m.A - x,
    Op.MUL: _mul,
    Op.MAX: lambda m, ins, x: max(m.A, x),
    Op.MIN: lambda m, ins, x: min(m.A, x),
    Op.SHR: lambda m, ins, x: _shr(m, ins, x),
    Op.CSGN: lambda m, ins, x: -m.A if x < 0 else m.A,
    Op.ABS: lambda m, ins, x: abs(m.A),
    Op.SAT: lambda m, ins, x: min(max(m.A, -(1 << 31)), (1 << 31) - 1),
    Op.BITLEN: _bitlen,
    Op.SQRT: _sqrt,
    Op.DIV: _div,
    Op.SIGP: _sigp,
    Op.GETI: lambda m, ins, x: m.i,
    Op.GETT: lambda m, ins, x: m.token,
}

_COND = {
    Cond.ALWAYS: lambda a: True, Cond.EQ: lambda a: a == 0, Cond.NE: lambda a: a != 0,
    Cond.LT: lambda a: a < 0, Cond.GE: lambda a: a >= 0, Cond.GT: lambda a: a > 0, Cond.LE: lambda a: a <= 0,
}
