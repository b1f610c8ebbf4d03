"""Trit packings: round trips, sizes, and the byte layout the hardware decodes."""

import numpy as np
import pytest

from mmfree_fpga.packing import (BASE3_DECODE, PACKINGS, pack_trits, packed_size,
                                           unpack_trits)

CASES = {
    "random": lambda g: g.integers(-1, 2, size=(37, 53)),
    "all_plus": lambda g: np.ones((16, 16), dtype=np.int64),
    "all_minus": lambda g: -np.ones((16, 16), dtype=np.int64),
    "all_zero": lambda g: np.zeros((16, 16), dtype=np.int64),
    "one_trit": lambda g: np.array([[-1]]),
    "sparse": lambda g: g.choice([-1, 0, 1], size=(64, 100), p=[0.05, 0.9, 0.05]),
    "long_row": lambda g: g.integers(-1, 2, size=(1, 16384)),
}


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip(packing, case):
    t = CASES[case](np.random.default_rng(len(case)))
    data = pack_trits(t, packing)
    assert len(data) == packed_size(t.size, packing)
    np.testing.assert_array_equal(unpack_trits(data, t.size, packing).reshape(t.shape), t)


def test_byte_layouts():
    # trits [+1, -1, 0, +1] -> codes 01, 11, 00, 01 from bit 0 upward
    assert pack_trits(np.array([1, -1, 0, 1]), "2bit") == bytes([0b01_00_11_01])
    # base3: sum (t_k + 1) 3^k = 2 + 0*3 + 1*9 + 2*27 + 1*81
    assert pack_trits(np.array([1, -1, 0, 1, 0]), "base3") == bytes([2 + 9 + 54 + 81])
    assert pack_trits(np.ones(5), "base3") == bytes([242])
    assert (BASE3_DECODE[243:] == 0).all()


def test_density():
    n = 5 * 4 * 1000
    assert 8 * packed_size(n, "base3") / n == 1.6
    assert 8 * packed_size(n, "2bit") / n == 2.0


def test_rejects_non_trits():
    with pytest.raises(ValueError):
        pack_trits(np.array([0, 2]), "2bit")
