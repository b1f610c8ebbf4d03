"""The board design's generated Verilog behind `serve`, driven by the host driver over TCP:
the tokens equal the integer model's (reference --integer), byte-exact protocol and all."""

import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.host.testing import random_checkpoint, reference_tokens, serve_many
from mmfree_fpga.sim.runner import simulator_missing

pytestmark = pytest.mark.skipif(simulator_missing("verilator") is not None,
                                reason=simulator_missing("verilator") or "")

# d and I multiples of the engine's 16 lanes; byte-level so --prompt text works
RTL_CONFIG = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mmfree_fpga.sim.backends import make_backend
    from mmfree_fpga.host.transport import TcpDeviceServer
    ckpt = random_checkpoint(tmp_path_factory.mktemp("rtl") / "ckpt", RTL_CONFIG, seed=4)
    backend = make_backend("rtl", RTL_CONFIG, "base3", None, lanes=16)
    server = TcpDeviceServer(backend).start()
    try:
        yield ckpt, server.url
    finally:
        server.stop()
        backend.close()


def test_run_against_rtl_serve_equals_integer_model(served, tmp_path):
    ckpt, url = served
    out = tmp_path / "run.json"
    prompt = "def f(x):\n  return"
    assert main(["run", "--device", url, "--checkpoint", str(ckpt), "--prompt", prompt, "--steps", "12",
                 "--quiet", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] == reference_tokens(ckpt, list(prompt.encode()), 12)
    assert r["loaded_weights"] is True


def test_sampling_on_the_host_from_rtl_logits(served, tmp_path):
    from mmfree_fpga.generation import Sampler
    ckpt, url = served
    out = tmp_path / "run.json"
    assert main(["run", "--device", url, "--checkpoint", str(ckpt), "--prompt-ids", "1,2,3", "--steps", "6",
                 "--temperature", "0.9", "--top-k", "8", "--seed", "3", "--quiet", "--json-out", str(out)]) == 0
    want = reference_tokens(ckpt, [1, 2, 3], 6, Sampler(temperature=0.9, top_k=8, seed=3))
    assert json.loads(out.read_text())["tokens"] == want


@pytest.mark.slow
def test_serve_waves_writes_an_fst_of_the_window(tmp_path):
    """``serve --waves``: a Verilator build with FST tracing (its own cached binary) dumps the
    board design's signals for the cycles asked for (cycle N at N periods of the nominal clock);
    the design answers as the plain build does."""
    import struct

    from mmfree_fpga.sim.backends import make_backend
    from mmfree_fpga.protocol import IDENTITY, Identity, Op, FrameDecoder, encode_frame
    from mmfree_fpga.sim.pipe import PIPE_CLOCK_HZ
    from mmfree_fpga.sim.runner import fst_missing
    if fst_missing():
        pytest.skip(fst_missing())
    fst = tmp_path / "serve.fst"
    first, end = 20, 120        # (an IDENTIFY exchange alone takes a few hundred cycles)
    backend = make_backend("rtl", RTL_CONFIG, "base3", None, lanes=16, waves=fst, waves_from=first,
                           waves_to=end)
    try:
        assert backend.binary.name.startswith("Vpipe-fst-")
        decoder, frames = FrameDecoder(), []
        backend.receive(encode_frame(1, Op.IDENTIFY), 0.0)
        for _ in range(200):
            frames += decoder.feed(backend.sim.recv(0.05))
            if frames:
                break
        assert [f.op for f in frames] == [Op.IDENTIFY | 0x80] and len(frames[0].payload) == IDENTITY.size
        assert Identity.unpack(frames[0].payload).vocab_size == RTL_CONFIG.V
    finally:
        backend.close()
    head = fst.read_bytes()[:74]
    # the FST header block (fstapi.c): type 0, length, start time, end time, ..., timescale exponent
    block, _, start, stop = struct.unpack(">BQQQ", head[:25])
    period = round(1e9 / PIPE_CLOCK_HZ)
    assert block == 0 and struct.unpack("b", head[73:74])[0] == -9        # ns
    assert (start, stop) == (period * first, period * (end - 1) + period // 2)


def test_serve_waves_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from mmfree_fpga.cli import main

    def error(argv):
        assert main(["serve", "--port", "0"] + argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmfree-fpga serve: error: ")
        return lines[0]

    assert "needs --backend rtl" in error(["--backend", "model", "--waves", str(tmp_path / "w.fst")])
    assert "need 0 <= from < to" in error(["--waves", str(tmp_path / "w.fst"), "--waves-from", "10",
                                           "--waves-to", "10"])
    assert "need --waves FILE" in error(["--waves-to", "100"])
    assert "does not exist" in error(["--waves", str(tmp_path / "no" / "w.fst")])
    assert not list(tmp_path.iterdir())


# -- layer slices over several RTL devices (protocol 1.2's slice ops in gateware) -----------------

SLICED_CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, intermediate_size=64)


@pytest.mark.slow      # a Verilator build of the design with slots: 60-100 s on 2 cores
def test_run_over_two_rtl_serve_processes_with_slots_equals_integer_model(tmp_path, monkeypatch):
    """``serve --backend rtl --slots 2`` twice (the board design with state slots: the Link's slice
    ops and the engine's slices), ``run --device A,B`` with two prompts in flight: the integer
    model's tokens; every device reports its engine's own cycles for every FEED_SLOT."""
    from mmfree_fpga.sim.backends import make_backend
    ckpt = random_checkpoint(tmp_path / "ckpt", SLICED_CONFIG, seed=4)
    monkeypatch.chdir(tmp_path)
    make_backend("rtl", SLICED_CONFIG, "base3", None, lanes=16, slots=2).close()   # the build, cached in ./out
    with serve_many(ckpt, 2, "--slots", "2", backend="rtl", cwd=tmp_path) as (urls, _):
        prompts = [[5, 6, 7], [9]]
        out = tmp_path / "run.json"
        assert main(["run", "--device", ",".join(urls), "--checkpoint", str(ckpt), "--prompt-ids", "5,6,7;9",
                     "--steps", "6", "--quiet", "--json-out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["tokens"] == [reference_tokens(ckpt, p, 6) for p in prompts]
        assert len(r["devices"]) == 2 and r["devices"][0]["embedding"] and r["devices"][-1]["head"]
        feeds = sum(len(p) + 6 - 1 for p in prompts)
        assert all(d["feeds"] == feeds and d["cycles"] > 1000 * feeds for d in r["devices"])
