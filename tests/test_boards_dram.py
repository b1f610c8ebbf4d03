"""``build --memory dram``: the ULX3S with the engine's weights in its SDRAM, the ECPIX-5 with them in
its DDR3 (boards/dram.py).

The plan-level tests elaborate the board top (no Yosys, no nextpnr): the generated LiteDRAM core's
Verilog and its Instance on the DRAM pins, the SDRAM clock or the DDR3 PHY's clocking (PLL, ECLKSYNCB,
CLKDIVF) and read levelling, the design clock; the size checks against block RAM and DRAM with the
numbers, before any tool runs; the errors. The bitstream builds themselves are slow.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import random_model

from mmfree_fpga.boards.budget import DeviceResources, ImageSummary, check_fits, check_fits_dram, memory_budget
from mmfree_fpga.boards.build import prepare
from mmfree_fpga.boards.dram import DramBoardDesign, dram_budget
from mmfree_fpga.boards.litedram import CORES, generate_core, litedram_available
from mmfree_fpga.boards.registry import BOARDS
from mmfree_fpga.cli import main
from mmfree_fpga.config import FORMAT_SETS, FORMATS, PUBLISHED, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.image import image_layout, image_size

pytestmark = pytest.mark.skipif(not litedram_available(), reason="LiteDRAM is not installed")

ULX3S = BOARDS["ulx3s-85f"]
ECPIX5 = BOARDS["ecpix5-85f"]
SDRAM_BYTES = 32 * 2 ** 20
DDR3_BYTES = 512 * 2 ** 20
SMALL = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=256)
# larger than the ULX3S's block RAM (about 420 KB), far smaller than its SDRAM: 1.3 MB of image
MEDIUM = ModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, intermediate_size=768)
# about 27 MB of image: the largest kind of model the ULX3S's 32 MB hold
NEAR_FULL = ModelConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=12, intermediate_size=1408)
ROW = {"370M": PUBLISHED["370M"], "medium": MEDIUM, "near_full": NEAR_FULL}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFREE_FPGA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    return save_checkpoint(random_model(SMALL), tmp_path_factory.mktemp("ckpt") / "small")


def fake_image(directory: Path, cfg: ModelConfig, packing: str = "base3", fmt: Formats | None = None) -> Path:
    """An export's manifest.json for ``cfg`` (sizes from the image layout; no weights.bin): what
    the size check reads, without the weights of a large model. ``fmt``: exported in these
    number formats (the manifest names them); None: the narrow set, unnamed."""
    directory.mkdir(parents=True)
    layout = image_layout(cfg, packing, fmt or FORMATS)
    manifest = {"geometry": cfg.as_dict(), "packing": packing, "bytes": image_size(cfg, packing, fmt or FORMATS),
                "sha256": "0" * 64, "sections": [{"name": s.name, "kind": s.kind, "size": s.size} for s in layout]}
    if fmt is not None:
        manifest["formats"] = asdict(fmt)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def summary(cfg: ModelConfig, packing: str = "base3") -> ImageSummary:
    """The exact size summary of ``cfg``'s image, from the layout alone."""
    layout = image_layout(cfg, packing)
    ternary = sum(s.size for s in layout if s.kind == "trits")
    embedding = sum(s.size for s in layout if s.name.startswith("embedding."))
    return ImageSummary(source="fake", packing=packing, geometry=cfg.as_dict(), image_bytes=image_size(cfg, packing),
                        ternary_bytes=ternary, embedding_bytes=embedding,
                        vector_bytes=sum(s.size for s in layout) - ternary - embedding,
                        state_bytes=cfg.L * cfg.d * 4, sha256="0" * 64)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def module_text(rtlil: str, name: str) -> str:
    start = rtlil.index(f"module \\{name}\n")
    return rtlil[start:rtlil.index("\nend\n", start)]


# -- the board's DRAM and its core -----------------------------------------------------------------

def test_ulx3s_dram_is_the_32_mb_of_its_generated_core(tmp_path):
    budget = dram_budget(ULX3S)
    assert (budget.kind, budget.module, budget.size_bytes) == ("SDRAM", "IS42S16160", SDRAM_BYTES)
    assert budget.text() == "33,554,432 B of SDRAM (IS42S16160, 32 MiB)"
    core = generate_core(CORES[ULX3S.dram], tmp_path)
    assert core.size_bytes == budget.size_bytes
    with pytest.raises(ValueError, match="no DRAM"):
        dram_budget(BOARDS["icebreaker"])


# -- the plan --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dram_plan(checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFREE_FPGA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return prepare("ulx3s-85f", checkpoint=checkpoint, memory="dram")


def test_plan_holds_the_core_verilog_and_its_instance_on_the_sdram_pins(dram_plan):
    p = dram_plan
    core = p.dram
    assert core is not None and core.config["sim"] is False and core.config["module"] == "IS42S16160"
    # the core's Verilog travels with the plan, and Yosys reads it before the design
    assert p.plan.files[f"{core.name}.v"] == Path(core.verilog).read_text()
    script = p.plan.files["top.ys"]
    assert script.index(f"{core.name}.v") < script.index("read_rtlil top.il")
    rtlil = p.plan.files["top.il"]
    cell = rtlil[rtlil.index(f"cell \\{core.name} "):]
    cell = cell[:cell.index("\n  end\n")]
    for port, pin, width in [("sdram_a", "a", 13), ("sdram_ba", "ba", 2), ("sdram_dq", "dq", 16),
                             ("sdram_dm", "dqm", 2)]:
        assert f"connect \\{port} \\sdram_0__{pin}__io [{width - 1}:0]" in cell
    for port, pin in [("sdram_cs_n", "cs"), ("sdram_ras_n", "ras"), ("sdram_cas_n", "cas"), ("sdram_we_n", "we"),
                      ("sdram_cke", "clk_en")]:
        # the raw (active-low) pads: the core drives cs_n etc. with their own polarity
        assert f"connect \\{port} \\sdram_0__{pin}__io [0]" in cell
    assert re.search(r"connect \\init_done \\\S*init_done", cell)
    for name in ("cmd_valid", "cmd_ready", "cmd_addr", "rdata_valid", "rdata_data", "wdata_ready"):
        assert re.search(rf"connect \\user_port_{name} \\\S*native__{name}", cell), name
    assert "connect \\clk " in cell and "connect \\rst " in cell
    assert p.design_name == "mmfree_fpga.boards.dram.DramBoardDesign" and p.lanes == 16 and p.memory == "dram"


def test_plan_pins_and_the_sdram_clock(dram_plan):
    p = dram_plan
    lpf = p.plan.files["top.lpf"]
    for pin, site in [("clk", "F19"), ("clk_en", "F20"), ("cs", "P20"), ("dq", None), ("a", None)]:
        assert f'"sdram_0__{pin}__io' in lpf
        if site:
            assert f'LOCATE COMP "sdram_0__{pin}__io" SITE "{site}";' in lpf
    assert 'LOCATE COMP "sdram_0__dq__io[15]" SITE "J17";' in lpf
    # the SDRAM clock: an output DDR register on the clock pin, low in the first half of each cycle
    # and high in the second (the design clock inverted)
    rtlil = p.plan.files["top.il"]
    outer = module_text(rtlil, "top.bridge.design")
    assert re.search(r"assign \\o \[0\] 1'0\n\s*assign \\o \[1\] 1'1", outer)
    ddr = module_text(rtlil, "top.bridge.design.sdram_clk")
    assert "cell \\ODDRX1F " in ddr and "\\sdram_0__clk__io" in ddr


def test_plan_runs_the_design_at_the_controllers_clock(dram_plan):
    p = dram_plan
    assert p.context.clock_hz == 50e6 == p.dram.clk_freq == ULX3S.dram_clock_hz
    assert p.pll is not None and p.pll.f_out == 50e6
    assert "50000000.0 HZ" in p.plan.files["top.lpf"]


def test_design_is_the_engine_with_its_weights_in_dram(checkpoint, cache):
    from mmfree_fpga.boards.designs import linked_engine
    from mmfree_fpga.hw.dram_engine import DramEngine
    seen = []
    factory = linked_engine()

    def spy(context):
        design = factory(context)
        seen.append((context, design))
        return design

    p = prepare("ulx3s-85f", checkpoint=checkpoint, memory="dram", clock_mhz=75, design=spy)
    ((context, design),) = seen
    assert context.memory == "dram" and context.dram is p.dram
    # another clock: the core is generated for it
    assert p.dram.clk_freq == context.clock_hz == 75e6
    assert isinstance(design, DramBoardDesign) and design.dram_core is p.dram
    linked = design.design
    assert isinstance(linked.engine, DramEngine) and linked.memory == "sdram"
    from mmfree_fpga.hw.link import FRAME_IDLE_TIMEOUT_S
    assert not linked.link.preloaded and linked.link.step_time_ms >= 1
    assert linked.link.idle_timeout_cycles == round(FRAME_IDLE_TIMEOUT_S * 75e6)
    from mmfree_fpga.hw.dram_port import native_port_signature
    assert (p.dram.data_width, p.dram.address_width) == (16, 24)
    assert linked.signature.members["native"].signature == native_port_signature(16, 24)
    # the default (bram) design of the same board preloads the image instead
    bram = prepare("ulx3s-85f", checkpoint=checkpoint)
    assert bram.memory == "bram" and bram.dram is None and bram.context.clock_hz == 60e6
    assert not any(name.startswith("mmfree_litedram_") for name in bram.plan.files)


# -- the size checks -------------------------------------------------------------------------------

def test_a_published_370m_image_fits_neither_memory_of_the_ulx3s():
    s = summary(PUBLISHED["370M"])
    budget = memory_budget(ULX3S.resources, (512, 512))
    dram = dram_budget(ULX3S)
    with pytest.raises(UserError) as bram_error:
        check_fits(s, budget, "ulx3s-85f", dram)
    message = str(bram_error.value)
    assert f"it needs {s.needed_bytes:,} B (weight image {s.image_bytes:,} B" in message
    assert "the board has 421,888 B (208 x 18 kbit EBR of 2048 B = 425,984 B, less 2 EBR for the UART FIFOs)" in message
    assert "nor does its weight image fit the board's 33,554,432 B of SDRAM (IS42S16160, 32 MiB)" in message
    with pytest.raises(UserError) as dram_error:
        check_fits_dram(s, dram, budget, "ulx3s-85f")
    message = str(dram_error.value)
    assert message.startswith(f"the model does not fit the ulx3s-85f's DRAM: its weight image is {s.image_bytes:,} B "
                              f"(ternary {s.ternary_bytes:,} B base3, embeddings {s.embedding_bytes:,} B, "
                              f"vectors {s.vector_bytes:,} B), the board has 33,554,432 B of SDRAM")
    assert s.image_bytes > 3 * SDRAM_BYTES
    assert "the board has 33,554,432 B of SDRAM (IS42S16160, 32 MiB)" in message
    assert "a board with more DRAM" in message


@pytest.mark.parametrize("name", ["medium", "near_full"])
def test_an_image_beyond_block_ram_fits_the_sdram(name):
    cfg = ROW[name]
    s = summary(cfg)
    budget = memory_budget(ULX3S.resources, (512, 512))
    dram = dram_budget(ULX3S)
    assert budget.available_bytes < s.image_bytes <= dram.size_bytes
    with pytest.raises(UserError, match=r"its weight image fits the board's 33,554,432 B of SDRAM "
                                        r"\(IS42S16160, 32 MiB\): build with --memory dram"):
        check_fits(s, budget, "ulx3s-85f", dram)
    fit = check_fits_dram(s, dram, budget, "ulx3s-85f")
    assert fit["memory"] == "dram"
    assert (fit["needed_bytes"], fit["available_bytes"]) == (s.image_bytes, SDRAM_BYTES)
    assert fit["percent"] == round(100 * s.image_bytes / SDRAM_BYTES, 1)
    assert (fit["on_chip_bytes"], fit["on_chip_available_bytes"]) == (cfg.L * cfg.d * 4, 421_888)


def test_state_beyond_block_ram_is_refused_even_with_dram():
    s = summary(MEDIUM)
    tiny = memory_budget(DeviceResources("x", "ecp5", luts=1, ffs=1, dsps=0, bram_blocks=1, bram_kbit=18))
    with pytest.raises(UserError, match=r"recurrent state \(4,096 B\) does not fit .* even with the weights in DRAM"):
        check_fits_dram(s, dram_budget(ULX3S), tiny, "x")


def test_build_refuses_370m_on_both_memories_with_the_sizes(tmp_path, capsys, cache):
    big = tmp_path / "large"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(PUBLISHED["370M"].to_hf_dict()))
    # int8 embeddings on chip (narrow), 30-bit mantissas in int32 with the DRAM (its default, wide)
    for memory, embeddings in (("bram", "32,768,000 B"), ("dram", "131,072,000 B")):
        out = tmp_path / f"out-{memory}"
        rc = main(["build", "--board", "ulx3s-85f", "--memory", memory, "--checkpoint", str(big),
                   "--out", str(out), "--quiet"])
        err = one_line_error(capsys)
        assert rc == 2 and f"embeddings {embeddings}" in err and "33,554,432 B of SDRAM" in err, err
        assert ("of on-chip RAM" in err) == (memory == "bram")
        assert not out.exists()
    # refused before any tool ran (and before the core was generated)
    assert not (cache / "bitstreams").exists() and not (cache / "litedram").exists()


def test_build_with_dram_accepts_an_image_beyond_block_ram(tmp_path, capsys, cache):
    image = fake_image(tmp_path / "medium", MEDIUM)
    rc = main(["build", "--board", "ulx3s-85f", "--checkpoint", str(image), "--out", str(tmp_path / "o"), "--quiet"])
    err = one_line_error(capsys)
    assert rc == 2 and "does not fit the ulx3s-85f" in err and "build with --memory dram" in err
    p = prepare("ulx3s-85f", checkpoint=image, memory="dram")
    s = summary(MEDIUM)
    assert p.fit["needed_bytes"] == s.image_bytes and p.fit["available_bytes"] == SDRAM_BYTES
    assert p.lanes == 16 and p.dram.size_bytes == SDRAM_BYTES


# -- the wide number formats -------------------------------------------------------------------------

def stop_before_synthesis(monkeypatch):
    """Builds stop at Yosys's stage (no tool runs): returns ``(seen, made)``, filled by each build
    with its PreparedBuild, the build directory's file names, the first stage and top.il
    (``seen``), and the designs the factory made (``made``)."""
    from mmfree_fpga.boards import build as board_build
    from mmfree_fpga.boards import designs
    seen, made = {}, []
    real_factory = designs.design_factory

    def spy_factory(name, **kw):
        factory = real_factory(name, **kw)

        def spy(context):
            made.append(factory(context))
            return made[-1]
        spy.__dict__.update(factory.__dict__)
        return spy

    def stop(prepared, tools, build_dir, env, quiet):
        seen.update(prepared=prepared, files={f.name for f in build_dir.iterdir()},
                    first=board_build._stages(prepared, tools)[0][0], il=(build_dir / "top.il").read_text())
        raise UserError("stopped before synthesis")

    monkeypatch.setattr(designs, "design_factory", spy_factory)
    monkeypatch.setattr(board_build, "_run_stages", stop)
    return seen, made

def test_build_dram_wide_formats_gets_to_synthesis(tmp_path, capsys, cache, monkeypatch):
    """``build --memory dram`` builds in the wide formats unless told otherwise (the board's
    ``dram_formats``): the demo's wide image checked against the SDRAM, the board top with the wide
    engine elaborated and extracted, the build at Yosys's stage (stopped there: no tool runs here).
    ``--formats narrow`` and a narrow exported image build narrow; on-chip builds default to the
    board's own set, builds with slots to narrow."""
    from mmfree_fpga.config import FORMAT_SETS
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    seen, _ = stop_before_synthesis(monkeypatch)
    out = tmp_path / "o"
    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--out", str(out), "--quiet"])
    assert rc == 2 and "stopped before synthesis" in one_line_error(capsys)
    p = seen["prepared"]
    assert p.formats == "wide"
    assert {"top.il", "top.ys", "top.lpf", f"{p.dram.name}.v"} <= seen["files"] and seen["first"] == "yosys"
    wide = FORMAT_SETS["wide"]
    cfg = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    assert p.memory == "dram" and p.context.formats == wide and p.lanes == 16
    assert p.fit["needed_bytes"] == image_size(cfg, "base3", wide) > image_size(cfg, "base3")
    assert p.fit["on_chip_bytes"] == cfg.L * cfg.d * wide.x_bits // 8
    assert not out.exists()

    from mmfree_fpga.boards.build import prepare
    assert prepare("ulx3s-85f", memory="dram", formats="narrow").context.formats == FORMAT_SETS["narrow"]
    on_chip = prepare("ulx3s-85f")
    # on chip the board's own set (medium on the ECP5 boards), the iCE40's tiny engine narrow
    assert on_chip.formats == "medium" and on_chip.context.formats == FORMAT_SETS["medium"]
    assert prepare("icebreaker").formats == "narrow"
    from mmfree_fpga.boards.build import default_formats
    from mmfree_fpga.boards.registry import BOARDS
    assert default_formats(BOARDS["ulx3s-85f"], "bram", slots=2) == "narrow"
    # nextpnr's router: router2 beside the DRAM controller, nextpnr's own on chip
    assert p.router == "router2" and "--router router2" in p.plan.files["build_top.sh"]
    assert on_chip.router is None and "--router" not in on_chip.plan.files["build_top.sh"]
    narrow_export = tmp_path / "export"
    assert main(["export", "--out", str(narrow_export)]) == 0
    capsys.readouterr()
    p = prepare("ulx3s-85f", memory="dram", checkpoint=narrow_export)
    assert p.formats == "narrow" and p.fit["needed_bytes"] == image_size(cfg, "base3")


def test_build_dram_with_slots_gets_to_synthesis(checkpoint, tmp_path, capsys, cache, monkeypatch):
    """``build --memory dram --slots 2`` for the ULX3S: the design is the DramEngine with state slots
    behind a Link with the slice ops (the slice images go into the SDRAM), elaborated and extracted;
    the build at Yosys's stage (stopped there: no tool runs here). The wide formats are refused
    with slots (the Link's slice ops carry int32 residuals)."""
    from mmfree_fpga.hw.dram_engine import DramEngine
    seen, made = stop_before_synthesis(monkeypatch)
    out = tmp_path / "o"
    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--slots", "2", "--checkpoint", str(checkpoint),
               "--out", str(out), "--quiet"])
    assert rc == 2 and "stopped before synthesis" in one_line_error(capsys)
    p = seen["prepared"]
    assert {"top.il", "top.ys", "top.lpf", f"{p.dram.name}.v"} <= seen["files"] and seen["first"] == "yosys"
    assert p.memory == "dram" and p.fit["needed_bytes"] == image_size(SMALL, "base3")
    (design,) = made
    linked = design.design
    assert isinstance(design, DramBoardDesign) and isinstance(linked.engine, DramEngine)
    assert linked.slots == linked.link.slots == linked.engine.core.slots == 2
    assert "residual" in linked.engine.signature.members and "residual__valid" in seen["il"]
    assert not out.exists()

    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--slots", "2", "--formats", "wide",
               "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"])
    assert rc == 2 and "--slots needs a format set with Q16 int32 residuals (narrow, medium)" in one_line_error(capsys)


def test_build_dram_with_slots_builds_a_slice_of_the_370m_split(tmp_path, capsys, cache, monkeypatch):
    """The 370M (97 MiB of image, its config.json alone: the size check needs no weights) on the
    ULX3S with ``--memory dram --slots 2``: refused as a whole model, accepted as a slice of a
    split over the planner's fewest boards, which the build prints; the design reaches Yosys (stopped
    there), its Link announcing the SDRAM's 32 MiB as its capacity. Without --slots it is refused
    as before."""
    from mmfree_fpga.planner import plan
    big = tmp_path / "370m"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(PUBLISHED["370M"].to_hf_dict()))
    seen, made = stop_before_synthesis(monkeypatch)
    out = tmp_path / "o"
    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--slots", "2", "--checkpoint", str(big),
               "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and "stopped before synthesis" in captured.err and seen["first"] == "yosys"
    fewest = plan(PUBLISHED["370M"], "base3", "ulx3s-85f", model="370M")
    assert fewest.devices == 4
    assert ("model: 370M: 97.2 MiB does not fit one board's 32 MiB; with --slots it runs as a slice of a split "
            "over >= 4 boards (mmfree-fpga plan --model 370M --board ulx3s-85f); the largest slice "
            f"{max(st.bytes for st in fewest.stages):,} B") in captured.out
    fit = seen["prepared"].fit
    assert fit["split"]["boards"] == 4 and fit["split"]["image_bytes"] == image_size(PUBLISHED["370M"], "base3")
    assert [sl["bytes"] for sl in fit["split"]["slices"]] == [st.bytes for st in fewest.stages]
    assert fit["needed_bytes"] <= fit["available_bytes"] == SDRAM_BYTES
    assert fit["on_chip_bytes"] == 2 * 24 * 1024 * 4 <= fit["on_chip_available_bytes"]
    (design,) = made
    linked = design.design
    assert linked.slots == 2 and linked.link.capacity == SDRAM_BYTES < linked.link.image_bytes
    assert not out.exists()

    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--checkpoint", str(big),
               "--out", str(out), "--quiet"])
    err = one_line_error(capsys)
    assert rc == 2 and "does not fit the ulx3s-85f's DRAM" in err and "33,554,432 B of SDRAM" in err, err


def test_slot_builds_refuse_what_does_not_split():
    """With slots: a model one of whose layers alone is larger than the DRAM is refused (the
    planner's reason); so is state of the slots beyond the on-chip RAM."""
    from mmfree_fpga.boards.budget import check_fits_slices
    budget = memory_budget(ULX3S.resources, (512, 512))
    dram = dram_budget(ULX3S)
    huge = ModelConfig(vocab_size=256, hidden_size=4096, num_hidden_layers=2, intermediate_size=16384)
    with pytest.raises(UserError, match=r"nor does it split over several: .* one layer alone is [\d,]+ B; "
                                        r"use a board with more memory"):
        check_fits_slices(summary(huge), dram, budget, "ulx3s-85f", slots=2, lanes=16)
    with pytest.raises(UserError, match=r"recurrent state of 3 state slots \(3 x 98,304 B = 294,912 B\) does not fit"):
        check_fits_slices(summary(PUBLISHED["370M"]), dram, memory_budget(ULX3S.resources, (512,) * 120),
                          "ulx3s-85f", slots=3, lanes=16)
    # a model whose whole image fits: the DRAM check of before, with the slots' state
    fit = check_fits_slices(summary(MEDIUM), dram, budget, "ulx3s-85f", slots=2, lanes=16)
    assert "split" not in fit and fit["needed_bytes"] == image_size(MEDIUM, "base3")
    assert fit["on_chip_bytes"] == 2 * MEDIUM.L * MEDIUM.d * 4


def test_ecpix5_dram_design_takes_the_wide_formats(checkpoint, tmp_path, cache):
    """The ECPIX-5's DDR3 design in the wide formats: the DramEngine's core computes in them, the
    Link's image (load and read-back length) is the wide one; a 370M-geometry image exported in the
    wide set (192 MiB: int32 embedding mantissas, norms and lower bounds) fits the 512 MiB."""
    from mmfree_fpga.boards.budget import image_summary
    from mmfree_fpga.boards.designs import linked_engine
    from mmfree_fpga.hw.dram_engine import DramEngine
    wide = FORMAT_SETS["wide"]
    factory = linked_engine()
    seen = []

    def spy(context):
        seen.append(factory(context))
        return seen[-1]

    p = prepare("ecpix5-85f", checkpoint=checkpoint, memory="dram", formats="wide", design=spy)
    (design,) = seen
    linked = design.design
    assert isinstance(linked.engine, DramEngine) and linked.engine.core.formats == wide
    assert linked.link.image_bytes == image_size(SMALL, "base3", wide) == p.fit["needed_bytes"]

    big = PUBLISHED["370M"]
    image = fake_image(tmp_path / "370m-wide", big, fmt=wide)
    fit = check_fits_dram(image_summary(image, fmt=wide), dram_budget(ECPIX5), None, "ecpix5-85f")
    assert fit["needed_bytes"] == image_size(big, "base3", wide) > 190 * 2 ** 20 and fit["percent"] == 37.4
    with pytest.raises(UserError, match="other number formats"):
        image_summary(image)


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--board", "icebreaker", "--memory", "dram"],
     "--memory dram: board icebreaker has no DRAM support in this flow (boards with DRAM: ulx3s-85f, ecpix5-85f)"),
    (["--board", "icestick:ICEStickPlatform", "--memory", "dram"],
     "has no DRAM support in this flow (boards with DRAM: ulx3s-85f, ecpix5-85f)"),
    (["--board", "ulx3s-85f", "--memory", "dram", "--design", "echo"],
     "--memory dram applies to the engine; the design built for ulx3s-85f is echo"),
    (["--board", "ulx3s-85f", "--memory", "ddr3"], "argument --memory: invalid choice: 'ddr3'"),
])
def test_build_memory_errors(args, message, tmp_path, capsys, cache):
    out = tmp_path / "o"
    rc = main(["build", *args, "--out", str(out), "--quiet"])
    err = one_line_error(capsys)
    assert rc == 2 and message in err, err
    assert not out.exists() and not cache.exists()


def test_prepare_memory_errors(checkpoint, cache):
    with pytest.raises(UserError, match="unknown memory 'sdram'; use one of bram, dram"):
        prepare("ulx3s-85f", checkpoint=checkpoint, memory="sdram")
    from mmfree_fpga.boards.placeholder import frame_echo
    with pytest.raises(UserError, match="FrameEcho keeps no weights in DRAM"):
        prepare("ulx3s-85f", checkpoint=checkpoint, memory="dram", design=frame_echo)


def test_dram_design_needs_the_native_port(tmp_path):
    from mmfree_fpga.boards.placeholder import FrameEcho
    core = generate_core(CORES["ulx3s-85f"], tmp_path)
    with pytest.raises(TypeError, match="has no member 'native'"):
        DramBoardDesign(FrameEcho(), core)


# -- the ECPIX-5's DDR3 -------------------------------------------------------------------------------

def test_ecpix5_dram_is_the_512_mib_of_its_generated_ddr3_core(tmp_path):
    """The board variant of the ECP5DDRPHY core: the PHY's I/O primitives on the DDR3 pins, its
    clocks and start-up sequencer's outputs, and its read-levelling CSRs as ports."""
    budget = dram_budget(ECPIX5)
    assert (budget.kind, budget.module, budget.size_bytes) == ("DDR3", "MT41K256M16", DDR3_BYTES)
    assert budget.text() == "536,870,912 B of DDR3 (MT41K256M16, 512 MiB)"
    core = generate_core(CORES[ECPIX5.dram], tmp_path)
    assert core.config["sim"] is False and core.size_bytes == DDR3_BYTES and core.clk_freq == 75e6
    assert (core.data_width, core.address_width) == (128, 25)
    assert (core.phy["phytype"], core.phy["bitslips"], core.phy["delays"]) == ("ECP5DDRPHY", 4, 8)
    ports = core.ports
    for name, direction, width in [("ddram_a", "out", 15), ("ddram_ba", "out", 3), ("ddram_dq", "inout", 16),
                                   ("ddram_dqs_p", "inout", 2), ("ddram_dm", "out", 2), ("ddram_clk_p", "out", 1),
                                   ("ddram_odt", "out", 1), ("ddram_cke", "out", 1),
                                   ("clk2x", "in", 1), ("init_clk", "in", 1), ("init_rst", "in", 1),
                                   ("eclk_stop", "out", 1), ("eclk_reset", "out", 1),
                                   ("dly_sel", "in", 2), ("rdly_dq_rst", "in", 1), ("rdly_dq_inc", "in", 1),
                                   ("rdly_dq_bitslip_rst", "in", 1), ("rdly_dq_bitslip", "in", 1),
                                   ("burstdet_clr", "in", 1), ("burstdet_seen", "out", 2)]:
        assert ports[name] == [direction, width], name
    # the ECPIX-5 wires neither CS# nor RESET# to the FPGA
    assert "ddram_cs_n" not in ports and "ddram_reset_n" not in ports
    text = Path(core.verilog).read_text()
    for primitive, count in [("DDRDLLA", 1), ("DQSBUFM", 2), ("IDDRX2DQA", 16), ("TSHX2DQA", 16),
                             ("ODDRX2DQA", 18), ("ODDRX2DQSB", 2)]:
        assert len(re.findall(rf"^{primitive} ", text, flags=re.M)) == count, primitive


@pytest.fixture(scope="module")
def ddr3_plan(checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFREE_FPGA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return prepare("ecpix5-85f", checkpoint=checkpoint, memory="dram")


def test_ecpix5_plan_clocks_the_phy_from_the_pll_through_eclksyncb_and_clkdivf(ddr3_plan):
    p = ddr3_plan
    assert p.context.clock_hz == 75e6 == p.dram.clk_freq == ECPIX5.dram_clock_hz
    # the PLL makes the PHY's edge clock (twice the design clock) and the 25 MHz init clock
    assert p.pll.f_out == 150e6 and p.pll.f_secondary == 25e6 and p.pll.f_vco == 750e6
    rtlil = p.plan.files["top.il"]
    clocking = module_text(rtlil, "top.clocking")
    assert "cell \\EHXPLLL " in clocking and "parameter \\CLKOS_DIV 30" in clocking
    assert "cell \\ECLKSYNCB " in clocking and "cell \\CLKDIVF " in clocking
    assert 'parameter \\DIV "2.0"' in clocking
    # the PHY's start-up sequencer stops the edge clock and resets the divider
    assert re.search(r"connect \\STOP \\eclk_stop", clocking) and re.search(r"connect \\RST \\eclk_reset", clocking)
    lpf = p.plan.files["top.lpf"]
    for line in ['FREQUENCY NET "clocking.clk" 75000000.0 HZ;', 'FREQUENCY NET "clocking.clk2x" 150000000.0 HZ;',
                 'FREQUENCY NET "clocking.init_clk" 25000000.0 HZ;', 'FREQUENCY PORT "clk100_0__io" 100000000.0 HZ;']:
        assert line in lpf


def test_ecpix5_plan_puts_the_ddr3_core_on_its_pins_behind_the_calibration(ddr3_plan):
    p = ddr3_plan
    core = p.dram
    assert p.plan.files[f"{core.name}.v"] == Path(core.verilog).read_text()
    rtlil = p.plan.files["top.il"]
    cell = rtlil[rtlil.index(f"cell \\{core.name} "):]
    cell = cell[:cell.index("\n  end\n")]
    for port, pin, width in [("ddram_a", "a__io", 15), ("ddram_ba", "ba__io", 3), ("ddram_dq", "dq__io", 16),
                             ("ddram_dm", "dm__io", 2), ("ddram_dqs_p", "dqs__p", 2)]:
        assert f"connect \\{port} \\ddr3_0__{pin} [{width - 1}:0]" in cell, port
    for port, pin in [("ddram_ras_n", "ras__io"), ("ddram_cas_n", "cas__io"), ("ddram_we_n", "we__io"),
                      ("ddram_cke", "clk_en__io"), ("ddram_odt", "odt__io"), ("ddram_clk_p", "clk__p")]:
        assert f"connect \\{port} \\ddr3_0__{pin} [0]" in cell, port
    # the native port and the PHY's controls come from the calibration (and the command slice), not
    # from the engine's own native port (as on the SDR board)
    for name in ("cmd_valid", "cmd_addr", "cmd_ready", "rdata_valid", "wdata_data"):
        assert re.search(rf"connect \\user_port_{name} \\(native|user)__{name}\$", cell), name
        assert not re.search(rf"connect \\user_port_{name} \\\S*design__native", cell), name
    for name in ("dly_sel", "rdly_dq_rst", "rdly_dq_inc", "rdly_dq_bitslip_rst", "rdly_dq_bitslip", "burstdet_clr",
                 "burstdet_seen"):
        assert re.search(rf"connect \\{name} \\phy__{name}", cell), name
    assert re.search(r"connect \\init_done \\init_done", cell)
    assert "connect \\eclk_stop \\eclk_stop" in cell and "connect \\eclk_reset \\eclk_reset" in cell
    for port, net in [("clk2x", "sync2x_clk"), ("init_clk", "dram_init_clk"), ("init_rst", "dram_init_rst")]:
        assert re.search(rf"connect \\{port} \\{net}", cell), port
    lpf = p.plan.files["top.lpf"]
    for pin, site in [("dqs__p[0]", "V4"), ("dqs__p[1]", "V1"), ("clk__p", "H3"), ("dq__io[0]", "T4"),
                      ("a__io[14]", "H1"), ("clk_en__io", "P1")]:
        assert f'LOCATE COMP "ddr3_0__{pin}" SITE "{site}";' in lpf
    assert 'IOBUF PORT "ddr3_0__dqs__p[0]" IO_TYPE=SSTL15D_I' in lpf
    # a differential pin is placed by its P pad alone
    for n_site in ("U5", "U2", "J3"):
        assert f'SITE "{n_site}"' not in lpf
    # the UART through the FT2232H, the status LEDs of the calibration
    for pin, site in [("uart_0__rx__io", "R26"), ("uart_0__tx__io", "R24"), ("rgb_led_3__g__io", "R23"),
                      ("rgb_led_3__r__io", "P21"), ("rgb_led_0__g__io", "R21")]:
        assert f'LOCATE COMP "{pin}" SITE "{site}";' in lpf


def test_ecpix5_design_is_the_engine_with_its_weights_in_ddr3_behind_the_calibration(checkpoint, cache):
    from mmfree_fpga.boards.designs import linked_engine
    from mmfree_fpga.hw.dram_calibration import DramCalibration
    from mmfree_fpga.hw.dram_engine import DramEngine
    seen = []
    factory = linked_engine()

    def spy(context):
        seen.append(factory(context))
        return seen[-1]

    p = prepare("ecpix5-85f", checkpoint=checkpoint, memory="dram", design=spy)
    (design,) = seen
    assert p.design_name == "mmfree_fpga.boards.dram.DramBoardDesign" and p.lanes == 16 and p.memory == "dram"
    assert p.fit["memory"] == "dram" and p.fit["available_bytes"] == DDR3_BYTES
    assert isinstance(design, DramBoardDesign) and design.ddr and design.dram_core is p.dram
    assert isinstance(design.design.engine, DramEngine) and design.design.memory == "sdram"
    cal = design.calibration
    assert isinstance(cal, DramCalibration)
    assert set(design.signature.members) == {"i_stream", "o_stream", "eclk_stop", "eclk_reset", "dram_ready",
                                             "dram_error"}
    # the calibration's pattern sits in the last words of the 512 MiB, away from the weight image
    assert cal.settings.shape().length == 2 and len(cal.pattern) == 8
    # a DDR3 board's status LEDs show the calibration's outcome
    assert dict(ECPIX5.status_leds) == {"dram_ready": ("rgb_led", 3, "g"), "dram_error": ("rgb_led", 3, "r")}
    rtlil = p.plan.files["top.il"]
    for led in ("rgb_led3_g", "rgb_led3_r"):
        assert f"top.{led}" in rtlil


def test_ecpix5_bram_build_plan(checkpoint, cache):
    """The ECPIX-5 without --memory dram: the engine with its weights in block RAM, 75 MHz from the
    PLL, no DRAM core."""
    p = prepare("ecpix5-85f", checkpoint=checkpoint)
    assert p.memory == "bram" and p.dram is None and p.context.clock_hz == 75e6 and p.pll.f_out == 75e6
    assert not any(name.startswith("mmfree_litedram_") for name in p.plan.files)
    assert "ECLKSYNCB" not in p.plan.files["top.il"]


def test_a_published_370m_image_fits_the_ecpix5_ddr3_with_the_sizes():
    s = summary(PUBLISHED["370M"])
    budget = memory_budget(ECPIX5.resources, (512, 512))
    dram = dram_budget(ECPIX5)
    fit = check_fits_dram(s, dram, budget, "ecpix5-85f")
    assert (fit["needed_bytes"], fit["available_bytes"]) == (s.image_bytes, DDR3_BYTES)
    assert fit["dram"] == "536,870,912 B of DDR3 (MT41K256M16, 512 MiB)"
    assert fit["percent"] == round(100 * s.image_bytes / DDR3_BYTES, 1) == 19.0
    assert fit["on_chip_bytes"] == 24 * 1024 * 4
    # not in block RAM: the refusal names the DDR3 it fits
    with pytest.raises(UserError, match=r"its weight image fits the board's 536,870,912 B of DDR3 "
                                        r"\(MT41K256M16, 512 MiB\): build with --memory dram"):
        check_fits(s, budget, "ecpix5-85f", dram)


def test_native_command_slice_keeps_order_and_registers_the_handshake():
    """The DDR3 design's command register slice: every command once, in order, at one per cycle
    when the core keeps up; ``user.cmd_ready`` does not follow ``native.cmd_ready`` within a cycle."""
    import random

    from amaranth.sim import Simulator

    from mmfree_fpga.boards.dram import NativeCommandSlice
    dut = NativeCommandSlice(16, 8)
    rng = random.Random(3)
    sent, got = [], []

    async def bench(ctx):
        pending = [(rng.getrandbits(1), rng.getrandbits(8)) for _ in range(300)]
        for cycle in range(900):
            stall = cycle < 600 and rng.random() < 0.4
            ctx.set(dut.native.cmd_ready, 0)
            before = ctx.get(dut.user.cmd_ready)
            ctx.set(dut.native.cmd_ready, not stall)
            assert ctx.get(dut.user.cmd_ready) == before
            offer = bool(pending) and (cycle >= 600 or rng.random() < 0.8)
            ctx.set(dut.user.cmd_valid, offer)
            if offer:
                ctx.set(dut.user.cmd_we, pending[0][0])
                ctx.set(dut.user.cmd_addr, pending[0][1])
            if offer and ctx.get(dut.user.cmd_ready):
                sent.append(pending.pop(0))
            if ctx.get(dut.native.cmd_valid) and not stall:
                got.append((ctx.get(dut.native.cmd_we), ctx.get(dut.native.cmd_addr)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(sent) == 300 and got == sent


# -- the bitstream -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ulx3s_dram_bitstream(tmp_path, capsys, cache):
    """The demo model's engine with its weights in the SDRAM: Yosys + nextpnr + ecppack at 50 MHz."""
    out, js = tmp_path / "out", tmp_path / "build.json"
    rc = main(["build", "--board", "ulx3s-85f", "--memory", "dram", "--quiet", "--out", str(out),
               "--json-out", str(js)])
    text = capsys.readouterr().out
    assert rc == 0
    r = json.loads(js.read_text())
    assert Path(r["bitstream"]).is_file() and r["memory"] == "dram"
    assert r["clock_mhz"] == 50 and r["dram"]["clk_mhz"] == 50 and r["dram"]["module"] == "IS42S16160"
    assert r["timing_met"], r["fmax_mhz"]
    assert r["model_fit"]["memory"] == "dram" and r["model_fit"]["available_bytes"] == SDRAM_BYTES
    fit = r["model_fit"]
    assert (f"weight image of {fit['needed_bytes']:,} B in DRAM ({fit['percent']:g}% of 33,554,432 B of SDRAM "
            "(IS42S16160, 32 MiB)), uploaded over the UART") in text
    assert (f"DRAM controller: LiteDRAM {r['dram']['versions']['litedram']} (IS42S16160, GENSDRPHY, 16-bit "
            "native port) at 50 MHz") in text
    # the core's I/O registers went into the I/O cells (nextpnr's IOLOGIC)
    assert r["nextpnr_cells"].get("IOLOGIC", {}).get("used", 0) >= 16 + 13


@pytest.mark.slow
def test_ecpix5_ddr3_bitstream(tmp_path, capsys, cache):
    """The demo model's engine with its weights in the ECPIX-5's DDR3: Yosys + nextpnr + ecppack at the
    controller's 75 MHz (the PHY's edge clock 150 MHz); the bench's row from the same (cached) build;
    a 370M-geometry image accepted with its sizes before any tool runs."""
    from mmfree_fpga.boards.bench import dram_build_rows
    out, js = tmp_path / "out", tmp_path / "build.json"
    rc = main(["build", "--board", "ecpix5-85f", "--memory", "dram", "--quiet", "--out", str(out),
               "--json-out", str(js)])
    text = capsys.readouterr().out
    assert rc == 0
    r = json.loads(js.read_text())
    assert Path(r["bitstream"]).is_file() and r["memory"] == "dram" and r["device"] == "LFE5UM5G-85F"
    assert r["clock_mhz"] == 75 and r["dram"]["clk_mhz"] == 75 and r["pll"]["f_out_mhz"] == 150
    assert (r["dram"]["module"], r["dram"]["phy"], r["dram"]["memtype"]) == ("MT41K256M16", "ECP5DDRPHY", "DDR3")
    assert r["dram"]["read_leveling"].startswith("hardware")
    assert r["timing_met"], r["fmax_mhz"]
    fit = r["model_fit"]
    assert fit["memory"] == "dram" and fit["available_bytes"] == DDR3_BYTES
    assert (f"weight image of {fit['needed_bytes']:,} B in DRAM ({fit['percent']:g}% of 536,870,912 B of DDR3 "
            "(MT41K256M16, 512 MiB)), uploaded over the UART") in text
    assert (f"DRAM controller: LiteDRAM {r['dram']['versions']['litedram']} (MT41K256M16, ECP5DDRPHY, 128-bit "
            "native port) at 75 MHz") in text
    cells = {name: c["used"] for name, c in r["nextpnr_cells"].items()}
    # the PHY's hard blocks: a DQS buffer per byte lane, the DLL, the edge clock's sync and divider
    assert (cells["DQSBUFM"], cells["DDRDLL"], cells["ECLKSYNCB"], cells["CLKDIVF"]) == (2, 1, 1, 1)
    # every DDR3 pin's DDR registers in its I/O cell: dq 16, dqs 2, dm 2, a 15, ba 3, ras/cas/we/cke/odt/clk 6
    assert cells["IOLOGIC"] >= 44

    rows = dram_build_rows(boards=("ecpix5-85f",), out_dir=tmp_path / "rows")
    (row,) = rows
    assert row["cached"] and row["error"] is None
    assert (row["fmax_mhz"], row["timing_met"], row["clock_mhz"]) == (r["fmax_mhz"], True, 75)
    assert row["lut"]["used"] == r["utilization"]["lut"]["used"] and row["iologic"]["used"] == cells["IOLOGIC"]
    assert row["dram_cells"]["DQSBUFM"] == 2 and row["memory"] == "536,870,912 B of DDR3 (MT41K256M16, 512 MiB)"

    image = fake_image(tmp_path / "370m", PUBLISHED["370M"])
    p = prepare("ecpix5-85f", checkpoint=image, memory="dram")
    s = summary(PUBLISHED["370M"])
    assert (p.fit["needed_bytes"], p.fit["available_bytes"], p.fit["percent"]) == (s.image_bytes, DDR3_BYTES, 19.0)
