"""Running the engine's generated design: images, the reference run, and three simulators.

``run_engine(...)`` is the one entry point (used by ``mmfree-fpga sim``, the tests and the
bench): it builds (or reuses) a simulation of :class:`~mmfree_fpga.hw.engine.Engine` with the
memory model and the ``$readmemh`` store, so weights reach the simulated memory as a file read
at time 0 (no Python per word), and one build per (lanes, maxima, packings) serves every
geometry that fits: the geometry is set at run time with ``SET_PARAM``. On Verilator a plain
C++ harness (``sim/engine_harness.cpp``) drives the command stream and runs the whole
prompt/steps sequence without Python per cycle (more than a million cycles/s on the demo
engine); on Icarus cocotb drives it (``sim/engine_tb.py``; ``cocotb=True`` does so on
Verilator too). The Amaranth simulator (``simulator="amaranth"``) instead uses on-chip RAM
initialised from the image.

``waves=Waves(path, first, end)`` records a waveform of clock cycles ``first .. end - 1``
(cycle 0 is the first reset cycle): FST from a separate ``--trace-fst`` Verilator build,
dumping only inside the window; VCD (or FST, by the file's suffix) from Icarus, switched on
and off with ``$dumpon``/``$dumpoff``; VCD from Amaranth's simulator, whose writer cannot
start after time 0, so its file always starts at cycle 0 and stops at ``end``.

``trace=True`` also records the engine's ``trace`` port: every result its writer stores, as
``(job, layer, row, value)`` tuples per step (:attr:`EngineRun.trace`), which
:func:`mmfree_fpga.sim.trace.hardware_trace` turns into per-layer vectors.

``memory="sdram"`` or ``"ddr3"`` runs the engine with its weights in DRAM instead (Verilator's
C++ harness only): :class:`~mmfree_fpga.sim.dram_sim.DramEngineSimTop`, the engine with a
LiteDRAM core in its ``sim`` variant (LiteDRAM's controller and SDRAM model with the board PHY's
settings, ``boards/litedram.py``, cached under the build root): "sdram" the ULX3S's SDR SDRAM
(IS42S16160, GENSDRPHY, 50 MHz), "ddr3" the ECPIX-5's DDR3 (MT41K256M16, ECP5DDRPHY, 75 MHz). The harness waits for the core's init
sequence, writes the image (of the build's number formats) through the engine's ``load`` stream,
then runs the tokens;
:attr:`EngineRun.dram` has the load and the weight traffic (:func:`dram_figures`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .runner import VERILATOR_FAST, VERILATOR_MAKEFLAGS


from mmfree_fpga.config import FORMAT_SETS, FORMATS, ModelConfig

__all__ = ["EngineBuild", "default_build", "format_set", "EngineRun", "Waves", "load_image", "synthetic_image_info",
           "reference_tokens", "run_engine", "run_amaranth", "run_amaranth_slices", "SliceStep", "build_dir_for", "build_harness", "decode_trace",
           "check_waves", "memory_model_inputs", "dram_config", "dram_core", "dram_figures", "SIMULATORS", "MEMORIES", "DRAM_BOARDS", "WAVE_FORMATS", "HARNESS", "HARNESS_VERILATOR_ARGS",
           "HARNESS_FST_ARGS"]

SIMULATORS = ("verilator", "icarus", "amaranth")
MEMORIES = ("bram", "sdram", "ddr3")   # where the weights are: the $readmemh store, or DRAM behind LiteDRAM
DRAM_BOARDS = {"sdram": "ulx3s-85f", "ddr3": "ecpix5-85f"}   # the board whose core each DRAM memory models
# what a DRAM build adds to ENGINE_SOURCES
DRAM_SOURCES = ("hw/dram_engine.py", "hw/dram_port.py", "hw/control.py", "sim/dram_sim.py", "boards/litedram.py")
# the smallest maxima of a DRAM build: a 1.3 MB model, larger than the ULX3S's block RAM, and the
# demo share one simulator build
DRAM_BUILD_FLOOR = ModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, intermediate_size=768)
# the gateware the engine is made of (a change to any of them means a new simulator build)
ENGINE_SOURCES = tuple(f"hw/{name}.py" for name in (
    "engine", "engine_common", "engine_fetch", "engine_front", "engine_output", "control", "ram", "weight_port",
    "matvec", "trits", "bitlinear_front", "scalar_unit", "output_scale", "elementwise", "embed_scale", "argmax",
    "vector_common")) + ("mmfree_fpga/config.py", "mmfree_fpga/image.py", "reference/integer.py",
                         "mmfree_fpga/packing.py")
_BUILD_ROOT = Path(os.environ.get("MMFREE_SIM_BUILD", Path(tempfile.gettempdir()) / "mmfree-engine-sim")).absolute()
HARNESS = Path(__file__).with_name("engine_harness.cpp")
# Measured on the demo engine (16 lanes, 8 token steps; best of 5 interleaved runs on a loaded 2-core
# machine): these flags 1.31 M cycles/s; Verilator's defaults (g++ -Os) 1.09 M; g++ -O1 1.19 M; g++ -O3,
# -march=native, -flto or no fast X options all within 3% of these (noise); --threads 2: 20 k (its
# threads spin on 2 shared cores).
HARNESS_VERILATOR_ARGS = ("-CFLAGS", "-O2")      # (build_verilator_exe adds VERILATOR_FAST)
# the waveform build: g++ -O1 (the last -O wins) compiles in 30 s instead of 42 and runs about 10%
# slower outside the window (1.0 M cycles/s against 1.1 M); -O0 would be 18 s but 4x slower
HARNESS_FST_ARGS = HARNESS_VERILATOR_ARGS + ("--trace-fst", "-CFLAGS", "-O1")
# the waveform format each simulator writes (file suffixes accepted)
WAVE_FORMATS = {"verilator": (".fst",), "icarus": (".vcd", ".fst"), "amaranth": (".vcd",)}
PERIOD_NS = 10          # one clock cycle in every waveform


@dataclass(frozen=True)
class EngineBuild:
    """What a simulator build is specialised for (everything else is a run-time parameter)."""
    lanes: int
    max_d: int
    max_I: int
    max_L: int
    max_V: int
    mem_words: int
    packings: tuple = ("2bit", "base3")
    compact: bool = False           # EngineCore(compact=True): the iCE40 variant
    # MEMORIES: "bram" (mem_words of $readmemh store) or "sdram" (a LiteDRAM core; mem_words unused)
    memory: str = field(default="bram", repr=False)
    # the number formats, a name in FORMAT_SETS
    formats: str = "narrow"

    @property
    def fmt(self):
        return format_set(self.formats)

    def key(self) -> str:
        """Names the build directory: these parameters and the gateware sources."""
        h = hashlib.sha1(repr(self).encode())
        root = Path(__file__).resolve().parent.parent
        for name in ENGINE_SOURCES:
            h.update((root / name).read_bytes())
        if self.memory != "bram":
            h.update(self.memory.encode() + dram_config(self.memory).key().encode())
            for name in DRAM_SOURCES:
                h.update((root / name).read_bytes())
        return h.hexdigest()[:12]

    def base_cfg(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.max_V, hidden_size=self.max_d, num_hidden_layers=self.max_L,
                           intermediate_size=self.max_I)


@dataclass
class EngineRun:
    tokens: list
    argmax_logits: list
    cycles: list
    read_logits: dict = field(default_factory=dict)     # step -> {index: logit}
    sim_seconds: float = 0.0
    simulator: str = ""
    synthetic: bool = False
    sim_cycles: float = 0.0        # clock cycles from the first FEED_TOKEN to the last result
    sim_wall_s: float = 0.0        # wall-clock seconds of those cycles (simulator start-up excluded)
    trace: list | None = None      # per step: [(job, layer, row, value), ...] in store order
    waves: str | None = None       # the waveform file written, if any
    memory: str = "bram"
    dram: dict | None = None       # memory="sdram": dram_figures()


@dataclass(frozen=True)
class Waves:
    """A waveform request: clock cycles ``first`` .. ``end - 1`` (``end`` None: to the end) to ``path``."""
    path: Path
    first: int = 0
    end: int | None = None


def format_set(name: str):
    """The :class:`~mmfree_fpga.config.Formats` of a name in ``FORMAT_SETS`` (UserError otherwise)."""
    from mmfree_fpga.errors import UserError
    if name not in FORMAT_SETS:
        raise UserError(f"unknown number formats {name!r}; use one of {', '.join(FORMAT_SETS)}")
    return FORMAT_SETS[name]


def load_image(checkpoint, packing: str, formats: str = "narrow"):
    """(cfg, image bytes) of a checkpoint exported with ``packing`` in the number formats
    ``formats`` (a name in ``FORMAT_SETS``; the default set as ``mmfree-fpga export`` writes it)."""
    fmt = format_set(formats)
    if fmt == FORMATS:
        from mmfree_fpga.host.image import WeightImage
        image = WeightImage.from_checkpoint(checkpoint, packing)
        return image.cfg, image.blob
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
    from mmfree_fpga.reference.export import image_bytes, integer_weights
    cfg, tensors = load_checkpoint(checkpoint or DEMO_CHECKPOINT)
    return cfg, image_bytes(integer_weights(cfg, tensors, fmt), packing)


def synthetic_image_info(cfg: ModelConfig, packing: str) -> int:
    from mmfree_fpga.image import image_size
    return image_size(cfg, packing)


def reference_tokens(cfg: ModelConfig, blob: bytes, packing: str, prompt: list[int], steps: int,
                     formats: str = "narrow"):
    """Greedy tokens and per-step logits (Q(x_frac), full width: ``wire_logits`` gives what the
    engine's interface carries) of the integer model in the formats ``formats``, run from the
    image bytes."""
    from mmfree_fpga.reference.integer import parse_image
    from mmfree_fpga.reference.integer import IntegerModel
    model = IntegerModel(parse_image(blob, cfg, packing, format_set(formats)))
    tokens = list(prompt)
    logits = []
    for t in range(len(prompt) + steps - 1):
        lg = model.step(tokens[t])
        logits.append(lg)
        if t >= len(prompt) - 1:
            tokens.append(IntegerModel.argmax(lg))
    return tokens, logits


def default_build(cfg: ModelConfig, lanes: int, image_bytes: int = 0, memory: str = "bram",
                  formats: str = "narrow") -> EngineBuild:
    """The build a geometry runs on unless told otherwise: maxima rounded up to at least the
    demo model's (with a DRAM memory, to :data:`DRAM_BUILD_FLOOR`'s), so the demo and smaller
    models share one simulator build per lane count, memory and number formats (a DRAM build
    serves every image size)."""
    from mmfree_fpga.hw.engine import beat_bytes
    words = -(-image_bytes // beat_bytes(lanes))
    floor = DRAM_BUILD_FLOOR if memory != "bram" else ModelConfig(vocab_size=256, hidden_size=128,
                                                                   num_hidden_layers=2, intermediate_size=256)
    mem_words = 0 if memory != "bram" else max(32768, 1 << max(0, words - 1).bit_length())
    format_set(formats)
    return EngineBuild(lanes=lanes, max_d=max(floor.d, cfg.d), max_I=max(floor.I, cfg.I), max_L=max(floor.L, cfg.L),
                       max_V=max(floor.V, cfg.V), mem_words=mem_words, memory=memory, formats=formats)


def dram_config(memory: str):
    """The LiteDRAM core settings (``boards.litedram.LiteDRAMConfig``, ``sim`` variant) of a
    DRAM ``memory``: "sdram" is the ULX3S's IS42S16160 controller, "ddr3" the ECPIX-5's
    MT41K256M16 controller (:data:`DRAM_BOARDS`)."""
    from mmfree_fpga.boards.litedram import CORES
    if memory in DRAM_BOARDS:
        return replace(CORES[DRAM_BOARDS[memory]], sim=True)
    raise ValueError(f"no DRAM core for memory {memory!r}; use one of {', '.join(MEMORIES[1:])}")


def dram_core(memory: str):
    """The generated core (``boards.litedram.DramCore``) of a DRAM ``memory``, cached under the
    simulation build root."""
    from mmfree_fpga.boards.litedram import generate_core
    return generate_core(dram_config(memory), cache_dir=_BUILD_ROOT)


def dram_figures(*, init_cycles: int, load_bytes: int, load_cycles: int, weight_beats: int, weight_cycles: int,
                 weight_wait_cycles: int, beat_bytes: int, native_bytes: int) -> dict:
    """The DRAM run's figures: the counters of :class:`~mmfree_fpga.sim.dram_sim.DramEngineSimTop`
    and ``efficiency``, the weight bytes delivered over what could have been delivered in the
    cycles spent streaming weights. ``native_bytes``: the memory's peak bytes per cycle
    (``DramCore.peak_bytes_per_cycle``).

    * The memory slower than the engine's beats (``native_bytes <= beat_bytes``: the SDR SDRAM):
      against the memory's peak over every cycle with beats owed.
    * The memory faster (the DDR3's 8 bytes per cycle, 16 lanes taking 4): the engine is the
      limit, so against one beat per cycle over the cycles with beats owed *and* the engine
      ready for one (``weight_cycles - weight_wait_cycles``): the cycles the engine waited for
      weights. ``memory_utilisation`` is the delivered bytes against the memory's peak over
      every cycle with beats owed, whichever the case.
    """
    delivered = weight_beats * beat_bytes
    if native_bytes <= beat_bytes:
        port_bytes, counted = native_bytes, weight_cycles
    else:
        port_bytes, counted = beat_bytes, weight_cycles - weight_wait_cycles
    return {"init_cycles": init_cycles, "load_bytes": load_bytes, "load_cycles": load_cycles,
            "weight_bytes": delivered, "weight_cycles": weight_cycles, "weight_wait_cycles": weight_wait_cycles,
            "peak_bytes_per_cycle": native_bytes, "port_bytes_per_cycle": port_bytes,
            "memory_utilisation": delivered / (native_bytes * weight_cycles) if weight_cycles else None,
            "efficiency": delivered / (port_bytes * counted) if counted else None}


def build_dir_for(build: EngineBuild, simulator: str) -> Path:
    return _BUILD_ROOT / f"{simulator}-{build.key()}"


def _param_commands(cfg: ModelConfig, packing: str, lanes: int, fmt=FORMATS) -> list[tuple[int, int]]:
    from mmfree_fpga.hw.engine import engine_params
    return sorted(engine_params(cfg, packing, lanes, fmt).items())


def run_engine(*, cfg: ModelConfig, blob: bytes | None, packing: str, lanes: int, prompt: list[int],
               steps: int, simulator: str = "verilator", build: EngineBuild | None = None,
               stall_rate: float = 0.0, cmd_stall_rate: float = 0.0, mem_bandwidth: float = 0.0,
               mem_latency: int = 1, read_logits: list[int] = (), seed: int = 1,
               synthetic: bool = False, trace: bool = False, waves: Waves | None = None,
               cocotb: bool = False, memory: str = "bram", progress: bool = True, log=None,
               formats: str | None = None) -> EngineRun:
    """Feed ``prompt`` then ``steps - 1`` greedy tokens (``steps`` generated tokens in all).

    ``blob`` None with ``synthetic``: the memory model makes up the weights (cycle counts only).
    ``stall_rate``: probability of a stall cycle on the weight response; ``cmd_stall_rate``: of
    an idle cycle before each command (and before taking each result), drawn from a PRNG seeded
    with ``seed``. ``mem_bandwidth`` bytes/cycle (0 = one beat per cycle).
    ``trace``: record the ``trace`` port (module docstring). ``waves``: write a waveform (module
    docstring). ``cocotb``: on Verilator, drive the command stream from cocotb instead of the C++
    harness (slower; no waves). ``progress``: a bar over the token steps of the C++ harness
    (shown only where :mod:`mmfree_fpga.progress` allows). ``log``: called with a line when a
    harness build starts. ``memory``: :data:`MEMORIES` ("sdram", "ddr3": the weights in DRAM, module
    docstring; Verilator's C++ harness, real weights, no memory-model settings). ``formats``: the
    number formats (a name in ``FORMAT_SETS``; None: the build's, "narrow" without a build); the
    image must be in them. ``argmax_logits`` and ``read_logits`` are what the interface carries
    (Q16 int32, ``reference.integer.wire_logits``).
    """
    from mmfree_fpga.hw.engine import beat_bytes, check_geometry
    from mmfree_fpga.errors import UserError
    if memory not in MEMORIES:
        raise UserError(f"unknown memory {memory!r}; use one of {', '.join(MEMORIES)}")
    if build is None:
        build = default_build(cfg, lanes, len(blob) if blob is not None else 0, memory, formats or "narrow")
    if build.memory != memory:
        raise ValueError(f"the build is for memory {build.memory!r}, the run for {memory!r}")
    if formats is not None and build.formats != formats:
        raise ValueError(f"the build is for the {build.formats!r} formats, the run for {formats!r}")
    formats = build.formats
    fmt = build.fmt
    check_geometry(cfg, lanes, max_d=build.max_d, max_I=build.max_I, max_L=build.max_L, max_V=build.max_V)
    if simulator not in SIMULATORS:
        raise UserError(f"unknown simulator {simulator!r}; use one of {', '.join(SIMULATORS)}")
    if blob is not None:
        from mmfree_fpga.image import image_size
        if len(blob) != image_size(cfg, packing, fmt):
            raise UserError(f"the image ({len(blob)} bytes) is not one of this geometry and packing in the "
                            f"{formats!r} number formats ({image_size(cfg, packing, fmt)} bytes)")
    if memory != "bram":
        if simulator != "verilator" or cocotb:
            raise UserError(f"--memory {memory} runs on Verilator's C++ harness only (--simulator verilator)")
        if blob is None or synthetic:
            raise UserError(f"--memory {memory} needs real weights (no --synthetic): they go through the load stream")
        if stall_rate or mem_bandwidth or mem_latency != 1:
            raise UserError(f"the memory model's settings (stall rate, bandwidth, latency) are for --memory bram; "
                            f"with --memory {memory} the DRAM model sets them")
    if waves is not None:
        check_waves(waves, simulator)
        if cocotb and simulator == "verilator":
            raise UserError("waves on Verilator come from the C++ harness: leave cocotb off")
    if simulator == "amaranth":
        return run_amaranth(cfg=cfg, blob=blob, packing=packing, lanes=lanes, prompt=prompt, steps=steps,
                            read_logits=read_logits, trace=trace, waves=waves, formats=formats)
    from .runner import simulator_missing
    reason = simulator_missing(simulator)
    if reason:
        raise UserError(reason)
    if memory == "bram" and blob is not None and len(blob) > build.mem_words * beat_bytes(lanes):
        raise UserError(f"the image ({len(blob)} bytes) does not fit this build's weight memory")
    if memory != "bram" and len(blob) > dram_core(memory).size_bytes:
        raise UserError(f"the image ({len(blob)} bytes) does not fit the {memory} "
                        f"({dram_core(memory).size_bytes} bytes)")
    job = dict(cfg=cfg, blob=blob, packing=packing, build=build, prompt=prompt, steps=steps,
               stall_rate=stall_rate, cmd_stall_rate=cmd_stall_rate, mem_bandwidth=mem_bandwidth,
               mem_latency=mem_latency, read_logits=read_logits, seed=seed, synthetic=synthetic, trace=trace,
               waves=waves)
    if simulator == "verilator" and not cocotb:
        return _run_harness(**job, progress=progress, log=log)
    return _run_cocotb(**job, simulator=simulator)


def check_waves(waves: Waves, simulator: str) -> None:
    """UserError unless ``waves`` can be written by ``simulator`` (before any work is done)."""
    from mmfree_fpga.errors import UserError
    path = Path(waves.path)
    if waves.first < 0 or (waves.end is not None and waves.end <= waves.first):
        raise UserError(f"the waveform window must have 0 <= --waves-from < --waves-to "
                        f"(got {waves.first} .. {'the end' if waves.end is None else waves.end})")
    if path.is_dir():
        raise UserError(f"--waves {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--waves {path}: the folder {parent} does not exist or is not writable")
    suffixes = WAVE_FORMATS[simulator]
    if path.suffix.lower() not in suffixes:
        raise UserError(f"--waves {path}: {simulator} writes {' or '.join(s[1:].upper() for s in suffixes)}; "
                        f"name the file *{' or *'.join(suffixes)}")
    if simulator == "verilator":
        from .runner import fst_missing
        reason = fst_missing()
        if reason:
            raise UserError(f"--waves {path}: {reason}")


def _waves_tmp(waves: Waves) -> Path:
    """A temporary file beside the waveform (renamed onto it once the run succeeded)."""
    path = Path(waves.path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 is for secrets; a waveform is an ordinary file
    return Path(tmp)


def decode_trace(words: list[int], layout) -> list[tuple[int, int, int, int]]:
    """Raw ``trace__payload`` integers -> (job, layer, row, value) with the widths of ``layout``
    (``value`` signed, x_bits wide)."""
    widths = [layout[name].shape.width for name in ("job", "layer", "row", "value")]
    vbits = widths[3]
    out = []
    for w in words:
        fields = []
        for width in widths:
            fields.append(w & ((1 << width) - 1))
            w >>= width
        v = fields[3]
        out.append((fields[0], fields[1], fields[2], v - (1 << vbits) if v >> (vbits - 1) else v))
    return out


def _sources(build: EngineBuild, directory: Path) -> list[Path]:
    """Verilog of the simulation top (written once per build)."""
    from mmfree_fpga.hw.engine import Engine
    from mmfree_fpga.hw.weight_port import STORE_VERILOG
    from .runner import write_verilog
    directory.mkdir(parents=True, exist_ok=True)
    top = directory / "engine_top.v"
    if build.memory != "bram":
        from .dram_sim import DramEngineSimTop
        core = dram_core(build.memory)
        if not top.exists():
            sim_top = DramEngineSimTop(core, cfg=build.base_cfg(), lanes=build.lanes, packings=build.packings,
                                       packing="base3" if "base3" in build.packings else "2bit",
                                       compact=build.compact, formats=build.fmt)
            tmp = write_verilog(sim_top, directory / "engine_top.v.tmp", name="engine_top")
            os.replace(tmp, top)
        return [top, Path(core.verilog)]
    store = directory / "weight_store.v"
    if not top.exists():
        engine = Engine(build.base_cfg(), lanes=build.lanes, packings=build.packings, readmemh=True, model=True,
                        mem_words=build.mem_words, packing="base3" if "base3" in build.packings else "2bit",
                        compact=build.compact, formats=build.fmt)
        tmp = write_verilog(engine, directory / "engine_top.v.tmp", name="engine_top")
        store.write_text(STORE_VERILOG)
        os.replace(tmp, top)
    return [top, store]


def _encoding() -> dict:
    """What the C++ harness needs of the control interface (:mod:`~mmfree_fpga.hw.control`): the
    op codes it sends, the bit offsets of ``cmd__payload``'s index and arg and of
    ``result__payload``'s fields."""
    from mmfree_fpga.hw.control import EngineOp, field_offsets
    return {"RESET_STATE": EngineOp.RESET_STATE.value, "FEED_TOKEN": EngineOp.FEED_TOKEN.value,
            "SET_PARAM": EngineOp.SET_PARAM.value, "LOAD_RESET": EngineOp.LOAD_RESET.value, **field_offsets()}


def memory_model_inputs(*, stall_rate: float, mem_bandwidth: float, mem_latency: int, synthetic: bool) -> dict:
    """The memory model's input ports (:class:`~mmfree_fpga.hw.weight_port.WeightMemory`) for these settings."""
    return {"mem_bandwidth": int(round(mem_bandwidth * 256)), "mem_latency": int(mem_latency),
            "mem_stall_rate": min(255, int(round(stall_rate * 256))), "mem_synthetic": int(bool(synthetic))}


def _watchdog_cycles(cfg: ModelConfig, lanes: int, inputs: dict, fmt=FORMATS) -> int:
    """Cycles after which the harness gives up waiting for one result: many times what the
    slowest memory setting could need for a token (ideal cycles, the image at the set bandwidth,
    the latency per request), so only a hung engine reaches it."""
    from mmfree_fpga.hw.engine import beat_bytes
    from mmfree_fpga.image import image_size
    bandwidth = inputs["mem_bandwidth"] / 256 or beat_bytes(lanes)
    per_token = (cfg.ideal_cycles(lanes) + image_size(cfg, "2bit", fmt) / bandwidth
                 + 100 * inputs["mem_latency"] * (6 * cfg.L + 1) * 8)
    return int(64 * per_token / (1 - inputs["mem_stall_rate"] / 256)) + 1_000_000


def build_harness(build: EngineBuild, *, fst: bool = False, log=None) -> Path:
    """The C++ harness (:data:`HARNESS`) compiled with Verilator around ``build``'s engine; cached
    by the build's key, the harness source and the flags. ``fst``: the ``--trace-fst`` variant."""
    from mmfree_fpga.errors import UserError
    from .runner import build_verilator_exe, simulator_missing
    reason = simulator_missing("verilator")
    if reason:
        raise UserError(reason)
    bdir = _BUILD_ROOT / f"harness-{build.key()}"
    sources = _sources(build, bdir)
    args = list(HARNESS_FST_ARGS if fst else HARNESS_VERILATOR_ARGS)
    if build.memory != "bram":
        args += ["-CFLAGS", "-DMMFREE_DRAM"]
    key = hashlib.sha256(HARNESS.read_bytes() + repr(args).encode()).hexdigest()[:12]
    binary = bdir / f"Vengine{'-fst' if fst else ''}-{key}"
    if binary.exists():
        return binary
    if log:
        log(f"building the Verilator harness in {bdir} (once per build, about a minute)")
    build_verilator_exe(sources=[*sources, HARNESS], top="engine_top", prefix="Vengine", binary=binary,
                        options=args, jobs=os.cpu_count() or 2, log_reason="Verilator build of the engine harness")
    for old in bdir.glob(f"Vengine{'-fst' if fst else ''}-" + "?" * len(key)):
        if old != binary:                        # builds of an older harness or older flags
            old.unlink(missing_ok=True)
    return binary


def _decode_traces(build: EngineBuild, raw: list[list[int]]) -> list:
    """Per step, the trace port's words decoded (:func:`decode_trace`) with the build's layout."""
    from mmfree_fpga.hw.engine import trace_layout
    layout = trace_layout(build.max_d, build.max_I, build.max_L, build.max_V, build.fmt)
    return [decode_trace(words, layout) for words in raw]


def _run_harness(*, cfg, blob, packing, build, prompt, steps, stall_rate, cmd_stall_rate, mem_bandwidth,
                 mem_latency, read_logits, seed, synthetic, trace, waves, progress, log) -> EngineRun:
    dram = build.memory != "bram"
    from mmfree_fpga.hw.engine import beat_bytes
    from mmfree_fpga.hw.weight_port import write_hex
    from mmfree_fpga.progress import Progress
    binary = build_harness(build, fst=waves is not None, log=log)
    enc = _encoding()
    inputs = memory_model_inputs(stall_rate=stall_rate, mem_bandwidth=mem_bandwidth, mem_latency=mem_latency,
                                 synthetic=synthetic)
    if dram:
        # (only for the watchdog) the native port's peak and a DRAM read round trip
        native_bytes = dram_core(build.memory).peak_bytes_per_cycle
        watch = dict(inputs, mem_bandwidth=256 * native_bytes, mem_latency=32)
    n_feed = len(prompt) + steps - 1
    job = [f"cmd {enc['RESET_STATE']} {enc['FEED_TOKEN']} {enc['SET_PARAM']} {enc['index_shift']} {enc['arg_shift']}",
           f"result {enc['token_bit']} {enc['logit_bit']} {enc['cycles_bit']}",
           f"mem {inputs['mem_bandwidth']} {inputs['mem_latency']} {inputs['mem_stall_rate']} {inputs['mem_synthetic']}",
           f"cmd_stall {float(cmd_stall_rate)!r} {int(seed) & (2**64 - 1)}", f"trace {int(bool(trace))}",
           f"watchdog {_watchdog_cycles(cfg, build.lanes, watch if dram else inputs, build.fmt)}"]
    job += [f"param {i} {v}" for i, v in _param_commands(cfg, packing, build.lanes, build.fmt)]
    job += [f"prompt {len(prompt)} " + " ".join(str(int(t)) for t in prompt), f"steps {steps}",
            f"read_logits {len(read_logits)} " + " ".join(str(int(i)) for i in read_logits)]
    tokens, argmax_logits, cycles = list(prompt), [], []
    logits = {t: {} for t in range(n_feed)}
    raw = [[] for _ in range(n_feed)] if trace else None
    done = None
    counts = {}
    tmp_waves = None
    with tempfile.TemporaryDirectory(prefix="engine-run-", dir=binary.parent) as tmp:
        argv = [str(binary)]
        if dram:
            image = Path(tmp) / "weights.bin"
            image.write_bytes(blob)
            job.append(f"load {enc['LOAD_RESET']} {image}")
        elif blob is not None:
            argv.append(f"+weights={write_hex(blob, beat_bytes(build.lanes), Path(tmp) / 'weights.hex')}")
        if waves is not None:
            tmp_waves = _waves_tmp(waves)
            argv.append(str(tmp_waves))
            job.append(f"waves {waves.first} {2**64 - 1 if waves.end is None else waves.end} {PERIOD_NS}")
        job.append("run\n")
        err_path = Path(tmp) / "stderr.txt"
        try:
            t0 = time.perf_counter()
            with open(err_path, "w") as err, \
                    Progress(f"simulating ({binary.name})", quiet=not progress, unit="token") as bar, \
                    subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                     cwd=tmp) as proc:
                try:
                    try:
                        proc.stdin.write("\n".join(job))
                        proc.stdin.close()
                    except BrokenPipeError:     # it stopped at once: its stderr says why (below)
                        pass
                    for line in proc.stdout:
                        kind, *f = line.split()
                        if kind == "trace":
                            raw[int(f[0])].append(int(f[1], 16))
                        elif kind == "step":
                            t, token, logit, cyc = (int(v) for v in f)
                            if t >= len(prompt) - 1:
                                tokens.append(token)
                            argmax_logits.append(logit)
                            cycles.append(cyc)
                            bar(t + 1, n_feed)
                        elif kind == "logit":
                            logits[int(f[0])][int(f[1])] = int(f[2])
                        elif kind == "done":
                            done = (int(f[0]), float(f[1]))
                        elif kind == "init":
                            counts["init_cycles"] = int(f[0])
                        elif kind == "loaded":
                            counts["load_bytes"], counts["load_cycles"] = int(f[0]), int(f[1])
                        elif kind == "dram":
                            counts.update(zip(("weight_beats", "weight_cycles", "weight_wait_cycles"),
                                              (int(v) for v in f)))
                    rc = proc.wait()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            elapsed = time.perf_counter() - t0
            if rc != 0 or done is None or len(cycles) != n_feed:
                tail = err_path.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"the engine harness failed (exit {rc}): " + " / ".join(tail))
            if tmp_waves is not None:
                os.replace(tmp_waves, waves.path)
        finally:
            if tmp_waves is not None and tmp_waves.exists():
                tmp_waves.unlink()
    traces = _decode_traces(build, raw) if trace else None
    figures = None
    if dram:
        figures = dram_figures(**counts, beat_bytes=beat_bytes(build.lanes), native_bytes=native_bytes)
    return EngineRun(tokens=tokens, argmax_logits=argmax_logits, cycles=cycles, read_logits=logits,
                     sim_seconds=elapsed, simulator="verilator", synthetic=synthetic, sim_cycles=done[0],
                     sim_wall_s=done[1], trace=traces, waves=str(waves.path) if waves is not None else None,
                     memory=build.memory, dram=figures)


ICARUS_WAVES_MODULE = "mmfree_waves"
ICARUS_WAVES_VERILOG = """\
// Waveforms of mmfree-fpga Icarus runs (sim/engine_sim.py): +waves=FILE dumps engine_top from
// +waves_from_ns=T0 (default 0) until +waves_to_ns=T1 (default: the end).
module mmfree_waves;
    reg [8*1024-1:0] path;
    reg [63:0] first, last;
    initial begin
        if ($value$plusargs("waves=%s", path)) begin
            if (!$value$plusargs("waves_from_ns=%d", first)) first = 0;
            $dumpfile(path);
            $dumpvars(0, engine_top);
            if (first > 0) begin
                $dumpoff;
                #(first) $dumpon;
            end
            if ($value$plusargs("waves_to_ns=%d", last)) #(last - first) $dumpoff;
        end
    end
endmodule
"""


def _run_cocotb(*, cfg, blob, packing, build, prompt, steps, simulator, stall_rate, cmd_stall_rate,
                mem_bandwidth, mem_latency, read_logits, seed, synthetic, trace=False, waves=None) -> EngineRun:
    from cocotb_tools.runner import get_results, get_runner
    from mmfree_fpga.hw.engine import beat_bytes
    from mmfree_fpga.hw.weight_port import write_hex
    from .runner import CocotbFailure, simulator_env
    bdir = build_dir_for(build, simulator)
    sources = _sources(build, bdir)
    runner = get_runner(simulator)
    if simulator == "verilator":
        # Not -CFLAGS -O2: it also applies to the symbol-table constructors that cocotb's
        # --public-flat-rw makes huge, and g++ then takes a quarter of an hour on them.
        args = ["-Wno-fatal", *VERILATOR_FAST]
        flags = f"{VERILATOR_MAKEFLAGS} OPT_FAST=-O1 OPT_SLOW=-O0 OPT_GLOBAL=-O1 -j2"
    else:
        # the waveform module is a second root, idle unless +waves=FILE is given
        waves_v = bdir / "waves.v"
        if not waves_v.exists() or waves_v.read_text() != ICARUS_WAVES_VERILOG:
            waves_v.write_text(ICARUS_WAVES_VERILOG)
        sources = sources + [waves_v]
        args, flags = ["-g2005", "-s", ICARUS_WAVES_MODULE], ""
    done = bdir / "build.done"
    stamp = hashlib.sha1(repr(args).encode() + b"".join(p.read_bytes() for p in sources)).hexdigest()
    fresh = done.exists() and done.read_text().strip() == stamp
    if not fresh:
        # (cocotb's Verilator runner reruns verilator and make on every build(), tens of seconds
        # here: build() is called only when the stamp -- sources and flags -- changed)
        with simulator_env(MAKEFLAGS=flags):
            runner.build(sources=[str(s) for s in sources], hdl_toplevel="engine_top", build_dir=bdir,
                         timescale=("1ns", "1ps"), build_args=args, always=True)
        done.write_text(stamp + "\n")
    tmp_waves = None
    with tempfile.TemporaryDirectory(prefix="engine-run-", dir=bdir) as tmp:
        tmp = Path(tmp)
        plusargs = []
        if blob is not None:
            plusargs.append(f"+weights={write_hex(blob, beat_bytes(build.lanes), tmp / 'weights.hex')}")
        if waves is not None:
            tmp_waves = _waves_tmp(waves)
            plusargs += [f"+waves={tmp_waves}", f"+waves_from_ns={waves.first * PERIOD_NS}"]
            if waves.end is not None:
                plusargs.append(f"+waves_to_ns={waves.end * PERIOD_NS}")
            # the runner turns dumping off (vvp -none) unless its own waves are on
            fmt = "-fst" if Path(waves.path).suffix.lower() == ".fst" else "-vcd"
            test_command = runner._test_command
            runner._test_command = lambda: [[fmt if a == "-none" else a for a in c] for c in test_command()]
        job = {
            "params": _param_commands(cfg, packing, build.lanes, build.fmt),
            "prompt": list(prompt), "steps": steps, "cmd_stall_rate": cmd_stall_rate,
            "mem_inputs": memory_model_inputs(stall_rate=stall_rate, mem_bandwidth=mem_bandwidth,
                                              mem_latency=mem_latency, synthetic=synthetic),
            "read_logits": list(read_logits), "seed": seed, "trace": trace, "period_ns": PERIOD_NS,
        }
        (tmp / "job.json").write_text(json.dumps(job))
        out = tmp / "result.json"
        try:
            t0 = time.perf_counter()
            with simulator_env():
                # the language named: with the build reused (not fresh: no build() in this process)
                # cocotb's Icarus runner has no sources to infer it from
                results = runner.test(test_module="mmfree_fpga.sim.engine_tb", hdl_toplevel="engine_top",
                                      hdl_toplevel_lang="verilog", build_dir=bdir, test_dir=tmp, timescale=("1ns", "1ps"), plusargs=plusargs,
                                      extra_env={"ENGINE_JOB": str(tmp / "job.json"), "ENGINE_RESULT": str(out)})
            elapsed = time.perf_counter() - t0
            total, failed = get_results(results)
            if failed or total == 0 or not out.exists():
                raise CocotbFailure(f"the engine simulation failed on {simulator}; see {tmp}")
            res = json.loads(out.read_text())
            if tmp_waves is not None:
                os.replace(tmp_waves, waves.path)
        finally:
            if tmp_waves is not None and tmp_waves.exists():
                tmp_waves.unlink()
    traces = _decode_traces(build, res["trace"]) if trace else None
    return EngineRun(tokens=res["tokens"], argmax_logits=res["argmax_logits"], cycles=res["cycles"],
                     read_logits={int(k): {int(i): v for i, v in d.items()} for k, d in res["read_logits"].items()},
                     sim_seconds=elapsed, simulator=simulator, synthetic=synthetic,
                     sim_cycles=res["sim_cycles"], sim_wall_s=res["sim_wall_s"], trace=traces,
                     waves=str(waves.path) if waves is not None else None)


def run_amaranth(*, cfg, blob, packing, lanes, prompt, steps, read_logits=(), load_stream: bool = False,
                 trace: bool = False, compact: bool = False, waves: Waves | None = None,
                 formats: str = "narrow", slots: int = 0) -> EngineRun:
    """The same run on Amaranth's simulator, weights in on-chip RAM initialised from the image
    (``load_stream``: RAM without contents, the image sent through the ``load`` stream first),
    in the number formats ``formats`` (a name in ``FORMAT_SETS``), on an engine with ``slots``
    state slots (FEED_TOKEN runs slot 0).
    ``sim_cycles``: clock cycles from the first FEED_TOKEN to the last result. ``waves``: a VCD
    from cycle 0 (Amaranth's writer cannot start later) until ``waves.end``."""
    from amaranth.sim import Simulator
    from mmfree_fpga.hw.control import EngineOp
    from mmfree_fpga.hw.engine import Engine
    if blob is None:
        from mmfree_fpga.errors import UserError
        raise UserError("the Amaranth simulator needs real weights (no synthetic mode)")
    dut = Engine(cfg, lanes=lanes, packing=packing, image=None if load_stream else blob,
                 compact=compact, formats=format_set(formats), slots=slots)
    out = EngineRun(tokens=list(prompt), argmax_logits=[], cycles=[], simulator="amaranth",
                    trace=[] if trace else None)
    clock = {"cycle": 0, "start": None, "end": 0, "t0": 0.0, "t1": 0.0}

    async def until(ctx, cond, *exprs):
        """tick().sample(*exprs).until(cond), counting the cycles (no extra process per cycle)."""
        while True:
            _clk, _rst, done, *values = await ctx.tick().sample(cond, *exprs)
            clock["cycle"] += 1
            if done:
                return values

    async def capture(ctx):
        # values sampled at the clock edge: what the writer stores on that edge
        async for _clk, _rst, valid, payload in ctx.tick().sample(dut.trace.valid, dut.trace.payload):
            if valid:
                out.trace[-1].append((int(payload.job), int(payload.layer), int(payload.row), int(payload.value)))

    async def command(ctx, op, arg=0, index=0):
        ctx.set(dut.cmd.payload, {"op": op, "index": index, "arg": arg})
        ctx.set(dut.cmd.valid, 1)
        await until(ctx, dut.cmd.ready)
        ctx.set(dut.cmd.valid, 0)

    async def bench(ctx):
        ctx.set(dut.result.ready, 0)
        if load_stream:
            await command(ctx, EngineOp.LOAD_RESET)
            ctx.set(dut.load.valid, 1)
            for b in blob:
                ctx.set(dut.load.payload, b)
                await ctx.tick()
            ctx.set(dut.load.valid, 0)
        await command(ctx, EngineOp.RESET_STATE)
        n_feed = len(prompt) + steps - 1
        for t in range(n_feed):
            if trace:
                out.trace.append([])
            if clock["start"] is None:
                clock["start"], clock["t0"] = clock["cycle"], time.perf_counter()
            await command(ctx, EngineOp.FEED_TOKEN, out.tokens[t])
            ctx.set(dut.result.ready, 1)
            (res,) = await until(ctx, dut.result.valid, dut.result.payload)
            ctx.set(dut.result.ready, 0)
            if t >= len(prompt) - 1:
                out.tokens.append(int(res.token))
            out.argmax_logits.append(int(res.logit))
            out.cycles.append(int(res.cycles))
            clock["end"], clock["t1"] = clock["cycle"], time.perf_counter()
            got = {}
            for idx in read_logits:
                ctx.set(dut.logit_req.payload, idx)
                ctx.set(dut.logit_req.valid, 1)
                await ctx.tick().until(dut.logit_req.ready)
                ctx.set(dut.logit_req.valid, 0)
                ctx.set(dut.logit_resp.ready, 1)
                (v,) = await ctx.tick().sample(dut.logit_resp.payload).until(dut.logit_resp.valid)
                ctx.set(dut.logit_resp.ready, 0)
                got[idx] = int(v)
            out.read_logits[t] = got

    sim = Simulator(dut)
    sim.add_clock(PERIOD_NS * 1e-9)
    sim.add_testbench(bench)
    if trace:
        sim.add_process(capture)
    t0 = time.perf_counter()
    if waves is None:
        sim.run()
    else:
        ticks = [0]

        async def count(ctx):
            async for _ in ctx.tick():
                ticks[0] += 1

        sim.add_process(count)
        tmp = _waves_tmp(waves)
        try:
            with sim.write_vcd(str(tmp)):
                while (waves.end is None or ticks[0] < waves.end) and sim.advance():
                    pass
            sim.run()
            os.replace(tmp, waves.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        out.waves = str(waves.path)
    out.sim_seconds = time.perf_counter() - t0
    out.sim_cycles = clock["end"] - (clock["start"] or 0)
    out.sim_wall_s = clock["t1"] - clock["t0"]
    return out


@dataclass
class SliceStep:
    """One FEED_SLOT of an engine in :func:`run_amaranth_slices`: its result and its output
    buffer (the logits with the head, else the residual out), as the logit port reads them."""
    device: int
    slot: int
    token: int
    logit: int
    cycles: int
    output: list


def run_amaranth_slices(*, cfg, blob, packing, lanes, slices, feeds, slots: int = 2,
                        read_count: int | None = None) -> list[list[SliceStep]]:
    """A chain of engines with state slots on Amaranth's simulator, one per slice of ``slices``
    (:class:`~mmfree_fpga.image_slice.Slice`, device 0 first, as ``chain_error`` wants them),
    each with ``slots`` slots, its on-chip RAM initialised with its slice image (``cut_image`` of
    the whole image ``blob``) and its parameters set with SET_PARAM (``engine_params`` of the
    slice). ``feeds``: ``("feed", slot, token)`` runs one token on ``slot`` through the chain (the
    residual of each engine written into the next one's input buffer); ``("reset", slot)`` is
    RESET_SLOT on every engine. Returns, per feed, each engine's :class:`SliceStep`
    (``read_count``: how many output values are read back, default all)."""
    from amaranth.hdl import Module
    from amaranth.sim import Simulator
    from mmfree_fpga.hw.control import EngineOp
    from mmfree_fpga.hw.engine import Engine, engine_params
    from mmfree_fpga.image_slice import chain_error, cut_image
    why = chain_error(list(slices), cfg)
    if why:
        raise ValueError(why)
    top = Module()
    duts = []
    for i, sl in enumerate(slices):
        dut = Engine(cfg, lanes=lanes, packing=packing, image=cut_image(blob, cfg, packing, sl), slots=slots)
        top.submodules[f"engine{i}"] = dut
        duts.append(dut)
    params = [sorted(engine_params(cfg, packing, lanes, sl=sl).items()) for sl in slices]
    out: list[list[SliceStep]] = []

    async def command(ctx, dut, op, arg=0, index=0):
        ctx.set(dut.cmd.payload, {"op": op, "index": index, "arg": arg})
        ctx.set(dut.cmd.valid, 1)
        await ctx.tick().until(dut.cmd.ready)
        ctx.set(dut.cmd.valid, 0)

    async def read(ctx, dut, count):
        values = []
        for idx in range(count):
            ctx.set(dut.logit_req.payload, idx)
            ctx.set(dut.logit_req.valid, 1)
            await ctx.tick().until(dut.logit_req.ready)
            ctx.set(dut.logit_req.valid, 0)
            ctx.set(dut.logit_resp.ready, 1)
            (v,) = await ctx.tick().sample(dut.logit_resp.payload).until(dut.logit_resp.valid)
            ctx.set(dut.logit_resp.ready, 0)
            values.append(int(v))
        return values

    async def bench(ctx):
        for dut, plist in zip(duts, params):
            ctx.set(dut.result.ready, 0)
            for index, value in plist:
                await command(ctx, dut, EngineOp.SET_PARAM, value, index)
            await command(ctx, dut, EngineOp.RESET_STATE)
        for feed in feeds:
            if feed[0] == "reset":
                for dut in duts:
                    await command(ctx, dut, EngineOp.RESET_SLOT, index=feed[1])
                continue
            _, slot, token = feed
            residual, steps = None, []
            for i, (dut, sl) in enumerate(zip(duts, slices)):
                if residual is not None:
                    ctx.set(dut.residual.valid, 1)
                    for index, value in enumerate(residual):
                        ctx.set(dut.residual.payload, {"index": index, "value": value})
                        await ctx.tick()
                    ctx.set(dut.residual.valid, 0)
                await command(ctx, dut, EngineOp.FEED_SLOT, token if sl.embedding else 0, slot)
                ctx.set(dut.result.ready, 1)
                (res,) = await ctx.tick().sample(dut.result.payload).until(dut.result.valid)
                ctx.set(dut.result.ready, 0)
                n = cfg.V if sl.head else cfg.d
                values = await read(ctx, dut, n if read_count is None or not sl.head else min(n, read_count))
                steps.append(SliceStep(i, slot, int(res.token), int(res.logit), int(res.cycles), values))
                residual = None if sl.head else values
            out.append(steps)

    sim = Simulator(top)
    sim.add_clock(PERIOD_NS * 1e-9)
    sim.add_testbench(bench)
    sim.run()
    return out
