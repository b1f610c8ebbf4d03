import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mmfree_fpga.config import ModelConfig  # noqa: E402


def random_model(cfg: ModelConfig, seed: int = 0):
    """A model with random latent weights and non-trivial norms and lower bounds."""
    from mmfree_fpga.reference.model import HGRNBitForCausalLM, randomize
    return randomize(HGRNBitForCausalLM(cfg), seed)


@pytest.fixture
def small_cfg():
    return ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=256)


@pytest.fixture
def small_checkpoint(tmp_path, small_cfg):
    from mmfree_fpga.reference.checkpoint import save_checkpoint
    return save_checkpoint(random_model(small_cfg), tmp_path / "ckpt")
