"""Running the engine's generated design: images, the reference run, and three simulators.

``run_engine(...)`` is the one entry point (used by ``mmfree-fpga sim``, the tests and the
bench): it builds (or reuses) a simulation of :class:`~mmfree_fpga.hw.engine.Engine` with the
memory model and the ``$readmemh`` store, so weights reach the simulated memory as a file read
at time 0 (no Python per word), and one build per (lanes, maxima, packings) serves every
geometry that fits: the geometry is set at run time with ``SET_PARAM``. cocotb drives the
command stream (``sim/engine_tb.py``); the Amaranth simulator (``simulator="amaranth"``)
instead uses on-chip RAM initialised from the image.

``trace=True`` also records the engine's ``trace`` port: every result its writer stores, as
``(job, layer, row, value)`` tuples per step (:attr:`EngineRun.trace`), which
:func:`mmfree_fpga.reference.compare.hardware_trace` turns into per-layer vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from mmfree_fpga.config import ModelConfig

__all__ = ["EngineBuild", "default_build", "EngineRun", "load_image", "synthetic_image_info", "reference_tokens",
           "run_engine", "run_amaranth", "build_dir_for", "decode_trace", "SIMULATORS"]

SIMULATORS = ("verilator", "icarus", "amaranth")
# the gateware the engine is made of (a change to any of them means a new simulator build)
ENGINE_SOURCES = tuple(f"hw/{name}.py" for name in (
    "engine", "weight_port", "matvec", "trits", "bitlinear_front", "scalar_unit", "output_scale", "elementwise",
    "embed_scale", "argmax", "vector_common")) + ("mmfree_fpga/config.py", "reference/integer.py", "reference/packing.py")
_BUILD_ROOT = Path(os.environ.get("MMFREE_SIM_BUILD", Path(tempfile.gettempdir()) / "mmfree-engine-sim")).absolute()


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

    def key(self) -> str:
        """Names the build directory: these parameters and the gateware sources."""
        h = hashlib.sha1(repr(self).encode())
        root = Path(__file__).resolve().parent.parent
        for name in ENGINE_SOURCES:
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


def load_image(checkpoint, packing: str):
    """(cfg, image bytes) of a checkpoint exported with ``packing``."""
    from mmfree_fpga.host.image import WeightImage
    image = WeightImage.from_checkpoint(checkpoint, packing)
    return image.cfg, image.blob


def synthetic_image_info(cfg: ModelConfig, packing: str) -> int:
    from mmfree_fpga.host.image import image_size
    return image_size(cfg, packing)


def reference_tokens(cfg: ModelConfig, blob: bytes, packing: str, prompt: list[int], steps: int):
    """Greedy tokens and per-step logits of the integer model run from the image bytes."""
    from mmfree_fpga.host.image import parse_image
    from mmfree_fpga.reference.integer import IntegerModel
    model = IntegerModel(parse_image(blob, cfg, packing))
    tokens = list(prompt)
    logits = []
    for t in range(len(prompt) + steps - 1):
        lg = model.step(tokens[t])
        logits.append(lg)
        if t >= len(prompt) - 1:
            tokens.append(IntegerModel.argmax(lg))
    return tokens, logits


def default_build(cfg: ModelConfig, lanes: int, image_bytes: int = 0) -> EngineBuild:
    """The build a geometry runs on unless told otherwise: maxima rounded up to at least the
    demo model's, so the demo and smaller models share one simulator build per lane count."""
    from mmfree_fpga.hw.engine import beat_bytes
    words = -(-image_bytes // beat_bytes(lanes))
    return EngineBuild(lanes=lanes, max_d=max(128, cfg.d), max_I=max(256, cfg.I), max_L=max(2, cfg.L),
                       max_V=max(256, cfg.V), mem_words=max(32768, 1 << max(0, words - 1).bit_length()))


def build_dir_for(build: EngineBuild, simulator: str) -> Path:
    return _BUILD_ROOT / f"{simulator}-{build.key()}"


def _param_commands(cfg: ModelConfig, packing: str, lanes: int) -> list[tuple[int, int]]:
    from mmfree_fpga.hw.engine import engine_params
    return sorted(engine_params(cfg, packing, lanes).items())


def run_engine(*, cfg: ModelConfig, blob: bytes | None, packing: str, lanes: int, prompt: list[int],
               steps: int, simulator: str = "verilator", build: EngineBuild | None = None,
               stall_rate: float = 0.0, cmd_stall_rate: float = 0.0, mem_bandwidth: float = 0.0,
               mem_latency: int = 1, read_logits: list[int] = (), seed: int = 1,
               synthetic: bool = False, trace: bool = False) -> EngineRun:
    """Feed ``prompt`` then ``steps - 1`` greedy tokens (``steps`` generated tokens in all).

    ``blob`` None with ``synthetic``: the memory model makes up the weights (cycle counts only).
    ``stall_rate``: probability of a stall cycle on the weight response; ``cmd_stall_rate``: of
    an idle cycle before each command. ``mem_bandwidth`` bytes/cycle (0 = one beat per cycle).
    ``trace``: record the ``trace`` port (module docstring).
    """
    from mmfree_fpga.hw.engine import beat_bytes, check_geometry
    from mmfree_fpga.host.image import image_size
    if build is None:
        build = default_build(cfg, lanes, len(blob) if blob is not None else 0)
    check_geometry(cfg, lanes, max_d=build.max_d, max_I=build.max_I, max_L=build.max_L, max_V=build.max_V)
    if simulator == "amaranth":
        return run_amaranth(cfg=cfg, blob=blob, packing=packing, lanes=lanes, prompt=prompt, steps=steps,
                            read_logits=read_logits, trace=trace)
    from .runner import simulator_missing
    from mmfree_fpga.errors import UserError
    reason = simulator_missing(simulator)
    if reason:
        raise UserError(reason)
    if blob is not None and len(blob) > build.mem_words * beat_bytes(lanes):
        raise UserError(f"the image ({len(blob)} bytes) does not fit this build's weight memory")
    return _run_cocotb(cfg=cfg, blob=blob, packing=packing, build=build, prompt=prompt, steps=steps,
                       simulator=simulator, stall_rate=stall_rate, cmd_stall_rate=cmd_stall_rate,
                       mem_bandwidth=mem_bandwidth, mem_latency=mem_latency, read_logits=read_logits,
                       seed=seed, synthetic=synthetic, trace=trace)


def decode_trace(words: list[int], layout) -> list[tuple[int, int, int, int]]:
    """Raw ``trace__payload`` integers -> (job, layer, row, value) with the widths of ``layout``."""
    widths = [layout[name].shape.width for name in ("job", "layer", "row", "value")]
    out = []
    for w in words:
        fields = []
        for width in widths:
            fields.append(w & ((1 << width) - 1))
            w >>= width
        v = fields[3]
        out.append((fields[0], fields[1], fields[2], v - (1 << 32) if v & (1 << 31) else v))
    return out


def _sources(build: EngineBuild, directory: Path) -> list[Path]:
    """Verilog of the simulation top (written once per build)."""
    from mmfree_fpga.hw.engine import Engine
    from mmfree_fpga.hw.weight_port import STORE_VERILOG
    from .runner import write_verilog
    directory.mkdir(parents=True, exist_ok=True)
    top = directory / "engine_top.v"
    store = directory / "weight_store.v"
    if not top.exists():
        engine = Engine(build.base_cfg(), lanes=build.lanes, packings=build.packings, readmemh=True, model=True,
                        mem_words=build.mem_words, packing="base3" if "base3" in build.packings else "2bit",
                        compact=build.compact)
        tmp = write_verilog(engine, directory / "engine_top.v.tmp", name="engine_top")
        store.write_text(STORE_VERILOG)
        os.replace(tmp, top)
    return [top, store]


def _run_cocotb(*, cfg, blob, packing, build, prompt, steps, simulator, stall_rate, cmd_stall_rate,
                mem_bandwidth, mem_latency, read_logits, seed, synthetic, trace=False) -> EngineRun:
    from cocotb_tools.runner import get_results, get_runner
    from mmfree_fpga.hw.engine import beat_bytes
    from mmfree_fpga.hw.weight_port import write_hex
    from .runner import CocotbFailure, _env
    bdir = build_dir_for(build, simulator)
    sources = _sources(build, bdir)
    runner = get_runner(simulator)
    if simulator == "verilator":
        # Not -CFLAGS -O2: it also applies to the symbol-table constructors that cocotb's
        # --public-flat-rw makes huge, and g++ then takes a quarter of an hour on them.
        args = ["-Wno-fatal", "-O3", "--x-assign", "fast", "--x-initial", "fast"]
        flags = "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O1 OPT_SLOW=-O0 OPT_GLOBAL=-O1 -j2"
    else:
        args, flags = ["-g2005"], ""
    done = bdir / "build.done"
    if done.exists():
        # cocotb's Verilator runner reruns verilator and make on every build() (tens of seconds
        # here); the build directory is named by a hash of the sources, so nothing is stale.
        runner._build_command = lambda: []
    with _env(MAKEFLAGS=flags):
        runner.build(sources=[str(s) for s in sources], hdl_toplevel="engine_top", build_dir=bdir,
                     timescale=("1ns", "1ps"), build_args=args, always=False)
    done.write_text("built\n")
    with tempfile.TemporaryDirectory(prefix="engine-run-", dir=bdir) as tmp:
        tmp = Path(tmp)
        plusargs = []
        if blob is not None:
            plusargs.append(f"+weights={write_hex(blob, beat_bytes(build.lanes), tmp / 'weights.hex')}")
        job = {
            "params": _param_commands(cfg, packing, build.lanes),
            "prompt": list(prompt), "steps": steps, "stall_rate": stall_rate,
            "cmd_stall_rate": cmd_stall_rate, "mem_bandwidth": mem_bandwidth, "mem_latency": mem_latency,
            "read_logits": list(read_logits), "seed": seed, "synthetic": synthetic, "vocab": cfg.V,
            "trace": trace,
        }
        (tmp / "job.json").write_text(json.dumps(job))
        out = tmp / "result.json"
        t0 = time.perf_counter()
        results = runner.test(test_module="mmfree_fpga.sim.engine_tb", hdl_toplevel="engine_top", build_dir=bdir,
                              test_dir=tmp, timescale=("1ns", "1ps"), plusargs=plusargs,
                              extra_env={"ENGINE_JOB": str(tmp / "job.json"), "ENGINE_RESULT": str(out)})
        elapsed = time.perf_counter() - t0
        total, failed = get_results(results)
        if failed or total == 0 or not out.exists():
            raise CocotbFailure(f"the engine simulation failed on {simulator}; see {tmp}")
        res = json.loads(out.read_text())
    traces = None
    if trace:
        from mmfree_fpga.hw.engine import trace_layout
        layout = trace_layout(build.max_d, build.max_I, build.max_L, build.max_V)
        traces = [decode_trace(words, layout) for words in res["trace"]]
    return EngineRun(tokens=res["tokens"], argmax_logits=res["argmax_logits"], cycles=res["cycles"],
                     read_logits={int(k): {int(i): v for i, v in d.items()} for k, d in res["read_logits"].items()},
                     sim_seconds=elapsed, simulator=simulator, synthetic=synthetic,
                     sim_cycles=res["sim_cycles"], sim_wall_s=res["sim_wall_s"], trace=traces)


def run_amaranth(*, cfg, blob, packing, lanes, prompt, steps, read_logits=(), load_stream: bool = False,
                 trace: bool = False, compact: bool = False) -> EngineRun:
    """The same run on Amaranth's simulator, weights in on-chip RAM initialised from the image
    (``load_stream``: RAM without contents, the image sent through the ``load`` stream first).
    ``sim_cycles``: clock cycles from the first FEED_TOKEN to the last result."""
    from amaranth.sim import Simulator
    from mmfree_fpga.hw.engine import Engine, EngineOp
    if blob is None:
        from mmfree_fpga.errors import UserError
        raise UserError("the Amaranth simulator needs real weights (no synthetic mode)")
    dut = Engine(cfg, lanes=lanes, packing=packing, image=None if load_stream else blob,
                 compact=compact)
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
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    if trace:
        sim.add_process(capture)
    t0 = time.perf_counter()
    sim.run()
    out.sim_seconds = time.perf_counter() - t0
    out.sim_cycles = clock["end"] - (clock["start"] or 0)
    out.sim_wall_s = clock["t1"] - clock["t0"]
    return out
