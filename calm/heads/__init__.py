"""Generative heads: hidden state → next latent vector (SPEC §2, paper §7.4).

``build_head`` picks the head named by ``HeadConfig.kind``; all heads share the
``GenerativeHead`` interface, so the backbone never knows which one it feeds.
"""

from __future__ import annotations

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads.base import GenerativeHead
from calm.heads.diffusion import DiffusionHead
from calm.heads.energy import EnergyHead, energy_loss, energy_terms
from calm.heads.flow import FlowHead

# kind → constructor from (config, hidden size, latent size, backbone layers)
HEADS = {
    "energy": EnergyHead.from_config,
    "flow": FlowHead.from_config,
    "diffusion": DiffusionHead.from_config,
}


def build_head(
    head_cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
) -> GenerativeHead:
    """The generative head named by ``head_cfg.kind``, sized for the backbone and latent."""
    if head_cfg.kind not in HEADS:
        raise CalmError(f"unknown head kind {head_cfg.kind!r}; choose from {', '.join(HEADS)}")
    return HEADS[head_cfg.kind](head_cfg, hidden_size, latent_size, num_backbone_layers)


__all__ = [
    "HEADS",
    "DiffusionHead",
    "EnergyHead",
    "FlowHead",
    "GenerativeHead",
    "build_head",
    "energy_loss",
    "energy_terms",
]
