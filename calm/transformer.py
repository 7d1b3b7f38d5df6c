"""The LLaMA-style decoder-only backbone (SPEC §2).

Pre-norm blocks (RMSNorm → causal self-attention with rotary embeddings and
optional grouped key/value heads → residual; RMSNorm → SwiGLU → residual) and a
final RMSNorm. The backbone has no token embedding and no output head: it maps
input vectors (B, S, d) to hidden states (B, S, d). CALM feeds it compressed
chunk embeddings; the token-level baseline wraps it with an embedding and an
lm head.

Batches of prompts of different lengths are left-padded: each row's real
positions start at rotary position 0 (``positions``) and pad keys are hidden
from attention (``key_mask``). A ``KVCache`` makes incremental decoding give the
same hidden states as the full forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import TransformerConfig
from calm.errors import CalmError
from calm.layers import RMSNorm, SwiGLU
from calm.precision import matmul_dtype


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, LLaMA's rotate-half convention, angles in fp32.

    The tables are plain attributes, not buffers, so that ``model.to(bfloat16)``
    cannot round them; they are rebuilt when the device changes. Explicit
    positions are computed on the fly (the same formula as the tables), which
    needs no bounds check and so no host sync.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise CalmError(f"rotary embeddings need an even head size, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self._tables: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions (...,) → rotation angles (..., head_dim), fp32."""
        dev = positions.device
        exponent = (
            torch.arange(0, self.head_dim, 2, device=dev, dtype=torch.float32) / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponent)  # (hd/2,)
        freqs = positions.float()[..., None] * inv_freq  # (..., hd/2)
        return torch.cat([freqs, freqs], dim=-1)  # (..., hd): both halves share a frequency

    def forward(
        self, start: int, length: int, positions: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (1 or B, 1, S, hd), broadcastable against (B, H, S, hd)."""
        if positions is not None:
            angles = self._angles(positions.to(device))  # (S, hd) or (B, S, hd)
            if angles.dim() == 2:
                angles = angles[None]
            angles = angles[:, None]  # (B|1, 1, S, hd)
            return angles.cos(), angles.sin()
        if start + length > self.max_seq_len:  # beyond the tables: compute these positions only
            angles = self._angles(torch.arange(start, start + length, device=device))
            return angles.cos()[None, None], angles.sin()[None, None]
        if self._tables is None or self._tables[0] != device:
            angles = self._angles(torch.arange(self.max_seq_len, device=device))
            self._tables = (device, angles.cos(), angles.sin())
        _, cos, sin = self._tables
        return cos[start : start + length][None, None], sin[start : start + length][None, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, hd) queries or keys; the product is taken in fp32."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer: (L, B, kv_heads, max_len, hd).

    ``length`` counts the positions written so far; the backbone appends to it.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int = 0):
        self.keys = keys
        self.values = values
        self.length = length

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A new cache holding the given batch rows (LongTensor indices), e.g. to reorder."""
        rows = rows.to(self.keys.device)
        return KVCache(
            self.keys.index_select(1, rows), self.values.index_select(1, rows), self.length
        )

    def expand(self, n: int) -> KVCache:
        """A new cache with each row repeated n times in place: rows [0,0,..,1,1,..]."""
        return KVCache(
            self.keys.repeat_interleave(n, dim=1),
            self.values.repeat_interleave(n, dim=1),
            self.length,
        )


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings and grouped KV heads."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        # One matmul for [q; k; v]; head h of q is rows h*hd:(h+1)*hd.
        self.qkv = nn.Linear(
            cfg.hidden_size, (self.num_heads + 2 * self.kv_heads) * self.head_dim, bias=False
        )
        self.proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        H, G, hd = self.num_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, G * hd, G * hd], dim=-1)
        q = q.view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(B, S, G, hd).transpose(1, 2)  # (B, G, S, hd)
        v = v.view(B, S, G, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            # Append this step's keys/values and attend over everything so far.
            end = cache.length + S
            cache.keys[layer, :, :, cache.length : end] = k
            cache.values[layer, :, :, cache.length : end] = v
            k = cache.keys[layer, :, :, :end]  # (B, G, T, hd)
            v = cache.values[layer, :, :, :end]
            q = q.to(k.dtype)  # attend in the cache's dtype: cast this step's queries, not every key
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=G != H
        )  # (B, H, S, hd)
        return self.proj(y.transpose(1, 2).reshape(B, S, H * hd))


class Block(nn.Module):
    """h + Attn(RMSNorm(h)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask, is_causal, cache=None, layer=0) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, is_causal, cache, layer)
        return h + self.mlp(self.mlp_norm(h))


def init_weights(
    module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None
) -> None:
    """GPT-2 style init: every Linear and Embedding ~ N(0, std), biases 0, RMSNorm scales 1.

    The residual-stream outputs (attention ``proj`` and SwiGLU ``down`` inside a
    ``Block``) get std / sqrt(2 · number of blocks), so the residual stream's
    variance does not grow with depth.
    """
    num_blocks = sum(isinstance(m, Block) for m in module.modules())
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std, generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    if num_blocks:
        scaled = std / math.sqrt(2 * num_blocks)
        for m in module.modules():
            if isinstance(m, Block):
                nn.init.normal_(m.attn.proj.weight, 0.0, scaled, generator=generator)
                nn.init.normal_(m.mlp.down.weight, 0.0, scaled, generator=generator)


class Transformer(nn.Module):
    """The backbone: input vectors (B, S, d) → hidden states (B, S, d) after the final RMSNorm."""

    def __init__(self, cfg: TransformerConfig, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise CalmError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}"
            )
        if cfg.num_heads % cfg.kv_heads:
            raise CalmError(
                f"num_heads {cfg.num_heads} is not divisible by num_kv_heads {cfg.kv_heads}"
            )
        self.cfg = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        init_weights(self, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` positions.

        Its dtype defaults to the one attention computes in: the weights', or bf16 when
        made inside a bf16 autocast region (half the bytes to read per step, and no
        conversion of every cached key at every layer and step).
        """
        p = self.norm.weight
        shape = (self.cfg.num_layers, batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        device = torch.device(device or p.device)
        dtype = dtype or matmul_dtype(device.type, p.dtype)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, S, d) of inputs x (B, S, d).

        positions: (S,) or (B, S) rotary positions; default: cache length + arange(S).
        cache: keys/values of earlier positions; this call appends S positions to it.
        key_mask: (B, cache length + S) bool, True on real keys, False on padding.
        attn_mask: (S, T) or (B, S, T) bool, True where a query may attend; replaces the
            causal and padding masks (for custom layouts such as batched rollouts).
        """
        B, S, _ = x.shape
        start = cache.length if cache is not None else 0
        T = start + S  # keys attended to
        if cache is not None and T > cache.max_len:
            raise CalmError(f"the KV cache holds {cache.max_len} positions; {T} were asked for")
        if key_mask is not None and key_mask.shape != (B, T):
            raise CalmError(f"key_mask must have shape ({B}, {T}), got {tuple(key_mask.shape)}")
        cos, sin = self.rotary(start, S, positions, x.device)

        # Pick the cheapest SDPA path: no mask tensor unless padding or a chunk
        # after a non-empty cache needs one.
        mask, is_causal = None, False
        if attn_mask is not None:
            mask = attn_mask.to(x.device, torch.bool)
            mask = mask if mask.dim() == 2 else mask[:, None]  # (S, T) or (B, 1, S, T)
        elif key_mask is None and start == 0:
            is_causal = S > 1  # square causal: the fused kernels handle it
        elif key_mask is not None or S > 1:
            q_pos = torch.arange(start, T, device=x.device)  # (S,) absolute query positions
            k_pos = torch.arange(T, device=x.device)  # (T,)
            mask = k_pos[None, :] <= q_pos[:, None]  # (S, T) causal
            if key_mask is not None:
                # Hide pad keys, but let every query see itself: a pad query then
                # has one key instead of none (no NaN); real queries never see pads.
                mask = (mask & key_mask[:, None, :].to(x.device, torch.bool)) | (
                    k_pos[None, :] == q_pos[:, None]
                )
                mask = mask[:, None]  # (B, 1, S, T)
        # else: one new query after a cache and no padding sees every key.

        h = x
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length = T
        return self.norm(h)
