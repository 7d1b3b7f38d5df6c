"""Train the chunk autoencoder (SPEC §1) on a prepared dataset.

Writes a run folder: metrics.jsonl and checkpoints/step_N/ (model.safetensors,
config.json, state, optimizer, tokenizer). Validation reports token accuracy
decoding μ and a sampled z, mean σ and collapsed latent dimensions.

Example: calm train-ae --data data/shakespeare --out runs/ae --preset demo --steps 2000
"""

from __future__ import annotations

import argparse

from calm.cli.common import (
    add_config_flags,
    add_output_flags,
    add_resume_flags,
    add_runtime_flags,
    add_train_flags,
    overrides,
    presets_of,
    run_settings,
    train_config,
)
from calm.config import AutoencoderConfig
from calm.errors import stop_if_stopped
from calm.recipes import recipe
from calm.runs import AutoencoderJob, train_autoencoder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `calm prepare`")
    add_output_flags(p)
    p.add_argument("--preset", default="demo", choices=presets_of("autoencoder"), help="model size")
    g = p.add_argument_group("model (overrides of the preset)")
    add_config_flags(g, AutoencoderConfig, skip=("vocab_size",))
    add_train_flags(p, "autoencoder")
    add_runtime_flags(p, training=True)
    add_resume_flags(p)


def run(args) -> int:
    job = AutoencoderJob(
        data=args.data, preset=args.preset,
        model=overrides(args, AutoencoderConfig, skip=("vocab_size",)),
        train=train_config(args, recipe("autoencoder", args.preset).train),
    )
    return stop_if_stopped(train_autoencoder(job, run_settings(args)))
