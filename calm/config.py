"""Model and training configurations: frozen, keyword-only dataclasses and named presets.

A model config fixes every weight shape and is saved as JSON beside the weights
(``config.json``). Command-line flags only override fields of a preset. Loading a
config validates field names and types, so a hand-edited file cannot smuggle in
unknown or ill-typed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from calm.errors import CalmError


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """The chunk autoencoder of SPEC §1 (encoder and decoder share the embedding)."""

    vocab_size: int = 4096
    """Vocabulary size; set from the dataset's tokenizer."""
    chunk_size: int = 4
    """K: tokens per chunk (the paper's semantic bandwidth)."""
    hidden_size: int = 512
    """d: width of the position-wise layers."""
    intermediate_size: int = 1280
    """Width of the SwiGLU MLPs."""
    num_encoder_layers: int = 2
    """Encoder layers; half before the squeeze, half after."""
    num_decoder_layers: int = 2
    """Decoder layers; half before the expand, half after."""
    latent_size: int = 128
    """l: size of the latent vector of one chunk."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    kl_weight: float = 1e-3
    """β: weight of the clipped KL term."""
    kl_clip: float = 0.5
    """λ_KL: per-dimension floor of the KL term (against posterior collapse)."""
    dropout: float = 0.15
    """p: token dropout (inputs replaced by the mask) and latent dropout rate (training only)."""
    token_mask: str = "learned"
    """What a dropped or absent input token reads: 'learned' (a mask embedding of its own)
    or 'id0' (token id 0, as the reference; id 0 is also end-of-text, which the
    autoencoder then cannot tell from a masked slot). Checkpoints without this field
    read 'id0'."""
    projection_bias: bool = False
    """Biases on the squeeze, latent, un-latent and expand Linears (the authors' layout, as
    in their released checkpoints); this library's own models have none."""


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """A LLaMA-style decoder-only backbone (SPEC §2)."""

    vocab_size: int = 4096
    """Vocabulary size; set from the dataset's tokenizer."""
    hidden_size: int = 768
    """d: model width."""
    intermediate_size: int = 2048
    """Width of the SwiGLU MLPs."""
    num_layers: int = 12
    """Number of Transformer blocks."""
    num_heads: int = 12
    """Number of attention (query) heads."""
    num_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means num_heads."""
    max_seq_len: int = 2048
    """Longest sequence (in backbone positions) the rotary tables cover."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    tie_embeddings: bool = False
    """Token-level models only: tie the output projection to the input embedding."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The generative head that turns a backbone hidden state into a latent vector."""

    kind: str = "energy"
    """Which head: 'energy' (default), 'flow' or 'diffusion'."""
    noise_size: int = 64
    """Energy head: size of the uniform noise input."""
    final_init: str = "zero"
    """Energy head: initial weights of its last Linear, 'zero' (the reference's: every
    sample starts at 0) or 'default' (PyTorch's uniform init), which learns several
    times faster at small scale (benchmarks/recipe_study.py)."""
    width: int | None = None
    """Width of the head's MLP; None means the backbone's hidden size."""
    num_blocks: int | None = None
    """Residual blocks; None means max(1, backbone layers // 4)."""
    num_samples: int = 8
    """N: model samples per target during training."""
    num_targets: int = 100
    """M: posterior samples of the target per chunk (energy loss)."""
    alpha: float = 1.0
    """Exponent of the energy score, in (0, 2)."""
    flow_steps: int = 4
    """Flow head: ODE steps at sampling time."""
    flow_solver: str = "midpoint"
    """Flow head: 'euler' or 'midpoint'."""
    flow_time_shift: float = 1.0
    """Flow head: s in t = u / (s − (s − 1)·u), for the training times (u ~ U(0, 1)) and the
    solver's steps (equal in u). 1: uniform t, the paper's; s > 1 spends more of both near
    the noise end."""
    diffusion_steps: int = 100
    """Diffusion head: respaced DDPM steps at sampling time."""


@dataclass(frozen=True, kw_only=True)
class CALMConfig:
    """CALM = frozen autoencoder + input compression + backbone + generative head (SPEC §2)."""

    backbone: TransformerConfig = field(default_factory=TransformerConfig)
    """The Transformer over chunk positions."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The generative head."""
    chunk_size: int = 4
    """K; must equal the autoencoder's."""
    latent_size: int = 128
    """l; must equal the autoencoder's."""
    input_scheme: str = "discrete"
    """How the previous chunk enters: 'discrete' (tokens), 'continuous' (latent) or 'both'."""
    token_loss_weight: float = 0.0
    """Weight of an auxiliary cross-entropy on the next chunk's K tokens, read from the
    backbone's hidden state by a small probe tied to the input embedding. A training aid
    only: sampling, generation and evaluation never use the probe. 0: the paper's objective
    (the generative head's loss alone)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training loop for every stage (autoencoder, CALM, baseline)."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch (per process)."""
    block_size: int = 512
    """Tokens per sequence; must be divisible by K."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (constant after warm-up, as the reference)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    warmdown: float = 0.0
    """Fraction of the run at its end over which the LR falls linearly to 0 (0: constant,
    as the reference). With a time budget the run's end is whichever comes first,
    the last step or the budget."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = 200
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation."""
    save_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    seed: int = 1337
    """Seed of the data order, dropout and model noise."""


PRESETS: dict[str, dict[str, Any]] = {
    # Autoencoder presets (SPEC §1). vocab_size is always taken from the data.
    "autoencoder": {
        "tiny": AutoencoderConfig(hidden_size=32, intermediate_size=64, latent_size=16),
        "demo": AutoencoderConfig(hidden_size=256, intermediate_size=640, latent_size=128),
        "reference": AutoencoderConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1280, latent_size=128
        ),
    },
    # Backbone presets; S..XL are the paper's (SPEC §3 footnote), head dim 64.
    "transformer": {
        "tiny": TransformerConfig(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_seq_len=256
        ),
        "demo": TransformerConfig(
            hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, max_seq_len=1024
        ),
        "bench": TransformerConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8
        ),
        "S": TransformerConfig(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12),
        "M": TransformerConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16),
        "L": TransformerConfig(hidden_size=1536, intermediate_size=4096, num_layers=16, num_heads=24),
        "XL": TransformerConfig(hidden_size=2560, intermediate_size=6880, num_layers=16, num_heads=40),
    },
}


def preset(family: str, name: str, **overrides: Any):
    """Return the named preset of a family with some fields overridden."""
    table = PRESETS[family]
    if name not in table:
        raise CalmError(f"unknown {family} preset {name!r}; choose from {', '.join(table)}")
    return replace(table[name], **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- JSON


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (nested configs become nested dicts)."""
    return dataclasses.asdict(cfg)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except CalmError as e:
                errs.append(str(e))
        raise CalmError(errs[0] if errs else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CalmError(f"{where}: expected an object, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalmError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CalmError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise CalmError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise CalmError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config"):
    """Build a config from JSON data, refusing unknown fields and ill-typed values."""
    if not isinstance(data, dict):
        raise CalmError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CalmError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)
