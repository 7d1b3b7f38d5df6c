"""The learning-rate schedule: warm-up, constant, optional warm-down (step- or time-aware)."""

from __future__ import annotations

import pytest

from calm.config import TrainConfig
from calm.train import lr_at


def test_constant_after_warmup_by_default():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == 1.0


def test_warmdown_falls_linearly_to_zero():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, warmdown=0.2)
    assert lr_at(50, cfg) == 1.0
    assert lr_at(80, cfg) == pytest.approx(1.0)
    assert lr_at(90, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.05)
    assert lr_at(100, cfg) == 0.0


def test_warmdown_follows_the_time_budget():
    cfg = TrainConfig(steps=100_000, lr=1.0, warmup_steps=10, warmdown=0.5)
    # A time budget three-quarters spent: half-way through the warm-down, whatever the step.
    assert lr_at(20, cfg, progress=0.75) == pytest.approx(0.5)
    assert lr_at(20, cfg, progress=1.2) == 0.0
    assert lr_at(5, cfg, progress=0.9) == pytest.approx(0.6)  # warm-up still first
