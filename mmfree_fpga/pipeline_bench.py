"""The bench's pipeline section: a measured pipeline of N ``serve`` processes (the Python device
model and the board design's RTL with state slots) through :class:`~mmfree_fpga.host.pipeline.Pipeline`,
the code of ``run --device A,B,C``. Here rather than in host/ because it builds the RTL devices
(sim/), which host/ does not import."""

from __future__ import annotations

import contextlib

from .config import ModelConfig
from .host.pipeline import Pipeline

BENCH_CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=9, intermediate_size=128)
BENCH_LANES = 16
BENCH_SLOTS = 4


def pipeline_section(quick: bool):
    """A measured pipeline of N ``serve`` processes on a small random-weight model
    (:data:`BENCH_CONFIG`): throughput in device cycles (``schedule_cycles``) for N = 1 .. 3
    devices, one sequence and N sequences in flight, twice: devices of the Python device model
    reporting the performance model's cycles, and the board design's generated Verilog with state
    slots (``--backend rtl --slots``) reporting its engines' own cycle counters; tokens checked
    against the integer model."""
    import tempfile

    from .bench import Section
    from .host.testing import random_checkpoint, reference_tokens

    prompt_len, steps = (4, 12) if quick else (8, 24)
    counts = (1, 3) if quick else (1, 2, 3)
    s = Section(f"Layer-pipelined runs over N simulated devices (d={BENCH_CONFIG.d}, {BENCH_CONFIG.L} layers, "
                f"I={BENCH_CONFIG.I}, V={BENCH_CONFIG.V}; device cycles)",
                "mmfree-fpga bench --only pipeline",
                ["devices", "sequences in flight", "split (layers per device)", "tokens through the chain",
                 "makespan cycles (performance model)", "tokens per Mcycle (performance model)",
                 "speed-up over 1 device (performance model)", "makespan cycles (RTL engines)",
                 "tokens per Mcycle (RTL engines)", "speed-up over 1 device (RTL engines)", "RTL wall s",
                 "tokens = reference --integer"])
    with tempfile.TemporaryDirectory(prefix="mmfree-bench-pipeline-") as tmp:
        checkpoint = random_checkpoint(f"{tmp}/ckpt", BENCH_CONFIG, seed=5)
        prompts = [[(7 * i + 3 * j) % BENCH_CONFIG.V for j in range(prompt_len)] for i in range(max(counts))]
        want = [reference_tokens(checkpoint, p, steps) for p in prompts]
        _build_rtl()
        base = {}
        for n in counts:
            for flight in sorted({1, n}):
                row, ok = {}, True
                for backend in ("model", "rtl"):
                    with contextlib.ExitStack() as stack:
                        urls = [stack.enter_context(_serve(checkpoint, backend)) for _ in range(n)]
                        with Pipeline(urls, BENCH_CONFIG, checkpoint) as pipe:
                            pipe.prepare(lanes=BENCH_LANES, model="bench model")
                            split = " / ".join(str(st.slice.layers) + ("+E" if st.slice.embedding else "")
                                               + ("+H" if st.slice.head else "") for st in pipe.stages)
                            result = pipe.run(prompts[:flight], steps)
                    ok = ok and result.tokens == want[:flight]
                    rate = result.tokens_per_mcycle
                    if n == 1 and flight == 1:
                        base[backend] = rate
                    row[backend] = (split, result.feeds, result.makespan_cycles, rate,
                                    rate / base[backend] if base.get(backend) else 0.0, result.seconds)
                m, r = row["model"], row["rtl"]
                split = m[0] if m[0] == r[0] else f"{m[0]} (RTL: {r[0]})"
                s.rows.append([n, flight, split, m[1], m[2], m[3], m[4], r[2], r[3], r[4], r[5], ok])
    s.notes.append("Devices: 'mmfree-fpga serve' processes on 127.0.0.1, for each row once with '--backend model "
                   "--slots 4 --cycle-model --lanes 16' and once with '--backend rtl --slots 4 --lanes 16' (the "
                   "board design, Link and block-RAM engine with 4 state slots, in Verilator); several devices run "
                   "through 'Pipeline' (the code of 'run --device A,B,C'), split by the planner (+E the embedding, "
                   "+H the final norm and lm_head). One device holds the whole model as one slice (its slots: the "
                   "sequences in flight on it).")
    s.notes.append("Cycles: each feed's cycles as the device reports them: the device model's are its performance "
                   "model's for its slice (PerfModel cut along the stage's terms: planner.stage_cycles), the RTL "
                   "devices' their engines' cycle counters (FEED_SLOT's cycles: from the command to the result). "
                   "Makespan: the feeds replayed on N devices in the order they ran, each as soon as its input "
                   "existed (pipeline.schedule_cycles); the host's residual relay is counted as free here "
                   "(planner: 2 x d x 4 B over 3 Mbaud per hop).")
    s.notes.append(f"Each sequence: a {prompt_len}-token prompt and {steps} generated tokens; tokens per Mcycle = "
                   "tokens through the chain (prompt positions included) per million cycles of the makespan. "
                   "Wall seconds (the RTL run's) include the host's relay over local sockets and the Verilator "
                   "simulation on a shared machine: not a throughput figure.")
    return s


def _build_rtl():
    """Build the RTL devices' Verilator binary once, before several 'serve' children look for it
    (cached in ./out/cache, where they run)."""
    from .sim.backends import make_backend
    make_backend("rtl", BENCH_CONFIG, "base3", None, lanes=BENCH_LANES, slots=BENCH_SLOTS).close()


@contextlib.contextmanager
def _serve(checkpoint, backend: str = "model"):
    """A 'serve' child with slots: the device model with its cycle model, or (``backend="rtl"``)
    the board design with state slots in Verilator; yields its URL."""
    import re
    import subprocess
    import sys
    options = ["--cycle-model"] if backend == "model" else []
    proc = subprocess.Popen([sys.executable, "-m", "mmfree_fpga.cli", "serve", "--backend", backend, "--port", "0",
                             "--slots", str(BENCH_SLOTS), *options, "--lanes", str(BENCH_LANES), "--checkpoint",
                             str(checkpoint)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in proc.stdout:
            found = re.search(r"socket://127\.0\.0\.1:\d+", line)
            if found:
                url = found.group(0)
                break
        if url is None:
            raise RuntimeError("serve printed no URL")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
