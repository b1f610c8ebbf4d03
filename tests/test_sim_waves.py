"""``mmfree-fpga sim --waves``: a waveform of the requested clock cycles from each simulator, and
bad requests refused before any work (exit 2, no file).

Cycle N of a run is clk low at 10N ns and its rising edge at 10N+5 ns (Verilator's harness; the
cocotb clock of Icarus rises at 10N ns); cycle 0 is the first reset cycle.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.reference.checkpoint import save_checkpoint
from mmfree_fpga.sim.runner import fst_missing, simulator_missing

from conftest import random_model

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
PERIOD_NS = 10


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_checkpoint(random_model(TINY, seed=4), tmp_path_factory.mktemp("tiny") / "ckpt")


def _vcd_times_ns(path) -> list[float]:
    """Every ``#time`` of a VCD file, in ns (from its ``$timescale``)."""
    text = path.read_text()
    assert "$enddefinitions" in text
    m = re.search(r"\$timescale\s+(\d+)\s*([a-z]+)\s+\$end", text)
    unit = int(m.group(1)) * {"fs": 1e-6, "ps": 1e-3, "ns": 1.0, "us": 1e3}[m.group(2)]
    return [int(t) * unit for t in re.findall(r"^#(\d+)", text, re.M)]


def _sim(tmp_path, *args) -> dict:
    js = tmp_path / "sim.json"
    assert main(["sim", "--quiet", "--json-out", str(js), *args]) == 0
    r = json.loads(js.read_text())
    assert r["matches_integer_model"] is True
    return r


def test_verilator_fst_holds_exactly_the_window(tmp_path):
    """The FST header's start and end times are the window's first and last dumped instants."""
    reason = simulator_missing("verilator") or fst_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run.fst"
    first, end = 1000, 3000
    r = _sim(tmp_path, "--prompt", "d", "--steps", "1", "--waves", str(out), "--waves-from", str(first),
             "--waves-to", str(end))
    assert r["waves"] == {"file": str(out), "format": "fst", "from_cycle": first, "to_cycle": end}
    head = out.read_bytes()[:74]
    # FST header block (fstapi.c): type 0, length, start time, end time, ..., timescale exponent
    block, _, start, stop = struct.unpack(">BQQQ", head[:25])
    assert block == 0
    assert (start, stop) == (PERIOD_NS * first, PERIOD_NS * (end - 1) + PERIOD_NS // 2)
    assert struct.unpack("b", head[73:74])[0] == -9          # ns
    assert not list(tmp_path.glob(".run.fst.*"))              # the temporary file was renamed


def test_amaranth_vcd_stops_at_the_window_end(tmp_path, tiny_checkpoint):
    """Amaranth's writer starts at time 0 (it cannot start later) and stops at --waves-to."""
    out = tmp_path / "run.vcd"
    end = 400
    r = _sim(tmp_path, "--checkpoint", str(tiny_checkpoint), "--simulator", "amaranth", "--prompt-ids", "3,60",
             "--steps", "1", "--waves", str(out), "--waves-from", "100", "--waves-to", str(end))
    assert r["waves"]["from_cycle"] == 0 and r["waves"]["to_cycle"] == end
    times = _vcd_times_ns(out)
    assert min(times) == 0
    assert PERIOD_NS * (end - 1) <= max(times) <= PERIOD_NS * end
    assert sum(r["cycles_per_token"]) > end                  # the run went on past the window


def test_icarus_vcd_holds_the_window(tmp_path, tiny_checkpoint):
    if simulator_missing("icarus"):
        pytest.skip(simulator_missing("icarus"))
    out = tmp_path / "run.vcd"
    first, end = 200, 700
    _sim(tmp_path, "--checkpoint", str(tiny_checkpoint), "--simulator", "icarus", "--prompt-ids", "3,60",
         "--steps", "1", "--waves", str(out), "--waves-from", str(first), "--waves-to", str(end))
    times = _vcd_times_ns(out)
    # $dumpvars/$dumpoff at time 0, then changes only between $dumpon and $dumpoff
    later = [t for t in times if t > 0]
    assert later and min(later) == PERIOD_NS * first and max(later) == PERIOD_NS * end


@pytest.mark.parametrize("args,message", [
    (["--waves", "{dir}"], "is a directory"),
    (["--waves", "{dir}/run.vcd"], "verilator writes FST"),
    (["--waves", "{dir}/run.fst", "--simulator", "amaranth"], "amaranth writes VCD"),
    (["--waves", "{dir}/run.fst", "--waves-from", "5", "--waves-to", "5"], "--waves-from < --waves-to"),
    (["--waves", "{dir}/run.fst", "--waves-from", "-1"], "--waves-from must be >= 0"),
    (["--waves", "{dir}/run.fst", "--waves-from", "9", "--waves-to", "3"], "--waves-from < --waves-to"),
    (["--waves", "{dir}/missing/run.fst"], "does not exist or is not writable"),
    (["--waves-to", "100"], "need --waves FILE"),
])
def test_bad_waves_requests_are_refused(tmp_path, capsys, args, message):
    before = set(tmp_path.rglob("*"))
    assert main(["sim", "--steps", "1", *(a.format(dir=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert set(tmp_path.rglob("*")) == before
