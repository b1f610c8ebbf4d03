"""From a float checkpoint to the integer weights, and the weight image the hardware reads.

The image is one binary file (``weights.bin``) of aligned sections plus ``manifest.json``
(geometry, formats, packing, every section's offset/size/dtype, the per-BitLinear constants,
bits per weight, SHA-256). ``read_image`` turns an image back into ``IntegerWeights``, so the
integer model can run from exactly the bytes the hardware gets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import CheckpointError, UserError
from mmfree_fpga.progress import track

from .integer import IntBitLinear, IntegerWeights, IntLayer, parse_image
from .model import lower_bound_values, weight_ternary
from mmfree_fpga.image import IMAGE_VERSION, image_layout, image_size
from mmfree_fpga.packing import PACKINGS, pack_trits

__all__ = ["integer_weights", "to_fixed_vector", "write_image", "image_bytes", "read_image", "image_sections"]

def to_fixed_vector(v: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Signed ``bits``-bit integers and exponent e with v ~= n / 2^e, largest |n| near full scale."""
    v = np.asarray(v, dtype=np.float64)
    vmax = float(np.abs(v).max(initial=0.0))
    limit = (1 << (bits - 1)) - 1
    if vmax == 0.0:
        return np.zeros(v.shape, dtype=np.int64), 0
    e = math.floor(math.log2(limit / vmax))
    n = np.round(v * 2.0 ** e)
    if np.abs(n).max() > limit:  # log2 rounding at the boundary
        e -= 1
        n = np.round(v * 2.0 ** e)
    return n.astype(np.int64), e


def _bitlinear(w: torch.Tensor, a: np.ndarray, c: np.ndarray, fmt: Formats) -> IntBitLinear:
    trits, beta = weight_ternary(w)
    a_int, e_a = to_fixed_vector(a, fmt.norm_bits)
    c_int, e_c = to_fixed_vector(c, fmt.norm_bits)
    k = float(beta) * math.sqrt(w.shape[1]) / 127.0 * 2.0 ** (e_a - e_c + fmt.x_frac - fmt.sumsq_shift)
    k_exp = math.floor(math.log2(k)) - (fmt.const_bits - 1)
    k_mant = round(k / 2.0 ** k_exp)
    if k_mant >= 1 << fmt.const_bits:
        k_mant, k_exp = k_mant >> 1, k_exp + 1
    return IntBitLinear(trits=trits.to(torch.int8).numpy(), a=a_int, c=c_int,
                        k_mant=int(k_mant), k_exp=int(k_exp), e_a=e_a, e_c=e_c)


def integer_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], fmt: Formats = FORMATS) -> IntegerWeights:
    """Fold norms into per-channel vectors and scales, ternarise, convert to fixed point.

    Scale invariance of the absmax quantiser lets the chained RMSNorms collapse: q depends on
    v * c with c the product of the norm weights in front of the matrix, and the output scale
    on max|v * c| / rms(v * a) with a the weights of the norm whose rms the float model takes.
    """
    # float64 copies for the norm vectors; trits and beta come from the tensors in their own
    # dtype, as the float reference computes them (a float64 W / beta can land on the other side
    # of 0.5: one lm_head trit of the demo model does)
    t = {k: v.detach().to(torch.float64) for k, v in tensors.items()}
    vec = lambda name: t[name].numpy()  # noqa: E731
    lbs = (lower_bound_values(t["model.lower_bounds"]) if cfg.use_lower_bound
           else torch.zeros(cfg.L, cfg.d, dtype=torch.float64)).numpy()
    one = 1 << fmt.gate_frac
    layers = []
    for l in track(range(cfg.L), "ternarising layers", unit="layer"):
        p = f"model.layers.{l}."
        an, gn, mn = vec(p + "attn_norm.weight"), vec(p + "attn.g_norm.weight"), vec(p + "mlp_norm.weight")
        bl = lambda name, a, c_pre: _bitlinear(tensors[p + name + ".weight"].detach(), a, c_pre * vec(p + name + ".norm.weight"), fmt)  # noqa: E731
        lb = np.round(lbs[l] * one).astype(np.int64)
        layers.append(IntLayer(
            i_proj=bl("attn.i_proj", an, an), f_proj=bl("attn.f_proj", an, an),
            g_proj=bl("attn.g_proj", an, an), o_proj=bl("attn.o_proj", gn, gn),
            gate_proj=bl("mlp.gate_proj", mn, mn),
            down_proj=bl("mlp.down_proj", np.ones(cfg.I), np.ones(cfg.I)),
            lower_bound=np.clip(lb, 0, one - 1)))
    fn = vec("model.norm.weight")
    lm_head = _bitlinear(tensors["lm_head.weight"].detach(), fn, fn * vec("lm_head.norm.weight"), fmt)

    emb = vec("model.embeddings.weight")
    rowmax = np.abs(emb).max(axis=1)
    step = np.where(rowmax > 0, rowmax / 127.0, 1.0)
    emb_q = np.clip(np.round(emb / step[:, None]), -127, 127).astype(np.int8)
    emb_scale = np.round(step * 2.0 ** fmt.emb_scale_frac)
    if emb_scale.max() >= 2.0 ** fmt.emb_scale_bits:
        raise CheckpointError(
            f"embedding values up to {rowmax.max():.4g} exceed the embedding format "
            f"(Q{fmt.emb_scale_frac} scale in {fmt.emb_scale_bits} bits); the checkpoint is not supported")
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=emb_scale.astype(np.int64),
                          layers=layers, lm_head=lm_head, formats=fmt)


def _bitlinears(w: IntegerWeights):
    for l, layer in enumerate(w.layers):
        for name in IntLayer.MATRICES:
            yield f"layers.{l}.{name}", getattr(layer, name)
    yield "lm_head", w.lm_head


def image_sections(w: IntegerWeights, packing: str) -> list[tuple[str, str, bytes, dict]]:
    """(name, kind, bytes, extra) for every section, in image order."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    out = []
    for name, bl in _bitlinears(w):
        out.append((f"{name}.trits", "trits", pack_trits(bl.trits, packing),
                    {"shape": list(bl.trits.shape), "packing": packing}))
        out.append((f"{name}.a", "int16", bl.a.astype("<i2").tobytes(), {"exponent": bl.e_a}))
        out.append((f"{name}.c", "int16", bl.c.astype("<i2").tobytes(), {"exponent": bl.e_c}))
        out.append((f"{name}.k", "k", np.array([bl.k_mant, bl.k_exp], dtype="<i4").tobytes(),
                    {"k_mant": bl.k_mant, "k_exp": bl.k_exp}))
    for l, layer in enumerate(w.layers):
        out.append((f"layers.{l}.lower_bound", "uint16", layer.lower_bound.astype("<u2").tobytes(),
                    {"frac": w.formats.gate_frac}))
    out.append(("embedding.q", "int8", w.emb_q.astype(np.int8).tobytes(), {"shape": list(w.emb_q.shape)}))
    out.append(("embedding.scale", "uint32", w.emb_scale.astype("<u4").tobytes(),
                {"frac": w.formats.emb_scale_frac}))
    return out


def image_bytes(w: IntegerWeights, packing: str = "base3") -> bytes:
    """The contents of ``weights.bin`` for ``w``."""
    return bytes(_assemble(w, packing)[0])


def _assemble(w: IntegerWeights, packing: str):
    """(image bytes, manifest section entries, bytes of packed trits)."""
    layout = image_layout(w.cfg, packing)
    blob = bytearray(image_size(w.cfg, packing))
    entries = []
    trit_bytes = 0
    for place, (name, kind, data, extra) in zip(layout, image_sections(w, packing), strict=True):
        assert (place.name, place.size) == (name, len(data)), (place, name, len(data))
        blob[place.offset:place.offset + place.size] = data
        entries.append({"name": name, "kind": kind, "offset": place.offset, "size": place.size, **extra})
        if kind == "trits":
            trit_bytes += len(data)
    return blob, entries, trit_bytes


def write_image(w: IntegerWeights, out_dir, packing: str = "base3") -> dict:
    """Write weights.bin + manifest.json into out_dir (complete or not at all); returns the manifest."""
    blob, entries, trit_bytes = _assemble(w, packing)
    cfg = w.cfg
    manifest = {
        "format": "mmfree-fpga weight image", "version": IMAGE_VERSION,
        "geometry": cfg.as_dict(), "formats": w.formats.as_dict(), "packing": packing,
        "ternary_weights": cfg.ternary_weights, "ternary_bytes": trit_bytes,
        "bits_per_weight": round(8 * trit_bytes / cfg.ternary_weights, 3),
        "embedding_bytes": cfg.V * cfg.d + 4 * cfg.V,
        "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
        "files": ["weights.bin", "manifest.json"], "sections": entries,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out_dir.parent))
    try:
        (tmp / "weights.bin").write_bytes(bytes(blob))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            for f in manifest["files"]:
                (out_dir / f).unlink(missing_ok=True)
            for f in manifest["files"]:
                os.replace(tmp / f, out_dir / f)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_image(directory) -> IntegerWeights:
    """IntegerWeights from an exported image directory (checks size and SHA-256)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        blob = (directory / "weights.bin").read_bytes()
        fmt = Formats(**{k: v for k, v in manifest["formats"].items() if k != "acc_bits"})
        cfg = ModelConfig(**manifest["geometry"])
        packing = manifest["packing"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{directory}: not a weight image ({e}); run 'mmfree-fpga export'") from None
    if len(blob) != manifest["bytes"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise UserError(f"{directory}/weights.bin does not match its manifest (size or SHA-256); re-export")
    sec = {e["name"]: e for e in manifest["sections"]}
    exponents = {name[:-2]: (sec[name]["exponent"], sec[name[:-2] + ".c"]["exponent"])
                 for name in sec if name.endswith(".a")}
    return parse_image(blob, cfg, packing, fmt, exponents)
