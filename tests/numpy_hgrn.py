"""An independent float64 NumPy implementation of one HGRN-bit decode step, written straight
from ../shared/MODEL.md, used only to check the PyTorch reference."""

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * w


def bitlinear(x, W, wn, eps):
    xh = rms_norm(x, wn, eps)
    s = 127.0 / max(np.abs(xh).max(), 1e-5)
    v = xh * s
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127)
    beta = max(np.abs(W).mean(), 1e-5)
    T = np.clip(np.round(W / beta), -1, 1)
    return (T @ q) * beta / s


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def silu(z):
    return z * sigmoid(z)


class NumpyHGRN:
    def __init__(self, cfg, tensors):
        self.cfg = cfg
        self.t = {k: v.double().numpy() for k, v in tensors.items()}
        lb = self.t["model.lower_bounds"]
        e = np.exp(lb - lb.max(axis=0))
        sm = e / e.sum(axis=0)
        cs = np.cumsum(sm, axis=0)
        self.lb = cs - sm[0]
        self.h = [np.zeros(cfg.d) for _ in range(cfg.L)]

    def step(self, token):
        t, cfg, eps = self.t, self.cfg, self.cfg.rms_norm_eps
        x = t["model.embeddings.weight"][token].copy()
        for l in range(cfg.L):
            p = f"model.layers.{l}."
            bl = lambda name, v: bitlinear(v, t[p + name + ".weight"], t[p + name + ".norm.weight"], eps)  # noqa
            u = rms_norm(x, t[p + "attn_norm.weight"], eps)
            f = sigmoid(bl("attn.f_proj", u))
            lb = self.lb[l] if cfg.use_lower_bound else 0.0
            f = lb + (1 - lb) * f
            c = silu(bl("attn.i_proj", u)) * (1 - f)
            self.h[l] = f * self.h[l] + c
            o = rms_norm(bl("attn.g_proj", u), t[p + "attn.g_norm.weight"], eps) * silu(self.h[l])
            x = x + bl("attn.o_proj", o)
            v = rms_norm(x, t[p + "mlp_norm.weight"], eps)
            gu = bl("mlp.gate_proj", v)
            x = x + bl("mlp.down_proj", silu(gu[:cfg.I]) * gu[cfg.I:])
        return bitlinear(rms_norm(x, t["model.norm.weight"], eps), t["lm_head.weight"],
                         t["lm_head.norm.weight"], eps)
