"""Where and how things run: device choice, threads, seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from calm.errors import CalmError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:1', 'mps' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CalmError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalmError("--device cuda was asked for, but CUDA is not available here")
    return dev


def set_threads(n: int | None) -> None:
    """Intra-op threads (None or 0 keeps PyTorch's default)."""
    if n is not None and n < 0:
        raise CalmError(f"--threads must be 0 (default) or positive, got {n}")
    if n:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
