"""Design sweeps: boards x lanes x packings x clocks, each point a task on Dask distributed.

A sweep (:class:`SweepSpec`) is the cross product of point kinds, boards, lane counts, trit
packings and design clocks for one model (the demo checkpoint, a checkpoint directory, or a
published geometry of :data:`~mmfree_fpga.config.PUBLISHED`, which has no weights). Each row of
the result is one :class:`Point`; the work behind it is a *measurement*, run as a task on a Dask
cluster (a ``LocalCluster`` of worker processes on this machine, or the scheduler at an address):

* ``build``: the board's bitstream (:func:`mmfree_fpga.boards.build.build`, the engine with
  ``lanes``): LUTs, FFs, block RAM, DSPs, Fmax and whether timing is met at the point's clock;
* ``sim``: the engine's cycle simulation (:func:`mmfree_fpga.sim.engine_sim.run_engine`, the
  ``sim`` command's path) on a short prompt: measured cycles per token, and whether its tokens
  equal the integer model's;
* ``model``: the performance model (:func:`mmfree_fpga.boards.designs.engine_perf_model` of the
  board's family, :class:`~mmfree_fpga.config.PerfModel` on the ECP5): cycles per token, no tool.

A ``sim`` or ``model`` measurement does not depend on the board's clock, so one serves every
clock (and, for ``sim``, every board) of the sweep. Tokens/s of a row is the point's design clock
(not Fmax) divided by its cycles per token; a ``build`` row takes its cycles from the sweep's
``sim`` measurement of the same lanes and packing when there is one, else from the performance
model (``cycles_source``), and also gives tokens/s at Fmax.

Measurements are cached as JSON under ``<cache>/sweep/`` by :func:`measurement_key`: the
measurement's parameters, the model's weight-image SHA-256 (the geometry for a published
model) and the package version; a rerun submits only what is missing (nothing at all when
everything is cached: no cluster is started). A measurement that fails (a build that does not
fit, a tool missing) is a row with its error, and is not cached, so a rerun tries it again.

The weight image goes to the workers as bytes (``manifest.json`` and ``weights.bin``, scattered
once per packing), so workers on other machines need the package, not this machine's files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import PUBLISHED, ModelConfig
from .packing import PACKINGS

__all__ = ["KINDS", "SIMULATORS", "SweepSpec", "SweepModel", "Point", "resolve_model", "plan_points",
           "measurement_key", "run_measurement", "run_sweep", "SweepResult", "pareto_front", "write_outputs",
           "COLUMNS", "default_cache_dir", "DEFAULT_PROMPT", "markdown_table", "plot_items"]

KINDS = ("build", "sim", "model")
SIMULATORS = ("verilator", "icarus", "amaranth")
DEFAULT_PROMPT = (1, 2)          # token ids fed by a sim point (taken modulo the vocabulary)
SWEEP_FORMAT = 1                 # bump when a measurement's result changes for the same key
# the table's columns, in order (the rows' keys; CSV and Markdown)
COLUMNS = ("kind", "board", "lanes", "packing", "clock_mhz", "cycles_per_token", "cycles_source", "tokens_per_s",
           "luts", "ffs", "bram", "dsp", "fmax_mhz", "timing_met", "tokens_per_s_at_fmax",
           "matches_integer_model", "cached", "seconds", "error")


def default_cache_dir() -> Path:
    """``$MMFREE_FPGA_CACHE`` or ``out/cache`` (the build cache's root); measurements go to ``sweep/`` in it."""
    return Path(os.environ.get("MMFREE_FPGA_CACHE", "out/cache"))


def package_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("mmfree-fpga")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- the model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepModel:
    """The model a sweep runs: ``cfg``; ``images``: packing -> (image SHA-256, {file name: bytes})
    of the exported weight image (empty for a published geometry, which has no weights)."""

    name: str
    cfg: ModelConfig
    images: dict = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return bool(self.images)

    def identity(self, packing: str) -> dict:
        """What a measurement key holds of the model: the image's hash, else the geometry."""
        if packing in self.images:
            return {"image_sha256": self.images[packing][0]}
        return {"geometry": self.cfg.as_dict()}


def resolve_model(model: str | None, packings) -> SweepModel:
    """A published geometry's name (:data:`PUBLISHED`), a checkpoint or export directory, or None
    (the demo checkpoint); a checkpoint is exported once per packing, here. ValueError for a name
    that is neither; an export directory holds one packing only (ValueError for the others)."""
    from .host.image import WeightImage
    from .reference.checkpoint import DEMO_CHECKPOINT
    if model in PUBLISHED:
        return SweepModel(name=model, cfg=PUBLISHED[model])
    directory = Path(model) if model is not None else DEMO_CHECKPOINT
    if not directory.is_dir():
        raise ValueError(f"model {model!r} is neither a published geometry ({', '.join(PUBLISHED)}) nor a "
                         "checkpoint directory")
    images, cfg = {}, None
    if (directory / "manifest.json").is_file():
        image = WeightImage.from_directory(directory)
        for packing in packings:
            if packing != image.packing:
                raise ValueError(f"{directory} is a {image.packing} weight image: sweep --packings "
                                 f"{image.packing} only, or give the checkpoint")
        files = {name: (directory / name).read_bytes() for name in ("manifest.json", "weights.bin")}
        images[image.packing] = (hashlib.sha256(image.blob).hexdigest(), files)
        cfg = image.cfg
    else:
        from .reference.checkpoint import load_checkpoint
        from .reference.export import integer_weights, write_image
        cfg, tensors = load_checkpoint(directory)
        weights = integer_weights(cfg, tensors)
        for packing in packings:
            with tempfile.TemporaryDirectory(prefix="mmfree-sweep-") as tmp:
                write_image(weights, Path(tmp) / "image", packing)
                image = WeightImage.from_directory(Path(tmp) / "image")
                files = {name: (Path(tmp) / "image" / name).read_bytes() for name in ("manifest.json", "weights.bin")}
            images[packing] = (hashlib.sha256(image.blob).hexdigest(), files)
    return SweepModel(name=str(model) if model is not None else "demo", cfg=cfg, images=images)


# -- points ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepSpec:
    """What to sweep. ``clocks_mhz``: design clocks, None for the board's default clock;
    ``simulator``, ``prompt`` (token ids, modulo the vocabulary) and ``steps``: for sim points."""

    kinds: tuple = ("model",)
    boards: tuple = ("ulx3s-85f",)
    lanes: tuple = (16,)
    packings: tuple = ("base3",)
    clocks_mhz: tuple = (None,)
    simulator: str = "verilator"
    prompt: tuple = DEFAULT_PROMPT
    steps: int = 2


@dataclass(frozen=True)
class Point:
    """One row: ``clock_mhz`` is the design clock (the board's default where none was asked)."""

    kind: str
    board: str
    lanes: int
    packing: str
    clock_mhz: float
    family: str = ""

    @property
    def label(self) -> str:
        return f"{self.board} {self.lanes}L {self.packing} {self.clock_mhz:g}MHz"


def _board(name: str):
    from .boards.registry import resolve_board
    return resolve_board(name)


def plan_points(spec: SweepSpec, model: SweepModel) -> list[Point]:
    """Every point of ``spec``, checked before anything runs: ValueError (a DesignError for lanes
    the geometry cannot take; the board registry's UserError for an unknown board) for a kind,
    board, lane count, packing, clock or simulator the sweep cannot run."""
    from .hw.engine import LANES_SUPPORTED, check_geometry
    from .boards.designs import FAMILY_LANES, TINY_FAMILIES
    for name, values in (("kinds", spec.kinds), ("boards", spec.boards), ("lanes", spec.lanes),
                         ("packings", spec.packings), ("clocks", spec.clocks_mhz)):
        if not values:
            raise ValueError(f"no {name} to sweep")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} repeats a value: {', '.join(map(str, values))}")
    for kind in spec.kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown point kind {kind!r}; use {', '.join(KINDS)}")
    for packing in spec.packings:
        if packing not in PACKINGS:
            raise ValueError(f"unknown packing {packing!r}; use {', '.join(PACKINGS)}")
    for clock in spec.clocks_mhz:
        if clock is not None and not (isinstance(clock, (int, float)) and math.isfinite(clock) and clock > 0):
            raise ValueError(f"clock {clock!r} MHz: must be a positive number")
    if "sim" in spec.kinds:
        if spec.simulator not in SIMULATORS:
            raise ValueError(f"unknown simulator {spec.simulator!r}; use {', '.join(SIMULATORS)}")
        if spec.steps < 1 or not spec.prompt:
            raise ValueError("sim points need a prompt of at least one token and at least one step")
        if not model.has_weights and spec.simulator != "verilator":
            raise ValueError(f"{model.name} is a geometry without weights: its sim points run synthetic weights, "
                             "which only Verilator's harness makes up; use --simulator verilator")
    if "build" in spec.kinds and not model.has_weights:
        raise ValueError(f"{model.name} is a geometry without weights: build points need a checkpoint "
                         "(--checkpoint DIR); model and sim points run without one")
    points = []
    for board_name in spec.boards:
        board = _board(board_name)
        if board.design != "engine":
            raise ValueError(f"board {board_name} builds the {board.design} design, not the engine: "
                             "a sweep needs an engine board (ulx3s-85f, icebreaker)")
        family = board.family or ""
        tiny = family in TINY_FAMILIES
        for lanes in spec.lanes:
            if tiny and lanes != FAMILY_LANES[family]:
                raise ValueError(f"board {board_name} runs the tiny engine, one lane: lanes {lanes} cannot run "
                                 f"there; sweep it apart with --lanes {FAMILY_LANES[family]}")
            if not tiny:
                if lanes not in LANES_SUPPORTED:
                    raise ValueError(f"board {board_name}: lanes {lanes} is not one of "
                                     f"{', '.join(map(str, LANES_SUPPORTED))}")
                check_geometry(model.cfg, lanes)
        if tiny and "2bit" in spec.packings:
            raise ValueError(f"board {board_name} runs the tiny engine, which decodes base3 images only")
        if tiny and "sim" in spec.kinds:
            raise ValueError(f"board {board_name}: sim points run the full engine's simulation; the tiny engine's "
                             "cycles come from model points (its instruction-set simulator)")
        for kind, lanes, packing, clock in itertools.product(spec.kinds, spec.lanes, spec.packings,
                                                             spec.clocks_mhz):
            mhz = clock if clock is not None else board.default_clock_hz / 1e6
            points.append(Point(kind=kind, board=board_name, lanes=lanes, packing=packing,
                                clock_mhz=float(mhz), family=family))
    return points


# -- measurements ----------------------------------------------------------------------------------

def measurement_fields(point: Point, spec: SweepSpec, model: SweepModel) -> dict:
    """The parameters a point's measurement depends on (so points sharing them share it)."""
    fields = {"kind": point.kind, "lanes": point.lanes, "packing": point.packing,
              "model": model.identity(point.packing)}
    if point.kind == "build":
        fields.update(board=point.board, clock_mhz=point.clock_mhz)
    elif point.kind == "sim":
        prompt = [t % model.cfg.V for t in spec.prompt]
        fields.update(simulator=spec.simulator, prompt=prompt, steps=spec.steps, synthetic=not model.has_weights)
    else:
        fields.update(family=point.family)
    return fields


def measurement_key(fields: dict) -> str:
    """The cache key: the measurement's fields, the package version and :data:`SWEEP_FORMAT`."""
    stamp = {"fields": fields, "version": package_version(), "format": SWEEP_FORMAT}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:24]


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_measurement(fields: dict, files: dict | None = None, geometry: dict | None = None) -> dict:
    """Run one measurement (on a worker). ``files``: the weight image's ``manifest.json`` and
    ``weights.bin`` (None for a model without weights: ``geometry`` then). Returns its result
    dict; a failure is ``{"error": one line}``, never an exception (so the sweep goes on)."""
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mmfree-sweep-point-") as tmp:
            image_dir = None
            if files is not None:
                image_dir = Path(tmp) / "image"
                image_dir.mkdir()
                for name, data in files.items():
                    (image_dir / name).write_bytes(data)
            cfg = ModelConfig(**geometry) if geometry is not None else None
            result = _MEASURE[fields["kind"]](fields, image_dir, cfg, Path(tmp))
    except Exception as e:          # a failed point is a row with its error (KeyboardInterrupt still stops)
        result = {"error": _one_line(e)}
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def _measure_model(fields, image_dir, cfg, tmp) -> dict:
    from .boards.designs import engine_perf_model
    from .host.image import WeightImage
    if image_dir is not None:
        cfg = WeightImage.from_directory(image_dir).cfg
    return {"cycles_per_token": float(engine_perf_model(fields["family"]).cycles_per_token(cfg, fields["lanes"]))}


def _measure_sim(fields, image_dir, cfg, tmp) -> dict:
    from .host.image import WeightImage
    from .sim.engine_sim import reference_tokens, run_engine
    blob = None
    if image_dir is not None:
        image = WeightImage.from_directory(image_dir)
        cfg, blob = image.cfg, image.blob
    run = run_engine(cfg=cfg, blob=blob, packing=fields["packing"], lanes=fields["lanes"], prompt=fields["prompt"],
                     steps=fields["steps"], simulator=fields["simulator"], synthetic=blob is None, progress=False)
    out = {"cycles_per_token": float(max(run.cycles)), "cycles_min": int(min(run.cycles)),
           "tokens": run.tokens, "matches_integer_model": None}
    if blob is not None:
        want, _ = reference_tokens(cfg, blob, fields["packing"], fields["prompt"], fields["steps"])
        out["matches_integer_model"] = want == run.tokens
    return out


def _measure_build(fields, image_dir, cfg, tmp) -> dict:
    from .boards.build import build
    from .boards.designs import design_factory
    r = build(fields["board"], out=tmp / "build", clock_mhz=fields["clock_mhz"], checkpoint=image_dir,
              packing=fields["packing"], design=design_factory("engine", lanes=fields["lanes"]), quiet=True)
    util = r["utilization"]

    def used(key):
        return util[key]["used"] if key in util else None
    return {"luts": used("lut") if "lut" in util else used("logic_cell"), "ffs": used("ff"), "bram": used("bram"),
            "dsp": used("dsp"), "fmax_mhz": r["fmax_mhz"], "timing_met": r["timing_met"],
            "build_clock_mhz": r["clock_mhz"], "build_cached": r["cached"], "utilization": util}


_MEASURE = {"model": _measure_model, "sim": _measure_sim, "build": _measure_build}


# -- the sweep ---------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """``rows``: one dict per point (keys :data:`COLUMNS`, plus ``label``); ``measurements``: how
    many distinct measurements the points need, ``cached`` of them found in the cache, ``run``
    submitted to the cluster, ``failed`` of those; ``cluster``: what ran them (None: nothing ran)."""

    rows: list
    measurements: int
    cached: int
    run: int
    failed: int
    cluster: str | None
    cache_dir: str
    model: str
    geometry: dict

    def as_dict(self) -> dict:
        return asdict(self)


def _cache_path(cache: Path, key: str) -> Path:
    return cache / "sweep" / f"{key}.json"


def _read_cache(cache: Path, key: str) -> dict | None:
    try:
        entry = json.loads(_cache_path(cache, key).read_text())
        return entry["result"] if isinstance(entry, dict) and isinstance(entry.get("result"), dict) else None
    except (OSError, ValueError):
        return None


def _write_cache(cache: Path, key: str, fields: dict, result: dict) -> None:
    path = _cache_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"fields": fields, "version": package_version(), "result": result}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _client(scheduler: str | None, workers: int | None, n_tasks: int):
    """(dask Client, its cluster or None, description). A LocalCluster of worker processes, one
    thread each (the measurements are processes and GIL-bound Python), unless ``scheduler``."""
    import logging

    from distributed import Client, LocalCluster
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ValueError(f"no Dask scheduler answers at {scheduler} ({_one_line(e)})") from None
        return client, None, f"the Dask scheduler at {scheduler}"
    n = workers or max(1, min(os.cpu_count() or 1, n_tasks))
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster, f"a LocalCluster of {n} worker process{'es' if n > 1 else ''}"


def run_sweep(spec: SweepSpec, model: SweepModel, *, cache_dir=None, scheduler: str | None = None,
              workers: int | None = None, use_cache: bool = True, on_progress=None) -> SweepResult:
    """Run the sweep: cached measurements are read, the others run as Dask tasks (a LocalCluster
    of ``workers`` processes, default one per core up to the number of tasks, or the cluster at
    ``scheduler``, e.g. ``tcp://host:8786``). ``on_progress(done, total, row_or_None)`` is called
    as measurements finish. Raises ValueError for a bad spec (:func:`plan_points`) before anything
    runs."""
    points = plan_points(spec, model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fields_of = {p: measurement_fields(p, spec, model) for p in points}
    keys = {p: measurement_key(f) for p, f in fields_of.items()}
    unique = {}
    for p in points:
        unique.setdefault(keys[p], fields_of[p])
    results, cached = {}, set()
    if use_cache:
        for key in unique:
            found = _read_cache(cache, key)
            if found is not None:
                results[key], _ = found, cached.add(key)
    todo = [k for k in unique if k not in results]
    total = len(unique)
    if on_progress:
        on_progress(len(results), total, None)
    cluster_text, failed = None, 0
    if todo:
        client, cluster, cluster_text = _client(scheduler, workers, len(todo))
        try:
            from distributed import as_completed
            # one future per image (a dict given to scatter would scatter its values under its keys)
            images = {packing: client.scatter([files], hash=False)[0]
                      for packing, (_sha, files) in model.images.items()
                      if any(unique[k]["kind"] != "model" and unique[k]["packing"] == packing for k in todo)}
            futures = {}
            for key in todo:
                f = unique[key]
                # model points need the geometry only; sim and build points the image, where there is one
                files = images.get(f["packing"]) if f["kind"] != "model" else None
                future = client.submit(run_measurement, f, files, None if files is not None else model.cfg.as_dict(),
                                       key=f"sweep-{f['kind']}-{key}", pure=False)
                futures[future] = key
            for future in as_completed(futures):
                key = futures[future]
                try:
                    result = future.result()
                except Exception as e:   # the worker died (KilledWorker), or the task could not run
                    result = {"error": _one_line(e)}
                results[key] = result
                if "error" in result:
                    failed += 1
                elif use_cache:
                    _write_cache(cache, key, unique[key], result)
                if on_progress:
                    on_progress(len(results), total, {"kind": unique[key]["kind"], **result})
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    rows = _rows(points, keys, results, cached, model)
    return SweepResult(rows=rows, measurements=total, cached=len(cached), run=len(todo), failed=failed,
                       cluster=cluster_text, cache_dir=str(cache), model=model.name, geometry=model.cfg.as_dict())


def _rows(points, keys, results, cached, model) -> list[dict]:
    from .boards.designs import engine_perf_model
    # measured cycles per (lanes, packing) for build rows: a sim point's, else the performance model's
    measured = {}
    for p in points:
        r = results[keys[p]]
        if p.kind == "sim" and "error" not in r:
            measured[(p.lanes, p.packing)] = r["cycles_per_token"]
    rows = []
    for p in points:
        r = results[keys[p]]
        row = dict.fromkeys(COLUMNS)
        row.update(kind=p.kind, board=p.board, lanes=p.lanes, packing=p.packing, clock_mhz=p.clock_mhz,
                   cached=keys[p] in cached, seconds=r.get("seconds"), error=r.get("error"), label=p.label)
        if "error" not in r:
            if p.kind == "build":
                row.update({k: r[k] for k in ("luts", "ffs", "bram", "dsp", "fmax_mhz", "timing_met")})
                if (p.lanes, p.packing) in measured:
                    row.update(cycles_per_token=measured[(p.lanes, p.packing)], cycles_source="sim")
                else:
                    row.update(cycles_per_token=float(engine_perf_model(p.family).cycles_per_token(model.cfg, p.lanes)),
                               cycles_source="model")
                if r["build_clock_mhz"]:
                    row["clock_mhz"] = r["build_clock_mhz"]     # the PLL's clock, not the one asked for
            else:
                row.update(cycles_per_token=r["cycles_per_token"], cycles_source=p.kind)
                if p.kind == "sim":
                    row["matches_integer_model"] = r.get("matches_integer_model")
            row["tokens_per_s"] = row["clock_mhz"] * 1e6 / row["cycles_per_token"]
            if row["fmax_mhz"]:
                row["tokens_per_s_at_fmax"] = row["fmax_mhz"] * 1e6 / row["cycles_per_token"]
        rows.append(row)
    return rows


# -- outputs -------------------------------------------------------------------------------------------

def pareto_front(items) -> list:
    """The items ``(cost, speed, payload)`` no other item beats: none with cost <= and speed >=,
    one of them strictly. Sorted by cost."""
    front = []
    for cost, speed, payload in sorted(items, key=lambda t: (t[0], -t[1])):
        if not front or speed > front[-1][1]:
            front.append((cost, speed, payload))
    return front


def plot_items(rows) -> tuple[list, str]:
    """(items for :func:`pareto_front`, the cost axis' name): build rows with LUTs against tokens/s
    (timing met only); without any, sim rows (else model rows) with their lanes as the cost."""
    builds = [(r["luts"], r["tokens_per_s"], r) for r in rows
              if r["kind"] == "build" and r["error"] is None and r["luts"] is not None and r["timing_met"]]
    if builds:
        return builds, "LUTs (build)"
    for kind in ("sim", "model"):
        items = [(r["lanes"], r["tokens_per_s"], r) for r in rows if r["kind"] == kind and r["error"] is None]
        if items:
            return items, f"lanes (no build points: LUTs unknown; {kind} cycles)"
    return [], "LUTs"


def _fmt(value, column=None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if column in ("cycles_per_token",) and value.is_integer():
            return f"{int(value):,}"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and column not in ("lanes",):
        return f"{value:,}"
    return str(value)


def markdown_table(rows) -> str:
    columns = [c for c in COLUMNS if any(r[c] is not None for r in rows) or c in ("kind", "board", "lanes")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [_fmt(r[c], c).replace("|", "/") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})
    return buf.getvalue()


def _plot(rows, path: Path, title: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items, axis = plot_items(rows)
    front = pareto_front(items)
    on_front = {id(p) for _, _, p in front}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    others = [(c, s) for c, s, p in items if id(p) not in on_front]
    if others:
        ax.scatter([s for _, s in others], [c for c, _ in others], color="0.6", label="points")
    if front:
        ax.plot([s for _, s, _ in front], [c for c, _, _ in front], "o-", color="C3", label="Pareto front")
        for cost, speed, p in front:
            ax.annotate(p["label"], (speed, cost), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if not items:
        ax.text(0.5, 0.5, "no successful points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("tokens/s (design clock / cycles per token)")
    ax.set_ylabel(axis)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.2, y=0.1)
    if items:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [p["label"] for _, _, p in front]


def write_outputs(result: SweepResult, out) -> dict:
    """``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``out``, all or nothing (written beside
    it, then moved in). Returns {"files": [...], "pareto": [labels of the front]}."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-sweep-", dir=out.parent))
    try:
        title = f"sweep of {result.model}: {plot_items(result.rows)[1]} against tokens/s"
        (tmp / "sweep.csv").write_text(_csv_text(result.rows))
        pareto = _plot(result.rows, tmp / "sweep.png", title)
        md = [f"# Sweep of {result.model}", "",
              f"Geometry {json.dumps(result.geometry)}; {result.measurements} measurements "
              f"({result.cached} cached, {result.run} run, {result.failed} failed).", "",
              "tokens_per_s = clock_mhz / cycles_per_token (the design clock; tokens_per_s_at_fmax uses the "
              "build's Fmax).", "", markdown_table(result.rows),
              "Pareto front (" + plot_items(result.rows)[1] + " against tokens/s): "
              + (", ".join(pareto) if pareto else "none") + "", "", "![plot](sweep.png)", ""]
        (tmp / "sweep.md").write_text("\n".join(md))
        out.mkdir(exist_ok=True)
        names = ("sweep.csv", "sweep.md", "sweep.png")
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": [str(out / n) for n in names], "pareto": pareto}
