"""The token-level baseline: the same backbone, one token per step, cross-entropy (paper §4.1).

It shares the Transformer, presets, data and training loop with CALM, so the
two can be compared at equal budgets. The output projection to the vocabulary
and the cross-entropy run fused (calm.ops), which is most of its training cost.
"""

from __future__ import annotations

import torch
from torch import nn

from calm.config import TransformerConfig
from calm.ops import linear_cross_entropy
from calm.transformer import KVCache, Transformer, init_weights


class TokenLM(nn.Module):
    kind = "baseline"

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.backbone = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        init_weights(self.embed)
        init_weights(self.lm_head)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, tokens: torch.Tensor, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, T) → (mean next-token cross-entropy, metrics)."""
        h = self.backbone(self.embed(tokens[:, :-1]))  # (B, T−1, d)
        loss, acc = linear_cross_entropy(h, self.lm_head.weight, tokens[:, 1:])
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    def logits(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        read: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, S, V), or only at positions ``read`` (B, R, V)."""
        h = self.backbone(
            self.embed(tokens), positions=positions, cache=cache, key_mask=key_mask,
            attn_mask=attn_mask,
        )
        if read is not None:
            h = h[:, read]
        return self.lm_head(h)

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.backbone.make_cache(batch_size, max_len)
