"""The diffusion generative head (SPEC §2 "Alternative heads", paper §7.4).

DDPM (Ho et al., 2020) with ε-prediction and the cosine noise schedule of
Nichol & Dhariwal (2021), as the MAR diffusion head:

  ᾱ(t) = f(t)/f(0),  f(t) = cos²(((t/T) + s)/(1 + s) · π/2),  s = 0.008, T = 1000
  β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999),  ᾱ_i = Π_{j≤i} (1 − β_j),  i = 0 … T−1

So ᾱ_0 = 1 − β_0 ≈ 0.99996 (almost clean) and ᾱ_{T−1} ≈ 2.4e-9 (pure noise).
Training, on N replicas of h per position (as the energy head):

  i ~ U{0 … T−1},  ε ~ N(0, I),  y ~ N(μ, σ²),  x_i = √ᾱ_i·y + √(1 − ᾱ_i)·ε,
  L = mean ‖ε_θ(x_i, i/T, h) − ε‖²   (mean over latent dims, positions, replicas).

Sampling: ancestral DDPM over `diffusion_steps` (default 100) respaced
timesteps (evenly spaced in 0 … T−1, always ending at T−1; the betas are
recomputed from ᾱ at the kept timesteps) with the posterior variance
β̃ = β·(1 − ᾱ_prev)/(1 − ᾱ) ("fixed small"), no noise at the last step. No
classifier-free guidance.

The predicted clean latent x̂_0 = (x − √(1 − ᾱ)·ε̂)/√ᾱ is clamped to ±10 at
every sampling step (``clip_denoised``; None turns it off). Latents of the
KL-regularised autoencoder are of unit scale, so the bound is inactive for a
good ε̂; but at the first step ᾱ ≈ 2.4e-9 amplifies any error of ε̂ by
1/√ᾱ ≈ 2·10⁴, and without the bound a small or young head diverges.

The network (``ConditionedMLP``) sees t = i/T. Its default number of blocks
follows the energy head's rule, max(1, backbone layers // 4): 3 for the
paper's 12-layer ablation backbone, whose heads have "3 MLP blocks".

Schedules are computed once in float64 on the CPU and copied to h's device in
float32 on use, so they follow h wherever it lives and never drop to the
module's (possibly bf16) dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads.base import GenerativeHead
from calm.heads.conditioning import ConditionedMLP

TRAIN_STEPS = 1000
COSINE_S = 0.008
MAX_BETA = 0.999
CLIP_DENOISED = 10.0  # bound on x̂_0 at sampling, far beyond unit-scale latents


def cosine_alpha_bar(num_steps: int = TRAIN_STEPS, s: float = COSINE_S) -> torch.Tensor:
    """ᾱ_i for i = 0 … T−1 of the clipped cosine schedule, float64 (T,), decreasing."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)  # (T,)
    return torch.cumprod(1 - betas, dim=0)


def respace(alpha_bar: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `steps` evenly spaced timesteps of 0 … T−1 (the last one always kept).

    Returns (timesteps (steps,) int64 increasing, betas (steps,) float64) with
    β'_k = 1 − ᾱ[t_k]/ᾱ[t_{k−1}] (ᾱ[t_{−1}] = 1), so Π_{j≤k}(1 − β'_j) = ᾱ[t_k].
    """
    T = alpha_bar.shape[0]
    if not 1 <= steps <= T:
        raise CalmError(f"diffusion: sampling steps must be in 1 … {T}, got {steps}")
    # Spaced down from T − 1, so that a single step still starts from pure noise.
    timesteps = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().flip(0)
    ab = alpha_bar[timesteps]
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return timesteps, 1 - ab / prev


def ddpm_sample(
    eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    clip_denoised: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral DDPM from x at the last step down to the data, given ε̂ = eps_fn(x, k).

    betas (K,) of the (respaced) chain; k = K−1 … 0 is the chain index passed to eps_fn.
    Each step: x̂_0 = (x − √(1 − ᾱ_k)·ε̂)/√ᾱ_k, clamped to ±clip_denoised when given;
    x ← c1·x̂_0 + c2·x + √β̃_k·noise with the Gaussian posterior q(x_{k−1} | x_k, x̂_0):
    c1 = √ᾱ_{k−1}·β_k/(1 − ᾱ_k), c2 = √α_k·(1 − ᾱ_{k−1})/(1 − ᾱ_k),
    β̃_k = β_k·(1 − ᾱ_{k−1})/(1 − ᾱ_k) (0 at k = 0: the last step adds no noise).
    """
    betas = betas.to(torch.float64)
    alphas = 1 - betas
    ab = torch.cumprod(alphas, dim=0)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    # Per-step scalars in float64 on the CPU, then one float32 copy to x's device.
    table = torch.stack(
        [
            ab.rsqrt(),  # 1/√ᾱ
            (1 / ab - 1).sqrt(),  # √(1 − ᾱ)/√ᾱ
            ab_prev.sqrt() * betas / (1 - ab),  # c1
            alphas.sqrt() * (1 - ab_prev) / (1 - ab),  # c2
            (betas * (1 - ab_prev) / (1 - ab)).sqrt(),  # √β̃
        ]
    )
    table = table.to(torch.float32).to(x.device)  # (5, K)
    for k in range(betas.shape[0] - 1, -1, -1):
        inv_sqrt_ab, eps_scale, c1, c2, sigma = table[:, k].to(x.dtype)
        x0 = x * inv_sqrt_ab - eps_scale * eps_fn(x, k)
        if clip_denoised is not None:
            x0 = x0.clamp(-clip_denoised, clip_denoised)
        x = c1 * x0 + c2 * x
        if k > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma * noise
    return x


class DiffusionHead(GenerativeHead):
    """ε-prediction diffusion head with a cosine schedule, sampled by respaced DDPM."""

    def __init__(
        self,
        hidden_size: int,
        latent_size: int,
        *,
        width: int | None = None,
        num_blocks: int = 3,
        num_samples: int = 8,
        steps: int = 100,
        train_steps: int = TRAIN_STEPS,
        clip_denoised: float | None = CLIP_DENOISED,
    ):
        super().__init__(hidden_size, latent_size)
        width = width or hidden_size
        if min(hidden_size, latent_size, width, num_blocks) < 1:
            raise CalmError("diffusion head: sizes and the number of blocks must be positive")
        if num_samples < 1:
            raise CalmError(f"diffusion head: num_samples must be at least 1, got {num_samples}")
        if train_steps < 2:
            raise CalmError(f"diffusion head: train_steps must be at least 2, got {train_steps}")
        if not 1 <= steps <= train_steps:
            raise CalmError(
                f"diffusion head: diffusion_steps must be in 1 … {train_steps}, got {steps}"
            )
        self.width = width
        self.num_samples = num_samples
        self.steps = steps
        self.train_steps = train_steps
        self.clip_denoised = clip_denoised
        self.net = ConditionedMLP(hidden_size, latent_size, width, num_blocks)
        # A plain attribute, not a buffer: not in the state dict, never cast to bf16.
        self.alpha_bar = cosine_alpha_bar(train_steps)  # (T,) float64, CPU
        self._train_table: torch.Tensor | None = None

    @classmethod
    def from_config(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> DiffusionHead:
        return cls(
            hidden_size,
            latent_size,
            width=cfg.width or hidden_size,
            num_blocks=cfg.num_blocks or max(1, num_backbone_layers // 4),
            num_samples=cfg.num_samples,
            steps=cfg.diffusion_steps,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor) -> torch.Tensor:
        """ε̂(x_i, i/T, h): x (..., N, l), t = i/T of shape () or (..., N), h (..., d) → (..., N, l)."""
        return self.net(x, t, self.net.condition(h))

    def _sqrt_tables(self, device: torch.device) -> torch.Tensor:
        """(2, T) float32 on device: √ᾱ_i and √(1 − ᾱ_i), copied once per device."""
        if self._train_table is None or self._train_table.device != device:
            table = torch.stack([self.alpha_bar.sqrt(), (1 - self.alpha_bar).sqrt()])
            self._train_table = table.to(torch.float32).to(device)
        return self._train_table

    def loss(
        self,
        h: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ε-prediction loss on N replicas per position.

        Draw order with a generator: timesteps (..., N), ε (..., N, l), then the posterior noise.
        """
        want = self.check_targets(h, target_mean, target_log_std)
        shape = (*want[:-1], self.num_samples, self.latent_size)  # (..., N, l)
        kw = {"generator": generator, "device": h.device}
        i = torch.randint(0, self.train_steps, shape[:-1], **kw)  # (..., N)
        eps = torch.randn(shape, dtype=torch.float32, **kw)
        noise = torch.randn(shape, dtype=torch.float32, **kw)
        y = torch.addcmul(
            target_mean.float().unsqueeze(-2), target_log_std.float().exp().unsqueeze(-2), noise
        )
        sqrt_ab, sqrt_1mab = self._sqrt_tables(h.device)[:, i].unsqueeze(-1)  # (..., N, 1) each
        xt = sqrt_ab * y + sqrt_1mab * eps
        dtype = self.net.input_proj.weight.dtype
        pred = self(xt.to(dtype), i.to(torch.float32) / self.train_steps, h)
        loss = (pred.float() - eps).pow(2).mean()
        return loss, {"diffusion/loss": loss.detach()}

    def sample_n(
        self, h: torch.Tensor, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Respaced ancestral DDPM from x ~ N(0, I): (..., d) → (..., n, l).

        Draw order with a generator: the start noise, then one noise draw per step.
        """
        dtype = self.net.input_proj.weight.dtype
        shape = (*h.shape[:-1], n, self.latent_size)
        x = torch.randn(shape, generator=generator, device=h.device, dtype=dtype)
        c = self.net.condition(h)  # (..., 1, w), once for all steps and samples
        # Respaced on each call (100 scalars): changing self.steps needs nothing else.
        timesteps, betas = respace(self.alpha_bar, self.steps)
        times = (timesteps.to(torch.float64) / self.train_steps).tolist()  # the network's t

        def eps_fn(x: torch.Tensor, k: int) -> torch.Tensor:
            return self.net(x, times[k], c)

        return ddpm_sample(eps_fn, x, betas, clip_denoised=self.clip_denoised, generator=generator)

    def flops_per_sample(self) -> int:
        return self.net.flops_per_evaluation()

    @property
    def sampling_steps(self) -> int:
        return self.steps
