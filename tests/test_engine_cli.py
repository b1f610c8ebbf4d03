"""``mmfree-fpga sim`` and ``mmfree-fpga generate``."""

from __future__ import annotations

import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import FORMAT_SETS, ModelConfig
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
from mmfree_fpga.sim.runner import simulator_missing

DEMO_RATIO_BOUND = 1.25


def test_sim_command_demo_cycles(tmp_path):
    """The demo at 16 lanes: the integer model's tokens, cycles per token within 1.25x of ideal."""
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    out = tmp_path / "sim.json"
    assert main(["sim", "--prompt", "def", "--steps", "3", "--quiet", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("tokens", "cycles_per_token", "ideal_cycles_per_token", "sim_cycles_per_s", "simulator", "lanes"):
        assert key in r
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    assert r["matches_integer_model"] is True
    assert r["tokens"][:3] == list(b"def") and len(r["tokens"]) == 6
    assert r["ideal_cycles_per_token"] == cfg.ideal_cycles(16)
    assert len(r["cycles_per_token"]) == 5
    assert max(r["cycles_per_token"]) <= DEMO_RATIO_BOUND * r["ideal_cycles_per_token"]


def test_sim_command_slow_memory(tmp_path):
    """A narrow, slow memory with stalls: same tokens, more cycles."""
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    out = tmp_path / "sim.json"
    assert main(["sim", "--prompt", "de", "--steps", "1", "--quiet", "--mem-bandwidth", "2", "--mem-latency", "30",
                 "--stall-rate", "0.1", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["matches_integer_model"] is True
    # 2 bytes/cycle carry 10 base3 trits, less than the 16 lanes take
    assert min(r["cycles_per_token"]) > 1.6 * r["ideal_cycles_per_token"]


def test_sim_command_rejects_bad_input(capsys):
    assert main(["sim", "--lanes", "24", "--steps", "1"]) == 2
    assert main(["sim", "--temperature", "0.5"]) == 2
    assert "error" in capsys.readouterr().err


def test_generate_command(tmp_path):
    out = tmp_path / "gen"
    js = tmp_path / "gen.json"
    assert main(["generate", "--lanes", "16", "--out", str(out), "--quiet", "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["top"] == "engine" and r["lanes"] == 16
    text = (out / "engine.v").read_text()
    assert "module engine(" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top"] == "engine" and set(manifest["files"]) == {"engine.v", "manifest.json"}


def test_sim_command_other_formats(tmp_path):
    """``sim --formats medium``: the demo exported in that set on its engine, the tokens of its
    integer model; the JSON names the formats. (The wide engine's Verilator build takes a minute
    more for its 2^15-row sigmoid table; test_engine_formats runs it on Verilator.)"""
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    out = tmp_path / "sim.json"
    assert main(["sim", "--formats", "medium", "--prompt", "de", "--steps", "2", "--quiet",
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["formats"] == "medium" and r["matches_integer_model"] is True
    assert r["tokens"][:2] == list(b"de") and len(r["tokens"]) == 4


def test_generate_command_wide_formats(tmp_path):
    js = tmp_path / "gen.json"
    assert main(["generate", "--formats", "wide", "--lanes", "16", "--no-init", "--out", str(tmp_path / "gen"),
                 "--quiet", "--json-out", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["formats"] == "wide"
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    # the manifest records the set the engine was generated in (config.FORMAT_SETS is its source)
    assert manifest["number_formats"]["x_bits"] == FORMAT_SETS["wide"].x_bits
    assert manifest["number_formats"]["norm_eps"] is True
    assert main(["generate", "--formats", "wide", "--lanes", "8", "--out", str(tmp_path / "gen8"), "--quiet"]) == 2
