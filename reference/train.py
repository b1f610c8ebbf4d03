"""Train a small byte-level HGRN-bit model on the Python standard library's own sources.

Every machine with Python has that text, so the demo model is reproducible without a
download: files are read at training time, sorted by path, and every 20th file is held out.
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmfree_fpga.config import FORMATS, ModelConfig

from .model import HGRNBitForCausalLM

__all__ = ["DEMO_CONFIG", "stdlib_corpus", "train", "evaluate_bits_per_byte", "unigram_bits_per_byte",
           "int8_embeddings"]

# The demo geometry: ternary weights at 1.6 bits/weight plus int8 embeddings fit the
# iCE40UP5K's 128 KB SPRAM (see reference/export.py for the exact image size).
DEMO_CONFIG = ModelConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, intermediate_size=256)
HELD_OUT_EVERY = 20


def stdlib_corpus(max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) byte arrays from the standard library's ``*.py`` files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    train, held = [], []
    for k, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if k % HELD_OUT_EVERY == 0 else train).append(data)
    cat = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)  # noqa: E731
    tr, ho = cat(train), cat(held)
    if max_bytes:
        tr, ho = tr[:max_bytes], ho[:max(max_bytes // 10, 4096)]
    return tr, ho


@torch.no_grad()
def int8_embeddings(weight: torch.Tensor, frac: int) -> torch.Tensor:
    """The embedding table snapped to what the hardware stores: each row ``q * k * 2^-frac`` with
    int8 ``q`` (|q| <= 127, the row's largest entry exactly +-127) and a positive integer ``k``.

    A model whose embeddings are snapped this way loses nothing in export when ``frac`` is at most
    ``Formats.emb_scale_frac`` and ``Formats.x_frac``: ``integer_weights`` recovers q and k exactly
    and ``embed`` gives the float embedding exactly in Q(x_frac). Returns a new float32 tensor.
    """
    e = weight.detach().to(torch.float64)
    amax = e.abs().argmax(1)
    rows = torch.arange(e.shape[0])
    rowmax = e[rows, amax].abs()
    k = torch.round(rowmax * 2.0 ** frac / 127).clamp(min=1)
    step = k * 2.0 ** -frac
    q = torch.round(e / step[:, None]).clamp(-127, 127)
    q[rows, amax] = 127.0 * torch.sign(e[rows, amax])
    q[rowmax == 0] = 0
    out = (q * step[:, None]).to(torch.float32)
    assert torch.equal(out.to(torch.float64), q * step[:, None]), "frac too large for float32"
    return out


def _batch(data: np.ndarray, batch: int, seq: int, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(data) - seq - 1, size=batch)
    return torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate_bits_per_byte(model: HGRNBitForCausalLM, data: np.ndarray, seq: int = 256,
                           windows: int = 64, seed: int = 1) -> float:
    model.eval()
    gen = np.random.default_rng(seed)
    x = _batch(data, windows, seq, gen)
    logits, _ = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return loss.item() / math.log(2)


def unigram_bits_per_byte(train: np.ndarray, held: np.ndarray) -> float:
    """Cross-entropy of the held-out bytes under the training set's byte frequencies."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.log2(p[held]).mean())


def train(cfg: ModelConfig = DEMO_CONFIG, steps: int = 1500, batch: int = 32, seq: int = 256,
          lr: float = 4e-3, seed: int = 0, log=print, device: str = "cpu",
          corpus: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[HGRNBitForCausalLM, dict]:
    """Train from scratch, reproducibly for a given seed; returns (model, report)."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    tr, ho = corpus if corpus is not None else stdlib_corpus()
    model = HGRNBitForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    model.train()
    for step in range(steps):
        x = _batch(tr, batch, seq, gen).to(device)
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.V), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps}  loss {loss.item() / math.log(2):.3f} bits/byte  "
                f"{time.time() - t0:6.0f} s")
    model = model.cpu().eval()
    # int8-representable embeddings: the table the hardware stores is then exactly the model's
    # (rounding it at export instead costs about 1% of the integer model's top-1 agreement)
    with torch.no_grad():
        emb = model.model.embeddings.weight
        emb.copy_(int8_embeddings(emb, FORMATS.x_frac))
    report = {
        "steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed,
        "int8_embeddings_frac": FORMATS.x_frac,
        "train_bytes": int(len(tr)), "held_out_bytes": int(len(ho)),
        "held_out_bits_per_byte": evaluate_bits_per_byte(model, ho, seq),
        "unigram_bits_per_byte": unigram_bits_per_byte(tr, ho),
        "uniform_bits_per_byte": 8.0,
        "train_seconds": round(time.time() - t0, 1),
    }
    return model, report
