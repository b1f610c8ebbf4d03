"""The multi-board planner: a model's layers split into contiguous slices, one per device.

Device 0 also holds the embedding table, the last device the final norm and lm_head (the image's
``lm_head`` sections: its trits, the norm folded into its ``a``/``c`` vectors, ``k``); every device
between them holds at least one layer, the first and the last may hold none (the 370M's
embedding table alone nearly fills a ULX3S's SDRAM). A slice's *bytes* are its sections of the
weight image (:func:`mmfree_fpga.image.image_layout`), each with the alignment padding that follows
it, so the slices' bytes add up to the image's size; its *state* is the recurrent state of its
layers (``d`` values of ``x_bits`` per layer), which stays on chip.

What fits a device (:class:`DeviceSpec`, :func:`device_spec`): with ``memory="dram"`` the slice's
bytes against the board's DRAM (:func:`mmfree_fpga.boards.dram.dram_budget`, from the LiteDRAM
core's settings in :data:`mmfree_fpga.boards.litedram.CORES`, which also names the ECPIX-5's DDR3
although the board registry has no ECPIX-5 yet) and the state against the on-chip RAM left by the
board top's FIFOs (:func:`mmfree_fpga.boards.budget.memory_budget`); with ``memory="bram"`` both
against the on-chip RAM.

Time per token of a stage, from :class:`~mmfree_fpga.config.PerfModel` cut along its terms (the
stages' compute cycles add up to ``PerfModel.cycles_per_token`` of the whole model): each layer's
matrices over ``lanes`` plus its per-layer overhead; device 0 the embedding's passes; the last
device lm_head's matrix and its input passes and latency. With the weights in DRAM a stage takes
at least its weight bytes per token (every section of its slice, plus one embedding row on
device 0) over the DRAM's peak bytes per cycle times ``dram_efficiency`` (the dram bench section
measured 0.959 for the SDR SDRAM; the default 0.95 is below it); the stage's cycles are the
larger of the two.

The residual hand-over between devices (protocol 1.2's WRITE_RESIDUAL / READ_OUTPUT, relayed by
``host/pipeline.py``; the figure here is the line time only): the host relays ``d`` int32 values (``x_bits`` wide) from device k to device k+1 over the two devices'
serial links at ``baud``, 10 bits per byte (UART 8N1), store-and-forward (received whole, then
sent), framing overhead not counted: ``2 * d * 4 * 10 / baud`` seconds per hop. One sequence:
tokens/s = 1 / (the stages' times + the hops'). N sequences in flight (one per device): each
device works on another sequence's token, each link carries one residual per token in each
direction (the UART's two wires), so tokens/s = 1 / the slowest of the stages and the one-way
transfer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import FORMATS, PERF_MODEL, PUBLISHED, ModelConfig, PerfModel
from .image import image_layout, image_size

__all__ = ["DeviceSpec", "device_spec", "plan_boards", "Stage", "Plan", "plan", "layer_bytes", "stage_cycles",
           "DRAM_EFFICIENCY", "UART_BITS_PER_BYTE", "plan_section", "sweep_section"]

DRAM_EFFICIENCY = 0.95       # of the DRAM's peak, while streaming weights (measured 0.959 on the SDR SDRAM)
UART_BITS_PER_BYTE = 10      # 8N1: start, 8 data bits, stop


# -- devices ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSpec:
    """One device kind as the planner sees it.

    ``weight_bytes``: room for a slice's weight bytes; ``state_bytes``: on-chip room for its
    recurrent state (with ``memory="bram"`` both share the on-chip RAM: ``shared`` is True and
    a slice needs weights + state <= ``weight_bytes``); ``clock_hz``: the design clock;
    ``peak_bytes_per_cycle``: the DRAM's data bus per clock cycle (None: weights on chip, the
    engine's one beat per cycle, compute bound); ``memory_text``: the memories for messages,
    ``capacity_text``: the one that holds the weights.
    """

    board: str
    memory: str
    weight_bytes: int
    state_bytes: int
    shared: bool
    clock_hz: float
    peak_bytes_per_cycle: float | None
    memory_text: str
    capacity_text: str = ""
    perf_model: PerfModel = PERF_MODEL

    def as_dict(self) -> dict:
        d = asdict(self)
        d["perf_model"] = asdict(self.perf_model)
        return d


def plan_boards() -> list[str]:
    """The board kinds the planner knows: the registry's ECP5 boards and every DRAM core's board."""
    from .boards.litedram import CORES
    from .boards.registry import BOARDS
    names = [name for name, b in BOARDS.items() if b.family == "ecp5"]
    return names + [name for name in CORES if name not in names]


def _device_of(part: str):
    """The budget table's entry for a part number with its speed grade and package
    (``LFE5UM5G-85F-8BG554I`` -> ``LFE5UM5G-85F``)."""
    from .boards.budget import DEVICES
    for name in sorted(DEVICES, key=len, reverse=True):
        if part == name or part.startswith(name + "-"):
            return DEVICES[name]
    raise ValueError(f"device {part} is not in boards/budget.py's DEVICES")


def device_spec(board: str, memory: str | None = None, clock_hz: float | None = None) -> DeviceSpec:
    """The planner's view of ``board`` (:func:`plan_boards`); ``memory`` "dram" (default where the
    board has a DRAM core) or "bram"; ``clock_hz`` default: the DRAM controller's clock with
    "dram", the board's default clock with "bram". ValueError for a board or memory it cannot plan."""
    from .boards.budget import memory_budget
    from .boards.litedram import CORES
    from .boards.registry import BOARDS
    from .boards.top import DEFAULT_FIFO_DEPTH
    known = plan_boards()
    if board not in known:
        raise ValueError(f"unknown board {board!r} for the planner; use one of {', '.join(known)} "
                         "(ECP5 boards: the planner models the full engine)")
    registered = BOARDS.get(board)
    # the board's DRAM: a registry board names its core; a board known by its core alone is that core
    dram_name = board if registered is None else registered.dram
    core = CORES.get(dram_name) if dram_name is not None else None
    memory = memory or ("dram" if core is not None else "bram")
    if memory not in ("dram", "bram"):
        raise ValueError(f"unknown memory {memory!r}; use dram or bram")
    if clock_hz is not None and not (math.isfinite(clock_hz) and clock_hz > 0):
        raise ValueError(f"clock {clock_hz!r} Hz: must be positive")
    device = registered.resources if registered is not None else _device_of(core.device)
    on_chip = memory_budget(device, (DEFAULT_FIFO_DEPTH, DEFAULT_FIFO_DEPTH))
    if memory == "bram":
        if registered is None:
            raise ValueError(f"board {board} is known by its DRAM core only; plan it with memory dram")
        return DeviceSpec(board=board, memory="bram", weight_bytes=on_chip.available_bytes,
                          state_bytes=on_chip.available_bytes, shared=True,
                          clock_hz=clock_hz or registered.default_clock_hz, peak_bytes_per_cycle=None,
                          memory_text=f"on-chip RAM: {on_chip.text()}", capacity_text=f"on-chip RAM: {on_chip.text()}")
    if core is None:
        raise ValueError(f"board {board} has no DRAM in this flow; plan it with memory bram")
    from types import SimpleNamespace

    from .boards.dram import dram_budget
    from .sim.engine_sim import DRAM_BOARDS, dram_core
    dram = dram_budget(SimpleNamespace(name=board, dram=dram_name))
    memories = {b: m for m, b in DRAM_BOARDS.items()}
    if dram_name in memories:
        peak = dram_core(memories[dram_name]).peak_bytes_per_cycle       # the generated (cached) sim core's
    else:
        raise ValueError(f"board {board}: no simulated DRAM core gives its memory's peak bandwidth")
    default = (registered.dram_clock_hz if registered is not None and registered.dram_clock_hz else core.clk_freq)
    return DeviceSpec(board=board, memory="dram", weight_bytes=dram.size_bytes,
                      state_bytes=on_chip.available_bytes, shared=False, clock_hz=clock_hz or default,
                      peak_bytes_per_cycle=peak,
                      memory_text=f"{dram.text()}, {peak} B/cycle peak; state in on-chip RAM: {on_chip.text()}",
                      capacity_text=dram.text())


# -- the cost of a slice ---------------------------------------------------------------------------

def layer_bytes(cfg: ModelConfig, packing: str) -> dict:
    """Part -> (stored bytes, bytes read per token) of the weight image; parts are ``layer`` index
    ints, ``"lm_head"`` and ``"embedding"``. Stored bytes include the alignment padding after each
    section (they add up to the image's size); read bytes are the sections' sizes (the embedding:
    one row and its scale, as :meth:`PerfModel.bytes_per_token` counts)."""
    layout = image_layout(cfg, packing)
    parts: dict = {}
    for i, s in enumerate(layout):
        end = layout[i + 1].offset if i + 1 < len(layout) else s.offset + s.size
        if s.name.startswith("layers."):
            part = int(s.name.split(".")[1])
        elif s.name.startswith("lm_head"):
            part = "lm_head"
        elif s.name.startswith("embedding."):
            part = "embedding"
        else:
            raise ValueError(f"image section {s.name} belongs to no part of a plan")
        stored, read = parts.get(part, (0, 0))
        parts[part] = (stored + end - s.offset, read + (s.size if part != "embedding" else 0))
    stored, _ = parts["embedding"]
    parts["embedding"] = (stored, cfg.d + 4)
    return parts


def stage_cycles(cfg: ModelConfig, lanes: int, layers: int, first: bool, last: bool,
                 pm: PerfModel = PERF_MODEL) -> float:
    """Compute cycles per token of a stage with ``layers`` layers (``first``: it embeds the token;
    ``last``: it runs lm_head): :meth:`PerfModel.cycles_per_token`'s terms for its part."""
    per_layer = (cfg.d * (4 * cfg.d + 3 * cfg.I) / lanes + pm.passes * (3 * cfg.d + cfg.I) + 4 * pm.job_latency
                 + 2 * (pm.q_split - 1) * cfg.d / lanes)
    cycles = layers * per_layer
    if first:
        cycles += pm.embed_passes * cfg.d
    if last:
        cycles += cfg.V * cfg.d / lanes + pm.passes * cfg.d + pm.job_latency
    return cycles


@dataclass(frozen=True)
class Stage:
    """One device's slice: layers ``first_layer .. first_layer + layers - 1``; ``bytes`` stored,
    ``state_bytes`` on chip, ``read_bytes`` per token; ``cycles`` = max(``compute_cycles``,
    ``memory_cycles``) per token (``memory_cycles`` None with the weights on chip)."""

    device: int
    first_layer: int
    layers: int
    embedding: bool
    lm_head: bool
    bytes: int
    state_bytes: int
    read_bytes: int
    compute_cycles: float
    memory_cycles: float | None
    cycles: float
    seconds: float

    @property
    def bound(self) -> str:
        return "memory bandwidth" if self.memory_cycles is not None and self.memory_cycles > self.compute_cycles \
            else "compute"

    @property
    def layers_text(self) -> str:
        parts = []
        if self.embedding:
            parts.append("embedding")
        if self.layers:
            last = self.first_layer + self.layers - 1
            parts.append(f"layer {last}" if self.layers == 1 else f"layers {self.first_layer}-{last}")
        if self.lm_head:
            parts.append("norm + lm_head")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(bound=self.bound, layers_text=self.layers_text)
        return d


@dataclass(frozen=True)
class Plan:
    """A split of ``model`` over ``len(stages)`` devices of kind ``device``. ``transfer_s``: one
    residual over one serial link; ``hop_s``: a hand-over relayed by the host (module docstring)."""

    model: str
    cfg: ModelConfig
    packing: str
    lanes: int
    device: DeviceSpec
    baud: int
    dram_efficiency: float
    stages: tuple
    image_bytes: int
    residual_bytes: int
    transfer_s: float
    notes: tuple = field(default_factory=tuple)

    @property
    def devices(self) -> int:
        return len(self.stages)

    @property
    def hop_s(self) -> float:
        return 2 * self.transfer_s

    @property
    def sequence_s(self) -> float:
        """Seconds per token of one sequence: every stage and every hop in turn."""
        return sum(s.seconds for s in self.stages) + (self.devices - 1) * self.hop_s

    @property
    def tokens_per_s_sequence(self) -> float:
        return 1 / self.sequence_s

    @property
    def bottleneck(self) -> tuple[str, float]:
        """(what, seconds) of the slowest step with one sequence per device in flight."""
        slowest = max(self.stages, key=lambda s: s.seconds)
        if self.devices > 1 and self.transfer_s > slowest.seconds:
            return "the serial links", self.transfer_s
        return f"device {slowest.device} ({slowest.bound})", slowest.seconds

    @property
    def tokens_per_s_in_flight(self) -> float:
        """tokens/s, all sequences together, with ``devices`` sequences in flight."""
        return 1 / self.bottleneck[1]

    def as_dict(self) -> dict:
        return {"model": self.model, "geometry": self.cfg.as_dict(), "packing": self.packing, "lanes": self.lanes,
                "board": self.device.board, "memory": self.device.memory, "device": self.device.as_dict(),
                "devices": self.devices, "baud": self.baud, "dram_efficiency": self.dram_efficiency,
                "image_bytes": self.image_bytes, "residual_bytes": self.residual_bytes,
                "transfer_s": self.transfer_s, "hop_s": self.hop_s,
                "stages": [s.as_dict() for s in self.stages],
                "tokens_per_s_sequence": self.tokens_per_s_sequence,
                "tokens_per_s_in_flight": self.tokens_per_s_in_flight,
                "bottleneck": self.bottleneck[0], "notes": list(self.notes)}

    def text(self) -> str:
        """The split as a table, then the throughput lines."""
        dev = self.device
        lines = [f"{self.model} ({self.packing} image of {self.image_bytes:,} B, {self.lanes} lanes) over "
                 f"{self.devices} x {dev.board} ({dev.memory}: {dev.memory_text}) at {dev.clock_hz / 1e6:g} MHz",
                 "device | holds | bytes | state B | cycles/token | ms/token | bound"]
        for s in self.stages:
            lines.append(f"{s.device} | {s.layers_text} | {s.bytes:,} | {s.state_bytes:,} | {s.cycles:,.0f} | "
                         f"{s.seconds * 1e3:.2f} | {s.bound}")
        if self.devices > 1:
            lines.append(f"hand-over: {self.residual_bytes:,} B of residual per hop, relayed by the host over two "
                         f"{self.baud:,}-baud links: {self.hop_s * 1e3:.2f} ms")
        lines.append(f"one sequence: {_rate(self.tokens_per_s_sequence)} tokens/s; {self.devices} in flight: "
                     f"{_rate(self.tokens_per_s_in_flight)} tokens/s (limit: {self.bottleneck[0]})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# -- the split ---------------------------------------------------------------------------------------

def _stage(cfg, lanes, device: DeviceSpec, parts, index, start, count, first, last, efficiency) -> Stage | None:
    """The stage of device ``index`` with layers ``start .. start + count - 1``, or None if it does not fit."""
    names = [*range(start, start + count), *(["embedding"] if first else []), *(["lm_head"] if last else [])]
    stored = sum(parts[n][0] for n in names)
    read = sum(parts[n][1] for n in names)
    state = count * cfg.d * FORMATS.x_bits // 8
    if device.shared:
        if stored + state > device.weight_bytes:
            return None
    elif stored > device.weight_bytes or state > device.state_bytes:
        return None
    compute = stage_cycles(cfg, lanes, count, first, last, device.perf_model)
    memory = None
    if device.peak_bytes_per_cycle is not None:
        memory = read / (device.peak_bytes_per_cycle * efficiency)
    cycles = max(compute, memory or 0.0)
    return Stage(device=index, first_layer=start, layers=count, embedding=first, lm_head=last, bytes=stored,
                 state_bytes=state, read_bytes=read, compute_cycles=compute, memory_cycles=memory, cycles=cycles,
                 seconds=cycles / device.clock_hz)


def _best_split(cfg, lanes, device, parts, n, efficiency):
    """The stages of the best split over ``n`` devices (the slowest stage as fast as possible, then
    the sum of the stages), or None if none fits."""
    L = cfg.L
    # best[j]: (slowest, total, stages) covering layers 0..j-1 with the devices so far
    best = {0: (0.0, 0.0, ())}
    for i in range(n):
        first, last = i == 0, i == n - 1
        least = 0 if (first or last) else 1
        nxt = {}
        for j, (slowest, total, stages) in best.items():
            ends = [L] if last else range(j + least, L + 1)
            for end in ends:
                if end - j < least:
                    continue
                st = _stage(cfg, lanes, device, parts, i, j, end - j, first, last, efficiency)
                if st is None:
                    continue
                cand = (max(slowest, st.seconds), total + st.seconds, stages + (st,))
                if end not in nxt or cand[:2] < nxt[end][:2]:
                    nxt[end] = cand
        best = nxt
        if not best:
            return None
    return best[L][2] if L in best else None


def plan(cfg: ModelConfig, packing: str, board, devices: int | None = None, *, lanes: int = 16,
         memory: str | None = None, clock_hz: float | None = None, baud: int | None = None,
         dram_efficiency: float = DRAM_EFFICIENCY, model: str = "") -> Plan:
    """Split ``cfg``'s layers over ``devices`` boards of kind ``board`` (a name for
    :func:`device_spec`, with ``memory`` and ``clock_hz``, or a :class:`DeviceSpec`; ``devices``
    None: as few as fit), the slowest stage as fast as possible, then the sum of the stages.
    ValueError for bad parameters, and when no split fits (with the sizes, and the fewest devices
    that would do where there are such)."""
    from .boards.top import DEFAULT_BAUD
    from .hw.engine import LANES_SUPPORTED, check_geometry
    if lanes not in LANES_SUPPORTED:
        raise ValueError(f"lanes must be one of {', '.join(map(str, LANES_SUPPORTED))}, got {lanes}")
    check_geometry(cfg, lanes)
    baud = DEFAULT_BAUD if baud is None else baud
    if not (isinstance(baud, int) and baud > 0):
        raise ValueError(f"baud must be a positive integer, got {baud!r}")
    if not 0 < dram_efficiency <= 1:
        raise ValueError(f"dram_efficiency must be in (0, 1], got {dram_efficiency}")
    most = cfg.L + 2 if cfg.L else 2
    if devices is not None and not (isinstance(devices, int) and 1 <= devices <= most):
        raise ValueError(f"devices must be 1 to {most} (the {cfg.L} layers, one a device, with embedding and "
                         f"lm_head on devices of their own), got {devices}")
    device = board if isinstance(board, DeviceSpec) else device_spec(board, memory, clock_hz)
    parts = layer_bytes(cfg, packing)
    size = image_size(cfg, packing)
    name = model or "the model"
    if devices is None:
        stages = None
        for n in range(1, most + 1):
            stages = _best_split(cfg, lanes, device, parts, n, dram_efficiency)
            if stages is not None:
                break
        if stages is None:
            raise ValueError(_no_fit(name, cfg, packing, device, parts, size, None))
    else:
        stages = _best_split(cfg, lanes, device, parts, devices, dram_efficiency)
        if stages is None:
            fewest = next((n for n in range(devices + 1, most + 1)
                           if _best_split(cfg, lanes, device, parts, n, dram_efficiency) is not None), None)
            raise ValueError(_no_fit(name, cfg, packing, device, parts, size, devices, fewest))
    residual = cfg.d * FORMATS.x_bits // 8
    notes = []
    if device.memory == "dram" and len(stages) > 1:
        per_flight = max(s.state_bytes for s in stages) * len(stages)
        if per_flight > device.state_bytes:
            notes.append(f"{len(stages)} sequences in flight need {per_flight:,} B of recurrent state on one "
                         f"device, more than its on-chip RAM: the in-flight figure assumes room for it")
    return Plan(model=name, cfg=cfg, packing=packing, lanes=lanes, device=device, baud=baud,
                dram_efficiency=dram_efficiency, stages=tuple(stages), image_bytes=size, residual_bytes=residual,
                transfer_s=residual * UART_BITS_PER_BYTE / baud, notes=tuple(notes))


def _no_fit(name, cfg, packing, device, parts, size, devices, fewest=None) -> str:
    room = device.capacity_text + (" for weights and state" if device.shared else "")
    state = cfg.d * FORMATS.x_bits // 8
    head = (f"{name}'s {packing} weight image ({size:,} B, {cfg.L} layers) does not fit "
            + (f"{devices} x {device.board}" if devices else f"any number of {device.board} boards")
            + f", {room} each")
    for part, what in (("embedding", "the embedding table"), ("lm_head", "lm_head with the final norm"),
                       (0, "one layer")):
        need = parts[part][0] + (state if part == 0 and device.shared else 0)
        if need > device.weight_bytes:
            return f"{head}: {what} alone is {need:,} B; use a board with more memory"
    if fewest is not None:
        return f"{head}; the fewest that fit are {fewest}"
    return f"{head}; use a board with more memory or --packing base3" if packing == "2bit" else head


# -- bench sections (the lead registers them in mmfree_fpga/bench.py) ----------------------------------

PLAN_BOARDS = ("ulx3s-85f", "ecpix5-85f")
PLAN_LANES = 64


def plan_section(quick: bool):
    """The 370M over N boards with its weights in DRAM: the ULX3S's SDRAM and the ECPIX-5's DDR3,
    N from the fewest that fit to at least 4 (performance model; no tool runs, ``quick`` unused)."""
    from .bench import Section
    cfg = PUBLISHED["370M"]
    s = Section(f"Multi-board plans: the 370M split over N boards (performance model, {PLAN_LANES} lanes, base3)",
                "mmfree-fpga bench --only plan (mmfree-fpga plan --model 370M --board B --devices N)",
                ["board", "memory", "N", "layers per board", "MB per board", "cycles/token of the slowest stage",
                 "tokens/s, one sequence", "tokens/s, N in flight", "limit"])
    for board in PLAN_BOARDS:
        fewest = plan(cfg, "base3", board, lanes=PLAN_LANES, model="370M")
        for n in range(fewest.devices, max(4, fewest.devices + 1) + 1):
            p = plan(cfg, "base3", board, n, lanes=PLAN_LANES, model="370M")
            layers = " / ".join(str(st.layers) + ("+E" if st.embedding else "") + ("+H" if st.lm_head else "")
                                for st in p.stages)
            mb = " / ".join(f"{st.bytes / 1e6:.1f}" for st in p.stages)
            s.rows.append([board, p.device.capacity_text, n, layers, mb,
                           round(max(st.cycles for st in p.stages)), p.tokens_per_s_sequence,
                           p.tokens_per_s_in_flight, p.bottleneck[0]])
        s.notes.append(f"{board}: {fewest.devices} boards at the fewest ({fewest.device.memory_text}; "
                       f"{fewest.device.clock_hz / 1e6:g} MHz, the DRAM controller's clock).")
    s.notes.append("Layers per board: +E the embedding table, +H the final norm and lm_head. MB: the slice's "
                   "weight-image bytes (sections with their alignment; they add up to the image). A stage's cycles "
                   f"are the larger of the performance model's compute cycles and its weight bytes per token over "
                   f"the DRAM's peak x {DRAM_EFFICIENCY} (planner.DRAM_EFFICIENCY; the dram section measured 0.959).")
    s.notes.append("Hand-over: the host relays d int32 values (4 KB for the 370M) between neighbours over the "
                   "two devices' 3 Mbaud UARTs (8N1, store-and-forward, no framing counted): 27 ms per hop. One "
                   "sequence pays every stage and hop in turn; with N in flight the slowest stage (or one "
                   "residual's 13.7 ms on a link) sets the rate. Protocol 1.2 and the host (run --device A,B,...) "
                   "carry the hand-over; the Python device model runs it, the gateware engine does not yet.")
    return s


def sweep_section(quick: bool):
    """A small sweep on a LocalCluster: the demo model's performance-model and Verilator sim
    points at 16 lanes (``quick``) or 16, 32 and 64, on the ULX3S at its default clock."""
    import os
    import tempfile

    from .bench import Section
    from .sweep import SweepSpec, resolve_model, run_sweep, write_outputs
    lanes = (16,) if quick else (16, 32, 64)
    spec = SweepSpec(kinds=("model", "sim"), boards=("ulx3s-85f",), lanes=lanes, packings=("base3",))
    s = Section("A design sweep on Dask (demo model, ULX3S default clock, performance model and Verilator)",
                "mmfree-fpga sweep --kinds model,sim --lanes " + ",".join(map(str, lanes)),
                ["kind", "lanes", "packing", "clock MHz", "cycles/token", "tokens/s", "matches integer model",
                 "seconds", "error"])
    with tempfile.TemporaryDirectory(prefix="mmfree-bench-sweep-") as tmp:
        result = run_sweep(spec, resolve_model(None, spec.packings), cache_dir=tmp,
                           workers=min(2, os.cpu_count() or 1))
        written = write_outputs(result, os.path.join(tmp, "out"))
    for r in result.rows:
        s.rows.append([r["kind"], r["lanes"], r["packing"], r["clock_mhz"], r["cycles_per_token"], r["tokens_per_s"],
                       "" if r["matches_integer_model"] is None else r["matches_integer_model"], r["seconds"],
                       r["error"] or ""])
    s.notes.append(f"{result.measurements} measurements run as tasks on {result.cluster} (a fresh cache, so "
                   f"every point ran; {result.failed} failed). Seconds: a measurement's own wall time on its worker, "
                   "including a Verilator build where the lane count had none cached.")
    s.notes.append("tokens/s = the design clock / cycles per token (sim: the largest of the prompt's and the "
                   "generated tokens' counts). Pareto front (lanes against tokens/s, no build points): "
                   + ", ".join(written["pareto"]) + ".")
    return s
