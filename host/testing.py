"""Small random checkpoints and reference token streams, for tests of the host side and beyond."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from pathlib import Path

from mmfree_fpga.config import ModelConfig
from mmfree_fpga.generation import Sampler, generate

__all__ = ["SMALL_CONFIG", "TINY_CONFIG", "random_checkpoint", "reference_tokens"]

# byte-level (so --prompt text works); a 17 KB image
SMALL_CONFIG = ModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
# prompts as ids; a 4 KB image, for runs that load it many times over a noisy link
TINY_CONFIG = ModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=32)


def random_checkpoint(directory, cfg: ModelConfig = SMALL_CONFIG, seed: int = 0) -> Path:
    """A checkpoint of ``cfg`` with random weights, norms and lower bounds (not a trained model).

    Norm weights and lower bounds are spread out so the greedy token stream depends on the
    recurrent state rather than repeating one token.
    """
    import torch

    from mmfree_fpga.reference.checkpoint import save_checkpoint
    from mmfree_fpga.reference.model import HGRNBitForCausalLM
    gen = torch.Generator().manual_seed(seed)
    model = HGRNBitForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * noise)
            elif name == "model.lower_bounds":
                p.copy_(noise)
            else:
                p.copy_(0.05 * noise)
    return save_checkpoint(model, directory)


def reference_tokens(checkpoint, prompt: list[int], steps: int, sampler: Sampler | None = None,
                     formats: str = "narrow") -> list[int]:
    """``tokens`` of ``mmfree-fpga reference --integer [--formats F]`` (prompt + generated) for this prompt."""
    from mmfree_fpga.config import FORMAT_SETS
    from mmfree_fpga.reference.steppers import integer_stepper
    _, step = integer_stepper(checkpoint, FORMAT_SETS[formats])
    return generate(step, list(prompt), steps, sampler or Sampler()).tokens


@contextlib.contextmanager
def serve_many(checkpoint, n: int, *extra, backend: str = "model", cwd=None):
    """``n`` 'mmfree-fpga serve --backend BACKEND --port 0' children started together (``extra``:
    more serve options); yields their socket URLs and processes, and stops them all afterwards
    (a stopped child too). An RTL backend's design is built in ``cwd``'s ./out: build it once
    first, or the children build it at the same time."""
    procs = [subprocess.Popen([sys.executable, "-m", "mmfree_fpga.cli", "serve", "--backend", backend, "--port", "0",
                               "--checkpoint", str(checkpoint), *extra], cwd=cwd, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(n)]
    try:
        urls = []
        for proc in procs:
            for line in proc.stdout:
                found = re.search(r"socket://127\.0\.0\.1:\d+", line)
                if found:
                    urls.append(found.group(0))
                    break
        if len(urls) != n:
            raise RuntimeError("a serve child printed no URL")
        yield urls, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
