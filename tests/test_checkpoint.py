"""Checkpoint loading: the mmfreelm layout, dtypes, and one clear error per bad checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model
from mmfree_fpga.cli import main
from mmfree_fpga.errors import CheckpointError
from mmfree_fpga.reference.checkpoint import (DEMO_CHECKPOINT, expected_shapes, load_checkpoint,
                                              load_model, save_checkpoint)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def test_roundtrip_fp32(small_checkpoint, small_cfg):
    model = load_model(small_checkpoint)
    assert model.config == small_cfg
    want = random_model(small_cfg)
    ids = [1, 2, 3, 250, 7]
    torch.testing.assert_close(_logits(model, ids), _logits(want, ids), rtol=0, atol=0)


def test_bf16_and_fp32_checkpoints_load_alike(tmp_path, small_cfg):
    model = random_model(small_cfg, seed=7)
    with torch.no_grad():  # make the latent weights bf16-representable: both files hold the same model
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    a = load_model(save_checkpoint(model, tmp_path / "fp32", dtype=torch.float32))
    b = load_model(save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    ids = list(range(40, 60))
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids), rtol=0, atol=0)


def test_pytorch_model_bin(tmp_path, small_checkpoint):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(small_checkpoint / "config.json", d / "config.json")
    torch.save(load_file(str(small_checkpoint / "model.safetensors")), d / "pytorch_model.bin")
    ids = [5, 6, 7]
    torch.testing.assert_close(_logits(load_model(d), ids), _logits(load_model(small_checkpoint), ids))


def test_mmfreelm_style_config_with_extra_keys(tmp_path, small_checkpoint):
    """config.json as transformers writes it for mmfreelm: extra keys, intermediate_size null."""
    cfg = json.loads((small_checkpoint / "config.json").read_text())
    cfg.update({"transformers_version": "4.39.3", "intermediate_size": None, "hidden_ratio": 4,
                "hidden_size": 64})
    (small_checkpoint / "config.json").write_text(json.dumps(cfg))
    c, _ = load_checkpoint(small_checkpoint)
    assert c.intermediate_size == 256  # int(64 * 4 * 2 / 3) = 170 -> 256


def test_demo_checkpoint_loads():
    cfg, tensors = load_checkpoint(DEMO_CHECKPOINT)
    assert cfg.vocab_size == 256 and set(tensors) == set(expected_shapes(cfg))


def _edit_tensors(ckpt, fn):
    t = load_file(str(ckpt / "model.safetensors"))
    fn(t)
    save_file(t, str(ckpt / "model.safetensors"))


def _edit_config(ckpt, **kv):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(kv)
    (ckpt / "config.json").write_text(json.dumps(cfg))


BAD = {
    "no_dir": (lambda c: shutil.rmtree(c), "does not exist"),
    "no_config": (lambda c: (c / "config.json").unlink(), "no config.json"),
    "bad_json": (lambda c: (c / "config.json").write_text("{not json"), "not valid JSON"),
    "no_weights": (lambda c: (c / "model.safetensors").unlink(), "no model.safetensors or pytorch_model.bin"),
    "garbage_weights": (lambda c: (c / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0garbage!"),
                        "not a readable safetensors file"),
    "missing_tensor": (lambda c: _edit_tensors(c, lambda t: t.pop("model.layers.1.attn.f_proj.weight")),
                       "lacks tensor(s) model.layers.1.attn.f_proj.weight"),
    "unexpected_tensor": (lambda c: _edit_tensors(c, lambda t: t.update(extra=torch.zeros(2))),
                          "unexpected tensor(s) extra"),
    "wrong_shape": (lambda c: _edit_tensors(c, lambda t: t.update({"lm_head.weight": torch.zeros(256, 65)})),
                    "lm_head.weight has shape (256, 65), config.json implies (256, 64)"),
    "nan": (lambda c: _edit_tensors(c, lambda t: t["model.norm.weight"].__setitem__(3, float("nan"))),
            "model.norm.weight contains NaN or Inf"),
    "inf": (lambda c: _edit_tensors(c, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), float("inf"))),
            "down_proj.weight contains NaN or Inf"),
    "int_dtype": (lambda c: _edit_tensors(c, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
                  "dtype torch.int32"),
    "model_type": (lambda c: _edit_config(c, model_type="llama"), "'model_type' is 'llama'"),
    "num_heads": (lambda c: _edit_config(c, num_heads=4), "'num_heads' = 4 is not supported"),
    "short_conv": (lambda c: _edit_config(c, use_short_conv=True), "'use_short_conv' = True is not supported"),
    "tied": (lambda c: _edit_config(c, tie_word_embeddings=True), "'tie_word_embeddings' = True"),
    "missing_key": (lambda c: _drop_key(c, "hidden_size"),
                    "lacks the key(s) hidden_size"),
    "negative": (lambda c: _edit_config(c, num_hidden_layers=-1), "'num_hidden_layers' must be a positive integer"),
}


def _drop_key(ckpt, key):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop(key)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_message(case, small_checkpoint):
    damage, message = BAD[case]
    damage(small_checkpoint)
    with pytest.raises(CheckpointError) as e:
        load_model(small_checkpoint)
    assert message in str(e.value)


@pytest.mark.parametrize("case", ["nan", "no_weights", "num_heads"])
def test_bad_checkpoint_cli(case, small_checkpoint, tmp_path, capsys):
    damage, message = BAD[case]
    damage(small_checkpoint)
    out = tmp_path / "result.json"
    assert main(["reference", "--checkpoint", str(small_checkpoint), "--json-out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
