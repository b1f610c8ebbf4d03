"""The engine-control interface: one command/result contract between the Link and every engine.

:class:`ControlSignature` is the interface as an engine presents it (:class:`~.engine.Engine`,
:class:`~.tiny_engine.TinyEngine`); the :class:`~.link.Link` holds the flipped side, and
``hw/linked_engine.py`` joins the two with :func:`amaranth.lib.wiring.connect`.

Members (engine side; all ``amaranth.lib.stream``)
---------------------------------------------------
cmd : In(stream.Signature(command_layout()))
    ``op`` (:class:`EngineOp`), ``index`` (u8, SET_PARAM only), ``arg`` (u32: the token of
    FEED_TOKEN, the value of SET_PARAM). Accepted only while the engine is idle (not during a
    token, nor while a result waits); the engine holds ``ready`` low otherwise.

    * ``RESET_STATE``: the recurrent state of every layer := 0 (also the state after reset);
    * ``FEED_TOKEN``: run one step on token ``arg``; exactly one ``result`` follows;
    * ``LOAD_RESET``: the weight write pointer := 0 (the Link sends it on LOAD_BEGIN);
    * ``SET_PARAM``: run-time parameter ``index`` := ``arg`` (engine-specific; an engine
      without parameters ignores it);
    * ``FEED_SLOT`` and ``RESET_SLOT`` (``index``: the slot): only engines with state slots
      (``EngineCore(slots=...)``, which then also has the ``residual`` member of
      :func:`residual_layout`, its input buffer) take them; see :mod:`.engine`.
load : In(stream.Signature(8))
    Weight-image bytes, stored at the write pointer, which then advances. Not during a token.
result : Out(stream.Signature(result_layout()))
    ``token`` (u32, the argmax), ``logit`` (s32, its Q16 value), ``cycles`` (u32, clock cycles
    from accepting FEED_TOKEN to offering the result; 0 if not counted). One per FEED_TOKEN.
logit_req : In(stream.Signature(32))
    Index of a logit of the last step.
logit_resp : Out(stream.Signature(signed(32)))
    That logit (Q16); one response per request, in order.

Host side: :func:`encode_command` and :func:`decode_result` turn the payloads into and out of
the integers a testbench drives and reads (``cmd__payload``, ``result__payload`` in the
generated Verilog); :func:`field_offsets` gives the bit offsets for code that cannot import
Amaranth (the C++ harness).
"""

from __future__ import annotations

from amaranth.hdl import signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["EngineOp", "command_layout", "result_layout", "residual_layout", "ControlSignature", "encode_command",
           "decode_result", "field_offsets"]


class EngineOp(enum.Enum, shape=3):
    RESET_STATE = 0
    FEED_TOKEN = 1
    LOAD_RESET = 2
    SET_PARAM = 3
    FEED_SLOT = 4       # engines with state slots only (EngineCore(slots=...))
    RESET_SLOT = 5


def command_layout() -> data.StructLayout:
    """``cmd`` payload: ``op`` (bits 2:0), ``index`` (10:3), ``arg`` (42:11)."""
    return data.StructLayout({"op": EngineOp, "index": unsigned(8), "arg": unsigned(32)})


def result_layout() -> data.StructLayout:
    """``result`` payload: ``token`` (bits 31:0), ``logit`` (63:32, signed), ``cycles`` (95:64)."""
    return data.StructLayout({"token": unsigned(32), "logit": signed(32), "cycles": unsigned(32)})


def residual_layout(max_d: int, fmt=None) -> data.StructLayout:
    """A write to the input buffer of an engine with state slots (its ``residual`` member):
    element ``index`` := ``value`` (signed ``fmt.x_bits``; the narrow formats by default)."""
    if fmt is None:
        from mmfree_fpga.config import FORMATS as fmt
    return data.StructLayout({"index": range(max_d), "value": signed(fmt.x_bits)})


class ControlSignature(wiring.Signature):
    """The control interface as the engine sees it (module docstring)."""

    def __init__(self):
        super().__init__({
            "cmd": In(stream.Signature(command_layout())),
            "load": In(stream.Signature(unsigned(8))),
            "result": Out(stream.Signature(result_layout())),
            "logit_req": In(stream.Signature(unsigned(32))),
            "logit_resp": Out(stream.Signature(signed(32))),
        })


def encode_command(op: EngineOp, *, index: int = 0, arg: int = 0) -> int:
    """The ``cmd`` payload of ``op`` as an integer."""
    if not isinstance(op, EngineOp):
        raise TypeError(f"op must be an EngineOp, not {op!r}")
    if not 0 <= index < 1 << 8 or not 0 <= arg < 1 << 32:
        raise ValueError(f"index must be in [0, 256) and arg in [0, 2**32), got {index} and {arg}")
    return command_layout().const({"op": op, "index": index, "arg": arg}).as_value().value


def decode_result(payload: int) -> tuple[int, int, int]:
    """``(token, logit, cycles)`` of a ``result`` payload integer."""
    value = result_layout().from_bits(payload)
    return int(value.token), int(value.logit), int(value.cycles)


def field_offsets() -> dict[str, int]:
    """Bit offsets of the payload fields: ``index_shift``, ``arg_shift`` of ``cmd``;
    ``token_bit``, ``logit_bit``, ``cycles_bit`` of ``result``."""
    cmd, res = command_layout(), result_layout()
    return {"index_shift": cmd["index"].offset, "arg_shift": cmd["arg"].offset,
            "token_bit": res["token"].offset, "logit_bit": res["logit"].offset,
            "cycles_bit": res["cycles"].offset}
