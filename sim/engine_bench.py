"""The engine's performance figures, for ``make bench`` (``engine_benchmarks()``).

* ``demo``: the bundled demo model at 16 lanes (the iCEBreaker build), real weights, cycles per
  token against the ideal (ternary weights / lanes); target 1.25x.
* ``block_d512``: one d=512 block (I=1536) at 64 lanes, measured as cycles(L=2) - cycles(L=1)
  on the same build; target under 60 000 cycles (the paper's FPGA: about 2.58 M).
* ``hgrn_370m``: L=24, d=1024, I=2816, V=32000 at 64 lanes; target 1.10x the ideal.
* :func:`large_geometries`: the 1.3B and 2.7B geometries at 64 lanes, one token each, on one
  shared build (``BUILD_64_LARGE``); no target, the ratio to the ideal is the figure.
* :func:`sim_speed`: simulated clock cycles per wall-clock second on the same workload (the demo
  model at 16 lanes, real weights) of Verilator driven by the C++ harness (what ``run_engine``
  uses), Verilator driven by the cocotb testbench, Icarus (cocotb) and Amaranth's simulator,
  counted from the first FEED_TOKEN to the last result (simulator start-up and builds excluded).

``formats`` (a name in ``FORMAT_SETS``, default "narrow") picks the number formats of every
engine build and image: ``engine_benchmarks(formats="wide")`` gives the same figures for the
wide engine.

The d=512 and 370M figures use *synthetic* weights (pseudo-random bytes made by the memory
model, labelled ``synthetic_weights: true``): the cycle count of a step does not depend on the
weights, and these images would not fit the simulated memory. All runs use Verilator (the C++ harness); the
memory model delivers one beat per cycle with latency 1 unless ``mem_bandwidth`` /
``mem_latency`` are given.
"""

from __future__ import annotations

import time

from mmfree_fpga.config import ModelConfig

from .engine_sim import default_build, load_image, reference_tokens, run_engine

__all__ = ["engine_benchmarks", "TARGETS", "GEOMETRY_370M", "block_cycles", "large_geometries", "sim_speed",
           "SIM_SPEED_RUNS", "BUILD_64_LARGE"]

TARGETS = {"demo_ratio": 1.25, "block_d512_cycles": 60_000, "hgrn_370m_ratio": 1.10}
GEOMETRY_370M = ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, intermediate_size=2816)
BUILD_64 = default_build(GEOMETRY_370M, 64)
# one build for the 1.3B and 2.7B geometries (the 2.7B's maxima; 1.3B set at run time)
GEOMETRY_LARGEST = ModelConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=32, intermediate_size=6912)
BUILD_64_LARGE = default_build(GEOMETRY_LARGEST, 64)


def _build_64(large: bool, formats: str):
    """BUILD_64 (BUILD_64_LARGE) in the number formats ``formats``."""
    if formats == "narrow":
        return BUILD_64_LARGE if large else BUILD_64
    return default_build(GEOMETRY_LARGEST if large else GEOMETRY_370M, 64, formats=formats)


def block_cycles(d: int = 512, I: int = 1536, lanes: int = 64, simulator: str = "verilator",
                 formats: str = "narrow", **mem) -> dict:
    """Cycles of one block: the difference between an L=2 and an L=1 model (same build)."""
    out = {}
    for L in (1, 2):
        cfg = ModelConfig(vocab_size=64, hidden_size=d, num_hidden_layers=L, intermediate_size=I)
        r = run_engine(cfg=cfg, blob=None, packing="base3", lanes=lanes, prompt=[1, 2], steps=1,
                       simulator=simulator, build=_build_64(False, formats) if lanes == 64 else None,
                       synthetic=True, formats=formats, **mem)
        out[L] = r.cycles[-1]
    block = 4 * d * d + 3 * d * I
    return {"cycles": out[2] - out[1], "ideal_cycles": block / lanes, "ratio_to_ideal": (out[2] - out[1]) / (block / lanes),
            "ternary_weights": block, "lanes": lanes, "synthetic_weights": True, "target_cycles": TARGETS["block_d512_cycles"],
            "paper_fpga_cycles": 2_580_000}


def engine_benchmarks(*, include_370m: bool = True, tokens_370m: int = 2, mem_bandwidth: float = 0.0,
                      mem_latency: int = 1, stall_rate: float = 0.0, formats: str = "narrow") -> dict:
    """Every figure above as a dict (see the module docstring); each has ``ok`` against its target."""
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    mem = {"mem_bandwidth": mem_bandwidth, "mem_latency": mem_latency, "stall_rate": stall_rate}
    res = {}

    cfg, blob = load_image(DEMO_CHECKPOINT, "base3", formats)
    prompt = list(b"def ")
    t0 = time.perf_counter()
    r = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=4, simulator="verilator",
                   formats=formats, **mem)
    ref, _ = reference_tokens(cfg, blob, "base3", prompt, 4, formats)
    ideal = cfg.ideal_cycles(16)
    res["demo"] = {"lanes": 16, "cycles_per_token": r.cycles, "ideal_cycles_per_token": ideal,
                   "ratio_to_ideal": max(r.cycles) / ideal, "target_ratio": TARGETS["demo_ratio"],
                   "ok": max(r.cycles) <= TARGETS["demo_ratio"] * ideal, "matches_integer_model": ref == r.tokens,
                   "sim_cycles_per_s": r.sim_cycles / r.sim_wall_s, "wall_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    b = block_cycles(formats=formats, **mem)
    b["ok"] = b["cycles"] < TARGETS["block_d512_cycles"]
    b["wall_s"] = time.perf_counter() - t0
    res["block_d512"] = b

    if include_370m:
        t0 = time.perf_counter()
        cfg = GEOMETRY_370M
        r = run_engine(cfg=cfg, blob=None, packing="base3", lanes=64, prompt=[1] * tokens_370m, steps=1,
                       simulator="verilator", build=_build_64(False, formats), synthetic=True, **mem)
        ideal = cfg.ideal_cycles(64)
        res["hgrn_370m"] = {"lanes": 64, "cycles_per_token": r.cycles, "ideal_cycles_per_token": ideal,
                            "ratio_to_ideal": max(r.cycles) / ideal, "target_ratio": TARGETS["hgrn_370m_ratio"],
                            "ok": max(r.cycles) <= TARGETS["hgrn_370m_ratio"] * ideal, "synthetic_weights": True,
                            "sim_cycles_per_s": r.sim_cycles / r.sim_wall_s, "wall_s": time.perf_counter() - t0}
    res["mem"] = mem
    res["formats"] = formats
    return res


def large_geometries(names=("1.3B", "2.7B"), tokens: int = 1, formats: str = "narrow", **mem) -> dict:
    """Cycles of ``tokens`` token steps (synthetic weights, 64 lanes) of each published geometry."""
    from mmfree_fpga.config import PUBLISHED
    out = {}
    for name in names:
        cfg = PUBLISHED[name]
        t0 = time.perf_counter()
        r = run_engine(cfg=cfg, blob=None, packing="base3", lanes=64, prompt=[1] * tokens, steps=1,
                       simulator="verilator", build=_build_64(True, formats), synthetic=True, **mem)
        ideal = cfg.ideal_cycles(64)
        out[name] = {"lanes": 64, "cycles_per_token": r.cycles, "ideal_cycles_per_token": ideal,
                     "ratio_to_ideal": max(r.cycles) / ideal, "synthetic_weights": True,
                     "sim_cycles_per_s": r.sim_cycles / r.sim_wall_s, "wall_s": time.perf_counter() - t0}
    return out


SIM_SPEED_RUNS = {
    # name: (simulator, driven by cocotb)
    "verilator": ("verilator", False),
    "verilator_cocotb": ("verilator", True),
    "icarus": ("icarus", True),
    "amaranth": ("amaranth", False),
}


def sim_speed(tokens: dict | None = None) -> dict:
    """Run name (:data:`SIM_SPEED_RUNS`) -> cycles/s on the demo model at 16 lanes (``tokens``: run
    name -> token steps fed: the prompt ``def `` and then generated tokens)."""
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    from .runner import simulator_missing
    tokens = tokens or {"verilator": 16, "verilator_cocotb": 4, "icarus": 1, "amaranth": 1}
    cfg, blob = load_image(DEMO_CHECKPOINT, "base3")
    out = {}
    for name, n in tokens.items():
        sim, cocotb = SIM_SPEED_RUNS[name]
        reason = None if sim == "amaranth" else simulator_missing(sim)
        if reason:
            out[name] = {"missing": reason}
            continue
        prompt = list(b"def ")[:n]
        steps = n - len(prompt) + 1
        t0 = time.perf_counter()
        r = run_engine(cfg=cfg, blob=blob, packing="base3", lanes=16, prompt=prompt, steps=steps, simulator=sim,
                       cocotb=cocotb, progress=False)
        ref, _ = reference_tokens(cfg, blob, "base3", prompt, steps)
        out[name] = {"tokens": n, "sim_cycles": r.sim_cycles, "sim_wall_s": r.sim_wall_s,
                     "cycles_per_s": r.sim_cycles / r.sim_wall_s, "matches_integer_model": r.tokens == ref,
                     "wall_s": time.perf_counter() - t0}
    return out


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(engine_benchmarks(include_370m="--no-370m" not in sys.argv), indent=1))
