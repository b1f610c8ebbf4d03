"""The weight image: manifest consistency, round trip, demo densities, CLI."""

import hashlib
import json

import numpy as np
import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import FORMAT_SETS
from mmfree_fpga.image import image_layout, image_size
from mmfree_fpga.protocol import formats_id
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
from mmfree_fpga.reference.export import image_bytes, integer_weights, read_image, write_image
from mmfree_fpga.reference.integer import IntegerModel, IntLayer


@pytest.mark.parametrize("formats", ["narrow", "wide"])
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_image_roundtrip(tmp_path, small_checkpoint, packing, formats):
    cfg, tensors = load_checkpoint(small_checkpoint)
    fmt = FORMAT_SETS[formats]
    w = integer_weights(cfg, tensors, fmt)
    manifest = write_image(w, tmp_path / "img", packing)
    blob = (tmp_path / "img" / "weights.bin").read_bytes()
    assert len(blob) == manifest["bytes"] == image_size(cfg, packing, fmt)
    assert manifest["formats"] == fmt.as_dict()
    for s in manifest["sections"]:
        assert s["offset"] + s["size"] <= len(blob) and s["offset"] % 16 == 0
    assert [(s["name"], s["kind"], s["offset"], s["size"]) for s in manifest["sections"]] == \
        [(s.name, s.kind, s.offset, s.size) for s in image_layout(cfg, packing, fmt)]
    r = read_image(tmp_path / "img")
    assert r.formats == fmt
    for l in range(cfg.L):
        for name in IntLayer.MATRICES:
            a, b = getattr(w.layers[l], name), getattr(r.layers[l], name)
            for field in ("trits", "a", "c"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert (a.k_mant, a.k_exp, a.eps_mant, a.eps_exp, a.eps_kind, a.e_a, a.e_c) == \
                (b.k_mant, b.k_exp, b.eps_mant, b.eps_exp, b.eps_kind, b.e_a, b.e_c)
            assert (a.eps_mant > 0) == fmt.norm_eps
        np.testing.assert_array_equal(w.layers[l].lower_bound, r.layers[l].lower_bound)
    np.testing.assert_array_equal(w.emb_q, r.emb_q)
    np.testing.assert_array_equal(w.emb_scale, r.emb_scale)
    assert r.lm_head.eps_kind == "input" and r.layers[0].o_proj.eps_kind == "gsum"
    assert r.layers[0].down_proj.eps_kind == "const"
    m1, m2 = IntegerModel(w), IntegerModel(r)
    for tok in (3, 99, 255):
        np.testing.assert_array_equal(m1.step(tok), m2.step(tok))


def test_layout_by_format_set(small_cfg):
    """The narrow set's layout is the original one (int16 norms, 8-byte k, uint16 lower bounds, int8
    embeddings); the wide set widens exactly those elements."""
    narrow = image_layout(small_cfg, "base3", FORMAT_SETS["narrow"])
    assert narrow == image_layout(small_cfg, "base3")
    wide = {s.name: s for s in image_layout(small_cfg, "base3", FORMAT_SETS["wide"])}
    d, V, i = small_cfg.d, small_cfg.V, small_cfg.I
    for s in narrow:
        w = wide[s.name]
        assert w.shape == s.shape or s.name.endswith(".k")
        part = s.name.rsplit(".", 1)[-1]
        factor = {"a": 2, "c": 2, "k": 2, "lower_bound": 2, "q": 4}.get(part, 1)
        assert w.size == factor * s.size, s.name
        assert (s.kind, w.kind) == {"a": ("int16", "int32"), "c": ("int16", "int32"), "k": ("k", "k"),
                                    "lower_bound": ("uint16", "uint32"), "q": ("int8", "int32"),
                                    "scale": ("uint32", "uint32"), "trits": ("trits", "trits")}[part]
    assert wide["layers.0.down_proj.a"].size == 4 * i and wide["embedding.q"].size == 4 * V * d
    assert wide["lm_head.k"].shape == (4,) and {s.name: s for s in narrow}["lm_head.k"].shape == (2,)
    assert formats_id(FORMAT_SETS["wide"]) != formats_id(FORMAT_SETS["narrow"])


def test_narrow_image_of_the_demo_unchanged():
    """The narrow set's image of the demo model is byte for byte the one before format sets existed
    (SHA-256 of weights.bin recorded then, both packings)."""
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    w = integer_weights(cfg, tensors)
    assert hashlib.sha256(image_bytes(w, "2bit")).hexdigest() == \
        "71f5e4a70e35ba5454be9a1aa2c05b3dcb6ca8dccefe349df20c386a8575aee2"
    assert hashlib.sha256(image_bytes(w, "base3")).hexdigest() == \
        "5e4df0148d1a785f3f86ead767188c58ab16af8521b7bc44a181ceac550f3b29"


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


def test_export_cli_formats(tmp_path):
    out, js = tmp_path / "exp", tmp_path / "r.json"
    assert main(["export", "--formats", "wide", "--out", str(out), "--json-out", str(js), "--quiet"]) == 0
    r = json.loads(js.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert r["formats"] == "wide" and manifest["formats"] == FORMAT_SETS["wide"].as_dict()
    cfg, _ = load_checkpoint(DEMO_CHECKPOINT)
    assert r["bytes"] == image_size(cfg, "base3", FORMAT_SETS["wide"])
    assert manifest["embedding_bytes"] == 4 * cfg.V * cfg.d + 4 * cfg.V
    assert read_image(out).formats == FORMAT_SETS["wide"]
