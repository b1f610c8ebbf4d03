"""Bit fields of the protocol's little-endian ``struct`` layouts, for the Link's parts: where a
field lies in a payload (:func:`struct_fields`, :func:`field`) and a payload's wire bytes made
of constants and signals (:func:`pack`)."""

from __future__ import annotations

import re
import struct

from amaranth.hdl import Cat, Const, Value

__all__ = ["struct_fields", "field", "pack"]


def struct_fields(layout: struct.Struct) -> list[tuple[int, int]]:
    """(bit offset, bit width) of each field of a little-endian ``struct`` layout, in order."""
    fmt = layout.format
    if fmt[0] != "<":
        raise ValueError(f"{fmt!r}: the wire layouts are little-endian, without padding")
    out, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt[1:]):
        n = int(count or 1)
        if code == "s":
            fields = [(offset, 8 * n)]
        else:
            fields = [(offset + 8 * struct.calcsize("<" + code) * i, 8 * struct.calcsize("<" + code))
                      for i in range(n)]
        out += fields
        offset = fields[-1][0] + fields[-1][1]
    assert offset == 8 * layout.size, fmt
    return out


def field(value, layout: struct.Struct, index: int):
    """Field ``index`` of ``layout`` in ``value`` (the payload's bits, byte i at bits 8i..8i+7)."""
    offset, width = struct_fields(layout)[index]
    return value[offset:offset + width]


def pack(layout: struct.Struct, *values):
    """The wire bytes (byte i = bits 8i..8i+7) of ``values`` in ``layout``; ints and bytes are constants."""
    fields = struct_fields(layout)
    if len(values) != len(fields):
        raise ValueError(f"{layout.format} has {len(fields)} fields, got {len(values)} values")
    parts = []
    for (_, width), value in zip(fields, values):
        if isinstance(value, bytes):
            value = int.from_bytes(value, "little")
        if isinstance(value, int):
            parts.append(Const(value & ((1 << width) - 1), width))
            continue
        value = Value.cast(value).as_unsigned()
        parts.append(value[:width] if len(value) >= width else Cat(value, Const(0, width - len(value))))
    return Cat(*parts)
