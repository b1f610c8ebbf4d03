"""Benchmarks: each section measures something and returns rows for BENCHMARKS.md.

A section is a function ``(quick: bool) -> Section``; ``mmfree-fpga bench`` runs them, writes
``BENCHMARKS.md`` and a JSON file, and states the command that produced every figure.
``--only NAMES`` reruns those sections and keeps the others of an existing BENCHMARKS.md as
they are (:func:`merge_markdown`): a section runs from its ``## `` title to the next and is
recognised by the command it names (```mmfree-fpga bench --only NAME```), with its own date
and machine.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Section", "SECTIONS", "render_markdown", "render_section", "merge_markdown", "split_markdown"]


@dataclass
class Section:
    title: str
    command: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    name: str = ""           # the key in SECTIONS (set by the bench command)
    when: str = ""           # date and machine of the run (set by the bench command)

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "command": self.command, "columns": self.columns,
                "rows": self.rows, "notes": self.notes, "seconds": round(self.seconds, 1), "when": self.when}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def run_stamp() -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} / Python {platform.python_version()}"


def _header(argv: str) -> list[str]:
    return ["# Benchmarks", "",
            f"Last updated by `{argv}` ({run_stamp()}). Every figure below was measured by the command "
            "its section names (which reproduces that section alone), at the time it states; "
            "`mmfree-fpga bench --only NAME` refreshes one section and keeps the others.", ""]


def render_section(s: Section) -> str:
    lines = [f"## {s.title}", "",
             f"`{s.command}` ({s.seconds:.0f} s; {s.when or run_stamp()})", ""]
    if s.rows:
        lines += ["| " + " | ".join(s.columns) + " |", "|" + "---|" * len(s.columns)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in s.rows]
        lines += [""]
    lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
    return "\n".join(lines) + "\n"


def render_markdown(sections: list[Section], argv: str) -> str:
    return "\n".join(_header(argv)) + "\n" + "".join(render_section(s) for s in sections)


def split_markdown(text: str) -> dict[str, str]:
    """Section name -> its Markdown (from its ``## `` title to the next), named by the
    ```mmfree-fpga bench --only NAME``` command it states."""
    import re
    out = {}
    for part in re.split(r"^(?=## )", text, flags=re.M):
        m = re.search(r"`mmfree-fpga bench --only ([A-Za-z0-9_]+)", part)
        if part.startswith("## ") and m:
            out[m.group(1)] = part if part.endswith("\n") else part + "\n"
    return out


def merge_markdown(old: str, sections: list[Section], argv: str, order) -> str:
    """``old`` with the given sections replaced (or added), the others kept verbatim, in ``order``."""
    kept = split_markdown(old)
    for s in sections:
        kept[s.name] = render_section(s)
    names = [n for n in order if n in kept] + [n for n in kept if n not in order]
    return "\n".join(_header(argv)) + "\n" + "".join(kept[n] for n in names)


# -- sections ------------------------------------------------------------------------

def agreement_section(quick: bool) -> Section:
    """Integer model vs float reference: demo model on held-out text, random models."""
    import torch

    from .config import ModelConfig
    from .reference.agreement import agreement, held_out_ids
    from .reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
    from .reference.export import integer_weights
    from .reference.model import HGRNBitForCausalLM, randomize

    s = Section("Integer model vs float reference", "mmfree-fpga bench --only agreement",
                ["model", "positions", "top-1 agreement", "mean logit cosine", "min logit cosine"])
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    model = load_model(DEMO_CHECKPOINT)
    weights = integer_weights(cfg, tensors)
    offsets = (100_000,) if quick else (100_000, 300_000, 600_000, 900_000)
    for off in offsets:
        r = agreement(model, weights, held_out_ids(2048, off))
        s.rows.append([f"demo, held-out bytes {off:,}..", r["positions"], r["top1_agreement"],
                       r["mean_logit_cosine"], r["min_logit_cosine"]])
    geometries = [(64, 1, 256), (256, 2, 512)] if quick else [(64, 1, 256), (128, 2, 256), (256, 3, 512), (512, 4, 1536)]
    for d, L, I in geometries:
        gcfg = ModelConfig(vocab_size=256, hidden_size=d, num_hidden_layers=L, intermediate_size=I)
        m = randomize(HGRNBitForCausalLM(gcfg), seed=d, embedding_std=0.02)
        ids = np.random.default_rng(d).integers(0, 256, 128).tolist()
        r = agreement(m, integer_weights(gcfg, m.state_dict()), ids)
        s.rows.append([f"random weights d={d} L={L} I={I}", r["positions"], r["top1_agreement"],
                       r["mean_logit_cosine"], r["min_logit_cosine"]])
    # the float model against itself: how sensitive is top-1 to any perturbation at all?
    ids = held_out_ids(2048)
    with torch.no_grad():
        base = model(torch.tensor([ids]))[0][0].numpy()
        f64 = load_model(DEMO_CHECKPOINT).double()(torch.tensor([ids]))[0][0].numpy()
    s.rows.append(["float32 vs float64 reference (demo)", len(ids),
                   float((base.argmax(1) == f64.argmax(1)).mean()), "", ""])
    for rel in (1e-5, 1e-4):
        pm = load_model(DEMO_CHECKPOINT)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "norm" in name:
                    p.mul_(1 + rel * torch.randn(p.shape, generator=g))
            out = pm(torch.tensor([ids]))[0][0].numpy()
        s.rows.append([f"float vs float with norm weights x (1 + {rel:g} N(0,1)) (demo)", len(ids),
                       float((base.argmax(1) == out.argmax(1)).mean()), "", ""])
    s.notes.append("Random-weight models have near-uniform logits, so their top-1 figure says little; "
                   "the cosine is the measure there.")
    s.notes.append("The last rows show the demo model's own sensitivity: any perturbation of ~1e-4 flips "
                   "about 1% of its greedy predictions (int8 activations make its logits discrete, and "
                   "near-ties are common in so small a model).")
    from .boards.registry import BOARDS
    from .config import FORMAT_SETS
    on_chip = BOARDS["ulx3s-85f"].formats
    s.notes.append("What it took to reach 0.99 (ablation, issue #3): one flipped int8 activation moves an accumulator "
                   "by a whole step and the recurrent state carries it on, so every rounding before a quantiser counts. "
                   "The demo model's embeddings are int8-representable (reference.train.int8_embeddings; rounding them "
                   "at export cost about 1%), and the export ternarises in the checkpoint's float32 like the float "
                   "model (one lm_head trit differed in float64). Remaining costs, each a few tenths: the quantiser's "
                   "reciprocal (about 16 significant bits whatever quant_bits is), the 16-bit normalised input and "
                   "quant-weights, the 2^9-interval sigmoid table; norm_bits 24, quant_bits 24, recip_frac 50 and "
                   "sig_table_log2 11 give more margin (tests/test_integer_model.py::"
                   "test_demo_model_agrees_with_wider_formats, slow). These rows are the narrow set's; the ULX3S's "
                   f"on-chip engine builds the {on_chip} set ({FORMAT_SETS[on_chip].summary()}; "
                   "registry.Board.formats), whose figures are in the fidelity section.")
    return s


def packing_section(quick: bool) -> Section:
    from .config import ModelConfig
    from .reference.checkpoint import DEMO_CHECKPOINT
    from .packing import PACKINGS, packed_size

    s = Section("Bits per stored weight", "mmfree-fpga bench --only packing",
                ["model", "ternary weights", "packing", "bytes", "bits/weight"])
    demo = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    models = {"demo": demo,
              "370M": ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, intermediate_size=2816),
              "1.3B": ModelConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, intermediate_size=5632),
              "2.7B": ModelConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=32, intermediate_size=6912)}
    for name, cfg in models.items():
        shapes = [shape for shape in cfg.bitlinear_shapes().values()] * cfg.L + [(cfg.V, cfg.d)]
        for packing in PACKINGS:
            nbytes = sum(packed_size(o * i, packing) for o, i in shapes)
            s.rows.append([name, cfg.ternary_weights, packing, nbytes, 8 * nbytes / cfg.ternary_weights])
    s.notes.append("Each matrix is packed as one row-major trit stream padded to a whole byte; the limit "
                   "is log2(3) = 1.585 bits.")
    return s


def reference_speed_section(quick: bool) -> Section:
    import torch

    from .reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_model
    from .reference.export import integer_weights
    from .reference.integer import IntegerModel

    s = Section("Reference models on this CPU (demo model, batch 1 decode)",
                "mmfree-fpga bench --only reference_speed", ["model", "tokens", "tokens/s"])
    n = 64 if quick else 256
    model = load_model(DEMO_CHECKPOINT)
    state = model.init_state()
    t0 = time.perf_counter()
    for k in range(n):
        _, state = model.step(k % 256, state)
    s.rows.append(["float (PyTorch, float32)", n, n / (time.perf_counter() - t0)])
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    im = IntegerModel(integer_weights(cfg, tensors))
    t0 = time.perf_counter()
    for k in range(n):
        im.step(k % 256)
    s.rows.append(["integer model (NumPy)", n, n / (time.perf_counter() - t0)])
    return s


_ENGINE_RESULTS: dict = {}


def _engine_results(quick: bool) -> dict:
    """Simulated cycle counts (sim/engine_bench.py), run once per bench invocation."""
    if "res" not in _ENGINE_RESULTS:
        from .sim.engine_bench import engine_benchmarks
        _ENGINE_RESULTS["res"] = engine_benchmarks(include_370m=not quick)
    return _ENGINE_RESULTS["res"]


def engine_section(quick: bool) -> Section:
    from .config import PERF_MODEL, PUBLISHED
    from .reference.checkpoint import DEMO_CHECKPOINT
    from .config import ModelConfig
    res = _engine_results(quick)
    s = Section("Engine cycles per token (Verilator simulation of the generated Verilog)",
                "mmfree-fpga bench --only engine",
                ["workload", "lanes", "cycles per token", "ideal (weights / lanes)", "ratio", "target",
                 "analytic model", "model error", "weights"])
    demo = ModelConfig.from_checkpoint(DEMO_CHECKPOINT)
    d = res["demo"]
    measured = max(d["cycles_per_token"])
    model = PERF_MODEL.cycles_per_token(demo, d["lanes"])
    s.rows.append(["demo model, token step", d["lanes"], measured, d["ideal_cycles_per_token"],
                   d["ratio_to_ideal"], f"<= {d['target_ratio']}x", model, f"{model / measured - 1:+.1%}",
                   "real (bit-exact: " + ("yes" if d["matches_integer_model"] else "NO") + ")"])
    b = res["block_d512"]
    b1 = ModelConfig(vocab_size=64, hidden_size=512, num_hidden_layers=1, intermediate_size=1536)
    b2 = ModelConfig(vocab_size=64, hidden_size=512, num_hidden_layers=2, intermediate_size=1536)
    model = PERF_MODEL.cycles_per_token(b2, b["lanes"]) - PERF_MODEL.cycles_per_token(b1, b["lanes"])
    s.rows.append(["one d=512 block (I=1536)", b["lanes"], b["cycles"], b["ideal_cycles"], b["ratio_to_ideal"],
                   f"< {b['target_cycles']:,} cycles", model, f"{model / b['cycles'] - 1:+.1%}", "synthetic"])
    if "hgrn_370m" in res:
        h = res["hgrn_370m"]
        measured = max(h["cycles_per_token"])
        model = PERF_MODEL.cycles_per_token(PUBLISHED["370M"], h["lanes"])
        s.rows.append(["370M geometry, token step", h["lanes"], measured, h["ideal_cycles_per_token"],
                       h["ratio_to_ideal"], f"<= {h['target_ratio']}x", model, f"{model / measured - 1:+.1%}",
                       "synthetic"])
    s.notes.append(f"Verilator simulated {d['sim_cycles_per_s']:,.0f} cycles/s for the demo model (the C++ harness, "
                   "sim/engine_harness.cpp; see the simulator speed section for the other simulators).")
    s.notes.append("The paper's FPGA needed about 2.58 M cycles for one d=512 block.")
    s.notes.append("'synthetic': the memory model makes up the trits (a step's cycle count does not depend on them).")
    return s


def engine_large_section(quick: bool) -> Section:
    """The 1.3B and 2.7B geometries, one token each (Verilator, synthetic weights, 64 lanes)."""
    from .config import PERF_MODEL, PUBLISHED
    from .sim.engine_bench import large_geometries
    s = Section("Engine cycles per token, 1.3B and 2.7B geometries (Verilator, one token each)",
                "mmfree-fpga bench --only engine_large",
                ["workload", "lanes", "cycles per token", "ideal (weights / lanes)", "ratio", "analytic model",
                 "model error", "simulated cycles/s", "wall s", "weights"])
    names = ("1.3B",) if quick else ("1.3B", "2.7B")
    load = _load()
    res = large_geometries(names)
    for name, r in res.items():
        measured = max(r["cycles_per_token"])
        model = PERF_MODEL.cycles_per_token(PUBLISHED[name], r["lanes"])
        s.rows.append([f"{name} geometry, token step", r["lanes"], measured, r["ideal_cycles_per_token"],
                       r["ratio_to_ideal"], model, f"{model / measured - 1:+.2%}", r["sim_cycles_per_s"],
                       r["wall_s"], "synthetic"])
    s.notes.append("One simulator build (the 2.7B maxima, 64 lanes) serves both geometries; the 1.3B is set at "
                   "run time with SET_PARAM. Wall time includes that build when it is not cached.")
    s.notes.append("'synthetic': the memory model makes up the trits (a step's cycle count does not depend on them).")
    s.notes.append(f"Cycle counts do not depend on the machine; cycles/s and wall time do (load when the section "
                   f"started: {load}).")
    return s


def _load() -> str:
    import os
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def sim_speed_section(quick: bool) -> Section:
    """Simulated cycles per second of each simulator (and Verilator under cocotb) on the same engine workload."""
    from .sim.engine_bench import sim_speed
    s = Section("Simulator speed (engine, demo model, 16 lanes)", "mmfree-fpga bench --only sim_speed",
                ["simulator", "token steps", "simulated cycles", "wall s (simulation)", "cycles/s",
                 "vs the C++ harness", "bit-exact"])
    tokens = ({"verilator": 4, "verilator_cocotb": 1, "icarus": 1, "amaranth": 1} if quick else
              {"verilator": 16, "verilator_cocotb": 4, "icarus": 1, "amaranth": 1})
    load = _load()
    res = sim_speed(tokens)
    base = res.get("verilator", {}).get("cycles_per_s")
    labels = {"verilator": "Verilator (C++ harness, generated Verilog)",
              "verilator_cocotb": "Verilator (cocotb, generated Verilog)",
              "icarus": "Icarus Verilog (cocotb, generated Verilog)", "amaranth": "Amaranth's Python simulator"}
    for sim, r in res.items():
        if "missing" in r:
            s.rows.append([labels[sim], "", "", "", "", "", f"not run: {r['missing']}"])
            continue
        s.rows.append([labels[sim], r["tokens"], int(r["sim_cycles"]), r["sim_wall_s"], r["cycles_per_s"],
                       f"{r['cycles_per_s'] / base:.4f}x" if base else "",
                       "yes" if r["matches_integer_model"] else "NO"])
    s.notes.append("cycles/s: clock cycles from the first FEED_TOKEN to the last result over the wall-clock time "
                   "of that interval; builds and simulator start-up are excluded. A token step is about 26,000 "
                   "cycles; the slower simulators run fewer steps.")
    s.notes.append("The C++ harness (sim/engine_harness.cpp, what `sim`, `compare` and the engine sections use on "
                   "Verilator) runs the whole command sequence in C++. The cocotb rows share one testbench "
                   "(sim/engine_tb.py), which wakes Python only for the handshakes; the Amaranth testbench wakes "
                   "every cycle while it waits.")
    s.notes.append(f"Single-threaded simulators; this machine's load when the section started: {load}.")
    return s


def boards_section(quick: bool) -> Section:
    from .boards.bench import BENCH_COLUMNS, board_benchmarks, bench_row_cells
    s = Section("The engine on the boards (place and route with YoWASP Yosys + nextpnr)",
                "mmfree-fpga bench --only boards", BENCH_COLUMNS)
    plan = [("ulx3s-85f", (16,) if quick else (16, 32, 64)), ("icebreaker", (1,))]
    for board, lanes in plan:
        for row in board_benchmarks((board,), lanes, progress=lambda line: print(f"bench: {line}", flush=True)):
            s.rows.append(bench_row_cells(row))
    from mmfree_fpga.boards.registry import resolve_board
    build_mhz = " and ".join(f"{resolve_board(b).default_clock_hz / 1e6:g}" for b in ("ulx3s-85f", "icebreaker"))
    s.notes.append("Demo model. Fmax is nextpnr's final post-route figure for the engine's clock; the requested "
                   "clocks are the board issue's targets (ECP5 100 MHz, iCE40 40 MHz; the boards' own build clocks "
                   f"are {build_mhz} MHz). cycles/token: config.PERF_MODEL for the ULX3S engine (the engine section "
                   "checks it against simulation); for the iCEBreaker's tiny engine the count of its instruction-set "
                   "simulator (hw/tiny_isa.py), which tests/test_tiny_engine.py checks cycle for cycle against the "
                   "hardware. tokens/s at Fmax = Fmax / cycles per token. build s: the whole build; \"(cached)\": "
                   "the bitstream came from the build cache (same plan, checkpoint and tool versions), and the "
                   "figure is the toolchain's time when it was built.")
    s.notes.append(f"ULX3S: the engine in its on-chip number formats ({resolve_board('ulx3s-85f').formats}; "
                   "registry.Board.formats; the boards_wide section has the narrow engine beside it), with the "
                   "weight image in block RAM from the bitstream. iCEBreaker: the tiny engine (hw/tiny_engine.py: one sequential 48-bit datapath run by a program, one trit per cycle), "
                   "weights uploaded over the UART into the four SPRAMs.")
    from mmfree_fpga.boards.build import ICE40_ABC9_WIRE_DELAY_PS
    s.notes.append(f"iCE40 synthesis maps LUTs with abc9 at a wire delay of {ICE40_ABC9_WIRE_DELAY_PS} ps per net "
                   "(synth_ice40 uses 250; boards/build.py says why). Fmax depends on nextpnr's placement: the rows "
                   "are nextpnr's default seed, the one every build uses, but where a row names another "
                   "(boards.bench.BENCH_SEEDS says why).")
    return s


def boards_wide_section(quick: bool) -> Section:
    """The ULX3S engine in each format set an on-chip engine builds (issue 21's cost of the wider
    formats): narrow and every board's own (``Board.formats``); the wide set is the DRAM engine's
    (the dram_builds section)."""
    from .boards.bench import BENCH_CLOCK_MHZ, BENCH_COLUMNS, bench_row_cells, board_benchmarks
    from .boards.registry import BOARDS
    from .config import FORMAT_SETS
    s = Section("The on-chip engine on the ULX3S in each format set (the cost of the wider formats)",
                "mmfree-fpga bench --only boards_wide", ["formats"] + BENCH_COLUMNS)
    lanes = (16,) if quick else (16, 32, 64)
    on_chip = ["narrow"] + sorted({b.formats for b in BOARDS.values()} - {"narrow"})
    rows = {name: board_benchmarks(("ulx3s-85f",), lanes, formats=name,
                                   progress=lambda line: print(f"bench: {line}", flush=True))
            for name in on_chip}
    for per_lanes in zip(*rows.values()):
        s.rows += [[row["formats"]] + bench_row_cells(row) for row in per_lanes]
    s.notes.append(f"Demo model, every set built for the same {BENCH_CLOCK_MHZ['ulx3s-85f']:g} MHz target (cached "
                   "builds are the same builds as the boards section's). The sets (config.FORMAT_SETS; README "
                   "'Format sets'): " + "; ".join(f"{name}: {FORMAT_SETS[name].summary()}" for name in on_chip)
                   + f". The board builds {BOARDS['ulx3s-85f'].formats} on chip unless --formats says "
                   "(registry.Board.formats); the wide set is built with the weights in DRAM (the dram_builds "
                   "section). Their fidelity is in the fidelity section. cycles/token and tokens/s: "
                   "config.PERF_MODEL, made for the narrow engine; the wider ones' pipelines are a few stages "
                   "longer, so their figures are slightly optimistic. nextpnr's default placement seed but where a "
                   "row names one (boards.bench.BENCH_SEEDS says why).")
    for per_lanes in zip(*rows.values()):
        narrow = per_lanes[0]
        for other in per_lanes[1:]:
            if narrow.get("error") or other.get("error"):
                continue

            def more(key, a=narrow, b=other):
                x, y = a[key]["used"], b[key]["used"]
                return f"{y - x:+d} ({(y - x) / x * 100 if x else 0:+.0f}%)"
            s.notes.append(f"{narrow['lanes']} lanes, {other['formats']} against {narrow['formats']}: LUT "
                           f"{more('lut')}, FF {more('ff')}, block RAM {more('bram')}, DSP {more('dsp')}; Fmax "
                           f"{narrow['fmax_mhz']:g} -> {other['fmax_mhz']:g} MHz.")
    return s


def projection_section(quick: bool) -> Section:
    from .config import PERF_MODEL, PUBLISHED
    clock = 100e6
    s = Section(f"Projected tokens/s with weights in external memory (engine at 64 lanes, {clock / 1e6:.0f} MHz)",
                "mmfree-fpga bench --only projection",
                ["model", "bytes/token (base3)", "cycles/token (model)", "0.2 GB/s", "1.6 GB/s", "12.8 GB/s",
                 "bound at 12.8 GB/s", "original GPU code, H200"])
    for name, cfg in PUBLISHED.items():
        rates = [PERF_MODEL.tokens_per_s(cfg, 64, "base3", clock, bw * 1e9) for bw in (0.2, 1.6, 12.8)]
        s.rows.append([name, PERF_MODEL.bytes_per_token(cfg, "base3"), PERF_MODEL.cycles_per_token(cfg, 64)]
                      + [f"{r:.1f} ({b.split()[0]})" for r, b in rates] + [rates[-1][1],
                      "14 tokens/s (370M, batch 1; MODEL.md)" if name == "370M" else ""])
    s.notes.append("tokens/s = min(clock / cycles per token, bandwidth / bytes per token), from the analytic "
                   "model in mmfree_fpga/config.py (PerfModel), which the engine section checks against simulation.")
    s.notes.append(f"{clock / 1e6:.0f} MHz is the ECP5 clock target of the board issue; the boards section has the measured Fmax"
                   " of the whole engine.")
    return s


# Anchors of issue 20: the published measurements the DRAM-backed engine is compared with.
ANCHORS = [("MMfreeLM-370M on a Kria KV260 (matmulfree_KRIA, Vivado; weights streamed from DDR4 every token)",
            30.6),
           ("the original GPU code, MMfreeLM-370M on an H200", 14.3)]


_DRAM_RESULTS: dict = {}


def _dram_runs(quick: bool) -> list[dict]:
    """The DRAM co-simulations (demo model; with ``quick`` off also a model larger than the ULX3S's
    block RAM), run once per bench invocation: name, cfg, image size, the EngineRun, bit-exact."""
    if "runs" in _DRAM_RESULTS:
        return _DRAM_RESULTS["runs"]
    import tempfile
    from pathlib import Path

    from .host.testing import random_checkpoint
    from .reference.checkpoint import DEMO_CHECKPOINT
    from .sim.engine_sim import DRAM_BUILD_FLOOR, load_image, reference_tokens, run_engine
    runs = []
    with tempfile.TemporaryDirectory(prefix="mmfree-bench-dram-") as tmp:
        cases = [("demo model", DEMO_CHECKPOINT, [100, 101, 32], 4 if quick else 8)]
        if not quick:
            g = DRAM_BUILD_FLOOR
            cases.append((f"random model V={g.V} d={g.d} L={g.L} I={g.I} (more than the ULX3S's block RAM)",
                          random_checkpoint(Path(tmp) / "ckpt", g, seed=20), [5, 1000, 2047], 3))
        for name, ckpt, prompt, steps in cases:
            cfg, blob = load_image(ckpt, "base3")
            run = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=DRAM_LANES, prompt=prompt, steps=steps,
                             memory="sdram", progress=False)
            want, _ = reference_tokens(cfg, blob, "base3", prompt, steps)
            runs.append({"name": name, "cfg": cfg, "image_bytes": len(blob), "run": run,
                         "bit_exact": run.tokens == want})
    _DRAM_RESULTS["runs"] = runs
    return runs


DRAM_LANES = 16


def dram_section(quick: bool) -> Section:
    """The engine with its weights in the ULX3S's SDRAM (LiteDRAM controller + LiteDRAM's SDRAM
    model) in Verilator: cycles per token, DRAM efficiency and effective bandwidth."""
    from .boards.litedram import CORES
    core = CORES["ulx3s-85f"]
    lanes = DRAM_LANES
    s = Section("Weights in DRAM: the engine with the ULX3S's SDRAM in co-simulation (LiteDRAM, Verilator)",
                "mmfree-fpga bench --only dram",
                ["workload", "image bytes", "lanes", "cycles per token", "ideal (weights / lanes)", "ratio",
                 "dram_efficiency", "bytes/cycle delivered", f"GB/s at {core.clk_freq / 1e6:g} MHz",
                 f"tokens/s at {core.clk_freq / 1e6:g} MHz", "tokens identical to reference --integer"])
    for r in _dram_runs(quick):
        run, cfg = r["run"], r["cfg"]
        dram = run.dram
        cycles = max(run.cycles)
        ideal = cfg.ideal_cycles(lanes)
        per_cycle = dram["weight_bytes"] / dram["weight_cycles"]
        s.rows.append([r["name"], r["image_bytes"], lanes, cycles, ideal, cycles / ideal, dram["efficiency"],
                       per_cycle, per_cycle * core.clk_freq / 1e9, core.clk_freq / cycles,
                       "all" if r["bit_exact"] else "NO"])
    s.notes.append(f"The controller is the one the ULX3S build uses ({core.module}, {8 * core.chips_bytes}-bit SDR, "
                   f"generated by boards/litedram.py for {core.clk_freq / 1e6:g} MHz) with LiteDRAM's SDRAM model "
                   "as its PHY; the image is written through the engine's load stream after the memory's init "
                   "sequence, then the prompt and greedy steps run.")
    s.notes.append("dram_efficiency = weight bytes delivered / (the native port's peak bytes per cycle x the cycles "
                   "in which the engine waited for requested beats); the counters sit in the simulation top "
                   "(sim/dram_sim.py), not in the engine. The SDR port's peak is 2 bytes per cycle, where 16 lanes "
                   "take a 4-byte beat per cycle: the engine is bound by the memory here.")
    return s


def dram_builds_section(quick: bool) -> Section:
    """Fmax and utilisation of the DRAM board builds (``build --board B --memory dram``, demo model)."""
    from .boards.bench import DRAM_BUILD_COLUMNS, dram_build_row_cells, dram_build_rows
    s = Section("Weights in DRAM: the board builds (ULX3S SDRAM, ECPIX-5 DDR3)",
                "mmfree-fpga bench --only dram_builds (mmfree-fpga build --board B --memory dram)",
                DRAM_BUILD_COLUMNS)
    from .boards.registry import BOARDS
    sets = ("narrow",) + tuple(sorted({b.dram_formats for b in BOARDS.values() if b.dram} - {"narrow"}))
    rows = dram_build_rows(progress=lambda text: print(f"  {text}", flush=True), formats=sets)
    s.rows = [dram_build_row_cells(r) for r in rows]
    s.notes.append(f"Each board in the format sets {' and '.join(sets)} (config.FORMAT_SETS): build --memory dram "
                   "builds its board's (registry.Board.dram_formats, wide on both) unless --formats says. nextpnr's router: each "
                   "board's for its DRAM designs (registry.Board.dram_router): router2 on the ULX3S, where router1 "
                   "had not routed the wide design after 24 minutes of routing; nextpnr's own (router1) on the ECPIX-5, where "
                   "router2 made the wide design 78.9 MHz against router1's 113.5 (the wide set of before its 2^15-interval "
                   "sigmoid table).")
    s.notes.append("Demo model, 16 lanes, at each board's DRAM controller clock (the design runs on it). ULX3S: "
                   "LiteDRAM's GENSDRPHY on the IS42S16160 (SDRAM clock from an ODDRX1F, the design clock inverted). "
                   "ECPIX-5: LiteDRAM's ECP5DDRPHY on the MT41K256M16 (sys2x 150 MHz edge clock through ECLKSYNCB + "
                   "CLKDIVF), read levelling by hw/dram_calibration.py (bitslip x delay sweep per byte lane, the "
                   "middle of the widest passing window) before the engine gets the memory. Neither has run on a "
                   "real board yet: met timing and a placed design, not a measured token.")
    cells = {}
    for r in rows:
        if r.get("dram_cells"):
            cells.setdefault(r["board"], set()).add(", ".join(f"{k} {v}" for k, v in sorted(r["dram_cells"].items())))
    for board, texts in cells.items():
        s.notes.append(f"{board}: clock and DDR hard blocks placed: " + " / ".join(sorted(texts)))
    return s


def dram_projection_section(quick: bool) -> Section:
    """tokens/s of the published geometries per DRAM board, bandwidth- and compute-bound, next to the anchors."""
    import dataclasses

    from .boards.litedram import CORES, generate_core
    from .boards.registry import BOARDS
    from .config import FORMAT_SETS, PERF_MODEL, PUBLISHED
    from .image import image_size
    status = {"ulx3s-85f": "co-simulated (dram section); bitstream: build --memory dram",
              "ecpix5-85f": "co-simulated (sim --memory ddr3); bitstream: build --memory dram (read levelling in "
                            "hardware, not yet run on a board)"}
    boards = []
    for board, config in CORES.items():
        core = generate_core(dataclasses.replace(config, sim=True))     # (cached) its size and PHY settings
        memory = f"{config.module} {core.phy['memtype']}, {core.phy['databits']}-bit ({config.phy})"
        boards.append((board, memory, core.size_bytes, core.clk_freq, core.peak_bytes_per_cycle, status[board]))
    s = Section("Weights in DRAM: tokens/s of the published models per board (performance model)",
                "mmfree-fpga bench --only dram_projection",
                ["model", "formats", "image bytes", "weight bytes/token", "board", "memory", "clock MHz", "peak GB/s",
                 "tokens/s (bandwidth bound)", "tokens/s (compute bound, 64 lanes)", "tokens/s", "status"])
    # the lowest DRAM efficiency measured in co-simulation (the dram section's runs)
    efficiency = min(r["run"].dram["efficiency"] for r in _dram_runs(quick))
    for name, cfg in PUBLISHED.items():
        for board, memory, capacity, clock, peak, status in boards:
            for fname, fmt in FORMAT_SETS.items():
                size = image_size(cfg, "base3", fmt)
                per_token = PERF_MODEL.bytes_per_token(cfg, "base3", fmt)
                label = fname + (" (the board's)" if BOARDS[board].dram_formats == fname else "")
                row = [name, label, size, per_token, board, memory, clock / 1e6, peak * clock / 1e9]
                if size > capacity:
                    s.rows.append(row + ["", "", f"does not fit ({size / 2**20:.0f} MiB > {capacity / 2**20:.0f} MiB)",
                                         status])
                    continue
                bandwidth = peak * clock * efficiency / per_token
                compute = clock / PERF_MODEL.cycles_per_token(cfg, 64)
                s.rows.append(row + [bandwidth, compute, min(bandwidth, compute), status])
    for anchor, rate in ANCHORS:
        s.notes.append(f"Anchor: {anchor}: {rate} tokens/s (issue 20).")
    s.notes.append(f"Bandwidth bound = peak bytes/s x {efficiency:.3f} (the lowest DRAM efficiency measured in the dram "
                   "section's co-simulations of the SDR controller, applied to both memories) / weight bytes per token (the image but "
                   "the embedding table, plus one embedding row: config.PERF_MODEL.bytes_per_token); compute bound "
                   "= clock / config.PERF_MODEL cycles per token at 64 lanes. The ULX3S engine runs on the "
                   "controller's clock; the ECPIX-5 at its controller's clock (LiteX's ecpix5 default system clock). Peak = "
                   "the memory bus's bytes per controller cycle (boards/litedram.py DramCore.peak_bytes_per_cycle). "
                   "Formats: each set's image (config.FORMAT_SETS); a board's DRAM build uses its own "
                   "(registry.Board.dram_formats) unless --formats says, or narrow with --slots (a split over boards).")
    return s


def link_faults_section(quick: bool) -> Section:
    """Both serve backends on a noisy line (issue 18): the host driver through the fault proxy,
    same seeds, until enough frames were corrupted; tokens against reference --integer."""
    import tempfile
    from pathlib import Path

    from .config import ModelConfig
    from .sim.backends import make_backend
    from .host.faults import noisy_generation
    from .host.image import WeightImage
    from .host.testing import random_checkpoint, reference_tokens
    from .protocol import FRAME_IDLE_TIMEOUT_S
    from .sim.pipe import PIPE_CLOCK_HZ
    from .sim.runner import simulator_missing

    rate, steps, prompt = 0.01, 200, [1, 2, 3, 4]
    target = 1_000 if quick else 10_000          # corrupted frames per backend
    s = Section("Noisy serial line: both serve backends through the fault proxy",
                "mmfree-fpga bench --only link_faults",
                ["backend", "fault rate", "sessions", "frames", "frames corrupted", "frames dropped",
                 "retransmissions", "tokens", "tokens identical to reference --integer", "wall s"])
    # a small engine (16 lanes divide d and I), so that Verilator serves it quickly
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    load = _load()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(Path(tmp) / "ckpt", cfg, seed=18)
        image = WeightImage.from_checkpoint(ckpt, "base3")
        want = reference_tokens(ckpt, prompt, steps)
        for name in ("model", "rtl"):
            missing = simulator_missing("verilator") if name == "rtl" else None
            if missing:
                s.rows.append([name, rate, "", "", "", "", "", "", f"not run: {missing}", ""])
                continue
            device = make_backend(name, cfg, "base3", None, lanes=16)
            totals = dict(sessions=0, frames=0, corrupted=0, dropped=0, retransmits=0, tokens=0, same=0, wall=0.0)
            try:
                seed = 7
                while totals["corrupted"] < target:
                    r = noisy_generation(device, image, prompt, steps, rate=rate, seed=seed, force_load=True)
                    seed += 1
                    totals["sessions"] += 1
                    totals["frames"] += r["faults"].get("frames", 0)
                    totals["corrupted"] += r["faults"].get("frames_corrupted", 0)
                    totals["dropped"] += r["faults"].get("frames_dropped", 0)
                    totals["retransmits"] += r["driver"]["retransmits"]
                    totals["tokens"] += steps
                    totals["same"] += steps if r["tokens"] == want else 0
                    totals["wall"] += r["wall_s"]
            finally:
                device.close()
            s.rows.append([name, rate, totals["sessions"], totals["frames"], totals["corrupted"], totals["dropped"],
                           totals["retransmits"], totals["tokens"],
                           "all" if totals["same"] == totals["tokens"] else f"{totals['same']} (NOT all)",
                           totals["wall"]])
    s.notes.append(f"Each session: 'mmfree-fpga serve' (model or rtl backend) behind the fault proxy ('mmfree-fpga "
                   f"proxy --rate {rate}': {rate:.0%} of the bytes corrupted and {rate:.0%} of the frames dropped, "
                   f"duplicated, delayed and preceded by garbage, in both directions), the host driver through it: "
                   f"connect, load the {image.size:,}-byte image, {steps} greedy tokens; sessions with seeds 7, 8, "
                   f"... (the same for both backends) until {target:,} frames were corrupted. A frame counts as "
                   "corrupted when a copy of it arrived with a byte changed, lost or doubled; frames dropped are "
                   "counted apart.")
    s.notes.append(f"The rtl backend is the board design's generated Verilog in Verilator at a nominal "
                   f"{PIPE_CLOCK_HZ / 1e3:g} kHz clock: the harness paces the clock to that while a partial frame "
                   f"waits, so the Link drops it after {FRAME_IDLE_TIMEOUT_S * 1e3:g} ms of wall time, as the device "
                   "model does (issue 18: at 12 MHz the timeout took seconds of wall time and a garbled frame "
                   "never died).")
    s.notes.append(f"Wall time is the sessions' (connect to last token) and depends on the machine ({load} when the "
                   "section started); retransmissions are the driver's.")
    return s


def fidelity_section(quick: bool) -> Section:
    from .fidelity import fidelity_section as section
    return section(quick)


def pipeline_section(quick: bool) -> Section:
    from .pipeline_bench import pipeline_section as section
    return section(quick)


def plan_section(quick: bool) -> Section:
    from .planner import plan_section as section
    return section(quick)


def sweep_section(quick: bool) -> Section:
    from .planner import sweep_section as section
    return section(quick)


SECTIONS: dict[str, Callable[[bool], Section]] = {
    "agreement": agreement_section,
    "fidelity": fidelity_section,
    "packing": packing_section,
    "reference_speed": reference_speed_section,
    "engine": engine_section,
    "engine_large": engine_large_section,
    "sim_speed": sim_speed_section,
    "boards": boards_section,
    "boards_wide": boards_wide_section,
    "projection": projection_section,
    "dram": dram_section,
    "dram_builds": dram_builds_section,
    "dram_projection": dram_projection_section,
    "link_faults": link_faults_section,
    "plan": plan_section,
    "pipeline": pipeline_section,
    "sweep": sweep_section,
}
