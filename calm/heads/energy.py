"""The energy generative head and the energy loss (SPEC §2; paper §3.2–3.3, Table 3–4).

The head is a residual MLP that maps a backbone hidden state h and uniform noise
u to a latent vector in ONE forward pass. It is trained with the energy score,
a strictly proper scoring rule that needs only samples, never a likelihood:

  L = (2 / (N·M)) Σ_n Σ_m ‖x_n − y_m‖^α − (1 / (N(N−1))) Σ_{n≠k} ‖x_n − x_k‖^α

with N head samples x_n and M draws y_m from the autoencoder posterior of the
true chunk. The first ("fidelity") term pulls samples towards the target, the
second ("diversity") term pushes samples apart so the head cannot collapse.

Efficiency: the condition path c = LN(Linear(h)) and, in every block, the
c-half of Linear(2w → w)(concat(LN(n), c)) are computed once per position and
broadcast over the N samples; pairwise distances use one batched matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads.base import GenerativeHead

LN_EPS = 1e-6  # as the input compression's LayerNorm (SPEC §2)


# ----------------------------------------------------------------------------- loss


def _safe_pow(d2: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """d2^p where keep, else exactly 0, with a finite (zero) gradient where not kept.

    The inner where keeps pow away from 0, whose derivative is infinite for p < 1:
    without it, 0 × inf = NaN would flow back from coincident pairs.
    """
    d2 = torch.where(keep, d2, torch.ones_like(d2))
    d = d2.sqrt() if p == 0.5 else d2.pow(p)
    return torch.where(keep, d, torch.zeros_like(d))


def _pairwise_pow(a: torch.Tensor, b: torch.Tensor, alpha: float, offdiag: bool) -> torch.Tensor:
    """‖a_i − b_j‖^α for a (P, N, l), b (P, M, l) → (P, N, M), via ‖a‖² + ‖b‖² − 2a·b.

    Squared distances below the rounding noise of the expansion (relative to
    ‖a‖² + ‖b‖²) are indistinguishable from 0 and count as 0 with zero gradient
    (a valid subgradient of the norm at a coincident pair). offdiag: also drop i = j.
    """
    # Squared norms as batched dot products: one read of the (P, M, l) targets,
    # several times faster on CPU than b.pow(2).sum(-1).
    a2 = torch.einsum("pnl,pnl->pn", a, a)  # (P, N)
    b2 = a2 if b is a else torch.einsum("pml,pml->pm", b, b)  # (P, M)
    scale = a2.unsqueeze(-1) + b2.unsqueeze(-2)  # (P, N, M)
    d2 = torch.baddbmm(scale, a, b.transpose(1, 2), alpha=-2.0)  # (P, N, M)
    keep = d2 > (64 * torch.finfo(d2.dtype).eps) * scale.detach()
    if offdiag:
        n = a.shape[1]
        keep = keep & ~torch.eye(n, dtype=torch.bool, device=a.device)
    return _safe_pow(d2, keep, alpha / 2)


def _centred_terms(
    x: torch.Tensor, y: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fidelity, diversity), each (P,), of x (P, N, l) and y (P, M, l), both already
    shifted by the detached mean of x (see energy_terms)."""
    n = x.shape[1]
    fidelity = _pairwise_pow(x, y, alpha, offdiag=False).mean((1, 2))  # (P,)
    diversity = _pairwise_pow(x, x, alpha, offdiag=True).sum((1, 2)) / (n * (n - 1))  # (P,)
    return fidelity, diversity


def _loss_dtype(*ts: torch.Tensor) -> torch.dtype:
    # float32 at least: the expansion ‖a‖² + ‖b‖² − 2a·b cancels badly in bf16/fp16.
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def energy_terms(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the energy loss per position.

    x: (..., N, l) model samples, N ≥ 2; y: (..., M, l) target samples.
    Returns (fidelity, diversity), each (...):
      fidelity  = (1 / (N·M)) Σ_n Σ_m ‖x_n − y_m‖^α
      diversity = (1 / (N(N−1))) Σ_{n≠k} ‖x_n − x_k‖^α
    Computed in float32 at least, outside autocast.
    """
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"energy_terms: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    lead, (n, l), m = x.shape[:-2], x.shape[-2:], y.shape[-2]
    if n < 2:
        raise ValueError("energy_terms: the diversity term needs N ≥ 2 samples")
    dtype = _loss_dtype(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype).reshape(-1, n, l)  # (P, N, l)
        y = y.to(dtype).reshape(-1, m, l)  # (P, M, l)
        # Distances are translation invariant: centring on the (constant) sample mean
        # keeps ‖a‖² close to the distances' own scale, so the expansion stays accurate
        # even when the samples sit far from the origin or have nearly collapsed.
        shift = x.detach().mean(1, keepdim=True)  # (P, 1, l)
        fidelity, diversity = _centred_terms(x - shift, y - shift, alpha)
    return fidelity.reshape(lead), diversity.reshape(lead)


def energy_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Energy loss per position (the negated energy score up to a constant): (..., N, l),
    (..., M, l) → (...). Its expectation is minimised exactly when x ~ the law of y."""
    fidelity, diversity = energy_terms(x, y, alpha)
    return 2 * fidelity - diversity


# ----------------------------------------------------------------------------- head


class _Block(nn.Module):
    """n + Linear(silu(gate) * up), gate/up from Linear(2w→w)(LN(n) ‖ c) → SiLU → Linear → SiLU."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.fuse = nn.Linear(2 * width, width)  # on concat(LN(n), c): columns [n-part | c-part]
        self.mid = nn.Linear(width, width)
        self.gate_up = nn.Linear(width, 2 * width)  # [gate; up]
        self.out = nn.Linear(width, width)

    def cond_part(self, c: torch.Tensor) -> torch.Tensor:
        """W_c·c + bias, once per position: (..., w) → (..., 1, w) to broadcast over samples."""
        return F.linear(c, self.fuse.weight[:, self.width :], self.fuse.bias).unsqueeze(-2)

    def forward(self, n: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # n (..., N, w), cond (..., 1, w): W_n·LN(n) + (W_c·c + b) equals the spec's
        # Linear(2w → w) on the concatenation, without N copies of c.
        a = F.linear(self.norm(n), self.fuse.weight[:, : self.width]) + cond
        a = F.silu(self.mid(F.silu(a)))
        gate, up = self.gate_up(a).chunk(2, dim=-1)
        return n + self.out(F.silu(gate) * up)


class EnergyHead(GenerativeHead):
    """One-step generator of the next latent vector, trained with the energy loss (SPEC §2)."""

    def __init__(
        self,
        hidden_size: int,
        latent_size: int,
        *,
        noise_size: int = 64,
        final_init: str = "zero",
        width: int | None = None,
        num_blocks: int = 1,
        num_samples: int = 8,
        num_targets: int = 100,
        alpha: float = 1.0,
    ):
        super().__init__(hidden_size, latent_size)
        width = width or hidden_size
        if min(hidden_size, latent_size, noise_size, width, num_blocks) < 1:
            raise CalmError("energy head: sizes and the number of blocks must be positive")
        if num_samples < 2:
            raise CalmError(f"energy head: num_samples must be at least 2, got {num_samples}")
        if num_targets < 1:
            raise CalmError(f"energy head: num_targets must be at least 1, got {num_targets}")
        if not 0 < alpha <= 2:
            raise CalmError(f"energy head: alpha must be in (0, 2], got {alpha}")
        if final_init not in ("zero", "default"):
            raise CalmError(f"energy head: final_init must be 'zero' or 'default', got {final_init!r}")
        self.noise_size = noise_size
        self.width = width
        self.num_samples = num_samples
        self.num_targets = num_targets
        self.alpha = alpha

        self.noise_proj = nn.Linear(noise_size, width)
        self.noise_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.cond_proj = nn.Linear(hidden_size, width)
        self.cond_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.final_hidden = nn.Linear(width, width)
        self.final_out = nn.Linear(width, latent_size)
        if final_init == "zero":
            # The reference's zero output layer: every sample starts at 0, and no gradient
            # reaches the layers below until this one has grown.
            nn.init.zeros_(self.final_out.weight)
            nn.init.zeros_(self.final_out.bias)

    @classmethod
    def from_config(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> EnergyHead:
        return cls(
            hidden_size,
            latent_size,
            noise_size=cfg.noise_size,
            final_init=cfg.final_init,
            width=cfg.width or hidden_size,
            num_blocks=cfg.num_blocks or max(1, num_backbone_layers // 4),
            num_samples=cfg.num_samples,
            num_targets=cfg.num_targets,
            alpha=cfg.alpha,
        )

    def forward(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The deterministic map (h, u) → x: h (..., d), u (..., N, noise_size) → (..., N, l)."""
        c = self.cond_norm(self.cond_proj(h))  # (..., w), once per position
        n = self.noise_norm(self.noise_proj(u))  # (..., N, w)
        for block in self.blocks:
            n = block(n, block.cond_part(c))
        return self.final_out(F.silu(self.final_hidden(self.final_norm(n))))  # (..., N, l)

    def draw_noise(
        self, h: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """u ~ Uniform[−0.5, 0.5]^noise_size for n samples per row of h: (..., n, noise_size)."""
        shape = (*h.shape[:-1], n, self.noise_size)
        dtype = self.noise_proj.weight.dtype
        return torch.rand(shape, generator=generator, device=h.device, dtype=dtype) - 0.5

    def sample_from_noise(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self(h, noise)

    def sample_n(
        self, h: torch.Tensor, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self(h, self.draw_noise(h, n, generator))

    def loss(
        self,
        h: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Energy loss with N head samples and M posterior draws per position.

        Draw order with a generator: the N noise vectors, then the M target draws.
        """
        self.check_targets(h, target_mean, target_log_std)
        x = self.sample_n(h, self.num_samples, generator=generator)  # (..., N, l)
        n, m, l = self.num_samples, self.num_targets, self.latent_size
        dtype = _loss_dtype(x, target_mean)
        eps_shape = (*target_mean.shape[:-1], m, l)
        eps = torch.randn(eps_shape, generator=generator, device=h.device, dtype=dtype)
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = x.to(dtype).reshape(-1, n, l)  # (P, N, l)
            mean = target_mean.to(dtype).reshape(-1, 1, l)  # (P, 1, l)
            std = target_log_std.to(dtype).exp().reshape(-1, 1, l)  # (P, 1, l)
            # As energy_terms, centred on the sample mean; the shift is folded into the
            # target draw y − s = (mean − s) + std·ε, saving a pass over the (P, M, l) targets.
            shift = x.detach().mean(1, keepdim=True)  # (P, 1, l)
            y = torch.addcmul(mean - shift, std, eps.reshape(-1, m, l))  # (P, M, l)
            fidelity, diversity = _centred_terms(x - shift, y, self.alpha)  # (P,) each
        loss = (2 * fidelity - diversity).mean()
        metrics = {
            "energy/loss": loss.detach(),
            "energy/fidelity": fidelity.detach().mean(),
            "energy/diversity": diversity.detach().mean(),
        }
        return loss, metrics

    def flops_per_sample(self) -> int:
        """Matmul FLOPs of one full forward for one row (condition path included; norms,
        activations and the loss not counted). In training the condition path and the
        blocks' c-parts are shared by the N samples of a position."""
        w, d, l = self.width, self.hidden_size, self.latent_size
        macs = self.noise_size * w + d * w  # input projections
        # per block: fuse (2w → w), mid (w → w), gate_up (w → 2w), out (w → w)
        macs += len(self.blocks) * (2 * w * w + w * w + w * 2 * w + w * w)
        macs += w * w + w * l  # final layer
        return 2 * macs

    @property
    def sampling_steps(self) -> int:
        return 1
