"""Evaluate a chunk autoencoder on held-out data.

Reports token accuracy decoding the posterior mean μ and decoding a sampled
z ~ N(μ, σ²), the mean σ, the number of collapsed latent dimensions (mean KL
below 0.01), and the robustness curve: accuracy as extra Gaussian noise of
growing scale is added to a sampled z.

Example: calm eval-ae --model runs/ae --data data/shakespeare --json
"""

from __future__ import annotations

import argparse
import json

import torch

from calm.autoencoder import health
from calm.cli.common import add_runtime_flags, precision_of
from calm.data import TokenDataset, eval_batches
from calm.loading import check_same_tokenizer, load_autoencoder
from calm.runtime import pick_device, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="autoencoder run or checkpoint folder")
    p.add_argument("--data", required=True, help="dataset folder made by `calm prepare`")
    p.add_argument("--split", default="val", help="dataset split to evaluate")
    p.add_argument("--max-tokens", type=int, default=262144, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--block-size", type=int, default=512, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled z and the noise")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_runtime_flags(p)


def run(args) -> int:
    set_threads(args.threads)
    device = pick_device(args.device)
    ae, ckpt, cfg = load_autoencoder(args.model, device)
    dataset = TokenDataset(args.data)
    check_same_tokenizer(cfg, dataset, ckpt)
    block = args.block_size - args.block_size % ae.config.chunk_size
    max_batches = max(1, args.max_tokens // (args.batch_size * block))
    batches = eval_batches(dataset, args.split, block, args.batch_size, max_batches=max_batches)
    g = torch.Generator(device=device).manual_seed(args.seed)
    from calm.precision import autocast

    with autocast(device, precision_of(args, device)):
        h = health(ae, batches, generator=g)
    h["checkpoint"] = str(ckpt)
    if args.json:
        print(json.dumps(h))
        return 0
    print(f"checkpoint        {ckpt}")
    print(f"tokens            {h['tokens']}")
    print(f"accuracy (mean)   {100 * h['acc_mean']:.3f} %")
    print(f"accuracy (sample) {100 * h['acc_sample']:.3f} %")
    print(f"mean sigma        {h['sigma']:.4f}")
    print(f"collapsed dims    {h['collapsed_dims']} / {h['latent_size']}")
    print("robustness        extra noise -> accuracy")
    for r in h["robustness"]:
        print(f"  {r['noise']:>5.2f}  {100 * r['acc']:.3f} %")
    return 0
