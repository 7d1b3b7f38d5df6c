"""The interface every generative head implements (SPEC §2, paper §3.2 and §7.4).

A head turns a backbone hidden state h into a continuous latent vector z of the
next chunk. It owns its training loss against the frozen autoencoder's
posterior of the true chunk and its own sampler, so energy, flow-matching and
diffusion heads are interchangeable: the backbone never knows which one it feeds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class GenerativeHead(nn.Module, ABC):
    """Base class: ``loss(h, mean, log_std) → (loss, metrics)`` and ``sample(h) → z``.

    A head whose sampler draws all its randomness up front may also define
    ``draw_noise(h, n, generator) → noise`` and ``sample_from_noise(h, noise) → (..., n, l)``
    (energy and flow heads): the deterministic rest can then be compiled
    (``generate(..., compile=True)``)."""

    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        """d: size of the backbone hidden state the head is conditioned on."""
        self.latent_size = latent_size
        """l: size of the latent vector the head generates."""

    @abstractmethod
    def loss(
        self,
        h: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss, averaged over positions, and detached scalar metrics.

        h: (..., d) hidden states at positions that have a target. The target is
        the autoencoder posterior N(target_mean, exp(target_log_std)²) of the true
        next chunk, each (..., l); the head draws its own samples from it.
        """

    @abstractmethod
    def sample_n(
        self, h: torch.Tensor, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n independent samples per row in one batched pass: h (..., d) → (..., n, l)."""

    def check_targets(
        self, h: torch.Tensor, target_mean: torch.Tensor, target_log_std: torch.Tensor
    ) -> tuple[int, ...]:
        """The target shape (..., l) that hidden states h (..., d) need; ValueError otherwise."""
        want = (*h.shape[:-1], self.latent_size)
        if target_mean.shape != want or target_log_std.shape != want:
            raise ValueError(
                f"{type(self).__name__}: targets {tuple(target_mean.shape)}, "
                f"{tuple(target_log_std.shape)} do not match hidden states {tuple(h.shape)} "
                f"(want {want})"
            )
        return want

    def sample(self, h: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample per row: h (..., d) → z (..., l)."""
        return self.sample_n(h, 1, generator=generator).squeeze(-2)

    @abstractmethod
    def flops_per_sample(self) -> int:
        """FLOPs (2 × multiply-adds) of one network evaluation for one row."""

    @property
    @abstractmethod
    def sampling_steps(self) -> int:
        """Network evaluations per sample (1 for the energy head, ODE/DDPM steps otherwise)."""
