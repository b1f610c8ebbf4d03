"""Trit packings the hardware decodes. A matrix is packed row-major as one trit stream.

* ``2bit``: 4 trits per byte, trit k of a byte in bits [2k+1:2k]; codes 00 = 0, 01 = +1,
  11 = -1 (two's complement); 10 never occurs and decodes as 0.
* ``base3``: 5 trits per byte, byte = sum_k (t_k + 1) * 3^k, k = 0..4 (values 0..242);
  1.6 bits per trit against the log2(3) = 1.585 limit.

The stream is padded with zero trits to a whole byte.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PACKINGS", "TRITS_PER_BYTE", "pack_trits", "unpack_trits", "packed_size",
           "pack_trits_2bit", "unpack_trits_2bit", "pack_trits_base3", "unpack_trits_base3",
           "BASE3_DECODE"]

TRITS_PER_BYTE = {"2bit": 4, "base3": 5}
PACKINGS = tuple(TRITS_PER_BYTE)


def packed_size(n_trits: int, packing: str) -> int:
    k = TRITS_PER_BYTE[packing]
    return (n_trits + k - 1) // k


def _groups(trits: np.ndarray, k: int) -> np.ndarray:
    flat = np.asarray(trits, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("trits must be -1, 0 or +1")
    pad = (-flat.size) % k
    return np.concatenate([flat, np.zeros(pad, dtype=np.int64)]).reshape(-1, k)


def pack_trits_2bit(trits: np.ndarray) -> bytes:
    g = _groups(trits, 4) & 0b11
    return (g << np.array([0, 2, 4, 6])).sum(axis=1).astype(np.uint8).tobytes()


def unpack_trits_2bit(data: bytes, n_trits: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    codes = (b[:, None] >> np.array([0, 2, 4, 6])) & 0b11
    trits = np.select([codes == 1, codes == 3], [1, -1], 0)
    return trits.reshape(-1)[:n_trits].astype(np.int8)


_POW3 = np.array([1, 3, 9, 27, 81])


def pack_trits_base3(trits: np.ndarray) -> bytes:
    g = _groups(trits, 5) + 1
    return (g * _POW3).sum(axis=1).astype(np.uint8).tobytes()


def _base3_table() -> np.ndarray:
    """byte value -> its 5 trits; the hardware's decoder ROM. Values 243..255 decode as 0s."""
    table = np.zeros((256, 5), dtype=np.int8)
    for v in range(243):
        table[v] = (v // _POW3) % 3 - 1
    return table


BASE3_DECODE = _base3_table()


def unpack_trits_base3(data: bytes, n_trits: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    return BASE3_DECODE[b].reshape(-1)[:n_trits].copy()


def pack_trits(trits: np.ndarray, packing: str) -> bytes:
    if packing == "2bit":
        return pack_trits_2bit(trits)
    if packing == "base3":
        return pack_trits_base3(trits)
    raise ValueError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")


def unpack_trits(data: bytes, n_trits: int, packing: str) -> np.ndarray:
    if packing == "2bit":
        return unpack_trits_2bit(data, n_trits)
    if packing == "base3":
        return unpack_trits_base3(data, n_trits)
    raise ValueError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
