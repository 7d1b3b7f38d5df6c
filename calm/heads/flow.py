"""The flow-matching generative head (SPEC §2 "Alternative heads", paper §7.4).

Rectified-flow / conditional flow matching (Lipman et al., 2023) on the latent:
a straight path from noise x_0 ~ N(0, I) at t = 0 to a target y at t = 1,

  x_t = (1 − t)·x_0 + t·y,   t ~ U(0, 1),   y ~ N(μ, σ²) (the autoencoder posterior),
  L = mean ‖v_θ(x_t, t, h) − (y − x_0)‖²,

with the mean taken over latent dimensions, positions and the N replicas of h
(as the energy head, each position is replicated N = num_samples times with
its own x_0, t and y). Sampling integrates dx/dt = v_θ(x, t, h) from t = 0 to 1
with ``flow_steps`` Euler or midpoint steps; the paper finds the midpoint solver
near its best after 4 steps. One midpoint step costs two network evaluations.
``flow_time_shift`` s > 1 draws the training times as t = u / (s − (s − 1)·u), u ~ U(0, 1),
and places the solver's steps alike, both denser near the noise end (default 1: as above).

The network (``ConditionedMLP``) is the diffusion head's; its default number of
blocks follows the energy head's rule, max(1, backbone layers // 4), which gives
the paper's 3 blocks for its 12-layer ablation backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads.base import GenerativeHead
from calm.heads.conditioning import ConditionedMLP

SOLVERS = ("euler", "midpoint")


def integrate(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x0: torch.Tensor,
    steps: int,
    solver: str = "midpoint",
    t0: float = 0.0,
    t1: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Solve dx/dt = velocity_fn(x, t) from x(t0) = x0 to t1 in `steps` steps.

    The steps are equal in u; time is t = time_shift(u, shift), so shift > 1 makes the
    steps short near t = 0 and long near t = 1 (shift 1: equal steps in t).
    euler: x += Δt·v(x, t)                         (1 evaluation per step, first order)
    midpoint: x += Δt·v(x + Δt/2·v(x, t), t + Δt/2) (2 evaluations per step, second order)
    """
    if steps < 1:
        raise CalmError(f"flow: the number of ODE steps must be at least 1, got {steps}")
    if solver not in SOLVERS:
        raise CalmError(f"flow: unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    du = (t1 - t0) / steps
    x = x0
    for i in range(steps):
        t = time_shift(t0 + i * du, shift)
        dt = time_shift(t0 + (i + 1) * du, shift) - t
        v = velocity_fn(x, t)
        if solver == "midpoint":
            v = velocity_fn(x + (dt / 2) * v, t + dt / 2)
        x = x + dt * v
    return x


def time_shift(u, shift: float):
    """t = u / (shift − (shift − 1)·u): a monotone map of [0, 1] onto itself, the identity
    at shift 1; shift > 1 puts more of the time near t = 0 (the noise end).

    Training draws t = time_shift(U(0, 1)) and sampling steps equally in u, so both
    spend more of their work where the sample is still mostly noise — where, between
    latents far apart from one another, which one the sample heads for is decided.
    """
    if shift == 1.0:
        return u
    return u / (shift - (shift - 1) * u)


class FlowHead(GenerativeHead):
    """Flow-matching head: velocity network v_θ(x_t, t, h), sampled by an ODE solver."""

    def __init__(
        self,
        hidden_size: int,
        latent_size: int,
        *,
        width: int | None = None,
        num_blocks: int = 3,
        num_samples: int = 8,
        steps: int = 4,
        solver: str = "midpoint",
        time_shift: float = 1.0,
    ):
        super().__init__(hidden_size, latent_size)
        width = width or hidden_size
        if min(hidden_size, latent_size, width, num_blocks) < 1:
            raise CalmError("flow head: sizes and the number of blocks must be positive")
        if num_samples < 1:
            raise CalmError(f"flow head: num_samples must be at least 1, got {num_samples}")
        if steps < 1:
            raise CalmError(f"flow head: flow_steps must be at least 1, got {steps}")
        if solver not in SOLVERS:
            raise CalmError(
                f"flow head: unknown solver {solver!r}; choose from {', '.join(SOLVERS)}"
            )
        if not time_shift > 0:
            raise CalmError(f"flow head: the time shift must be positive, got {time_shift}")
        self.time_shift = float(time_shift)
        self.width = width
        self.num_samples = num_samples
        self.steps = steps
        self.solver = solver
        self.net = ConditionedMLP(hidden_size, latent_size, width, num_blocks)

    @classmethod
    def from_config(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> FlowHead:
        return cls(
            hidden_size,
            latent_size,
            width=cfg.width or hidden_size,
            num_blocks=cfg.num_blocks or max(1, num_backbone_layers // 4),
            num_samples=cfg.num_samples,
            steps=cfg.flow_steps,
            solver=cfg.flow_solver,
            time_shift=cfg.flow_time_shift,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor) -> torch.Tensor:
        """Velocity v_θ(x_t, t, h): x (..., N, l), t () or (..., N), h (..., d) → (..., N, l)."""
        return self.net(x, t, self.net.condition(h))

    def loss(
        self,
        h: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss on N replicas per position.

        Draw order with a generator: t (..., N), x_0 (..., N, l), then the posterior noise.
        """
        want = self.check_targets(h, target_mean, target_log_std)
        shape = (*want[:-1], self.num_samples, self.latent_size)  # (..., N, l)
        kw = {"generator": generator, "device": h.device, "dtype": torch.float32}
        t = time_shift(torch.rand(shape[:-1], **kw), self.time_shift)  # (..., N)
        x0 = torch.randn(shape, **kw)
        eps = torch.randn(shape, **kw)
        # y ~ N(μ, σ²), one draw per replica
        y = torch.addcmul(
            target_mean.float().unsqueeze(-2), target_log_std.float().exp().unsqueeze(-2), eps
        )
        tt = t.unsqueeze(-1)  # (..., N, 1)
        xt = (1 - tt) * x0 + tt * y
        dtype = self.net.input_proj.weight.dtype
        v = self(xt.to(dtype), t, h)  # (..., N, l)
        loss = (v.float() - (y - x0)).pow(2).mean()
        return loss, {"flow/loss": loss.detach()}

    def sample_n(
        self, h: torch.Tensor, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """ODE from x_0 ~ N(0, I) (the only randomness) at t = 0 to t = 1: (..., d) → (..., n, l)."""
        return self.sample_from_noise(h, self.draw_noise(h, n, generator))

    def draw_noise(
        self, h: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The ODE's start points x_0 ~ N(0, I): (..., n, l)."""
        dtype = self.net.input_proj.weight.dtype
        shape = (*h.shape[:-1], n, self.latent_size)
        return torch.randn(shape, generator=generator, device=h.device, dtype=dtype)

    def sample_from_noise(self, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        c = self.net.condition(h)  # (..., 1, w), once for all steps and samples
        return integrate(
            lambda x, t: self.net(x, t, c), x0, self.steps, self.solver, shift=self.time_shift
        )

    def flops_per_sample(self) -> int:
        return self.net.flops_per_evaluation()

    @property
    def sampling_steps(self) -> int:
        return self.steps * (2 if self.solver == "midpoint" else 1)
