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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfree_fpga.config import FORMATS, Formats, ModelConfig
from mmfree_fpga.errors import CheckpointError, UserError
from mmfree_fpga.progress import track

from .integer import IntBitLinear, IntegerWeights, IntLayer
from .model import lower_bound_values, weight_ternary
from .packing import pack_trits, packed_size, unpack_trits, PACKINGS

__all__ = ["integer_weights", "to_fixed_vector", "write_image", "image_bytes", "read_image", "image_sections",
           "image_layout", "image_size", "parse_image", "Section", "IMAGE_VERSION", "SECTION_ALIGN"]

IMAGE_VERSION = 1
SECTION_ALIGN = 16


@dataclass(frozen=True)
class Section:
    name: str
    kind: str
    offset: int
    size: int
    shape: tuple[int, ...]


def _bitlinear_names(cfg: ModelConfig):
    per_layer = {key.split(".", 1)[1]: shape for key, shape in cfg.bitlinear_shapes().items()}
    for layer in range(cfg.L):
        for name in IntLayer.MATRICES:
            yield f"layers.{layer}.{name}", per_layer[name]
    yield "lm_head", (cfg.V, cfg.d)


def image_layout(cfg: ModelConfig, packing: str) -> list[Section]:
    """Every section of ``weights.bin``, in image order: a function of geometry and packing alone,
    so an engine addresses its weight memory with constants and never reads the manifest."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    entries: list[tuple[str, str, int, tuple[int, ...]]] = []
    for name, (out_f, in_f) in _bitlinear_names(cfg):
        entries += [(f"{name}.trits", "trits", packed_size(out_f * in_f, packing), (out_f, in_f)),
                    (f"{name}.a", "int16", 2 * in_f, (in_f,)),
                    (f"{name}.c", "int16", 2 * in_f, (in_f,)),
                    (f"{name}.k", "k", 8, (2,))]
    entries += [(f"layers.{layer}.lower_bound", "uint16", 2 * cfg.d, (cfg.d,)) for layer in range(cfg.L)]
    entries += [("embedding.q", "int8", cfg.V * cfg.d, (cfg.V, cfg.d)),
                ("embedding.scale", "uint32", 4 * cfg.V, (cfg.V,))]
    out, offset = [], 0
    for name, kind, size, shape in entries:
        offset += (-offset) % SECTION_ALIGN
        out.append(Section(name, kind, offset, size, shape))
        offset += size
    return out


def image_size(cfg: ModelConfig, packing: str) -> int:
    last = image_layout(cfg, packing)[-1]
    return last.offset + last.size


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


def parse_image(blob: bytes, cfg: ModelConfig, packing: str, fmt: Formats = FORMATS,
                exponents: dict[str, tuple[int, int]] | None = None) -> IntegerWeights:
    """IntegerWeights from raw image bytes, using only geometry and packing, as an engine reads them.

    The export-time exponents e_a/e_c are manifest metadata already folded into k; without
    ``exponents`` they come back as 0 (the integer datapath does not read them).
    """
    layout = {s.name: s for s in image_layout(cfg, packing)}
    total = image_size(cfg, packing)
    if len(blob) != total:
        raise UserError(f"image has {len(blob)} bytes; geometry and packing {packing} imply {total}")
    view = memoryview(blob)
    exponents = exponents or {}

    def raw(name: str):
        s = layout[name]
        return view[s.offset:s.offset + s.size]

    def vector(name: str, dtype: str) -> np.ndarray:
        return np.frombuffer(raw(name), dtype=dtype).astype(np.int64)

    def bitlinear(name: str) -> IntBitLinear:
        out_f, in_f = layout[f"{name}.trits"].shape
        trits = unpack_trits(bytes(raw(f"{name}.trits")), out_f * in_f, packing).reshape(out_f, in_f)
        k_mant, k_exp = (int(v) for v in np.frombuffer(raw(f"{name}.k"), dtype="<i4"))
        e_a, e_c = exponents.get(name, (0, 0))
        return IntBitLinear(trits=trits, a=vector(f"{name}.a", "<i2"), c=vector(f"{name}.c", "<i2"),
                            k_mant=k_mant, k_exp=k_exp, e_a=e_a, e_c=e_c)

    layers = [IntLayer(**{m: bitlinear(f"layers.{layer}.{m}") for m in IntLayer.MATRICES},
                       lower_bound=vector(f"layers.{layer}.lower_bound", "<u2"))
              for layer in range(cfg.L)]
    emb_q = np.frombuffer(raw("embedding.q"), dtype=np.int8).reshape(cfg.V, cfg.d).copy()
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=vector("embedding.scale", "<u4"),
                          layers=layers, lm_head=bitlinear("lm_head"), formats=fmt)


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
