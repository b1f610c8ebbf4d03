"""`mmfree-fpga compare`: agreement figures, report files, the simulated engine equal to the
integer model, and a corrupted weight caught and located (layer and job) in both hardware modes."""

import hashlib
import json
import shutil

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.reference.agreement import agreement, held_out_ids
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
from mmfree_fpga.reference.compare import HARDWARE_VECTORS, OPS
from mmfree_fpga.reference.export import integer_weights
from mmfree_fpga.sim.runner import simulator_missing


@pytest.fixture(scope="module")
def demo_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "export"
    assert main(["export", "--out", str(out), "--quiet"]) == 0
    return out


def _needs_verilator():
    reason = simulator_missing("verilator")
    if reason:
        pytest.skip(reason)


def test_compare_demo_matches_agreement(tmp_path, demo_image):
    js = tmp_path / "r.json"
    assert main(["compare", "--positions", "96", "--hardware", "image", "--image", str(demo_image),
                 "--out", str(tmp_path / "rep"), "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    want = agreement(load_model(DEMO_CHECKPOINT), integer_weights(cfg, tensors), held_out_ids(96))
    # compare feeds token by token, agreement() the whole prompt at once: float32 order differs,
    # and float32 rounding alone flips about 0.5% of this model's greedy choices (BENCHMARKS.md)
    assert abs(r["top1_agreement"] - want["top1_agreement"]) <= 1 / 96 + 1e-9
    assert r["mean_logit_cosine"] == pytest.approx(want["mean_logit_cosine"], abs=1e-6)
    assert r["hardware"] == "image" and "not simulated" in r["hardware_source"]
    assert r["hardware_exact"] is True and r["hardware_first_mismatch"] is None
    for name in ("report.md", "report.json", "cosine_per_token.png", "error_per_op.png", "quantisation_error.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert len(r["per_layer"]) == cfg.L * len(OPS)
    # float vs integer by magnitude: every vector within a few percent on the demo model
    assert all(e["float_vs_integer_rel_l2"] < 0.1 for e in r["per_layer"])


def test_compare_simulated_engine_equals_integer_model(tmp_path):
    """The default hardware mode: the engine simulated (Verilator), every stored vector captured."""
    _needs_verilator()
    js = tmp_path / "r.json"
    assert main(["compare", "--positions", "3", "--out", str(tmp_path / "rep"), "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["hardware"] == "sim" and r["simulation"]["simulator"] == "verilator"
    assert r["hardware_exact"] is True and r["hardware_first_mismatch"] is None
    assert r["hardware_vectors"] == list(HARDWARE_VECTORS) + ["logits"]
    assert r["simulation"]["result_matches_stored_logits"] is True
    stored = [e for e in r["per_layer"] if e["hardware_compared"]]
    assert {e["op"] for e in stored} == set(HARDWARE_VECTORS)
    assert all(e["hardware_mismatched_tokens"] == 0 for e in stored)
    assert "not stored by the engine" in (tmp_path / "rep" / "report.md").read_text()


def _corrupt(demo_image, tmp_path):
    img = tmp_path / "bad"
    shutil.copytree(demo_image, img)
    manifest = json.loads((img / "manifest.json").read_text())
    section = next(s for s in manifest["sections"] if s["name"] == "layers.1.gate_proj.trits")
    blob = bytearray((img / "weights.bin").read_bytes())
    blob[section["offset"] + 7] = (blob[section["offset"] + 7] + 1) % 243   # one trit of row 0 changes
    (img / "weights.bin").write_bytes(bytes(blob))
    manifest["sha256"] = hashlib.sha256(blob).hexdigest()                  # a consistent but wrong image
    (img / "manifest.json").write_text(json.dumps(manifest))
    return img


@pytest.mark.parametrize("hardware", ["image", "sim"])
def test_corrupted_weight_is_located(tmp_path, demo_image, hardware):
    if hardware == "sim":
        _needs_verilator()
    img = _corrupt(demo_image, tmp_path)
    js = tmp_path / "r.json"
    assert main(["compare", "--prompt", "def" if hardware == "sim" else "def f(x):", "--hardware", hardware,
                 "--image", str(img), "--out", str(tmp_path / "rep"), "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["hardware_exact"] is False
    first = r["hardware_first_mismatch"]
    # the image mode sees the raw gate_proj output; the engine stores its gate half (row 0 is in it)
    assert (first["token_index"], first["layer"], first["op"]) == (0, 1, "gate_proj")
    assert first["vector"] == ("gate_proj" if hardware == "image" else "gate")
    assert first["elements"] == [0]
    assert "HARDWARE DIFFERS" in r["verdict"] and "layer 1 gate_proj" in r["verdict"]
    # nothing before layer 1's gate_proj job differs
    order = list(OPS)
    for e in r["per_layer"]:
        if e.get("hardware_compared") and (e["layer"], order.index(e["op"])) < (1, order.index("gate_proj")):
            assert e["hardware_mismatched_tokens"] == 0, e


def test_compare_without_simulator(tmp_path, monkeypatch, capsys):
    """No Verilator: the default falls back to the image and says so; --hardware sim is an error."""
    import mmfree_fpga.sim.runner as runner
    monkeypatch.setattr(runner, "simulator_missing", lambda name: f"{name} not found: install it")
    js = tmp_path / "r.json"
    assert main(["compare", "--positions", "2", "--out", str(tmp_path / "rep"), "--json-out", str(js)]) == 0
    assert json.loads(js.read_text())["hardware"] == "image"
    assert "verilator not found" in capsys.readouterr().out
    assert main(["compare", "--positions", "2", "--hardware", "sim", "--out", str(tmp_path / "rep2")]) != 0
    err = capsys.readouterr().err
    assert "--hardware sim: verilator not found" in err and "Traceback" not in err


def test_compare_three_way_figures(tmp_path):
    """fidelity: integer vs float64, float32 vs float64, integer vs float32, each against the same
    figures computed here from the three models' logits."""
    import numpy as np
    import torch

    from mmfree_fpga.reference.agreement import logit_agreement
    from mmfree_fpga.reference.integer import IntegerModel
    js = tmp_path / "r.json"
    assert main(["compare", "--positions", "24", "--hardware", "none", "--out", str(tmp_path / "rep"),
                 "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    f = r["fidelity"]
    assert list(f) == ["integer_vs_float64", "float32_vs_float64", "integer_vs_float32"]
    assert r["formats"] == "narrow"
    ids = held_out_ids(24)
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    m = IntegerModel(integer_weights(cfg, tensors))
    li = np.stack([m.logits_to_float(m.step(t)) for t in ids])
    with torch.no_grad():
        f64 = load_model(DEMO_CHECKPOINT).double()(torch.tensor([ids]))[0][0].numpy()
    want = logit_agreement(li, f64)
    for key in ("positions", "top1_agreement", "mean_logit_cosine", "min_logit_cosine"):
        assert f["integer_vs_float64"][key] == pytest.approx(want[key], abs=1e-9)
    assert f["integer_vs_float32"]["top1_agreement"] == r["top1_agreement"]
    assert f["integer_vs_float32"]["mean_logit_cosine"] == pytest.approx(r["mean_logit_cosine"], abs=1e-12)
    assert f["float32_vs_float64"]["min_logit_cosine"] > 0.9999
    assert "integer vs float64" in (tmp_path / "rep" / "report.md").read_text()


def test_compare_wide_formats(tmp_path, capsys):
    """--formats wide: the image exported with the wide set runs through the integer model equal to
    the wide integer model; the formats of an --image decide; the simulated engine is refused."""
    img = tmp_path / "wide"
    assert main(["export", "--formats", "wide", "--out", str(img), "--quiet"]) == 0
    js = tmp_path / "r.json"
    assert main(["compare", "--prompt", "def f(x):", "--image", str(img), "--hardware", "image",
                 "--out", str(tmp_path / "rep"), "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["formats"] == "wide" and r["hardware_exact"] is True and "wide formats" in r["hardware_source"]
    assert r["fidelity"]["integer_vs_float32"]["min_logit_cosine"] > 0.999
    capsys.readouterr()
    assert main(["compare", "--prompt", "ab", "--image", str(img), "--formats", "narrow",
                 "--out", str(tmp_path / "rep2")]) == 2
    assert "other number formats (wide) than --formats narrow" in capsys.readouterr().err
    assert main(["compare", "--prompt", "ab", "--formats", "wide", "--hardware", "sim",
                 "--out", str(tmp_path / "rep3")]) == 2
    assert "use --hardware image" in capsys.readouterr().err
