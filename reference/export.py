"""From a float checkpoint to the integer weights, and the weight image the hardware reads.

The image is one binary file (``weights.bin``) of aligned sections plus ``manifest.json``
(geometry, number formats, packing, every section's offset/size/dtype, the per-BitLinear
constants, bits per weight, SHA-256). Element sizes follow the number formats
(:func:`mmfree_fpga.image.image_layout`). ``read_image`` turns an image back into
``IntegerWeights`` with the formats its manifest records, so the integer model can run from
exactly the bytes the hardware gets.
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

from .integer import EPS_KIND_OF, EPS_KINDS, IntBitLinear, IntegerWeights, IntLayer, parse_image
from .model import lower_bound_values, weight_ternary
from mmfree_fpga.image import IMAGE_VERSION, KIND_DTYPES, element_kinds, image_layout, image_size
from mmfree_fpga.packing import PACKINGS, pack_trits

__all__ = ["integer_weights", "integer_layer", "integer_lm_head", "integer_embeddings", "lower_bound_fractions",
           "to_fixed_vector", "const_mantissa", "eps_scale", "write_image", "image_bytes",
           "read_image", "read_formats", "image_sections"]


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


def const_mantissa(value: float, bits: int) -> tuple[int, int]:
    """(mant, exp) with mant * 2^exp ~= value > 0 and mant a ``bits``-bit mantissa:
    exp = floor(log2(value)) - (bits - 1), mant = round(value / 2^exp), renormalised (mant >> 1,
    exp + 1) if rounding reaches 2^bits."""
    if not value > 0:
        raise ValueError(f"const_mantissa needs a positive value, got {value!r}")
    exp = math.floor(math.log2(value)) - (bits - 1)
    mant = round(value / 2.0 ** exp)
    if mant >= 1 << bits:
        mant, exp = mant >> 1, exp + 1
    return int(mant), int(exp)


def eps_scale(kind: str, in_features: int, e_a: int, fmt: Formats) -> float:
    """C of a BitLinear's eps constant (eps_mant * 2^eps_exp ~= rms_norm_eps * C): the factor that
    turns eps into S's units, given the :func:`~mmfree_fpga.reference.integer.eps_term` sum G:
    "input" 2^(2 (norm_bits - 16) + 2 (e_a - sumsq_shift)); "gsum" 2^(2 (x_frac - 12) + 2 (e_a -
    sumsq_shift)); "const" in_features * 2^(2 (x_frac + e_a - sumsq_shift)). ``e_a``: the exponent
    of the a vector (a_int ~= a * 2^e_a)."""
    if kind == "input":
        return 2.0 ** (2 * (fmt.norm_bits - 16) + 2 * (e_a - fmt.sumsq_shift))
    if kind == "gsum":
        return 2.0 ** (2 * (fmt.x_frac - 12) + 2 * (e_a - fmt.sumsq_shift))
    if kind == "const":
        return in_features * 2.0 ** (2 * (fmt.x_frac + e_a - fmt.sumsq_shift))
    raise ValueError(f"unknown eps kind {kind!r}; expected one of {', '.join(EPS_KINDS)}")


def _bitlinear(w: torch.Tensor, a: np.ndarray, c: np.ndarray, fmt: Formats, eps_kind: str = "input",
               eps: float = 1e-6) -> IntBitLinear:
    """One BitLinear in fixed point: trits, a and c, K (and with ``fmt.norm_eps`` the eps constant of
    its ``eps_kind`` for ``rms_norm_eps`` = ``eps``)."""
    trits, beta = weight_ternary(w)
    a_int, e_a = to_fixed_vector(a, fmt.norm_bits)
    c_int, e_c = to_fixed_vector(c, fmt.norm_bits)
    k = float(beta) * math.sqrt(w.shape[1]) / 127.0 * 2.0 ** (e_a - e_c + fmt.x_frac - fmt.sumsq_shift)
    k_mant, k_exp = const_mantissa(k, fmt.const_bits)
    eps_mant, eps_exp = 0, 0
    if fmt.norm_eps:
        eps_mant, eps_exp = const_mantissa(eps * eps_scale(eps_kind, w.shape[1], e_a, fmt), fmt.const_bits)
    return IntBitLinear(trits=trits.to(torch.int8).numpy(), a=a_int, c=c_int,
                        k_mant=k_mant, k_exp=k_exp, e_a=e_a, e_c=e_c,
                        eps_mant=eps_mant, eps_exp=eps_exp, eps_kind=eps_kind)


def _vec(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    return tensors[name].detach().to(torch.float64).numpy()


def lower_bound_fractions(cfg: ModelConfig, lower_bounds: torch.Tensor) -> np.ndarray:
    """The forget gates' lower bounds of every layer as float64 values [L, d] (zeros without
    ``use_lower_bound``), from the checkpoint's ``model.lower_bounds``."""
    if not cfg.use_lower_bound:
        return np.zeros((cfg.L, cfg.d))
    return lower_bound_values(lower_bounds.detach().to(torch.float64)).numpy()


def integer_layer(cfg: ModelConfig, tensors: dict[str, torch.Tensor], layer: int, lower_bound: np.ndarray,
                  fmt: Formats = FORMATS) -> IntLayer:
    """One layer in fixed point from the checkpoint tensors of that layer (``model.layers.{layer}.*``)
    and its lower bounds (float64 [d], :func:`lower_bound_fractions`)."""
    # float64 copies for the norm vectors; trits and beta come from the tensors in their own
    # dtype, as the float reference computes them (a float64 W / beta can land on the other side
    # of 0.5: one lm_head trit of the demo model does)
    p = f"model.layers.{layer}."
    vec = lambda name: _vec(tensors, p + name)  # noqa: E731
    an, gn, mn = vec("attn_norm.weight"), vec("attn.g_norm.weight"), vec("mlp_norm.weight")
    bl = lambda name, a, c_pre: _bitlinear(  # noqa: E731
        tensors[p + name + ".weight"].detach(), a, c_pre * vec(name + ".norm.weight"), fmt,
        EPS_KIND_OF[name.split(".")[1]], cfg.rms_norm_eps)
    one = 1 << fmt.gate_frac
    lb = np.round(np.asarray(lower_bound, dtype=np.float64) * one).astype(np.int64)
    return IntLayer(
        i_proj=bl("attn.i_proj", an, an), f_proj=bl("attn.f_proj", an, an),
        g_proj=bl("attn.g_proj", an, an), o_proj=bl("attn.o_proj", gn, gn),
        gate_proj=bl("mlp.gate_proj", mn, mn),
        down_proj=bl("mlp.down_proj", np.ones(cfg.I), np.ones(cfg.I)),
        lower_bound=np.clip(lb, 0, one - 1))


def integer_lm_head(cfg: ModelConfig, tensors: dict[str, torch.Tensor], fmt: Formats = FORMATS) -> IntBitLinear:
    """lm_head in fixed point, with the final norm folded in (``model.norm.weight``, ``lm_head.*``)."""
    fn = _vec(tensors, "model.norm.weight")
    return _bitlinear(tensors["lm_head.weight"].detach(), fn, fn * _vec(tensors, "lm_head.norm.weight"), fmt,
                      EPS_KIND_OF["lm_head"], cfg.rms_norm_eps)


def integer_embeddings(emb, fmt: Formats = FORMATS) -> tuple[np.ndarray, np.ndarray]:
    """(mantissas [rows, d], scales [rows]) of embedding rows: per row, signed ``emb_bits``-bit
    mantissas (int8 up to 8 bits, else int32) with the largest |value| at full scale, and one
    unsigned Q``emb_scale_frac`` step; CheckpointError if a step exceeds ``emb_scale_bits``."""
    emb = np.asarray(emb.detach().to(torch.float64).numpy() if isinstance(emb, torch.Tensor) else emb,
                     dtype=np.float64)
    rowmax = np.abs(emb).max(axis=1)
    qmax = (1 << (fmt.emb_bits - 1)) - 1
    step = np.where(rowmax > 0, rowmax / float(qmax), 1.0)
    emb_q = np.clip(np.round(emb / step[:, None]), -qmax, qmax).astype(np.int8 if fmt.emb_bits <= 8 else np.int32)
    emb_scale = np.round(step * 2.0 ** fmt.emb_scale_frac)
    if emb_scale.max(initial=0) >= 2.0 ** fmt.emb_scale_bits:
        raise CheckpointError(
            f"embedding values up to {rowmax.max():.4g} exceed the embedding format "
            f"(Q{fmt.emb_scale_frac} scale in {fmt.emb_scale_bits} bits); the checkpoint is not supported")
    return emb_q, emb_scale.astype(np.int64)


def integer_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], fmt: Formats = FORMATS) -> IntegerWeights:
    """Fold norms into per-channel vectors and scales, ternarise, convert to fixed point.

    Scale invariance of the absmax quantiser lets the chained RMSNorms collapse: q depends on
    v * c with c the product of the norm weights in front of the matrix, and the output scale
    on max|v * c| / rms(v * a) with a the weights of the norm whose rms the float model takes.
    With ``fmt.norm_eps`` every BitLinear also gets its inner RMSNorm's eps as a constant of its
    eps kind (:data:`~mmfree_fpga.reference.integer.EPS_KIND_OF`); the outer norms' own eps is
    dropped (eps * eps terms). Embedding rows get ``emb_bits``-bit mantissas.
    :func:`integer_layer`, :func:`integer_lm_head` and :func:`integer_embeddings` convert the parts.
    """
    lbs = lower_bound_fractions(cfg, tensors["model.lower_bounds"])
    layers = [integer_layer(cfg, tensors, l, lbs[l], fmt)
              for l in track(range(cfg.L), "ternarising layers", unit="layer")]
    lm_head = integer_lm_head(cfg, tensors, fmt)
    emb_q, emb_scale = integer_embeddings(tensors["model.embeddings.weight"], fmt)
    return IntegerWeights(cfg=cfg, emb_q=emb_q, emb_scale=emb_scale, layers=layers, lm_head=lm_head, formats=fmt)


def _bitlinears(w: IntegerWeights):
    for l, layer in enumerate(w.layers):
        for name in IntLayer.MATRICES:
            yield f"layers.{l}.{name}", getattr(layer, name)
    yield "lm_head", w.lm_head


def _packed(values: np.ndarray, kind: str, name: str) -> bytes:
    """``values`` as little-endian elements of ``kind``; ValueError if one does not fit."""
    dtype = np.dtype(KIND_DTYPES[kind])
    info = np.iinfo(dtype)
    values = np.asarray(values)
    if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
        raise ValueError(f"{name}: values outside {kind}; the weights do not match the number formats")
    return values.astype(dtype).tobytes()


def image_sections(w: IntegerWeights, packing: str) -> list[tuple[str, str, bytes, dict]]:
    """(name, kind, bytes, extra) for every section, in image order; element kinds by ``w.formats``
    (:func:`mmfree_fpga.image.element_kinds`)."""
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    fmt = w.formats
    kinds = element_kinds(fmt)
    norm, lb = kinds["norm"], kinds["lower_bound"]
    out = []
    for name, bl in _bitlinears(w):
        out.append((f"{name}.trits", "trits", pack_trits(bl.trits, packing),
                    {"shape": list(bl.trits.shape), "packing": packing}))
        out.append((f"{name}.a", norm, _packed(bl.a, norm, f"{name}.a"), {"exponent": bl.e_a}))
        out.append((f"{name}.c", norm, _packed(bl.c, norm, f"{name}.c"), {"exponent": bl.e_c}))
        words, extra = [bl.k_mant, bl.k_exp], {"k_mant": bl.k_mant, "k_exp": bl.k_exp}
        if fmt.norm_eps:
            words += [bl.eps_mant, bl.eps_exp]
            extra.update(eps_mant=bl.eps_mant, eps_exp=bl.eps_exp, eps_kind=bl.eps_kind)
        out.append((f"{name}.k", "k", _packed(np.array(words), "k", f"{name}.k"), extra))
    for l, layer in enumerate(w.layers):
        out.append((f"layers.{l}.lower_bound", lb, _packed(layer.lower_bound, lb, f"layers.{l}.lower_bound"),
                    {"frac": fmt.gate_frac}))
    emb_q = kinds["embedding.q"]
    out.append(("embedding.q", emb_q, _packed(w.emb_q, emb_q, "embedding.q"),
                {"shape": list(w.emb_q.shape), "bits": fmt.emb_bits}))
    out.append(("embedding.scale", "uint32", _packed(w.emb_scale, "uint32", "embedding.scale"),
                {"frac": fmt.emb_scale_frac}))
    return out


def image_bytes(w: IntegerWeights, packing: str = "base3") -> bytes:
    """The contents of ``weights.bin`` for ``w``."""
    return bytes(_assemble(w, packing)[0])


def _assemble(w: IntegerWeights, packing: str):
    """(image bytes, manifest section entries, bytes of packed trits)."""
    layout = image_layout(w.cfg, packing, w.formats)
    blob = bytearray(image_size(w.cfg, packing, w.formats))
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
    embedding_bytes = sum(e["size"] for e in entries if e["name"].startswith("embedding."))
    manifest = {
        "format": "mmfree-fpga weight image", "version": IMAGE_VERSION,
        "geometry": cfg.as_dict(), "formats": w.formats.as_dict(), "packing": packing,
        "ternary_weights": cfg.ternary_weights, "ternary_bytes": trit_bytes,
        "bits_per_weight": round(8 * trit_bytes / cfg.ternary_weights, 3),
        "embedding_bytes": embedding_bytes,
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


def read_formats(directory) -> Formats:
    """The number formats an exported image's manifest records."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        return Formats(**{k: v for k, v in manifest["formats"].items() if k != "acc_bits"})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{directory}: not a weight image ({e}); run 'mmfree-fpga export'") from None


def read_image(directory) -> IntegerWeights:
    """IntegerWeights from an exported image directory (checks size and SHA-256), in the number
    formats its manifest records."""
    directory = Path(directory)
    fmt = read_formats(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        blob = (directory / "weights.bin").read_bytes()
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
