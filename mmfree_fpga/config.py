"""The single source of truth: model geometry, number formats, hardware parameters.

Everything in ``reference/``, ``hw/``, ``sim/``, ``host/`` and ``boards/`` reads its
dimensions and fixed-point formats from here; no geometry constant is written twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CheckpointError

__all__ = ["ModelConfig", "Formats", "FORMATS", "FORMAT_SETS", "slots_formats_error", "LAYER_BITLINEARS",
           "derive_intermediate_size"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_text(value) -> str:
    """``value`` as it is written in config.json (so 'false' and false read differently)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def derive_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """``int(d * hidden_ratio * 2 / 3)`` rounded up to a multiple of 256, as mmfreelm does."""
    raw = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((raw + 255) // 256)


# config.json keys we accept, with the only value we support where a key changes the math.
_REQUIRED_VALUES = {
    "model_type": ("hgrn_bit", "this toolkit implements the HGRN-bit architecture only"),
    "num_heads": (1, "the g_norm would be split per head; the published models use 1 head"),
    "expand_ratio": (1, "the token mixer would be wider than the hidden size; published models use 1"),
    "use_short_conv": (False, "the short convolution is not implemented; published models have it off"),
    "tie_word_embeddings": (False, "lm_head must be its own ternary matrix, as in the published models"),
    "attn_mode": ("fused_recurrent", "only the recurrent MLGRU formulation is defined for decode"),
    "hidden_act": ("swish", "the GLU uses SiLU (swish) only"),
}


# The BitLinears of one layer as the checkpoint names them (module.matrix), in image order.
LAYER_BITLINEARS = ("attn.i_proj", "attn.f_proj", "attn.g_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelConfig:
    """Geometry of an HGRN-bit model (the parts of ``config.json`` that matter)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    use_lower_bound: bool = True

    # -- derived names used throughout the code -----------------------------------
    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def L(self) -> int:
        return self.num_hidden_layers

    @property
    def I(self) -> int:  # noqa: E743 - the paper's name
        return self.intermediate_size

    @property
    def V(self) -> int:
        return self.vocab_size

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise CheckpointError(f"config key {key!r} must be a positive integer, got {_json_text(value)}")
        if not (_is_number(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            raise CheckpointError(f"config key 'rms_norm_eps' must be a number in (0, 1), "
                                  f"got {_json_text(self.rms_norm_eps)}")
        if not isinstance(self.use_lower_bound, bool):
            raise CheckpointError(f"config key 'use_lower_bound' must be true or false, "
                                  f"got {_json_text(self.use_lower_bound)}")
        if max(self.hidden_size, self.intermediate_size) > FORMATS.max_features:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} / intermediate_size {self.intermediate_size} exceed "
                f"the largest supported vector length {FORMATS.max_features}")

    # -- sizes -------------------------------------------------------------------
    def bitlinear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every BitLinear of one layer, plus lm_head."""
        d, i = self.d, self.I
        shapes = {"attn.i_proj": (d, d), "attn.f_proj": (d, d), "attn.g_proj": (d, d),
                  "attn.o_proj": (d, d), "mlp.gate_proj": (2 * i, d), "mlp.down_proj": (d, i)}
        return {name: shapes[name] for name in LAYER_BITLINEARS}

    @property
    def ternary_weights(self) -> int:
        """Ternary weights (= ternary MACs per token): ``L (4 d^2 + 3 d I) + V d``."""
        return self.L * (4 * self.d ** 2 + 3 * self.d * self.I) + self.V * self.d

    def ideal_cycles(self, lanes: int) -> float:
        """Cycles per token of a matrix unit taking ``lanes`` trits per cycle and nothing else:
        ``ternary_weights / lanes``, the bound every engine's cycle count is compared with."""
        return self.ternary_weights / lanes

    @property
    def embedding_params(self) -> int:
        return self.V * self.d

    # -- config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        """Validate an mmfreelm ``config.json`` dict; unsupported settings raise CheckpointError."""
        if not isinstance(cfg, dict):
            raise CheckpointError("config.json must hold a JSON object")
        for key, (wanted, why) in _REQUIRED_VALUES.items():
            value = cfg.get(key)
            if key == "model_type":
                if value != wanted:
                    raise CheckpointError(
                        f"config key 'model_type' is {value!r}, expected 'hgrn_bit': {why}")
            elif value is not None and type(value) is not type(wanted):
                kind = {bool: "boolean", int: "integer", str: "string"}[type(wanted)]
                raise CheckpointError(f"config key {key!r} must be the JSON {kind} {_json_text(wanted)}, "
                                      f"got {_json_text(value)}")
            elif value is not None and value != wanted:
                raise CheckpointError(f"config key {key!r} = {value!r} is not supported "
                                      f"(only {wanted!r}): {why}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if cfg.get(k) is None]
        if missing:
            raise CheckpointError(f"config.json lacks the key(s) {', '.join(missing)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if not _is_int(cfg[key]) or cfg[key] <= 0:
                raise CheckpointError(f"config key {key!r} must be a positive integer, got {_json_text(cfg[key])}")
        ratio = cfg.get("hidden_ratio")
        if ratio is None:
            ratio = 4
        elif not (_is_number(ratio) and ratio > 0):
            raise CheckpointError(f"config key 'hidden_ratio' must be a positive number, got {_json_text(ratio)}")
        inter = cfg.get("intermediate_size")
        if inter is None:
            try:
                inter = derive_intermediate_size(cfg["hidden_size"], ratio)
            except OverflowError:
                inter = math.inf
            if inter > FORMATS.max_features:
                raise CheckpointError(f"config keys 'hidden_size' {cfg['hidden_size']} and 'hidden_ratio' "
                                      f"{_json_text(ratio)} give an intermediate size beyond the largest "
                                      f"supported vector length {FORMATS.max_features}")
            if inter <= 0:
                raise CheckpointError(f"config key 'hidden_ratio' = {_json_text(ratio)} leaves the MLP no "
                                      "features; give intermediate_size")
        eps = cfg.get("rms_norm_eps", 1e-6)
        lower = cfg.get("use_lower_bound")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            intermediate_size=inter,
            rms_norm_eps=eps,
            use_lower_bound=True if lower is None else lower,
        )

    def to_hf_dict(self) -> dict:
        """The ``config.json`` mmfreelm writes for this geometry."""
        return {
            "architectures": ["HGRNBitForCausalLM"],
            "model_type": "hgrn_bit",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "hidden_ratio": 4,
            "num_heads": 1,
            "expand_ratio": 1,
            "attn_mode": "fused_recurrent",
            "use_short_conv": False,
            "conv_size": 4,
            "share_conv_kernel": True,
            "use_lower_bound": self.use_lower_bound,
            "hidden_act": "swish",
            "max_position_embeddings": 2048,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "pad_token_id": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "fuse_cross_entropy": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_checkpoint(cls, directory) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json; a checkpoint is a directory with "
                                  "config.json and model.safetensors (or pytorch_model.bin)")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); give the checkpoint's own config.json") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: not a config.json (nested too deeply)") from None
        return cls.from_hf_dict(cfg)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Formats:
    """Fixed-point formats of the integer model (and so of the hardware).

    Notation: a value stored as integer ``n`` in format "Qf" means ``n / 2**f``.

    * activations entering a matrix: int8 ``q`` in [-128, 127], per-token absmax scale;
    * weights: trits {-1, 0, +1}; one scale ``beta`` per matrix, folded into ``out_scale``;
    * residual stream ``x``, the MLGRU state ``h`` and every BitLinear output: signed
      ``x_bits`` integers in Q``x_frac``, saturated on every add;
    * gates (sigmoid outputs, forget gates, lower bounds): unsigned Q``gate_frac``;
    * per-channel norm vectors: signed ``norm_bits`` integers with one power-of-two exponent
      per vector, chosen at export so the largest entry uses the full width;
    * the vector entering a BitLinear is first normalised to ``norm_bits`` bits (one shift per
      token), so every per-element product is ``norm_bits x norm_bits``;
    * the per-token output scale of a BitLinear is a ``scale_bits``-bit mantissa and a shift;
    * embedding rows: signed ``emb_bits``-bit mantissas (|q| <= 2^(emb_bits-1) - 1) with an unsigned
      ``emb_scale_bits``-bit per-row scale in Q``emb_scale_frac``;
    * ``quant_exact``: the activation quantiser rounds exactly (round half up of 127 |z| / m) instead
      of through the ``quant_bits`` / ``recip_frac`` reciprocal;
    * ``norm_eps``: each BitLinear adds the float model's inner RMSNorm eps to its sum of squares
      (an export-time constant ``eps_mant * 2^eps_exp`` per BitLinear; needs ``norm_bits >= 16`` and
      ``x_frac >= 12``).

    The image stores a and c as int16 when ``norm_bits <= 16`` (else int32), lower bounds as
    uint16 when ``gate_frac <= 16`` (else uint32), embedding mantissas as int8 when
    ``emb_bits <= 8`` (else int32), and each BitLinear's ``k`` section as 2 int32 (4 with
    ``norm_eps``); see :func:`mmfree_fpga.image.image_layout`. :data:`FORMAT_SETS` names the sets
    the toolkit builds.
    """

    act_bits: int = 8
    x_bits: int = 32
    x_frac: int = 16
    gate_frac: int = 15
    norm_bits: int = 16
    # mantissa width of the export-time constant beta * sqrt(n) / 127
    const_bits: int = 16
    # bits of the per-token scale mantissa (quotient of the scalar divider)
    scale_bits: int = 17
    # sum-of-squares terms are (v * a) >> sumsq_shift before squaring
    sumsq_shift: int = 15
    # the quantiser shifts |z| and m = max|z| so m has quant_bits bits, then multiplies by
    # R = floor(127 << recip_frac / m16)
    quant_bits: int = 16
    recip_frac: int = 24
    # sigmoid table: 2**sig_table_log2 + 1 entries over [-sig_range, +sig_range]
    sig_range: int = 16
    sig_table_log2: int = 9
    # embedding rows: int8 values with an unsigned per-row scale in Q(emb_scale_frac)
    emb_scale_frac: int = 24
    emb_scale_bits: int = 32
    # largest supported vector (in_features/out_features of any matrix except lm_head rows)
    max_features: int = 16384
    # embedding mantissa bits (signed); int8 in the image up to 8, else int32
    emb_bits: int = 8
    # exactly rounded quantiser (else the quant_bits / recip_frac reciprocal)
    quant_exact: bool = False
    # the inner RMSNorm eps term in every BitLinear's sum of squares
    norm_eps: bool = False

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if isinstance(getattr(type(self), name, None), bool):
                if not isinstance(value, bool):
                    raise TypeError(f"Formats.{name} must be a bool, got {value!r}")
            elif not _is_int(value):
                raise TypeError(f"Formats.{name} must be an int, got {value!r}")
        if not 2 <= self.emb_bits <= 32:
            raise ValueError(f"Formats.emb_bits must be in 2..32, got {self.emb_bits}")
        if self.norm_bits > 32 or self.gate_frac > 32 or self.emb_scale_bits > 32:
            raise ValueError("Formats: norm_bits, gate_frac and emb_scale_bits are stored in at most 32 bits")
        if self.norm_eps and (self.norm_bits < 16 or self.x_frac < 12):
            raise ValueError("Formats.norm_eps needs norm_bits >= 16 and x_frac >= 12")

    @property
    def acc_bits(self) -> int:
        """Signed accumulator width: |acc| <= 128 * max_features."""
        return (128 * self.max_features).bit_length() + 1

    @property
    def sig_step_log2(self) -> int:
        """Sigmoid table step is 2**-sig_step_log2."""
        return self.sig_table_log2 - 1 - int(math.log2(self.sig_range))

    @property
    def x_max(self) -> int:
        return (1 << (self.x_bits - 1)) - 1

    @property
    def x_min(self) -> int:
        return -(1 << (self.x_bits - 1))

    def summary(self) -> str:
        """One phrase for help texts: the widths a user chooses between, from the fields themselves."""
        emb = "int8" if self.emb_bits <= 8 else f"{self.emb_bits}-bit"
        return (f"Q{self.x_frac} in {self.x_bits} bits, {self.norm_bits}-bit norms, {emb} embeddings, a "
                f"2^{self.sig_table_log2}-interval sigmoid table, the "
                f"{'exact' if self.quant_exact else 'reciprocal'} quantiser"
                + (", the inner RMSNorm eps" if self.norm_eps else ""))

    @property
    def int32_residual(self) -> bool:
        """The residual stream is a Q16 int32: what the Link's slice ops carry (state slots)."""
        return self.x_bits <= 32 and self.x_frac == 16

    def as_dict(self) -> dict:
        d = asdict(self)
        d["acc_bits"] = self.acc_bits
        return d


FORMATS = Formats()

# The format sets the toolkit builds, by name. "narrow": the first engine's (and the iCE40 tiny
# engine's). "medium": the ECP5 boards' on-chip engine (registry.Board.formats): narrow plus what
# the demo's held-out texts showed to matter most (issue 21: top-1 against float32 >= 0.993 on
# each, where narrow gives 0.991-0.993): the exact quantiser, 20-bit normalised vectors and norm
# weights (with 20-bit constants, a 21-bit scale mantissa) and a 2^11-interval sigmoid table.
# Either change alone left a text below 0.993. The activations stay Q16 in 32 bits and the
# embeddings int8 (the wide engine's 50-bit datapath and larger image keep it far from 100 MHz at
# 64 lanes; medium meets it: 109 MHz, README 'Format sets').
# "wide": Q34 activations in 50 bits, 32-bit normalised vectors and norm weights, 24-bit
# constants, Q30 gates from a 2^15-interval sigmoid table, the exact quantiser, the inner RMSNorm
# eps and 30-bit embedding mantissas (issue 21: float32's distance to float64 at the published
# geometries; bench --only fidelity). From the previous wide sets: Q28 in 44 bits with 24-bit
# norms flipped int8 activations many times as often as float32 (the norms) and flipped layer 0's
# (24-bit embeddings: a bf16 row is exact in float32); with Q23 gates from a 2^13-interval table
# the MLGRU's gates were as coarse as float32 (o_proj's input as far from float64 as float32's,
# 1.3B), so a whole run drifted from float64 as far as float32 does; Q30 and 2^15 intervals put
# it about ten times closer (the precision note of the fidelity section). quant_bits / recip_frac
# stay: in the wide set they size the hardware's reciprocal candidate, which it corrects to the
# exact result.
FORMAT_SETS = {
    "narrow": FORMATS,
    "medium": Formats(norm_bits=20, sumsq_shift=23, const_bits=20, scale_bits=21, sig_table_log2=11,
                      quant_exact=True),
    "wide": Formats(x_bits=50, x_frac=34, norm_bits=32, sumsq_shift=39, gate_frac=30, sig_table_log2=15,
                    const_bits=24, scale_bits=25, emb_bits=30, emb_scale_frac=58, quant_exact=True,
                    norm_eps=True),
}



def slots_formats_error() -> str:
    """The one message for state slots asked of a format set without Q16 int32 residuals."""
    names = ", ".join(n for n, f in FORMAT_SETS.items() if f.int32_residual)
    return f"--slots needs a format set with Q16 int32 residuals ({names}): the slice ops carry them"


@dataclass(frozen=True)
class PerfModel:
    """Analytic cycles and bytes per token of the engine (``hw/engine.py``), to size a design
    without simulating it; ``mmfree-fpga bench`` checks it against simulation.

    The matrix unit takes ``ternary_weights / lanes`` cycles. What does not overlap a matrix:
    for each BitLinear whose input is the previous one's output (f_proj, o_proj, gate_proj and
    down_proj of every layer, and lm_head) ``passes`` passes over that input (statistics, then
    quantisation, one element per cycle) and ``job_latency`` cycles of pipeline and scalar-unit
    latency; i_proj and g_proj read the same x as f_proj and hide behind its matrix.

    The compact engine (``EngineCore(compact=True)``, :data:`PERF_MODEL_COMPACT`) adds
    ``embed_passes`` passes over the embedding (it goes through the half-rate output scale), a
    longer ``job_latency`` (the output scale and elementwise pipelines take two cycles per
    stage) and, for i_proj and g_proj, ``(q_split - 1) * d / lanes`` cycles of a first row fed
    from the narrow q FIFO. Both models assume d / lanes >= 2 (a matrix row at least as long as
    the compact output path takes per element).
    """

    passes: int = 2
    job_latency: int = 104
    embed_passes: int = 0
    q_split: int = 1

    def ideal_cycles(self, cfg: ModelConfig, lanes: int) -> float:
        return cfg.ideal_cycles(lanes)

    def cycles_per_token(self, cfg: ModelConfig, lanes: int) -> float:
        per_layer = (self.passes * (3 * cfg.d + cfg.I) + 4 * self.job_latency
                     + 2 * (self.q_split - 1) * cfg.d / lanes)
        return (self.ideal_cycles(cfg, lanes) + cfg.L * per_layer + (self.passes + self.embed_passes) * cfg.d
                + self.job_latency)

    def bytes_per_token(self, cfg: ModelConfig, packing: str, fmt: Formats = FORMATS) -> int:
        """Weight-memory bytes read per token: the whole image (in the formats ``fmt``) but the
        embedding table, plus one row of it and its scale."""
        from mmfree_fpga.image import image_layout
        layout = image_layout(cfg, packing, fmt)
        total = sum(s.size for s in layout if not s.name.startswith("embedding."))
        row = next(s.size for s in layout if s.name == "embedding.q") // cfg.V
        return total + row + 4

    def tokens_per_s(self, cfg: ModelConfig, lanes: int, packing: str, clock_hz: float,
                     bandwidth_bytes_per_s: float | None = None) -> tuple[float, str]:
        """(tokens/s, bound): the slower of compute (clock / cycles) and memory (bandwidth / bytes)."""
        compute = clock_hz / self.cycles_per_token(cfg, lanes)
        if bandwidth_bytes_per_s is None:
            return compute, "compute"
        memory = bandwidth_bytes_per_s / self.bytes_per_token(cfg, packing)
        return (compute, "compute") if compute <= memory else (memory, "memory bandwidth")


PERF_MODEL = PerfModel()
# the compact engine (iCE40UP5K): output scale and elementwise unit at half rate (each of their
# 11 pipeline stages 2 cycles), the embedding through the output scale, q FIFO words of lanes/4
PERF_MODEL_COMPACT = PerfModel(job_latency=124, embed_passes=1, q_split=4)

# Published geometries (MODEL.md), for benchmarks and size checks.
PUBLISHED = {
    "370M": ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, intermediate_size=2816),
    "1.3B": ModelConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, intermediate_size=5632),
    "2.7B": ModelConfig(vocab_size=32000, hidden_size=2560, num_hidden_layers=32, intermediate_size=6912),
}
