"""Train the chunk autoencoder (SPEC §1) on a prepared dataset.

Writes a run folder: metrics.jsonl and checkpoints/step_N/ (model.safetensors,
config.json, state, optimizer, tokenizer). Validation reports token accuracy
decoding μ and a sampled z, mean σ and collapsed latent dimensions.

Example: calm train-ae --data data/shakespeare --out runs/ae --preset demo --steps 2000
"""

from __future__ import annotations

import argparse
import json

from calm import dist
from calm.autoencoder import Autoencoder, health
from calm.cli.common import (
    add_config_flags,
    add_output_flags,
    add_resume_flags,
    add_runtime_flags,
    add_train_flags,
    overrides,
    precision_of,
    prepare_out_dir,
    presets_of,
    time_limit,
    train_config,
)
from calm.config import AutoencoderConfig, preset, to_dict
from calm.data import TokenDataset
from calm.errors import CalmError
from calm.recipes import recipe
from calm.runtime import pick_device, seed_everything, set_threads
from calm.train import prepare_run, sharded_batches, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `calm prepare`")
    add_output_flags(p)
    p.add_argument("--preset", default="demo", choices=presets_of("autoencoder"), help="model size")
    g = p.add_argument_group("model (overrides of the preset)")
    add_config_flags(g, AutoencoderConfig, skip=("vocab_size",))
    add_train_flags(p, "autoencoder")
    add_runtime_flags(p, training=True)
    add_resume_flags(p)


def build_config(args, vocab_size: int) -> AutoencoderConfig:
    cfg = preset("autoencoder", args.preset, vocab_size=vocab_size,
                 **overrides(args, AutoencoderConfig, skip=("vocab_size",)))
    if cfg.chunk_size <= 0 or cfg.latent_size <= 0 or cfg.hidden_size <= 0:
        raise CalmError("chunk, latent and hidden sizes must be positive")
    return cfg


def run(args) -> int:
    set_threads(args.threads)
    env = dist.setup(pick_device(args.device))  # under torchrun: cuda:LOCAL_RANK, process group
    device = env.device
    precision = precision_of(args, device)
    dataset = TokenDataset(args.data)
    cfg = build_config(args, dataset.vocab_size)
    # The autoencoder is context-free, so the block only sets how many chunks a step sees.
    tcfg = train_config(args, recipe("autoencoder", args.preset).train)
    limit = time_limit(args)  # checked before anything is written
    if tcfg.block_size % cfg.chunk_size:
        raise CalmError(
            f"block size {tcfg.block_size} is not divisible by K={cfg.chunk_size}"
        )
    loader, val = sharded_batches(dataset, tcfg, chunk_size=cfg.chunk_size)
    resume = prepare_run(lambda: prepare_out_dir(args.out, args.overwrite, resume=bool(args.resume)),
                         args.resume, args.out)
    seed_everything(tcfg.seed)
    model = Autoencoder(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if env.is_main:
        print(f"autoencoder: {n_params / 1e6:.2f}M parameters, K={cfg.chunk_size}, "
              f"latent {cfg.latent_size}, on {device}")
    model = dist.wrap(model.to(device), dist.default_mode(args.dist, env.world_size), device)

    def evaluate(m):
        # Each rank scores its share of the validation batches; the loop averages ranks.
        h = health(m, val)
        return {k: h[k] for k in ("acc_mean", "acc_sample", "sigma", "collapsed_dims")}

    result = train(
        model, tcfg, iter(loader), run_dir=args.out, device=device, evaluate=evaluate,
        checkpoint_config={"kind": "autoencoder", "model": to_dict(cfg),
                           "data": {"path": str(args.data), "tokenizer": dataset.fingerprint}},
        tokenizer=dataset.tokenizer, loader_state=loader.state_dict,
        progress=not args.no_progress, desc="train-ae", time_limit=limit,
        resume=resume, keep_checkpoints=args.keep_checkpoints, max_bad_steps=args.max_bad_steps,
        precision=precision,
    )
    if env.is_main:
        print(json.dumps({"step": result.step, **result.last_eval,
                          "tokens_per_s": round(result.tokens_per_second, 1),
                          "checkpoint": str(result.checkpoint)}))
    dist.cleanup()
    return 0
