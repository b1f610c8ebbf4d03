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
from mmfree_fpga.progress import track

from .model import HGRNBitForCausalLM

__all__ = ["load_checkpoint", "load_model", "save_checkpoint", "check_checkpoint_dir", "expected_shapes",
           "DEMO_CHECKPOINT"]

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


def _short(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, shortened (library messages can run to pages)."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, one tensor at a time so a large file shows progress."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = list(f.keys())
        return {name: f.get_tensor(name) for name in track(names, f"reading {path.name}", unit="tensor")}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        try:
            return _load_safetensors(st)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{st} is not a readable safetensors file ({_short(e)}); it is damaged or "
                                  "truncated: copy or export the checkpoint again") from None
    if pt.is_file():
        import pickle
        import warnings
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # torch's notes on pickle protocols: not the user's concern
                obj = torch.load(str(pt), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's message suggests weights_only=False, i.e. running the file's pickled code
            raise CheckpointError(f"{pt} is not a valid checkpoint: not a state dict of tensors saved with "
                                  "torch.save (it is damaged, or holds pickled objects other than tensors, "
                                  "which are not loaded); save model.state_dict() or convert it to "
                                  "model.safetensors") from None
        except Exception as e:  # torch raises many types for a corrupt or truncated zip/pickle
            raise CheckpointError(f"{pt} is not a valid checkpoint ({type(e).__name__}: {_short(e)}); it is "
                                  "damaged or truncated: copy or save it again") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{pt} is not a valid checkpoint: it does not hold a dict of tensors; "
                                  "save model.state_dict()")
        return obj
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin; "
                          "point --checkpoint at an mmfreelm checkpoint directory")


def load_checkpoint(directory) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Validated (config, float32 state dict) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise CheckpointError(f"--checkpoint {directory} is a file; give the checkpoint's directory "
                                  "(config.json + model.safetensors)")
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg = ModelConfig.from_checkpoint(directory)
    tensors = _read_tensors(directory)
    if cfg.L > len(tensors):   # each layer has many tensors; also spares listing 10**9 expected names
        raise CheckpointError(f"config.json says num_hidden_layers={cfg.L}, but the checkpoint holds only "
                              f"{len(tensors)} tensors; is config.json from the same model?")
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
    for name, shape in track(expected.items(), "checking tensors", total=len(expected), unit="tensor"):
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


def check_checkpoint_dir(directory) -> Path:
    """CheckpointError unless :func:`save_checkpoint` may write ``directory``: a new or empty
    directory, or a checkpoint (which it replaces); call it before the work that makes the model."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is an existing file; choose a new directory for the checkpoint")
        if not (directory / "config.json").is_file() and any(directory.iterdir()):
            raise CheckpointError(f"{directory} exists and is not a checkpoint; choose an empty or new directory")
    return directory


def save_checkpoint(model: HGRNBitForCausalLM, directory, dtype=torch.float32,
                    extra_config: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ ``extra_files``, name -> text); the directory
    appears only when complete."""
    from safetensors.torch import save_file
    directory = check_checkpoint_dir(directory)
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
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
