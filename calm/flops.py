"""FLOPs accounting for CALM and the token-level baseline (paper §7.2, Table 1; SPEC §2-3).

Closed-form counts of the matrix products that really run, per token:

- training: forward + backward of one block of ``block_size`` tokens, divided by
  ``block_size`` (the training loop counts every token of a batch). CALM runs the
  frozen encoder on all T/K chunks, and the compression, backbone, head and loss
  on the T/K − 1 input positions; the baseline runs T − 1 positions.
- inference: one generation step (KV cache, one new backbone position) divided by
  the tokens it emits: K for CALM (compression + backbone + head + the
  autoencoder's decoder with its vocabulary projection), 1 for the baseline.

Conventions (the same as ``torch.utils.flop_counter.FlopCounterMode``):
- one multiply-add = 2 FLOPs; only matrix products count. Norms, activations,
  softmax, rotary embeddings, residual adds, bias adds, embedding lookups and
  the optimizer are not counted (they are a few percent at most).
- backward of y = x·W: a weight gradient (as much as the forward) when W is
  trainable, an input gradient (as much again) when x needs one. Trainable
  layers cost 3× their forward; the head's noise projection (its input is
  noise) 2×; the frozen autoencoder encoder that makes the targets 1×.
- attention: QKᵀ and AV over the full score matrix, causal mask or not (what
  FlopCounterMode and the paper's Table 1 count; no kernel skips work in the
  count); backward 2× forward. FlashAttention's recomputation of QKᵀ in its
  backward (another 0.5× of the attention forward, counted by FlopCounterMode
  on CUDA) is not included.
- context lengths are in tokens; CALM's backbone attends over ⌈context / K⌉
  chunk positions.

With the paper's sizes (Llama 3 vocabulary, 5e11 training tokens, context 2048
steps) these formulas give Table 1's parameter and inference FLOPs figures
within 1-3 %, and its training FLOPs within 6 %.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from calm.config import AutoencoderConfig, TransformerConfig


def _lin(n_in: int, n_out: int) -> int:
    """Forward FLOPs of one row through a Linear(n_in → n_out)."""
    return 2 * n_in * n_out


# ----------------------------------------------------------------------------- pieces


def backbone_flops(cfg: TransformerConfig) -> int:
    """Forward FLOPs of one position through every block, attention scores excluded."""
    d, H, G, hd, ff = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    per_layer = _lin(d, (H + 2 * G) * hd) + _lin(H * hd, d) + _lin(d, 2 * ff) + _lin(ff, d)
    return cfg.num_layers * per_layer


def attention_flops(cfg: TransformerConfig, keys: int) -> int:
    """Forward FLOPs of one query attending to ``keys`` keys (QKᵀ and AV), all layers."""
    return cfg.num_layers * 2 * _lin(cfg.num_heads * cfg.head_dim, keys)


def encoder_flops(ae: AutoencoderConfig) -> int:
    """Forward FLOPs of the autoencoder's encoder for one chunk (μ and log σ)."""
    d, K, ff, l = ae.hidden_size, ae.chunk_size, ae.intermediate_size, ae.latent_size
    layer = _lin(d, 2 * ff) + _lin(ff, d)  # one SwiGLU layer, one position
    ne = ae.num_encoder_layers
    return K * (ne // 2) * layer + _lin(K * d, d) + (ne - ne // 2) * layer + _lin(d, 2 * l)


def decoder_flops(ae: AutoencoderConfig, vocab: bool = True) -> int:
    """Forward FLOPs of the decoder for one latent: K positions, with the vocabulary projection."""
    d, K, ff, l = ae.hidden_size, ae.chunk_size, ae.intermediate_size, ae.latent_size
    layer = _lin(d, 2 * ff) + _lin(ff, d)
    nd = ae.num_decoder_layers
    f = _lin(l, d) + (nd // 2) * layer + _lin(d, K * d) + K * (nd - nd // 2) * layer
    return f + (K * _lin(d, ae.vocab_size) if vocab else 0)


def compression_flops(model: nn.Module) -> tuple[int, int]:
    """CALM input compression of one position: (forward, forward + backward)."""
    cfg = model.config
    d, K, l = cfg.backbone.hidden_size, cfg.chunk_size, cfg.latent_size
    fwd = train = 0
    if cfg.input_scheme in ("discrete", "both"):
        f = _lin(K * d, 2 * d) + _lin(2 * d, d)
        fwd, train = fwd + f, train + 3 * f  # the embeddings are trainable: input grads too
    if cfg.input_scheme in ("continuous", "both"):
        f = _lin(l, d)
        fwd, train = fwd + f, train + 2 * f  # the latents come from the frozen encoder
    return fwd, train


def _energy_head_training(head: nn.Module) -> tuple[int, int]:
    """(head, loss) FLOPs of one training position of the energy head, forward + backward.

    The condition path (Linear(d → w) and each block's c-half of its first
    Linear) runs once per position and is shared by the N samples; the noise
    path runs N times. The loss computes ‖a‖², ‖b‖² and a·bᵀ by batched
    matmuls for the N×M (fidelity) and N×N (diversity) pairs; the targets need
    no gradient.
    """
    w, d, l, z = head.width, head.hidden_size, head.latent_size, head.noise_size
    nb, N, M = len(head.blocks), head.num_samples, head.num_targets
    shared = _lin(d, w) + nb * _lin(w, w)
    per_sample = _lin(z, w) + nb * (_lin(w, w) + _lin(w, w) + _lin(w, 2 * w) + _lin(w, w))
    per_sample += _lin(w, w) + _lin(w, l)
    # everything trainable and on differentiable inputs (3×), except the noise projection (2×)
    head_total = 3 * shared + N * (3 * per_sample - _lin(z, w))
    norms_x = 2 * N * l  # ‖x_n‖², computed once per pairwise call
    fidelity = 3 * norms_x + 2 * M * l + 2 * (2 * N * M * l)  # ‖y‖² and y: no gradient
    diversity = 3 * norms_x + 3 * (2 * N * N * l)
    return head_total, fidelity + diversity


def _conditioned_mlp_parts(net: nn.Module) -> tuple[int, int, int]:
    """Forward FLOPs of the flow/diffusion network: (condition path, once per position;
    time MLP, once per t; the rest, once per replica or sample)."""
    from calm.heads.conditioning import FREQ_SIZE

    w, d, l, nb = net.width, net.hidden_size, net.latent_size, len(net.blocks)
    cond = _lin(d, w)
    time = _lin(FREQ_SIZE, w) + _lin(w, w)
    rest = _lin(l, w) + nb * (_lin(w, 3 * w) + 2 * _lin(w, w)) + _lin(w, 2 * w) + _lin(w, l)
    return cond, time, rest


def _conditioned_mlp_training(head: nn.Module) -> int:
    """Flow/diffusion head, one training position: N replicas, each with its own t."""
    from calm.heads.conditioning import FREQ_SIZE

    net, N = head.net, head.num_samples
    cond, time, rest = _conditioned_mlp_parts(net)
    w, l = net.width, net.latent_size
    # no input gradient for the sinusoidal features and the noisy latent x_t
    per_replica = 3 * (time + rest) - _lin(FREQ_SIZE, w) - _lin(l, w)
    return 3 * cond + N * per_replica


def _head_training(head: nn.Module) -> tuple[int, int]:
    """(head, loss) FLOPs of one training position, forward + backward."""
    from calm.heads.energy import EnergyHead

    if isinstance(head, EnergyHead):
        return _energy_head_training(head)
    if _has_conditioned_mlp(head):
        return _conditioned_mlp_training(head), 0  # the loss is a squared error: no matmul
    # Any other head: N network evaluations per position, forward + backward.
    n = getattr(head, "num_samples", 1)
    return 3 * n * head.flops_per_sample(), 0


def _head_inference(head: nn.Module) -> int:
    """FLOPs of one sample for one position (all network evaluations of the sampler)."""
    if _has_conditioned_mlp(head):
        # The condition path runs once; t is one scalar per step, so the time MLP
        # runs once per evaluation (counted per row, as for a batch of one).
        cond, time, rest = _conditioned_mlp_parts(head.net)
        return cond + head.sampling_steps * (time + rest)
    return head.flops_per_sample() * head.sampling_steps


def _has_conditioned_mlp(head: nn.Module) -> bool:
    from calm.heads.conditioning import ConditionedMLP

    return isinstance(getattr(head, "net", None), ConditionedMLP)


# ----------------------------------------------------------------------------- totals


def _is_calm(model: nn.Module) -> bool:
    return getattr(model, "kind", None) == "calm"


def _check_block(model: nn.Module, block_size: int) -> None:
    from calm.errors import CalmError

    K = model.config.chunk_size if _is_calm(model) else 1
    if block_size % K or block_size // K < 2:
        raise CalmError(
            f"block size {block_size} must be a multiple of K={K} holding 2 steps or more"
        )


def training_parts(model: nn.Module, block_size: int) -> dict[str, float]:
    """Training FLOPs per token, forward + backward, by part."""
    _check_block(model, block_size)
    T = block_size
    if _is_calm(model):
        cfg = model.config
        C = T // cfg.chunk_size
        P = C - 1  # input positions: chunks 0 … C−2 predict chunks 1 … C−1
        head, loss = _head_training(model.head)
        parts = {
            "autoencoder encoder (frozen, targets)": C * encoder_flops(model.autoencoder.config),
            "input compression": P * compression_flops(model)[1],
            "backbone": P * 3 * backbone_flops(cfg.backbone),
            "backbone attention scores": P * 3 * attention_flops(cfg.backbone, P),
            f"head (N={getattr(model.head, 'num_samples', 1)} samples)": P * head,
        }
        if loss:
            parts["energy loss distances"] = P * loss
        if cfg.token_loss_weight > 0:
            # Linear(d → K·d) and K tied-embedding logits per position, forward + backward.
            d, K, V = cfg.backbone.hidden_size, cfg.chunk_size, cfg.backbone.vocab_size
            parts["auxiliary token loss"] = P * 3 * (_lin(d, K * d) + K * _lin(d, V))
        if cfg.input_scheme == "both" and cfg.chunk_size > 1:
            # Training re-encodes each block's first chunk with its absent slots masked.
            parts["autoencoder encoder (first chunk, masked)"] = encoder_flops(
                model.autoencoder.config)
    else:
        cfg = model.config
        P = T - 1
        parts = {
            "embedding (lookup)": 0,
            "backbone": P * 3 * backbone_flops(cfg),
            "backbone attention scores": P * 3 * attention_flops(cfg, P),
            "lm head + cross-entropy": P * 3 * _lin(cfg.hidden_size, cfg.vocab_size),
        }
    return {k: v / T for k, v in parts.items()}


def inference_parts(model: nn.Module, context_len: int) -> dict[str, float]:
    """Inference FLOPs per generated token, by part; the new step attends over the context."""
    if context_len < 1:
        from calm.errors import CalmError

        raise CalmError(f"context length must be positive, got {context_len}")
    if _is_calm(model):
        cfg = model.config
        K = cfg.chunk_size
        head = model.head
        parts = {
            "input compression": compression_flops(model)[0],
            "backbone": backbone_flops(cfg.backbone),
            "backbone attention scores": attention_flops(cfg.backbone, math.ceil(context_len / K)),
            "head (one sample)": _head_inference(head),
            "autoencoder decoder": decoder_flops(model.autoencoder.config, vocab=False),
            "decoder vocabulary projection": K
            * _lin(model.autoencoder.config.hidden_size, model.autoencoder.config.vocab_size),
        }
        return {k: v / K for k, v in parts.items()}
    cfg = model.config
    return {
        "embedding (lookup)": 0,
        "backbone": backbone_flops(cfg),
        "backbone attention scores": attention_flops(cfg, context_len),
        "lm head": _lin(cfg.hidden_size, cfg.vocab_size),
    }


def training_flops_per_token(model: nn.Module, block_size: int) -> float:
    """Forward + backward matmul FLOPs per training token at this block size (tokens)."""
    return float(sum(training_parts(model, block_size).values()))


def inference_flops_per_token(model: nn.Module, context_len: int) -> float:
    """Matmul FLOPs per generated token, one step attending over ``context_len`` tokens."""
    return float(sum(inference_parts(model, context_len).values()))


# ----------------------------------------------------------------------------- parameters


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """total (the frozen autoencoder included), trainable, frozen, and non-embedding: the
    trainable parameters less the vocabulary matrices (embeddings and the lm head)."""
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    vocab_mats = {}
    for name in ("embed", "lm_head"):
        m = getattr(model, name, None)
        if m is not None and m.weight.requires_grad:
            vocab_mats[id(m.weight)] = m.weight.numel()
    return {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "non_embedding": trainable - sum(vocab_mats.values()),
    }


def flops_breakdown(
    model: nn.Module, block_size: int, context_len: int | None = None
) -> dict[str, Any]:
    """Everything for display: parameters, training and inference FLOPs per token by part."""
    context_len = context_len or block_size
    train = training_parts(model, block_size)
    infer = inference_parts(model, context_len)
    out: dict[str, Any] = {
        "kind": getattr(model, "kind", "model"),
        "chunk_size": model.config.chunk_size if _is_calm(model) else 1,
        "block_size": block_size,
        "context_len": context_len,
        "params": parameter_counts(model),
        "training": {"per_token": float(sum(train.values())), "parts": train},
        "inference": {"per_token": float(sum(infer.values())), "parts": infer},
    }
    return out


def build_for_counting(
    kind: str, model_cfg: dict | Any, ae_cfg: dict | Any | None = None
) -> nn.Module:
    """A model of the given configs on the meta device: shapes without memory or weights."""
    import torch

    from calm.config import AutoencoderConfig, CALMConfig, TransformerConfig, from_dict
    from calm.errors import CalmError

    with torch.device("meta"):
        if kind == "calm":
            from calm.autoencoder import Autoencoder
            from calm.model import CALM

            if isinstance(model_cfg, dict):
                model_cfg = from_dict(CALMConfig, model_cfg, where="model config")
            if ae_cfg is None:
                raise CalmError("counting a CALM model needs its autoencoder's config")
            if isinstance(ae_cfg, dict):
                ae_cfg = from_dict(AutoencoderConfig, ae_cfg, where="autoencoder config")
            return CALM(model_cfg, Autoencoder(ae_cfg))
        if kind == "baseline":
            from calm.baseline import TokenLM

            if isinstance(model_cfg, dict):
                model_cfg = from_dict(TransformerConfig, model_cfg, where="model config")
            return TokenLM(model_cfg)
    raise CalmError(f"cannot count FLOPs of a {kind!r} model (expected calm or baseline)")


DEFAULT_BLOCK = 512  # the training commands' default block size


def model_from_checkpoint(path):
    """(model on the meta device, checkpoint config, training block size or None)."""
    from calm.checkpoint import read_state
    from calm.errors import CalmError
    from calm.loading import checkpoint_kind

    ckpt, cfg = checkpoint_kind(path)
    kind = cfg["kind"]
    if kind == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; FLOPs are counted for CALM and baseline models")
    ae_cfg = ((cfg.get("autoencoder") or {}).get("model")) if kind == "calm" else None
    if kind == "calm" and ae_cfg is None:
        raise CalmError(f"{ckpt}/config.json does not record its autoencoder's config")
    model = build_for_counting(kind, cfg.get("model") or {}, ae_cfg)
    block = (read_state(ckpt).get("train_config") or {}).get("block_size")
    return model, ckpt, block
