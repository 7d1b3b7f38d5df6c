"""CALM: frozen autoencoder + input compression + backbone + generative head (SPEC §2, paper §3).

Training layout (the reference's): a block of T tokens is C = T/K chunks; the
backbone reads chunks 0 … C−2 (each compressed to one vector) and at position i
predicts the latent vector of chunk i+1, whose target is the frozen
autoencoder's posterior N(μ, σ²).

Prompts whose length is not a multiple of K: the first chunk may have leading
*absent* slots, filled with a learned pad embedding rather than a token, so the
text the model reads stays exactly the prompt. Training shows the model such
partial first chunks (``PARTIAL_FIRST_CHUNK`` of the blocks), so it knows them.
"""

from __future__ import annotations

import torch
from torch import nn

from calm.autoencoder import Autoencoder
from calm.config import CALMConfig
from calm.errors import CalmError
from calm.heads import build_head
from calm.ops import linear_cross_entropy
from calm.transformer import KVCache, Transformer, init_weights

PARTIAL_FIRST_CHUNK = 0.25  # fraction of training blocks whose first chunk loses a prefix


class CALM(nn.Module):
    kind = "calm"

    def __init__(self, cfg: CALMConfig, autoencoder: Autoencoder):
        super().__init__()
        ae = autoencoder.config
        if (ae.chunk_size, ae.latent_size) != (cfg.chunk_size, cfg.latent_size):
            raise CalmError(
                f"the autoencoder has K={ae.chunk_size}, latent {ae.latent_size}; the model "
                f"needs K={cfg.chunk_size}, latent {cfg.latent_size}"
            )
        if ae.vocab_size != cfg.backbone.vocab_size:
            raise CalmError(
                f"the autoencoder's vocabulary ({ae.vocab_size}) differs from the model's "
                f"({cfg.backbone.vocab_size})"
            )
        if cfg.input_scheme not in ("discrete", "continuous", "both"):
            raise CalmError(
                f"unknown input scheme {cfg.input_scheme!r}; choose discrete, continuous or both"
            )
        self.config = cfg
        d, K, V = cfg.backbone.hidden_size, cfg.chunk_size, cfg.backbone.vocab_size
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        if cfg.input_scheme in ("discrete", "both"):
            self.embed = nn.Embedding(V, d)
            if K > 1:  # an absent token slot of a partial chunk (none exist when K = 1)
                self.pad_embed = nn.Parameter(torch.zeros(d))
            self.compress = nn.Sequential(
                nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=1e-6)
            )
        if cfg.input_scheme in ("continuous", "both"):
            self.latent_in = nn.Linear(cfg.latent_size, d)
        self.backbone = Transformer(cfg.backbone)
        self.head = build_head(cfg.head, d, cfg.latent_size, cfg.backbone.num_layers)
        for name, m in self.named_children():
            if name in ("embed", "compress", "latent_in"):
                init_weights(m)
        if hasattr(self, "pad_embed"):
            nn.init.normal_(self.pad_embed, std=0.02)
        if cfg.token_loss_weight < 0:
            raise CalmError(f"token_loss_weight must be >= 0, got {cfg.token_loss_weight}")
        if cfg.token_loss_weight > 0:
            if not hasattr(self, "embed"):
                raise CalmError("the auxiliary token loss reads the input embedding: use the "
                                "discrete or both input scheme, or token_loss_weight 0")
            # One d-vector per slot of the next chunk, scored against the (tied) embedding.
            self.token_probe = nn.Sequential(
                nn.Linear(d, K * d), nn.Unflatten(-1, (K, d)), nn.LayerNorm(d, eps=1e-6)
            )
            init_weights(self.token_probe)

    # The frozen autoencoder stays in eval mode (no dropout) whatever mode CALM is in.
    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()
        return self

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Weights to save: everything but the frozen autoencoder (it has its own checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("autoencoder.")}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ inputs

    def inputs(
        self,
        chunks: torch.Tensor,
        latents: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone inputs from the previous chunks: chunks (B, S, K) → (B, S, d).

        latents (B, S, l): the previous chunks' latent vectors (continuous input).
        known (B, S, K) bool: False marks an absent slot (pad embedding instead of a token).
        """
        scheme = self.config.input_scheme
        x = None
        if scheme in ("discrete", "both"):
            e = self.embed(chunks)  # (B, S, K, d)
            if known is not None and hasattr(self, "pad_embed"):
                e = torch.where(known[..., None], e, self.pad_embed.to(e.dtype))
            x = self.compress(e.flatten(-2))  # (B, S, d)
        if scheme in ("continuous", "both"):
            if latents is None:
                raise ValueError("the continuous input scheme needs the previous latents")
            c = self.latent_in(latents.to(self.latent_in.weight.dtype))
            x = c if x is None else x + c
        return x

    @torch.no_grad()
    def input_latents(
        self, chunks: torch.Tensor, known: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """What the continuous input reads for chunks (..., K): the frozen encoder's mean μ
        of their tokens (absent slots masked), in training and at inference alike; None
        for the discrete scheme."""
        if self.config.input_scheme == "discrete":
            return None
        return self.autoencoder.encode(chunks, known)[0]

    # ------------------------------------------------------------------ training

    def forward(
        self, tokens: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, T), T divisible by K → (energy loss, metrics)."""
        K = self.config.chunk_size
        B, T = tokens.shape
        if T % K:
            raise CalmError(f"block size {T} is not divisible by K={K}")
        chunks = tokens.reshape(B, T // K, K)
        with torch.no_grad():
            mean, log_std = self.autoencoder.encode(chunks)  # (B, C, l) targets
        known = None
        if self.training and hasattr(self, "pad_embed"):
            # Show the model partial first chunks: a random prefix of chunk 0 is absent.
            r = torch.rand(B, device=tokens.device, generator=generator)
            cut = torch.randint(1, K, (B,), device=tokens.device, generator=generator)
            cut = torch.where(r < PARTIAL_FIRST_CHUNK, cut, torch.zeros_like(cut))
            known = torch.ones(B, T // K - 1, K, dtype=torch.bool, device=tokens.device)
            known[:, 0] = torch.arange(K, device=tokens.device)[None, :] >= cut[:, None]
        prev = None
        if self.config.input_scheme != "discrete":
            prev = mean[:, :-1]
            if known is not None:  # a partial first chunk: μ of what is there, as at inference
                prev = torch.cat([self.input_latents(chunks[:, :1], known[:, :1]), prev[:, 1:]], 1)
        x = self.inputs(chunks[:, :-1], prev, known)  # (B, C−1, d)
        h = self.backbone(x)
        loss, metrics = self.head.loss(h, mean[:, 1:], log_std[:, 1:], generator=generator)
        if hasattr(self, "token_probe"):
            ce, acc = linear_cross_entropy(self.token_probe(h), self.embed.weight, chunks[:, 1:])
            metrics = {**metrics, "token/ce": ce.detach(), "token/acc": acc.detach()}
            loss = loss + self.config.token_loss_weight * ce
        metrics = {"loss": loss.detach(), **metrics}
        return loss, metrics

    # ------------------------------------------------------------------ generation

    def make_cache(self, batch_size: int, max_chunks: int) -> KVCache:
        return self.backbone.make_cache(batch_size, max_chunks)

    def step(
        self,
        chunks: torch.Tensor,
        latents: torch.Tensor | None,
        *,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed chunks (B, S, K) through the backbone with the cache; return the last hidden (B, d)."""
        x = self.inputs(chunks, latents, known)
        h = self.backbone(x, positions=positions, cache=cache, key_mask=key_mask)
        return h[:, -1]
