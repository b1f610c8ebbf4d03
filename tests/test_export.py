"""The weight image: manifest consistency, round trip, demo densities, CLI."""

import json

import numpy as np
import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
from mmfree_fpga.reference.export import integer_weights, read_image, write_image
from mmfree_fpga.reference.integer import IntegerModel, IntLayer


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_image_roundtrip(tmp_path, small_checkpoint, packing):
    cfg, tensors = load_checkpoint(small_checkpoint)
    w = integer_weights(cfg, tensors)
    manifest = write_image(w, tmp_path / "img", packing)
    blob = (tmp_path / "img" / "weights.bin").read_bytes()
    assert len(blob) == manifest["bytes"]
    for s in manifest["sections"]:
        assert s["offset"] + s["size"] <= len(blob) and s["offset"] % 16 == 0
    r = read_image(tmp_path / "img")
    for l in range(cfg.L):
        for name in IntLayer.MATRICES:
            a, b = getattr(w.layers[l], name), getattr(r.layers[l], name)
            for field in ("trits", "a", "c"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert (a.k_mant, a.k_exp) == (b.k_mant, b.k_exp)
        np.testing.assert_array_equal(w.layers[l].lower_bound, r.layers[l].lower_bound)
    np.testing.assert_array_equal(w.emb_q, r.emb_q)
    m1, m2 = IntegerModel(w), IntegerModel(r)
    for tok in (3, 99, 255):
        np.testing.assert_array_equal(m1.step(tok), m2.step(tok))


def test_corrupt_image_rejected(tmp_path, small_checkpoint):
    from mmfree_fpga.errors import UserError
    cfg, tensors = load_checkpoint(small_checkpoint)
    write_image(integer_weights(cfg, tensors), tmp_path / "img")
    p = tmp_path / "img" / "weights.bin"
    b = bytearray(p.read_bytes())
    b[100] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(UserError, match="does not match its manifest"):
        read_image(tmp_path / "img")


@pytest.mark.parametrize("packing, bits", [("base3", 1.6), ("2bit", 2.0)])
def test_demo_export_cli(tmp_path, packing, bits):
    out, js = tmp_path / "exp", tmp_path / "r.json"
    assert main(["export", "--packing", packing, "--out", str(out), "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["bits_per_weight"] == bits
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bytes"] == (out / "weights.bin").stat().st_size == r["bytes"]
    cfg, _ = load_checkpoint(DEMO_CHECKPOINT)
    trit_sections = [s for s in manifest["sections"] if s["kind"] == "trits"]
    assert sum(s["shape"][0] * s["shape"][1] for s in trit_sections) == cfg.ternary_weights
    assert sum(s["size"] for s in trit_sections) == manifest["ternary_bytes"]
    # the demo model's image fits the iCE40UP5K's 128 KB of SPRAM (ternary + int8 embeddings)
    assert manifest["ternary_bytes"] + cfg.V * cfg.d <= 128 * 1024


def test_export_bad_checkpoint_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
