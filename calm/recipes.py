"""Default training recipes, one per model kind and preset.

The paper's recipe (lr 3e-4, ~2M-token batches, 2000 warm-up steps) suits GPU
clusters. On a CPU a small model gets only a few hundred such steps, and CALM's
zero-initialised generative head starts collapsed (all samples alike, so every
Brier-n is slightly negative). The small presets therefore train with small
batches, a high learning rate and a short warm-up, which take the head out of
its collapsed start within minutes; the paper-size presets keep the paper's
settings. Every field can still be overridden on the command line.

The small-preset figures were chosen by measurement on the demo corpus (2 CPU
threads, a few minutes per probe); see the README's "Training recipes".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from calm.config import TrainConfig
from calm.errors import CalmError


@dataclass(frozen=True)
class Recipe:
    """Training settings and (CALM only) generative-head settings of one preset."""

    train: TrainConfig
    head: dict[str, Any] = field(default_factory=dict)


_AE_SMALL = TrainConfig(
    steps=2000, batch_size=8, block_size=512, lr=2e-3, warmup_steps=100, eval_every=500,
    eval_batches=8,
)
_LM_SMALL = TrainConfig(
    steps=1000, batch_size=4, block_size=512, lr=1e-3, warmup_steps=50, eval_every=250,
    eval_batches=8,
)
# The paper's: constant LR after 2000 warm-up steps. Its ~2M-token batches come from many
# devices: global batch = batch_size × grad_accum × processes sequences of block_size tokens.
_LM_PAPER = TrainConfig(
    steps=250_000, batch_size=8, block_size=2048, lr=3e-4, warmup_steps=2000, eval_every=1000,
    eval_batches=20, save_every=1000,
)

RECIPES: dict[str, dict[str, Recipe]] = {
    "autoencoder": {
        "tiny": Recipe(_AE_SMALL),
        # The LR falls linearly to 0 over the last 30 % of the run (of --max-minutes when
        # given): 10 minutes on 2 threads reach 99.49 % held-out accuracy at a sampled z
        # (100.00 % on tokens seen >= 100 times) against 98.95 % (99.87 %) at a constant LR,
        # run one after the other on one machine (benchmarks/autoencoder.py).
        "demo": Recipe(replace(_AE_SMALL, warmdown=0.3)),
        "reference": Recipe(replace(_AE_SMALL, lr=3e-4, warmup_steps=1000, steps=30_000,
                                    eval_every=1000)),
    },
    "calm": {
        "tiny": Recipe(_LM_SMALL),
        # The flow-matching head: Brier-1 0.086 against the energy head's 0.054 after 1200
        # demo steps, and 0.099 against 0.067 on fixed features (benchmarks/recipe_study.py,
        # benchmarks/head_study.py): at a few thousand small steps the energy loss, close
        # to a quadratic scoring rule over chunks, pulls too weakly.
        # With --head energy, the last-layer init below applies (it is the energy head's only).
        # The LR warm-down of the autoencoder's demo recipe helps CALM too: at the quickstart's
        # 3.95 minutes, Brier-1 0.105-0.106 against 0.101 and Brier-2 0.025-0.027 against
        # 0.021 at a constant LR (two runs, every held-out token, 16 samples per start).
        "demo": Recipe(replace(_LM_SMALL, warmdown=0.3), head={"kind": "flow", "final_init": "default"}),
        # The energy head with a non-zero last layer: 2.5× the Brier-1 of the reference's
        # zero layer after 300 steps, over three seeds (benchmarks/recipe_study.py).
        "bench": Recipe(_LM_SMALL, head={"final_init": "default"}),
        # The paper's CALM blocks: 8192 tokens = 2048 backbone positions at K = 4.
        **{p: Recipe(replace(_LM_PAPER, block_size=8192, batch_size=2)) for p in ("S", "M", "L", "XL")},
    },
    "baseline": {
        "tiny": Recipe(_LM_SMALL),
        # The same warm-down as CALM's demo recipe, measured alike: Brier-1 0.143 against 0.136,
        # perplexity 70.9 against 72.6, BrierLM 1.03 against 0.86 at 3.1 minutes.
        "demo": Recipe(replace(_LM_SMALL, warmdown=0.3)),
        "bench": Recipe(_LM_SMALL),
        **{p: Recipe(_LM_PAPER) for p in ("S", "M", "L", "XL")},
    },
}


def recipe(kind: str, preset: str) -> Recipe:
    """The default recipe of a model kind ('autoencoder', 'calm', 'baseline') at a preset."""
    if kind not in RECIPES:
        raise CalmError(f"no recipes for model kind {kind!r}; choose from {', '.join(RECIPES)}")
    table = RECIPES[kind]
    if preset not in table:
        raise CalmError(f"no {kind} recipe for preset {preset!r}; choose from {', '.join(table)}")
    return table[preset]
