"""Default training recipes: one per model kind and preset, and the commands use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calm.checkpoint import list_checkpoints
from calm.config import PRESETS, HeadConfig
from calm.errors import CalmError
from calm.recipes import recipe


def test_every_preset_has_a_recipe():
    for name in PRESETS["autoencoder"]:
        assert recipe("autoencoder", name).train.block_size > 0
    for name in PRESETS["transformer"]:
        for kind in ("calm", "baseline"):
            r = recipe(kind, name)
            assert set(r.head) <= {f for f in HeadConfig.__dataclass_fields__}


def test_paper_presets_keep_the_paper_recipe():
    for name in ("S", "M", "L", "XL"):
        for kind in ("calm", "baseline"):
            r = recipe(kind, name).train
            assert (r.lr, r.warmup_steps, r.weight_decay, r.grad_clip) == (3e-4, 2000, 0.1, 1.0)
        # CALM's block of 8192 tokens is 2048 backbone positions at K = 4, the backbone's reach
        assert recipe("calm", name).train.block_size // 4 <= PRESETS["transformer"][name].max_seq_len
        assert recipe("baseline", name).train.block_size <= PRESETS["transformer"][name].max_seq_len


def test_unknown_recipe():
    with pytest.raises(CalmError, match="no calm recipe for preset 'huge'"):
        recipe("calm", "huge")
    with pytest.raises(CalmError, match="no recipes for model kind"):
        recipe("vae", "demo")


def _state(run: Path) -> dict:
    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())


def _model(run: Path) -> dict:
    return json.loads((list_checkpoints(run)[-1] / "config.json").read_text())["model"]


def test_commands_train_with_the_presets_recipe(calm_run, base_run, ae_run):
    # The fixtures override steps, block and batch size; the rest is the tiny preset's recipe.
    for run, kind in ((calm_run, "calm"), (base_run, "baseline"), (ae_run, "autoencoder")):
        used = _state(run)["train_config"]
        rec = recipe(kind, "tiny").train
        assert used["lr"] == rec.lr, kind
        assert used["warmup_steps"] == rec.warmup_steps, kind
        assert used["weight_decay"] == rec.weight_decay, kind
    head = _model(calm_run)["head"]
    for k, v in recipe("calm", "tiny").head.items():
        assert head[k] == v
