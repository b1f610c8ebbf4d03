"""Float PyTorch reference of HGRN-bit (the MatMul-free LM), CPU, faithful to mmfreelm.

Parameter names equal the checkpoint's tensor names (mmfreelm's layout, the README's Checkpoints section), so a
``state_dict`` loads and saves in the mmfreelm layout. Quantisers use straight-through
estimators so the same module trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfree_fpga.config import ModelConfig

__all__ = [
    "round_half_away", "activation_quant", "weight_ternary", "RMSNorm", "BitLinear",
    "HGRNBitForCausalLM", "lower_bound_values",
]


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (the fused kernel's rounding)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def activation_quant(x: torch.Tensor):
    """Per-token absmax int8: returns (q, s) with q integer-valued, x ~= q / s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = round_half_away(x * s).clamp(-128, 127)
    return q, s


def weight_ternary(w: torch.Tensor):
    """Per-tensor absmean ternarisation: returns (T, beta) with T in {-1, 0, 1}, W ~= T * beta."""
    beta = w.abs().mean().clamp(min=1e-5)
    t = torch.round(w / beta).clamp(-1, 1)
    return t, beta


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BitLinear(nn.Module):
    """RMSNorm -> int8 absmax activations -> ternary absmean weights; no bias.

    Forward values are exactly the quantised computation; gradients pass straight through
    both quantisers.
    """

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, eps)
        nn.init.normal_(self.weight, std=0.02)
        self._wq_cache = None        # (weight version, weight storage, wq) for inference

    def quantised_weight(self) -> torch.Tensor:
        """The ternary weight ``T * beta`` as the forward pass uses it (through the straight-through
        form, so the values are those of training). Without gradients it is computed once and reused
        until the weight changes: ternarising is several passes over the whole matrix, which
        dominates a decode step of a large model (about 11 s per token at the 370M geometry)."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            t, beta = weight_ternary(w)
            return w + (t * beta - w).detach()
        key = (w._version, w.data_ptr(), w.dtype)
        if self._wq_cache is None or self._wq_cache[0] != key:
            t, beta = weight_ternary(w)
            self._wq_cache = (key, w + (t * beta - w))
        return self._wq_cache[1]

    def forward(self, x):
        xn = self.norm(x)
        q, s = activation_quant(xn)
        xq = xn + (q / s - xn).detach()
        return F.linear(xq, self.quantised_weight())


class MLGRU(nn.Module):
    """The token mixer: i/f/g projections, lower-bounded forget gate, elementwise recurrence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.d, cfg.rms_norm_eps
        self.i_proj = BitLinear(d, d, eps)
        self.f_proj = BitLinear(d, d, eps)
        self.g_proj = BitLinear(d, d, eps)
        self.g_norm = RMSNorm(d, eps)
        self.o_proj = BitLinear(d, d, eps)

    def forward(self, u, h, lower_bound):
        """u: [B, T, d]; h: [B, d] state before the first position; returns (out, h_last)."""
        f = torch.sigmoid(self.f_proj(u))
        f = lower_bound + (1 - lower_bound) * f
        c = F.silu(self.i_proj(u)) * (1 - f)
        outs = []
        for t in range(u.shape[1]):
            h = f[:, t] * h + c[:, t]
            outs.append(h)
        hs = torch.stack(outs, dim=1)
        o = self.g_norm(self.g_proj(u)) * F.silu(hs)
        return self.o_proj(o), h


class GLU(nn.Module):
    """The channel mixer: one [2I, d] BitLinear split into gate and up, SiLU gate, down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.I
        self.gate_proj = BitLinear(cfg.d, 2 * cfg.I, cfg.rms_norm_eps)
        self.down_proj = BitLinear(cfg.I, cfg.d, cfg.rms_norm_eps)

    def forward(self, v):
        gu = self.gate_proj(v)
        gate, up = gu[..., :self.intermediate], gu[..., self.intermediate:]
        return self.down_proj(F.silu(gate) * up)


class HGRNBitBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d, cfg.rms_norm_eps)
        self.attn = MLGRU(cfg)
        self.mlp_norm = RMSNorm(cfg.d, cfg.rms_norm_eps)
        self.mlp = GLU(cfg)

    def forward(self, x, h, lower_bound):
        a, h = self.attn(self.attn_norm(x), h, lower_bound)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, h


class HGRNBitModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.V, cfg.d)
        nn.init.normal_(self.embeddings.weight, std=0.02)
        self.lower_bounds = nn.Parameter(torch.zeros(cfg.L, cfg.d))
        self.layers = nn.ModuleList(HGRNBitBlock(cfg) for _ in range(cfg.L))
        self.norm = RMSNorm(cfg.d, cfg.rms_norm_eps)


def lower_bound_values(lower_bounds: torch.Tensor) -> torch.Tensor:
    """softmax over layers, cumulative sum, minus the first: layer 0 gets 0."""
    lb = lower_bounds.softmax(0)
    return lb.cumsum(0) - lb[0]


class HGRNBitForCausalLM(nn.Module):
    """The whole model. ``forward`` runs a prompt; ``step`` feeds one token to the state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = HGRNBitModel(cfg)
        self.lm_head = BitLinear(cfg.d, cfg.V, cfg.rms_norm_eps)

    def init_state(self, batch: int = 1) -> list[torch.Tensor]:
        """Recurrent state: one zero vector h per layer."""
        p = self.model.embeddings.weight
        return [torch.zeros(batch, self.config.d, dtype=p.dtype, device=p.device)
                for _ in range(self.config.L)]

    def lower_bounds(self) -> torch.Tensor:
        if not self.config.use_lower_bound:
            return torch.zeros_like(self.model.lower_bounds)
        return lower_bound_values(self.model.lower_bounds)

    def forward(self, ids: torch.Tensor, state: list[torch.Tensor] | None = None):
        """ids: [B, T] -> (logits [B, T, V], new state)."""
        if state is None:
            state = self.init_state(ids.shape[0])
        lbs = self.lower_bounds()
        x = self.model.embeddings(ids)
        new_state = []
        for layer, h, lb in zip(self.model.layers, state, lbs):
            x, h = layer(x, h, lb)
            new_state.append(h)
        return self.lm_head(self.model.norm(x)), new_state

    @torch.no_grad()
    def step(self, token: int, state: list[torch.Tensor]):
        """One decode step for batch 1: -> (logits [V], new state)."""
        logits, state = self.forward(torch.tensor([[token]]), state)
        return logits[0, 0], state


@torch.no_grad()
def randomize(model: HGRNBitForCausalLM, seed: int = 0, embedding_std: float = 1.0) -> HGRNBitForCausalLM:
    """Random latent weights with non-trivial norms and lower bounds (for tests and benchmarks)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        elif name == "model.lower_bounds":
            p.normal_()
        elif name == "model.embeddings.weight":
            p.normal_(0, embedding_std)
        else:
            p.normal_(0, 0.02)
    return model.eval()
