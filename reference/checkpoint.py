"""Load and save Hugging Face style HGRN-bit checkpoints as mmfreelm writes them.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (older dumps:
``pytorch_model.bin``); tensors are latent fp32, bf16 or fp16 weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.errors import CheckpointError

from .model import HGRNBitForCausalLM

__all__ = ["load_checkpoint", "load_model", "save_checkpoint", "expected_shapes", "DEMO_CHECKPOINT"]

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "mmfree_fpga" / "demo_model"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint of this geometry, with its shape."""
    shapes = {"model.embeddings.weight": (cfg.V, cfg.d), "model.lower_bounds": (cfg.L, cfg.d),
              "model.norm.weight": (cfg.d,), "lm_head.weight": (cfg.V, cfg.d),
              "lm_head.norm.weight": (cfg.d,)}
    for layer in range(cfg.L):
        p = f"model.layers.{layer}."
        shapes[p + "attn_norm.weight"] = (cfg.d,)
        shapes[p + "mlp_norm.weight"] = (cfg.d,)
        shapes[p + "attn.g_norm.weight"] = (cfg.d,)
        for name, (out_f, in_f) in cfg.bitlinear_shapes().items():
            shapes[p + name + ".weight"] = (out_f, in_f)
            shapes[p + name + ".norm.weight"] = (in_f,)
    return shapes


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({e}); "
                                  "re-export the checkpoint") from None
    if pt.is_file():
        try:
            obj = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a corrupt pickle/zip
            raise CheckpointError(f"{pt}: not a readable PyTorch state dict ({e})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{pt}: does not hold a dict of tensors")
        return obj
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin; "
                          "point --checkpoint at an mmfreelm checkpoint directory")


def load_checkpoint(directory) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Validated (config, float32 state dict) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg = ModelConfig.from_checkpoint(directory)
    tensors = _read_tensors(directory)
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more} "
                              "required by its config.json")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"checkpoint has unexpected tensor(s) {', '.join(unexpected[:3])}{more}; "
                              "is config.json from the same model?")
    out = {}
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}; expected fp32, bf16 or fp16")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name} contains NaN or Inf values; the checkpoint is damaged")
        out[name] = t
    return cfg, out


def load_model(directory=None) -> HGRNBitForCausalLM:
    """The float reference with a checkpoint's weights, in eval mode."""
    cfg, tensors = load_checkpoint(directory or DEMO_CHECKPOINT)
    model = HGRNBitForCausalLM(cfg)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def save_checkpoint(model: HGRNBitForCausalLM, directory, dtype=torch.float32,
                    extra_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors; the directory appears only when complete."""
    from safetensors.torch import save_file
    directory = Path(directory)
    if directory.exists() and not (directory / "config.json").is_file() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists and is not a checkpoint; choose an empty or new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    tmp.chmod(0o755)
    try:
        cfg = model.config.to_hf_dict()
        cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                              torch.float16: "float16"}[dtype]
        cfg.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
