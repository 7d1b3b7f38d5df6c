"""The conditioning network shared by the flow-matching and diffusion heads (SPEC §2, paper §7.4).

The paper adopts "an architecture consistent with the diffusion head" of MAR
(Li et al., 2024): a residual MLP over the noisy latent x_t whose every block is
modulated by adaptive LayerNorm (adaLN) from the sum of the backbone hidden
state's projection and a sinusoidal embedding of the time t:

  y = SiLU(Linear(h) + TimeMLP(sin/cos(1000·t)))
  block: (shift, scale, gate) = Linear(y);  x = x + gate · MLP(LN(x) · (1 + scale) + shift)
  final: (shift, scale) = Linear(y);  out = Linear(LN(x) · (1 + scale) + shift)

LayerNorms carry no affine parameters (the modulation replaces them). Every
modulation Linear and the output Linear start at zero, so each block starts as
the identity and the untrained network outputs exactly 0.

Efficiency: Linear(h) is computed once per position and broadcast over the N
replicas of h (training) or the n samples (sampling). At sampling time t is one
scalar per step, so the modulations are also computed once per position and step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
TIME_SCALE = 1000.0  # t ∈ [0, 1] is embedded as 1000·t, the usual DDPM timestep range
FREQ_SIZE = 256  # sinusoidal features before the time MLP (as MAR / DiT)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos(t·f_k), sin(t·f_k)], f_k = max_period^(−k/(dim/2)): (...) → (..., dim).

    Computed in float32 whatever t's dtype: t reaches 1000 and bf16 cannot resolve its steps.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = t.to(torch.float32).unsqueeze(-1) * freqs  # (..., half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _AdaLNBlock(nn.Module):
    """x + gate · MLP(LN(x)·(1 + scale) + shift), (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (..., N, w); y (..., N or 1, w) = SiLU(condition + time), broadcast over samples
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(torch.addcmul(shift, self.norm(x), 1 + scale))


class ConditionedMLP(nn.Module):
    """v or ε = f(x_t, t, h): the adaLN residual MLP of the flow and diffusion heads.

    Use ``condition(h)`` once per position, then ``forward(x, t, c)`` per network
    evaluation: x (..., N, l); t a scalar, (), or (..., N) in [0, 1]; c (..., 1, w).
    """

    def __init__(self, hidden_size: int, latent_size: int, width: int, num_blocks: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.width = width
        self.cond_proj = nn.Linear(hidden_size, width)
        self.time_mlp = nn.Sequential(
            nn.Linear(FREQ_SIZE, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.input_proj = nn.Linear(latent_size, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.final_out = nn.Linear(width, latent_size)
        for layer in (self.final_modulation, self.final_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """Projection of the hidden state, once per position: h (..., d) → (..., 1, w)."""
        return self.cond_proj(h).unsqueeze(-2)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, c: torch.Tensor) -> torch.Tensor:
        """x (..., N, l), t ∈ [0, 1] of shape () or (..., N), c (..., 1, w) → (..., N, l)."""
        t = torch.as_tensor(t, device=x.device)
        temb = self.time_mlp(timestep_embedding(TIME_SCALE * t, FREQ_SIZE).to(x.dtype))
        # temb (w,) at sampling or (..., N, w) in training; y broadcasts to either
        y = F.silu(c + temb)  # (..., 1 or N, w)
        a = self.input_proj(x)  # (..., N, w)
        for block in self.blocks:
            a = block(a, y)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.final_out(torch.addcmul(shift, self.final_norm(a), 1 + scale))

    def flops_per_evaluation(self) -> int:
        """Matmul FLOPs (2 × multiply-adds) of one evaluation for one row, condition and
        time paths included (at sampling they are shared by all samples of a position)."""
        w, d, l = self.width, self.hidden_size, self.latent_size
        macs = d * w + FREQ_SIZE * w + w * w + l * w  # condition, time MLP, input
        macs += len(self.blocks) * (3 * w * w + 2 * w * w)  # modulation + MLP per block
        macs += 2 * w * w + w * l  # final modulation + output
        return 2 * macs
