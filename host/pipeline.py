"""Layer-pipelined runs over several devices: one token through a chain of layer slices.

A model split over N devices (protocol 1.2's slice ops, ``mmfree_fpga/protocol.py``): device 0
holds the embedding and the first layers, each next device the layers after its predecessor's,
the last the final layers and the head (final norm + lm_head). :class:`Pipeline` drives them
through one synchronous :class:`~mmfree_fpga.host.driver.Driver` per device:

* :meth:`Pipeline.prepare` connects every device and reads its slice (SLICE_INFO). If the slices
  chain (:func:`~mmfree_fpga.image_slice.chain_error`) and each device holds this model's slice
  image, nothing is loaded; if they chain but some hold other weights, those are loaded with the
  same split; otherwise the planner (:func:`mmfree_fpga.planner.plan`, the devices' announced
  capacity as their memory, compute cycles of the performance model at their lanes) chooses
  the split and every device that does not hold its slice image gets it (the uploads run in
  parallel, one thread each).
* :meth:`Pipeline.run` streams the prompts. A token of a sequence goes to device 0 (FEED_SLOT
  with the token), the host reads the residual it leaves (READ_OUTPUT) and writes it into
  device 1 (WRITE_RESIDUAL, FEED_SLOT), and so on; the last device answers the greedy token (and,
  when sampling, its logits are read). Each device has one worker thread and a FIFO of jobs, so
  with several sequences in flight (one state slot each, as many as the devices' fewest slots)
  device k works on one sequence while device k + 1 works on another. A sequence's prompt
  tokens enter device 0 without waiting; each generated token enters once the last device
  has produced it. Per device, jobs keep their order, so each slot's feeds reach every device
  in position order. When a sequence ends its slot goes to the next prompt.
* A device that stops answering (or fails otherwise) ends the run: the other workers stop
  after their current exchange and :class:`PipelineError` names the device (index, URL and
  slice), within the driver's bounds (MAX_SILENT_RETRIES timeouts without a byte). No token is
  produced after a device failed. A device that lost its state (a reset: POSITION_MISMATCH, or
  NO_WEIGHTS with arg 0) is recovered as the single-device driver does it: its slice reloaded
  if gone, every slot in use replayed from the inputs the host kept (tokens, residuals), each
  replayed step checked against the output it gave before (the greedy token, or the residual's
  digest).

Cycles: every feed's ``cycles`` (the engines' counters; the device model reports its
performance model's figures with ``cycle_model``) is recorded with the order in which the
devices ran the feeds. :func:`schedule_cycles` replays that order on N devices that each run
their feeds in turn, each as soon as its input exists (the previous device's feed of the same
token, or, for a generated token, the last device's previous one) and returns the makespan:
the run's length in device cycles with the host's relay counted as free.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import UserError
from mmfree_fpga.generation import Sampler
from mmfree_fpga.image_slice import Slice, chain_error
from mmfree_fpga.protocol import MAX_RECOVERIES, WIRE_LOGIT_FRAC, Error, SliceInfo, formats_id

from .driver import DeviceNak, Driver, DriverError, FeedResult, RecoveryError
from .image import WeightImage

__all__ = ["Pipeline", "PipelineError", "PipelineResult", "StageInfo", "plan_slices", "schedule_cycles"]


class PipelineError(DriverError):
    """A device of a multi-device run failed; the message names it (index, URL, slice)."""


@dataclass
class StageInfo:
    """One device of the pipeline: its driver, its slice and slice image, what it did."""

    index: int
    url: str
    driver: Driver
    info: SliceInfo
    slice: Slice | None = None
    image: WeightImage | None = None
    loaded: bool = False
    cycles: list = field(default_factory=list)       # of every feed, in the order run
    # per slot in use: [(input: token or residual, output digest: greedy token or residual digest)]
    history: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        where = self.slice.text() if self.slice is not None else "no slice yet"
        return f"device {self.index} ({self.url}, {where})"

    def as_dict(self) -> dict:
        return {"url": self.url, **(self.slice.as_dict() if self.slice else {}),
                "slice": self.slice.text() if self.slice else None,
                "image_bytes": self.image.size if self.image else None,
                "image_crc32": f"{self.image.crc32:08x}" if self.image else None,
                "loaded_weights": self.loaded, "slots": self.info.slots, "capacity": self.info.capacity,
                "feeds": len(self.cycles), "cycles": int(sum(self.cycles)), "link": self.driver.stats.as_dict()}


@dataclass
class PipelineResult:
    tokens: list                 # per prompt: prompt + generated
    generated: int               # tokens generated, all prompts
    feeds: int                   # tokens through the whole chain (prompt positions included)
    seconds: float
    makespan_cycles: int         # schedule_cycles of the run (0 if the devices count no cycles)
    device_cycles: list          # per device: the sum of its feeds' cycles
    in_flight: int               # sequences in flight at most

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_mcycle(self) -> float:
        """Tokens through the chain per million device cycles of the schedule (0 if not counted)."""
        return self.feeds / self.makespan_cycles * 1e6 if self.makespan_cycles else 0.0


def plan_slices(cfg: ModelConfig, packing: str, infos: list[SliceInfo], lanes: int, model: str = ""):
    """(slices, plan): the planner's split of ``cfg`` over devices with these SLICE_INFOs (their
    fewest capacity bytes as every device's memory, the state on chip, compute-bound stages at
    ``lanes``). UserError when it does not fit or there are more devices than the model can use."""
    from mmfree_fpga.planner import DeviceSpec, plan
    capacity = min(i.capacity for i in infos)
    spec = DeviceSpec(board="device", memory="announced", weight_bytes=capacity, state_bytes=1 << 62, shared=False,
                      clock_hz=1e8, peak_bytes_per_cycle=None,
                      memory_text=f"{capacity:,} B of weights (the fewest any device announces)",
                      capacity_text=f"{capacity:,} B")
    try:
        p = plan(cfg, packing, spec, len(infos), lanes=lanes, model=model)
    except ValueError as e:
        raise UserError(f"cannot split {model or 'the model'} over {len(infos)} devices: {e}") from None
    except Exception as e:     # the engine's geometry check (DesignError) for a lane count it cannot take
        if type(e).__name__ != "DesignError":
            raise
        raise UserError(f"cannot plan {model or 'the model'} at {lanes} lanes: {e}") from None
    slices = [Slice(s.first_layer, s.first_layer + s.layers, s.embedding, s.lm_head) for s in p.stages]
    return slices, p


def schedule_cycles(records, devices: int, prompt_lengths: list[int]) -> int:
    """The makespan, in device cycles, of feeds ``records`` = (order, device, sequence, position,
    cycles) on ``devices`` devices (module docstring): each device runs its feeds in ``order``,
    each once its input exists."""
    finish: dict = {}
    free = [0] * devices
    for _, k, seq, pos, cycles in sorted(records):
        if k > 0:
            ready = finish[(k - 1, seq, pos)]
        elif pos >= prompt_lengths[seq]:
            ready = finish[(devices - 1, seq, pos - 1)]
        else:
            ready = 0
        free[k] = finish[(k, seq, pos)] = max(free[k], ready) + cycles
    return max(free, default=0)


@dataclass
class _Job:
    seq: int
    slot: int
    position: int
    token: int
    x: np.ndarray | None = None       # the residual from the device before


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.int64).tobytes()).hexdigest()


class Pipeline:
    """A model run over ``urls``, one device each (module docstring). ``checkpoint``'s geometry
    ``cfg``; ``log`` gets one line per notable event."""

    def __init__(self, urls: list[str], cfg: ModelConfig, checkpoint=None, *, baudrate: int = 115200,
                 timeout: float | None = None, log: Callable[[str], None] | None = None):
        if not urls:
            raise ValueError("a pipeline needs at least one device")
        self.urls, self.cfg, self.checkpoint = list(urls), cfg, checkpoint
        self.log = log or (lambda message: None)
        self.stages: list[StageInfo] = []
        self.planned = None
        self._images: dict[str, WeightImage] = {}
        self._drivers = []
        try:
            for url in self.urls:
                self._drivers.append(Driver.open(url, baudrate=baudrate, timeout=timeout, log=self._device_log(url)))
        except BaseException:
            self.close()
            raise

    def _device_log(self, url):
        return lambda message: self.log(f"{url}: {message}")

    def close(self) -> None:
        for d in self._drivers:
            d.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def whole_image(self, packing: str, fmt: Formats = FORMATS) -> WeightImage:
        key = (packing, formats_id(fmt))
        if key not in self._images:
            self._images[key] = WeightImage.from_checkpoint(self.checkpoint, packing, fmt)
        return self._images[key]

    # -- the split and the weights -----------------------------------------------------------
    def prepare(self, *, force: bool = False, allow_load: bool = True, verify: bool = False,
                progress: Callable[[int, int], None] | None = None, lanes: int | None = None,
                model: str = "") -> bool:
        """Connect, settle the split, load what is missing (module docstring). True if the split
        was planned here (``force``, or the devices' slices did not chain), False if it is the one
        the devices held. ``lanes``: the planner's engine lanes (default: the devices' fewest
        announced, else 16)."""
        stages = []
        for i, (url, d) in enumerate(zip(self.urls, self._drivers)):
            try:
                d.connect(self.cfg, what=model or "the model")
                info = d.require_slices()
            except DriverError as e:
                raise type(e)(f"device {i}: {e}" if url in str(e) else f"device {i} ({url}): {e}") from None
            stages.append(StageInfo(index=i, url=url, driver=d, info=info))
        self.stages = stages
        held = [s.driver.held_slice() for s in stages]
        chained = all(h is not None for h in held) and chain_error(held, self.cfg) is None
        planned = force or not chained
        if planned:
            if not allow_load:
                why = chain_error(held, self.cfg) if all(h is not None for h in held) else \
                    f"device {held.index(None)} ({self.urls[held.index(None)]}) holds no weights"
                raise DriverError(f"the devices do not hold this model as a chain of slices ({why}); leave out "
                                  "--no-load to plan the split and load them")
            known = [s.driver.info.lanes for s in stages if s.driver.info.lanes]
            slices, self.planned = plan_slices(self.cfg, stages[0].driver.packing, [s.info for s in stages],
                                               lanes or (min(known) if known else 16), model)
        else:
            slices = held
        for s, sl in zip(stages, slices):
            s.slice = sl
            s.image = self.whole_image(s.driver.packing, s.driver.formats).cut(sl)
        todo = [s for s in stages if force or not s.driver.holds(s.image)]
        if todo and not allow_load:
            s = todo[0]
            raise DriverError(f"{s.name} holds other weights than this model's slice; leave out --no-load "
                              "to load it")
        total = sum(s.image.size for s in todo)
        done = [0] * len(stages)
        lock = threading.Lock()

        def load(s: StageInfo):
            def step(offset, size):
                with lock:
                    done[s.index] = offset
                    if progress is not None:
                        progress(sum(done), total)
            try:
                s.driver.load_weights(s.image, step, resume=not force)
            except DriverError as e:
                raise type(e)(f"{s.name}: {e}") from None
            s.loaded = True

        if todo:
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                for f in [pool.submit(load, s) for s in todo]:
                    f.result()
        for s in stages:
            if not s.loaded:
                s.driver.image = s.image
            if verify:
                try:
                    s.driver.verify_weights(s.image)
                except DriverError as e:
                    raise type(e)(f"{s.name}: {e}") from None
        return planned

    def split_text(self) -> list[str]:
        """One line per device: its slice and image."""
        return [f"device {s.index} {s.url}: {s.slice.text()} ({s.image.size:,} B, CRC-32 {s.image.crc32:08x}"
                f"{', loaded' if s.loaded else ', already held'})" for s in self.stages]

    # -- running ----------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], steps: int, sampler: Callable[[], Sampler] | None = None,
            on_token: Callable[[int, int], None] | None = None, in_flight: int | None = None,
            deadline_s: float | None = None) -> PipelineResult:
        """Generate ``steps`` tokens after each prompt; ``sampler()`` makes each prompt's sampler
        (default greedy), ``on_token(prompt index, token)`` sees each as it arrives. At most
        ``in_flight`` sequences at once (default: as many as the devices' fewest state slots
        allow, at most the prompts). ``deadline_s``: PipelineError if the run takes longer."""
        if not self.stages:
            raise ValueError("prepare() first")
        if steps < 0:
            raise UserError("--steps must be >= 0")
        if not prompts or any(not p for p in prompts):
            raise UserError("every prompt needs at least one token")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.cfg.V]
            if bad:
                raise UserError(f"prompt id {bad[0]} is outside the vocabulary [0, {self.cfg.V})")
        make = sampler or Sampler
        samplers = [make() for _ in prompts]
        greedy = all(s.greedy for s in samplers)
        slots = min(s.info.slots for s in self.stages)
        flight = min(slots, len(prompts), in_flight or slots)
        n = len(self.stages)
        queues = [queue.Queue() for _ in range(n)]
        results: queue.Queue = queue.Queue()
        stop = threading.Event()
        order = itertools.count()
        records: list = []
        for s in self.stages:
            s.history = {}
            s.cycles = []

        def work(k: int) -> None:
            stage = self.stages[k]
            while not stop.is_set():
                try:
                    job = queues[k].get(timeout=0.05)
                except queue.Empty:
                    continue
                try:
                    started = next(order)
                    result, out = self._execute(stage, job, need_logits=not greedy)
                except BaseException as e:      # noqa: BLE001 - reported to the main thread
                    results.put(("error", k, e))
                    stop.set()
                    return
                stage.cycles.append(result.cycles)
                records.append((started, k, job.seq, job.position, result.cycles))
                if k + 1 < n:
                    queues[k + 1].put(_Job(job.seq, job.slot, job.position, job.token, out))
                else:
                    results.put(("done", job, (result, out)))

        threads = [threading.Thread(target=work, args=(k,), name=f"mmfree-pipeline-{k}", daemon=True)
                   for k in range(n)]
        tokens = [list(p) for p in prompts]
        generated = [0] * len(prompts)
        waiting = deque(range(len(prompts)))
        free_slots = deque(range(flight))
        active = 0
        t0 = time.perf_counter()

        def start_some():
            nonlocal active
            started = []
            while waiting and free_slots:
                started.append((waiting.popleft(), free_slots.popleft()))
            active += len(started)
            longest = max((len(prompts[i]) for i, _ in started), default=0)
            for pos in range(longest):      # interleaved, so the first tokens of every prompt go first
                for i, slot in started:
                    if pos < len(prompts[i]):
                        queues[0].put(_Job(i, slot, pos, prompts[i][pos]))

        for t in threads:
            t.start()
        try:
            start_some()
            while active:
                if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                    raise PipelineError(f"the run took longer than {deadline_s:g} s")
                try:
                    kind, a, b = results.get(timeout=0.05)
                except queue.Empty:
                    continue
                if kind == "error":
                    raise self._failure(a, b)
                job, (result, logits) = a, b
                i = job.seq
                if job.position + 1 < len(prompts[i]):
                    continue
                done = steps == 0
                if not done:
                    if samplers[i].greedy:
                        token = result.token
                    else:
                        token = samplers[i](logits.astype(np.float64) / (1 << WIRE_LOGIT_FRAC))
                    tokens[i].append(token)
                    generated[i] += 1
                    if on_token is not None:
                        on_token(i, token)
                    done = generated[i] == steps
                    if not done:
                        queues[0].put(_Job(i, job.slot, job.position + 1, token))
                if done:
                    active -= 1
                    free_slots.append(job.slot)
                    start_some()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        seconds = time.perf_counter() - t0
        cycles = [int(sum(s.cycles)) for s in self.stages]
        makespan = schedule_cycles(records, n, [len(p) for p in prompts]) if all(cycles) else 0
        return PipelineResult(tokens=tokens, generated=sum(generated), feeds=len(self.stages[-1].cycles),
                              seconds=seconds, makespan_cycles=makespan, device_cycles=cycles, in_flight=flight)

    def _failure(self, k: int, error: BaseException) -> Exception:
        stage = self.stages[k]
        if isinstance(error, UserError):
            return PipelineError(f"{stage.name} failed: {error}")
        return error

    def _execute(self, stage: StageInfo, job: _Job, need_logits: bool) -> tuple[FeedResult, np.ndarray | None]:
        """One feed of ``job`` on ``stage``'s device (its residual in, its output out); recovers
        a device that lost its state and retries."""
        d, sl = stage.driver, stage.slice
        for _ in range(MAX_RECOVERIES + 1):
            try:
                if job.position == 0:
                    d.reset_slot(job.slot)
                    stage.history[job.slot] = []
                result, out, digest = self._feed(stage, job.slot, job.position,
                                                 job.token if sl.embedding else job.x, need_logits)
            except DeviceNak as e:
                if not (e.error == Error.POSITION_MISMATCH or (e.error == Error.NO_WEIGHTS and e.arg == 0)):
                    raise
                self._recover(stage, e)
                continue
            stage.history.setdefault(job.slot, []).append((job.token if sl.embedding else job.x, digest))
            return result, out
        raise RecoveryError(f"the device at {d.name} keeps losing its state")

    def _feed(self, stage: StageInfo, slot: int, position: int, given, need_logits: bool):
        """(FeedResult, output or None, digest) of one feed of ``given`` (a token or a residual)."""
        d, sl = stage.driver, stage.slice
        if sl.embedding:
            result = d.feed_slot(slot, position, int(given))
        else:
            d.write_residual(slot, position, given)
            result = d.feed_slot(slot, position, 0)
        if not sl.head:
            out = d.read_output(slot, position + 1, self.cfg.d, logits=False)
            return result, out, _digest(out)
        out = d.read_output(slot, position + 1, self.cfg.V, logits=True) if need_logits else None
        return result, out, result.token

    def _recover(self, stage: StageInfo, cause: DeviceNak) -> None:
        """Bring a device that lost its state back to every slot's history (module docstring)."""
        d = stage.driver
        d.stats.recoveries += 1
        positions = sum(len(h) for h in stage.history.values())
        self.log(f"{stage.name} lost its state ({cause}); recovering {positions} positions in "
                 f"{len(stage.history)} slots")
        d.identify()
        if not d.holds(stage.image):
            self.log(f"{stage.name}: reloading its slice")
            d.load_weights(stage.image)
        for slot, history in stage.history.items():
            d.reset_slot(slot)
            for position, (given, digest) in enumerate(history):
                _, _, again = self._feed(stage, slot, position, given, False)
                if again != digest:
                    raise RecoveryError(f"after recovery {stage.name} gives another output at position "
                                        f"{position + 1} of slot {slot}: its state cannot be restored exactly")
                d.stats.replayed_tokens += 1
