"""The board design's generated Verilog behind `serve`, driven by the host driver over TCP:
the tokens equal the integer model's (reference --integer), byte-exact protocol and all."""

import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.host.testing import random_checkpoint, reference_tokens
from mmfree_fpga.sim.runner import simulator_missing

pytestmark = pytest.mark.skipif(simulator_missing("verilator") is not None,
                                reason=simulator_missing("verilator") or "")

# d and I multiples of the engine's 16 lanes; byte-level so --prompt text works
RTL_CONFIG = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mmfree_fpga.host.backends import make_backend
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
