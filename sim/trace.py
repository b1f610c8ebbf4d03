"""The engine's ``trace`` port decoded into the vectors the integer model computes.

The engine's writer reports every result it stores as ``(job, layer, row, value)``
(:attr:`mmfree_fpga.sim.engine_sim.EngineRun.trace`); :func:`hardware_trace` arranges those
stores as a trace of :data:`~mmfree_fpga.reference.compare.HARDWARE_VECTORS` and the logits, the
form :func:`~mmfree_fpga.reference.compare.compare_traces` takes.
"""

from __future__ import annotations

import numpy as np

from mmfree_fpga.hw.engine import JOBS
from mmfree_fpga.reference.compare import HARDWARE_VECTORS

__all__ = ["hardware_trace", "HARDWARE_VECTORS"]


def hardware_trace(records: list[list[tuple]], cfg) -> list[dict]:
    """The engine's ``trace`` beats (per step: ``(job, layer, row, value)``, as
    :attr:`mmfree_fpga.sim.engine_sim.EngineRun.trace` holds them) -> a trace of
    :data:`HARDWARE_VECTORS` and the logits. A row stored twice or never is marked with a
    value no integer vector can hold, so it shows as a mismatch of that vector; a store that
    belongs to no vector (a job, layer or row out of range) is counted in ``"unexpected"``."""
    missing = np.iinfo(np.int64).min
    d, inter = cfg.d, cfg.I
    # job -> [(vector, first row, length)]
    stored = {"f_proj": [("forget", 0, d)], "i_proj": [("h", 0, d)], "g_proj": [("o_in", 0, d)],
              "o_proj": [("x_attn", 0, d)], "gate_proj": [("gate", 0, inter), ("down_in", inter, inter)],
              "down_proj": [("x", 0, d)]}
    out = []
    for beats in records:
        layers = [{v: np.full(n, missing, dtype=np.int64) for job in stored for v, _, n in stored[job]}
                  for _ in range(cfg.L)]
        logits = np.full(cfg.V, missing, dtype=np.int64)
        seen = set()
        bad = set()
        unexpected = 0
        for jt, layer, row, value in beats:
            job = JOBS[jt] if jt < len(JOBS) else None
            if job == "lm_head":
                target, idx, key = logits, row, ("lm_head", 0, "logits")
            elif job in stored and layer < cfg.L:
                hit = [(v, row - first) for v, first, n in stored[job] if first <= row < first + n]
                if not hit:
                    unexpected += 1
                    continue
                vec, idx = hit[0]
                target, key = layers[layer][vec], (job, layer, vec)
            else:
                unexpected += 1
                continue
            if idx >= len(target):
                unexpected += 1
                continue
            if (key, idx) in seen:
                bad.add((key, idx))
            seen.add((key, idx))
            target[idx] = value
        for (job, layer, vec), idx in bad:
            (logits if job == "lm_head" else layers[layer][vec])[idx] = missing
        out.append({"layers": layers, "logits": logits, "unexpected": unexpected})
    return out
