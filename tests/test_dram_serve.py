"""``mmfree-fpga serve --memory sdram``: the board design with its weights in a simulated SDRAM
(LinkedEngine with a DramEngine and the generated LiteDRAM core with LiteDRAM's SDRAM model, in
Verilator's pipe harness), driven by the host driver over TCP: the driver uploads the image
(LOAD_BEGIN/CHUNK/COMMIT, through the Link's load stream into the DRAM) and streams tokens
equal to ``reference --integer``.

The demo model runs in the default suite (one Verilator build, about 45 s), and so do two such
devices with state slots running a random 4-layer model in two layer slices (protocol 1.2's slice
ops, each slice image in its device's SDRAM; another build, about 55 s); a random model of 1.36 MB,
larger than the ULX3S's block RAM, is ``slow``.
"""

import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.host.testing import reference_tokens
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT

from conftest import random_model
from test_host_cli import _error_line, serve_child

# more than the ULX3S's block RAM (issue 20): V=2048, d=256, L=4, I=768, 1.36 MB in base3
LARGE = ModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, intermediate_size=768)


def _needs_dram_cosim():
    from mmfree_fpga.boards.litedram import litedram_available
    from mmfree_fpga.sim.runner import simulator_missing
    if simulator_missing("verilator"):
        pytest.skip(simulator_missing("verilator"))
    if not litedram_available():
        pytest.skip("LiteDRAM is not installed")


def test_memory_sdram_needs_the_rtl_backend(capsys):
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.sim.backends import make_backend
    err = _error_line(capsys, ["serve", "--backend", "model", "--memory", "sdram", "--port", "0"])
    assert "--memory sdram" in err and "needs --backend rtl" in err
    with pytest.raises(UserError, match="needs --backend rtl"):
        make_backend("model", ModelConfig.from_checkpoint(DEMO_CHECKPOINT), memory="sdram")


def test_serve_memory_sdram_runs_the_demo_bit_exact(tmp_path, capsys):
    """The CLI end to end: ``serve --memory sdram`` in a child process, ``run --verify`` uploads
    the demo image into the simulated SDRAM, has the engine read it back from there (VERIFY_IMAGE
    through the DramEngine's reader and the LiteDRAM core) and generates; a second ``run`` finds
    the same image there (no upload) and continues bit-exact."""
    _needs_dram_cosim()
    # (the first time: a Verilator build)
    with serve_child(["--memory", "sdram", "--checkpoint", str(DEMO_CHECKPOINT)], url_timeout=600) as (url, child_out):
        assert "simulated SDRAM" in child_out.line(timeout=10)

        out = tmp_path / "run.json"
        prompt = "def"
        want = reference_tokens(DEMO_CHECKPOINT, list(prompt.encode()), 6)
        assert main(["run", "--device", url, "--checkpoint", str(DEMO_CHECKPOINT), "--prompt", prompt,
                     "--steps", "6", "--verify", "--quiet", "--json-out", str(out)]) == 0
        first = json.loads(out.read_text())
        assert first["loaded_weights"] is True and first["verified"] is True and first["tokens"] == want

        assert main(["run", "--device", url, "--checkpoint", str(DEMO_CHECKPOINT), "--prompt", prompt,
                     "--steps", "3", "--quiet", "--json-out", str(out)]) == 0
        again = json.loads(out.read_text())
        assert again["loaded_weights"] is False and again["tokens"] == want[:len(prompt) + 3]
        capsys.readouterr()


@pytest.mark.slow
def test_serve_memory_sdram_wide_formats_verifies_and_runs_the_demo(tmp_path, capsys):
    """``serve --memory sdram --formats wide``: the host exports the demo in the formats the device
    announces, uploads the wide image into the simulated SDRAM, has it read back from there
    (VERIFY_IMAGE: the Link's read-back as long as the wide image) and generates the tokens of
    ``reference --integer --formats wide``. Slow (its own Verilator build, about 47 s): the default
    suite has the wide DRAM engine against the integer model in test_dram_engine and the
    CLI's wide DRAM run in test_engine_cli."""
    from mmfree_fpga.config import FORMAT_SETS
    from mmfree_fpga.image import image_size
    _needs_dram_cosim()
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    with serve_child(["--memory", "sdram", "--formats", "wide", "--checkpoint", str(DEMO_CHECKPOINT)],
                     url_timeout=900) as (url, child_out):
        assert "simulated SDRAM" in child_out.line(timeout=10)
        out = tmp_path / "run.json"
        prompt = "def"
        want = reference_tokens(DEMO_CHECKPOINT, list(prompt.encode()), 4, formats="wide")
        assert main(["run", "--device", url, "--checkpoint", str(DEMO_CHECKPOINT), "--prompt", prompt,
                     "--steps", "4", "--verify", "--quiet", "--json-out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["loaded_weights"] is True and r["verified"] is True and r["tokens"] == want
        assert r["link"]["image_bytes_sent"] == image_size(cfg, "base3", FORMAT_SETS["wide"])
        capsys.readouterr()


@pytest.mark.slow
def test_driver_loads_a_model_larger_than_block_ram_into_the_sdram(tmp_path):
    """A random-weight model of 1.36 MB (more than the ULX3S's 420 KB of block RAM): the driver
    uploads it through ``serve`` into the simulated SDRAM, the tokens are bit-exact."""
    from mmfree_fpga.host.transport import TcpDeviceServer
    from mmfree_fpga.image import image_size
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    from mmfree_fpga.sim.backends import make_backend
    _needs_dram_cosim()
    assert image_size(LARGE, "base3") > 1_300_000
    ckpt = save_checkpoint(random_model(LARGE, seed=5), tmp_path / "ckpt")
    backend = make_backend("rtl", LARGE, "base3", None, lanes=16, memory="sdram")
    server = TcpDeviceServer(backend).start()
    try:
        prompt = [5, 1000, 2047, 77]
        out = tmp_path / "run.json"
        assert main(["run", "--device", server.url, "--checkpoint", str(ckpt),
                     "--prompt-ids", ",".join(map(str, prompt)), "--steps", "3", "--verify", "--quiet",
                     "--json-out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["loaded_weights"] is True and r["verified"] is True
        assert r["tokens"] == reference_tokens(ckpt, prompt, 3)
    finally:
        server.stop()
        backend.close()


@pytest.mark.slow
def test_serve_memory_ddr3_runs_the_demo_bit_exact(tmp_path):
    """The same through the ECPIX-5's DDR3 (LiteDRAM controller with the ECP5DDRPHY's settings and
    LiteDRAM's DDR3 model): the driver uploads the demo image, the tokens are bit-exact."""
    from mmfree_fpga.host.transport import TcpDeviceServer
    from mmfree_fpga.sim.backends import make_backend
    _needs_dram_cosim()
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    backend = make_backend("rtl", cfg, "base3", None, lanes=16, memory="ddr3")
    assert "simulated DDR3" in backend.description
    server = TcpDeviceServer(backend).start()
    try:
        out = tmp_path / "run.json"
        assert main(["run", "--device", server.url, "--checkpoint", str(DEMO_CHECKPOINT), "--prompt", "def",
                     "--steps", "4", "--verify", "--quiet", "--json-out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["loaded_weights"] is True and r["verified"] is True
        assert r["tokens"] == reference_tokens(DEMO_CHECKPOINT, list(b"def"), 4)
    finally:
        server.stop()
        backend.close()


# -- layer slices with the weights in DRAM (protocol 1.2's slice ops in the DramEngine's design) -------

# d and I multiples of the engine's 16 lanes; 4 layers: 2 per device
SLICED = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, intermediate_size=64)


def test_dram_design_with_slots_has_the_slice_ops():
    """``LinkedEngine(memory="sdram", slots=2)``: the Link with the slice ops, the DramEngine's core
    with the slots and its ``residual`` input buffer; the wide formats (int64-sized residuals) and
    the tiny engine are refused."""
    from amaranth.back import rtlil
    from mmfree_fpga.config import FORMAT_SETS
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.hw.dram_engine import DramEngine
    from mmfree_fpga.hw.linked_engine import LinkedEngine
    from mmfree_fpga.sim.backends import make_backend
    linked = LinkedEngine(SLICED, memory="sdram", slots=2, native_data_width=16, native_address_width=24)
    assert isinstance(linked.engine, DramEngine) and linked.engine.core.slots == 2 and linked.link.slots == 2
    assert "residual" in linked.engine.signature.members
    rtlil.convert(linked)       # elaborates, the residual stream and all
    plain = DramEngine(SLICED, native_data_width=16, native_address_width=24)
    assert plain.core.slots == 0 and "residual" not in plain.signature.members
    with pytest.raises(ValueError, match="int32"):
        LinkedEngine(SLICED, memory="sdram", slots=2, native_data_width=16, native_address_width=24,
                     formats=FORMAT_SETS["wide"])
    with pytest.raises(UserError, match=r"--slots needs a format set with Q16 int32 residuals \(narrow, medium\)"):
        make_backend("rtl", SLICED, "base3", None, memory="sdram", slots=2, formats=FORMAT_SETS["wide"])


# (the first time: a Verilator build of the DRAM design with slots, cached in ./out; about 55 s in all
# with the SDRAM; the ECPIX-5's DDR3 is slow)
@pytest.mark.parametrize("memory", ["sdram", pytest.param("ddr3", marks=pytest.mark.slow)])
def test_run_over_two_dram_serve_processes_with_slots_equals_integer_model(memory, tmp_path):
    """``serve --backend rtl --memory sdram --slots 2`` twice (or ``--memory ddr3``): each device's
    slice image goes through the Link's load into its simulated DRAM (LOAD_SLICE, LOAD_CHUNK,
    LOAD_COMMIT, then the slice's parameters by SET_PARAM), ``run --device A,B --verify`` has each
    read its slice back from there (VERIFY_IMAGE over the slice image's length), and with two
    prompts in flight the tokens are the integer model's."""
    from mmfree_fpga.host.testing import random_checkpoint, serve_many
    from mmfree_fpga.image_slice import Slice, slice_image_size
    from mmfree_fpga.sim.backends import make_backend
    _needs_dram_cosim()
    ckpt = random_checkpoint(tmp_path / "ckpt", SLICED, seed=4)
    # the build once, cached in ./out, before two processes would build the same design
    make_backend("rtl", SLICED, "base3", None, lanes=16, memory=memory, slots=2).close()
    with serve_many(ckpt, 2, "--memory", memory, "--slots", "2", backend="rtl") as (urls, _):
        prompts = [[5, 6, 7], [9]]
        out = tmp_path / "run.json"
        # (the DDR3's simulated init and read levelling outlast the adaptive first IDENTIFYs' 2.5 s)
        wait = ["--timeout", "20"] if memory == "ddr3" else []
        assert main(["run", "--device", ",".join(urls), "--checkpoint", str(ckpt), "--prompt-ids", "5,6,7;9",
                     "--steps", "5", "--verify", "--quiet", "--json-out", str(out), *wait]) == 0
        r = json.loads(out.read_text())
        assert r["tokens"] == [reference_tokens(ckpt, p, 5) for p in prompts]
        assert len(r["devices"]) == 2 and r["devices"][0]["embedding"] and r["devices"][-1]["head"]
        assert r["verified"] is True
        for d in r["devices"]:      # each loaded its slice image (LOAD_SLICE's size) into its SDRAM
            sl = Slice(d["first_layer"], d["end_layer"], d["embedding"], d["head"])
            assert d["loaded_weights"] is True and d["slots"] == 2
            assert d["image_bytes"] == d["link"]["image_bytes_sent"] == slice_image_size(SLICED, "base3", sl)
        assert [d["end_layer"] - d["first_layer"] for d in r["devices"]] != [0, SLICED.L]
        feeds = sum(len(p) + 5 - 1 for p in prompts)
        assert all(d["feeds"] == feeds and d["cycles"] > 1000 * feeds for d in r["devices"])
