"""Where do the float model, the integer model and the hardware differ? Per token, layer and op.

Traces are lists (one entry per token fed) of ``{"layers": [ {op: vector} per layer ],
"logits": vector}``. Integer and hardware traces hold the raw integers (Q``x_frac``, gates
Q``gate_frac`` of the number formats); float traces hold floats. Hardware is compared with the
integer model exactly, the float model with the integer model by magnitude. The logits of the
float32 and float64 models and the integer model give the three-way fidelity figures
(:func:`~mmfree_fpga.reference.agreement.three_way`).

The hardware trace (:func:`hardware_trace`) holds what the engine's writer stores, captured
from the simulation through the engine's ``trace`` port: per layer ``forget`` (f after the
lower bound, written by the f_proj job), ``h`` (i_proj job), ``o_in`` (p, g_proj job),
``x_attn`` (x after the token mixer, o_proj job), ``gate`` and ``down_in`` (the GLU gate and
v, gate_proj job), ``x`` (down_proj job), and the logits (lm_head). The raw BitLinear outputs
``i_proj``, ``f_proj``, ``g_proj``, ``o_proj``, ``gate_proj`` (its up half) and ``down_proj``
are never stored by the engine (they go straight from the output scale into the elementwise
unit), so they have no hardware counterpart; each stored vector is the first place an error
in its job shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmfree_fpga.config import FORMATS, LAYER_BITLINEARS, Formats
from mmfree_fpga.progress import track

from .integer import IntegerModel, IntegerWeights
from .model import HGRNBitForCausalLM

__all__ = ["OPS", "OP_JOB", "HARDWARE_VECTORS", "op_fracs", "float_trace", "float64_logits", "integer_trace",
           "compare_traces", "write_report"]

# vectors every float and integer trace has, in the order the engine produces them; value: the
# integer format's fractional bits
OPS = {"f_proj": FORMATS.x_frac, "forget": FORMATS.gate_frac, "i_proj": FORMATS.x_frac, "h": FORMATS.x_frac,
       "g_proj": FORMATS.x_frac, "o_in": FORMATS.x_frac, "o_proj": FORMATS.x_frac, "x_attn": FORMATS.x_frac,
       "gate_proj": FORMATS.x_frac, "gate": FORMATS.x_frac, "down_in": FORMATS.x_frac,
       "down_proj": FORMATS.x_frac, "x": FORMATS.x_frac}
# the engine job (BitLinear) whose output path produces each vector
OP_JOB = {"f_proj": "f_proj", "forget": "f_proj", "i_proj": "i_proj", "h": "i_proj", "g_proj": "g_proj",
          "o_in": "g_proj", "o_proj": "o_proj", "x_attn": "o_proj", "gate_proj": "gate_proj",
          "gate": "gate_proj", "down_in": "gate_proj", "down_proj": "down_proj", "x": "down_proj"}
# what the engine's writer stores (see hardware_trace), in store order; plus the logits
HARDWARE_VECTORS = ("forget", "h", "o_in", "x_attn", "gate", "down_in", "x")


def op_fracs(fmt: Formats = FORMATS) -> dict[str, int]:
    """:data:`OPS` for the number formats ``fmt``: each vector's fractional bits."""
    return {op: fmt.gate_frac if op == "forget" else fmt.x_frac for op in OPS}


@torch.no_grad()
def float64_logits(model: HGRNBitForCausalLM, ids: list[int]) -> np.ndarray:
    """The logits [positions, V] of ``model`` run in float64 (on a float64 copy; ``model`` is left as
    it is) over ``ids`` from the zero state."""
    import copy
    m64 = copy.deepcopy(model).double()
    return m64(torch.tensor([ids]))[0][0].numpy()


@torch.no_grad()
def float_trace(model: HGRNBitForCausalLM, ids: list[int]) -> list[dict]:
    """The float model's vectors of :data:`OPS` per token. ``o_in`` is g_proj * silu(h) before
    the float model's g_norm (the integer model folds that RMSNorm into o_proj's own
    normalisation, so this is the vector it computes)."""
    import torch.nn.functional as F
    captured: dict = {}
    hooks = []
    lbs = model.lower_bounds().double().numpy()
    n_inter = model.config.I
    for l, layer in enumerate(model.model.layers):
        for name in LAYER_BITLINEARS:
            module, op = name.split(".")
            hooks.append(getattr(getattr(layer, module), op).register_forward_hook(
                lambda m, i, o, l=l, op=op: captured.__setitem__((l, op), o[0, -1].double().numpy())))
        hooks.append(layer.attn.register_forward_hook(
            lambda m, i, o, l=l: captured.__setitem__((l, "h"), o[1][0].double().numpy())))
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, l=l: captured.__setitem__((l, "x"), o[0][0, -1].double().numpy())))
        hooks.append(layer.mlp_norm.register_forward_hook(
            lambda m, i, o, l=l: captured.__setitem__((l, "x_attn"), i[0][0, -1].double().numpy())))

    def derived(l):
        c = captured
        f = torch.sigmoid(torch.from_numpy(c[(l, "f_proj")])).numpy()
        c[(l, "forget")] = lbs[l] + (1 - lbs[l]) * f
        c[(l, "o_in")] = c[(l, "g_proj")] * F.silu(torch.from_numpy(c[(l, "h")])).numpy()
        gu = c[(l, "gate_proj")]
        c[(l, "gate")] = gu[:n_inter]
        c[(l, "down_in")] = F.silu(torch.from_numpy(gu[:n_inter])).numpy() * gu[n_inter:]
    try:
        state = model.init_state()
        out = []
        for tok in track(ids, "float model", unit="token"):
            captured.clear()
            logits, state = model.step(tok, state)
            for l in range(model.config.L):
                derived(l)
            out.append({"layers": [{op: captured[(l, op)] for op in OPS} for l in range(model.config.L)],
                        "logits": logits.double().numpy()})
        return out
    finally:
        for h in hooks:
            h.remove()


def integer_trace(weights: IntegerWeights, ids: list[int]) -> list[dict]:
    model = IntegerModel(weights)
    out = []
    for tok in track(ids, "integer model", unit="token"):
        layers: list = []
        logits = model.step(tok, trace=layers)
        out.append({"layers": [{op: t[op] for op in OPS} for t in layers], "logits": logits})
    return out


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare_traces(ids: list[int], flt: list[dict], itg: list[dict], hw: list[dict] | None = None,
                   fmt: Formats = FORMATS, float64: np.ndarray | None = None) -> dict:
    """The report: per token (top-1 of each model, logit cosine integer vs float), per layer and
    vector (float vs integer error; hardware vs integer mismatches), the first hardware mismatch,
    and with ``float64`` (the float64 model's logits, [positions, V]) the three-way ``fidelity``
    figures. ``fmt``: the integer (and hardware) traces' number formats."""
    from .agreement import three_way
    n_layers = len(itg[0]["layers"])
    fracs = op_fracs(fmt)
    per_token = []
    for t in range(len(ids)):
        lf, li = flt[t]["logits"], itg[t]["logits"] / 2 ** fmt.x_frac
        row = {"token": int(ids[t]), "float_top1": int(np.argmax(lf)), "integer_top1": int(np.argmax(li)),
               "logit_cosine": _cos(lf, li)}
        if hw is not None:
            row["hardware_top1"] = int(np.argmax(hw[t]["logits"]))
            row["hardware_logits_exact"] = bool(np.array_equal(hw[t]["logits"], itg[t]["logits"]))
        per_token.append(row)
    per_layer = []
    errors = {}
    hw_ops = [op for op in OPS if hw is not None and op in hw[0]["layers"][0]]
    for l in range(n_layers):
        for op, frac in fracs.items():
            rel, quant_err = [], []
            for t in range(len(ids)):
                f = flt[t]["layers"][l][op]
                i = itg[t]["layers"][l][op] / 2 ** frac
                rel.append(np.linalg.norm(f - i) / (np.linalg.norm(f) + 1e-30))
                quant_err.append((i - f) / (np.abs(f).max() + 1e-30))
            errors[(l, op)] = np.concatenate(quant_err)
            entry = {"layer": l, "op": op, "job": OP_JOB[op], "float_vs_integer_rel_l2": float(np.mean(rel)),
                     "float_vs_integer_rel_l2_max": float(np.max(rel))}
            if hw is not None:
                entry["hardware_compared"] = op in hw_ops
                bad = [t for t in range(len(ids))
                       if op in hw_ops and not np.array_equal(hw[t]["layers"][l][op], itg[t]["layers"][l][op])]
                entry["hardware_mismatched_tokens"] = len(bad) if op in hw_ops else None
                entry["hardware_mismatched_elements"] = (
                    int(sum(np.count_nonzero(hw[t]["layers"][l][op] != itg[t]["layers"][l][op]) for t in bad))
                    if op in hw_ops else None)
                entry["hardware_first_mismatch_token"] = bad[0] if bad else None
            per_layer.append(entry)
    top1 = float(np.mean([r["float_top1"] == r["integer_top1"] for r in per_token]))
    report = {"positions": len(ids), "top1_agreement": top1,
              "mean_logit_cosine": float(np.mean([r["logit_cosine"] for r in per_token])),
              "per_token": per_token, "per_layer": per_layer}
    if float64 is not None:
        report["fidelity"] = three_way(np.stack([t["logits"] / 2 ** fmt.x_frac for t in itg]),
                                       np.stack([t["logits"] for t in flt]), float64)
    if hw is not None:
        first = None
        for t in range(len(ids)):
            for l in range(n_layers):
                for op in hw_ops:
                    if first is None and not np.array_equal(hw[t]["layers"][l][op], itg[t]["layers"][l][op]):
                        rows = np.flatnonzero(hw[t]["layers"][l][op] != itg[t]["layers"][l][op])
                        first = {"token_index": t, "layer": l, "op": OP_JOB[op], "vector": op,
                                 "elements": [int(r) for r in rows[:8]]}
            if first is None and not np.array_equal(hw[t]["logits"], itg[t]["logits"]):
                rows = np.flatnonzero(hw[t]["logits"] != itg[t]["logits"])
                first = {"token_index": t, "layer": None, "op": "lm_head", "vector": "logits",
                         "elements": [int(r) for r in rows[:8]]}
        report["hardware_unexpected_stores"] = int(sum(h.get("unexpected", 0) for h in hw))
        report["hardware_exact"] = (first is None and all(r["hardware_logits_exact"] for r in per_token)
                                    and report["hardware_unexpected_stores"] == 0)
        report["hardware_first_mismatch"] = first
        report["hardware_vectors"] = hw_ops + ["logits"]
        report["hardware_top1_agreement_with_integer"] = float(
            np.mean([r["hardware_top1"] == r["integer_top1"] for r in per_token]))
    report["verdict"] = _verdict(report)
    report["_errors"] = errors
    return report


def _verdict(r: dict) -> str:
    parts = []
    if "hardware_exact" in r:
        if r["hardware_exact"]:
            parts.append("hardware equals the integer model bit for bit")
        else:
            f = r["hardware_first_mismatch"]
            if f is None:
                where = f"{r['hardware_unexpected_stores']} stores outside every vector"
            elif f["layer"] is None:
                where = f"the logits (lm_head), token {f['token_index']}"
            else:
                where = f"layer {f['layer']} {f['op']} (stored vector {f['vector']}), token {f['token_index']}"
            parts.append(f"HARDWARE DIFFERS from the integer model, first at {where}")
    parts.append(f"integer vs float: top-1 agreement {r['top1_agreement']:.4f}, mean logit cosine "
                 f"{r['mean_logit_cosine']:.5f} over {r['positions']} positions")
    if "fidelity" in r:
        a, b = r["fidelity"]["integer_vs_float64"], r["fidelity"]["float32_vs_float64"]
        parts.append(f"mean logit cosine to float64: integer {a['mean_logit_cosine']:.5f}, "
                     f"float32 {b['mean_logit_cosine']:.5f}")
    return "; ".join(parts)


def write_report(report: dict, out_dir) -> list[str]:
    """report.json, report.md and PNG plots into out_dir; returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = report.pop("_errors")
    files = []
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([r["logit_cosine"] for r in report["per_token"]])
    ax.set_xlabel("token position")
    ax.set_ylabel("logit cosine (integer vs float)")
    fig.tight_layout()
    fig.savefig(out / "cosine_per_token.png", dpi=100)
    plt.close(fig)
    files.append("cosine_per_token.png")

    labels = [f"L{e['layer']} {e['op']}" for e in report["per_layer"]]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.4), 3.5))
    ax.bar(range(len(labels)), [e["float_vs_integer_rel_l2"] for e in report["per_layer"]])
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("relative L2 error, integer vs float")
    fig.tight_layout()
    fig.savefig(out / "error_per_op.png", dpi=100)
    plt.close(fig)
    files.append("error_per_op.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (l, op), e in errors.items():
        if op in ("i_proj", "down_proj"):
            ax.hist(e, bins=80, histtype="step", label=f"L{l} {op}")
    ax.set_xlabel("(integer - float) / max|float|, per element")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quantisation_error.png", dpi=100)
    plt.close(fig)
    files.append("quantisation_error.png")

    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    files.append("report.json")
    has_hw = "hardware_exact" in report
    md = ["# mmfree-fpga compare", "", f"**Verdict:** {report['verdict']}", ""]
    if report.get("hardware_source"):
        md += [f"Hardware: {report['hardware_source']}.", ""]
    if report.get("simulation"):
        sim = report["simulation"]
        md += [f"Simulation: {sim['simulator']}, {max(sim['cycles_per_token']):,} cycles per token at most, "
               f"{sim['sim_seconds']} s; the engine's returned argmax logits "
               + ("match" if sim["result_matches_stored_logits"] else "DO NOT match")
               + " the largest logits it stored.", ""]
    if report.get("formats"):
        md += [f"Number formats of the integer model: {report['formats']}.", ""]
    if "fidelity" in report:
        md += ["| comparison | top-1 agreement | mean logit cosine | min logit cosine |", "|---|---|---|---|"]
        for key, f in report["fidelity"].items():
            md.append(f"| {key.replace('_', ' ')} | {f['top1_agreement']:.4f} | {f['mean_logit_cosine']:.6f} | "
                      f"{f['min_logit_cosine']:.6f} |")
        md += [""]
    if has_hw:
        md += ["Vectors the engine stores (compared exactly): " + ", ".join(report["hardware_vectors"]) + ".", ""]
    md += ["| layer | vector | job | rel. L2 error (int vs float), mean | max |" +
           (" hardware vs integer: mismatched tokens (elements) |" if has_hw else ""),
           "|---|---|---|---|---|" + ("---|" if has_hw else "")]
    for e in report["per_layer"]:
        hwcol = ""
        if has_hw:
            hwcol = (f" {e['hardware_mismatched_tokens']} ({e['hardware_mismatched_elements']}) |"
                     if e["hardware_compared"] else " not stored by the engine |")
        md.append(f"| {e['layer']} | {e['op']} | {e['job']} | {e['float_vs_integer_rel_l2']:.2e} | "
                  f"{e['float_vs_integer_rel_l2_max']:.2e} |" + hwcol)
    md += ["", "![cosine per token](cosine_per_token.png)", "", "![error per op](error_per_op.png)", "",
           "![quantisation error](quantisation_error.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    files.append("report.md")
    return files
