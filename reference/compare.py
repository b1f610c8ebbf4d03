"""Where do the float model, the integer model and the hardware differ? Per token, layer and op.

Traces are lists (one entry per token fed) of ``{"layers": [ {op: vector} per layer ],
"logits": vector}``. Integer and hardware traces hold the raw integers (Q16, gates Q15);
float traces hold floats. Hardware is compared with the integer model exactly, the float
model with the integer model by magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmfree_fpga.config import FORMATS

from .integer import IntegerModel, IntegerWeights
from .model import BitLinear, HGRNBitForCausalLM

__all__ = ["OPS", "float_trace", "integer_trace", "compare_traces", "write_report"]

# ops every trace has, in datapath order; value: the integer format's fractional bits
OPS = {"i_proj": FORMATS.x_frac, "f_proj": FORMATS.x_frac, "g_proj": FORMATS.x_frac,
       "h": FORMATS.x_frac, "o_proj": FORMATS.x_frac, "gate_proj": FORMATS.x_frac,
       "down_proj": FORMATS.x_frac, "x": FORMATS.x_frac}


@torch.no_grad()
def float_trace(model: HGRNBitForCausalLM, ids: list[int]) -> list[dict]:
    captured: dict = {}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        for op in ("i_proj", "f_proj", "g_proj", "o_proj"):
            hooks.append(getattr(layer.attn, op).register_forward_hook(
                lambda m, i, o, l=l, op=op: captured.__setitem__((l, op), o[0, -1].double().numpy())))
        for op in ("gate_proj", "down_proj"):
            hooks.append(getattr(layer.mlp, op).register_forward_hook(
                lambda m, i, o, l=l, op=op: captured.__setitem__((l, op), o[0, -1].double().numpy())))
        hooks.append(layer.attn.register_forward_hook(
            lambda m, i, o, l=l: captured.__setitem__((l, "h"), o[1][0].double().numpy())))
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, l=l: captured.__setitem__((l, "x"), o[0][0, -1].double().numpy())))
    try:
        state = model.init_state()
        out = []
        for tok in ids:
            captured.clear()
            logits, state = model.step(tok, state)
            out.append({"layers": [{op: captured[(l, op)] for op in OPS} for l in range(model.config.L)],
                        "logits": logits.double().numpy()})
        return out
    finally:
        for h in hooks:
            h.remove()


def integer_trace(weights: IntegerWeights, ids: list[int]) -> list[dict]:
    model = IntegerModel(weights)
    out = []
    for tok in ids:
        layers: list = []
        logits = model.step(tok, trace=layers)
        out.append({"layers": [{op: t[op] for op in OPS} for t in layers], "logits": logits})
    return out


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare_traces(ids: list[int], flt: list[dict], itg: list[dict], hw: list[dict] | None = None) -> dict:
    n_layers = len(itg[0]["layers"])
    per_token = []
    for t in range(len(ids)):
        lf, li = flt[t]["logits"], itg[t]["logits"] / 2 ** FORMATS.x_frac
        row = {"token": int(ids[t]), "float_top1": int(np.argmax(lf)), "integer_top1": int(np.argmax(li)),
               "logit_cosine": _cos(lf, li)}
        if hw is not None:
            row["hardware_top1"] = int(np.argmax(hw[t]["logits"]))
            row["hardware_logits_exact"] = bool(np.array_equal(hw[t]["logits"], itg[t]["logits"]))
        per_token.append(row)
    per_layer = []
    errors = {}
    for l in range(n_layers):
        for op, frac in OPS.items():
            rel, quant_err = [], []
            for t in range(len(ids)):
                f = flt[t]["layers"][l][op]
                i = itg[t]["layers"][l][op] / 2 ** frac
                rel.append(np.linalg.norm(f - i) / (np.linalg.norm(f) + 1e-30))
                quant_err.append((i - f) / (np.abs(f).max() + 1e-30))
            errors[(l, op)] = np.concatenate(quant_err)
            entry = {"layer": l, "op": op, "float_vs_integer_rel_l2": float(np.mean(rel)),
                     "float_vs_integer_rel_l2_max": float(np.max(rel))}
            if hw is not None:
                bad = [t for t in range(len(ids)) if not np.array_equal(hw[t]["layers"][l][op], itg[t]["layers"][l][op])]
                entry["hardware_mismatched_tokens"] = len(bad)
                entry["hardware_first_mismatch_token"] = bad[0] if bad else None
            per_layer.append(entry)
    top1 = float(np.mean([r["float_top1"] == r["integer_top1"] for r in per_token]))
    report = {"positions": len(ids), "top1_agreement": top1,
              "mean_logit_cosine": float(np.mean([r["logit_cosine"] for r in per_token])),
              "per_token": per_token, "per_layer": per_layer}
    if hw is not None:
        first = None
        for t in range(len(ids)):
            for l in range(n_layers):
                for op in OPS:
                    if first is None and not np.array_equal(hw[t]["layers"][l][op], itg[t]["layers"][l][op]):
                        first = {"token_index": t, "layer": l, "op": op}
        report["hardware_exact"] = first is None and all(r["hardware_logits_exact"] for r in per_token)
        report["hardware_first_mismatch"] = first
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
            where = f"layer {f['layer']} {f['op']}, token {f['token_index']}" if f else "the logits"
            parts.append(f"HARDWARE DIFFERS from the integer model, first at {where}")
    parts.append(f"integer vs float: top-1 agreement {r['top1_agreement']:.4f}, mean logit cosine "
                 f"{r['mean_logit_cosine']:.5f} over {r['positions']} positions")
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
    md = ["# mmfree-fpga compare", "", f"**Verdict:** {report['verdict']}", "",
          "| layer | op | rel. L2 error (int vs float), mean | max |" +
          (" hardware mismatched tokens |" if "hardware_exact" in report else ""),
          "|---|---|---|---|" + ("---|" if "hardware_exact" in report else "")]
    for e in report["per_layer"]:
        md.append(f"| {e['layer']} | {e['op']} | {e['float_vs_integer_rel_l2']:.2e} | "
                  f"{e['float_vs_integer_rel_l2_max']:.2e} |" +
                  (f" {e['hardware_mismatched_tokens']} |" if "hardware_exact" in report else ""))
    md += ["", "![cosine per token](cosine_per_token.png)", "", "![error per op](error_per_op.png)", "",
           "![quantisation error](quantisation_error.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    files.append("report.md")
    return files
