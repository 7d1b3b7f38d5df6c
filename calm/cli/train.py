"""Train a CALM model on top of a frozen, trained autoencoder (SPEC §2).

The backbone runs over chunk positions; the energy head predicts the next
chunk's latent vector and is trained with the energy loss against the
autoencoder's posterior. K, the latent size and the tokenizer come from the
autoencoder, which must have been trained on data with the same tokenizer.

Example: calm train --autoencoder runs/ae --data data/shakespeare --out runs/calm --preset demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json

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
from calm.config import CALMConfig, HeadConfig, TransformerConfig, preset, to_dict
from calm.errors import CalmError
from calm.recipes import recipe


def add_model_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `calm prepare`")
    add_output_flags(p)
    p.add_argument("--preset", default="demo", choices=presets_of("transformer"), help="backbone size")
    p.add_argument("--init-from", metavar="DIR",
                   help="fine-tune: start from this checkpoint's weights (your own or one made by "
                        "`calm import`), keeping its architecture; the optimizer starts fresh and "
                        "the data must use its tokenizer")
    g = p.add_argument_group("backbone (overrides of the preset)")
    add_config_flags(g, TransformerConfig, skip=("vocab_size",))
    add_train_flags(p, kind)
    add_runtime_flags(p, training=True)
    add_resume_flags(p)
    p.add_argument("--eval-brier", action="store_true",
                   help="also report BrierLM and Brier-1..4 at every validation")
    p.add_argument("--eval-brier-tokens", type=int, default=8192,
                   help="held-out tokens scored by --eval-brier")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder",
                   help="trained autoencoder (run or checkpoint folder); with --init-from, the "
                        "one that checkpoint records")
    add_model_arguments(p, "calm")
    g = p.add_argument_group(
        "generative head (defaults: HeadConfig, then the preset's recipe: demo and bench set "
        "--head-final-init default; see calm.recipes)")
    add_config_flags(g, HeadConfig, prefix="head-")
    # Short spellings of the most used head flags.
    g.add_argument("--head", dest="head_kind", choices=["energy", "flow", "diffusion"],
                   default=None, help="same as --head-kind")
    g.add_argument("--flow-steps", dest="head_flow_steps", type=int, default=None,
                   help="same as --head-flow-steps")
    g.add_argument("--flow-solver", dest="head_flow_solver", choices=["euler", "midpoint"],
                   default=None, help="same as --head-flow-solver")
    g.add_argument("--diffusion-steps", dest="head_diffusion_steps", type=int, default=None,
                   help="same as --head-diffusion-steps")
    p.add_argument(
        "--input-scheme", default="discrete", choices=["discrete", "continuous", "both"],
        help="how the previous chunk enters the backbone",
    )


def backbone_config(args, vocab_size: int) -> TransformerConfig:
    return preset("transformer", args.preset, vocab_size=vocab_size,
                  **overrides(args, TransformerConfig, skip=("vocab_size",)))


def run_training(args, *, kind: str) -> int:
    """Shared by `calm train` and `calm train-baseline`: assemble, train, report."""
    import torch

    from calm import dist
    from calm.data import TokenDataset
    from calm.loading import check_same_tokenizer
    from calm.runtime import pick_device, seed_everything, set_threads
    from calm.train import micro_batch_seed, prepare_run, sharded_batches, train

    set_threads(args.threads)
    env = dist.setup(pick_device(args.device))  # under torchrun: cuda:LOCAL_RANK, process group
    device = env.device
    precision = precision_of(args, device)
    dataset = TokenDataset(args.data)
    rec = recipe(kind, args.preset)
    tcfg = train_config(args, rec.train)
    limit = time_limit(args)  # checked before anything is written
    backbone = backbone_config(args, dataset.vocab_size)
    ckpt_cfg: dict = {"kind": kind, "data": {"path": str(args.data), "tokenizer": dataset.fingerprint}}

    if args.init_from:
        from calm.loading import load_model

        fixed = overrides(args, TransformerConfig, skip=("vocab_size",))
        if kind == "calm":
            fixed.update(overrides(args, HeadConfig, prefix="head-"))
        if fixed:
            flag = next(iter(fixed)).replace("_", "-")
            raise CalmError(f"--init-from keeps the checkpoint's architecture; drop --{flag}")
        if kind == "calm" and args.input_scheme != "discrete":
            raise CalmError("--init-from keeps the checkpoint's input scheme; drop --input-scheme")
        model, init_ckpt, init_cfg = load_model(args.init_from, device)
        if init_cfg["kind"] != kind:
            raise CalmError(f"{init_ckpt} holds a {init_cfg['kind']} model; `calm "
                            f"{'train' if kind == 'calm' else 'train-baseline'}` needs a {kind} one")
        if kind == "calm" and args.autoencoder:
            raise CalmError("--init-from uses the autoencoder its checkpoint records; drop --autoencoder")
        check_same_tokenizer(init_cfg, dataset, init_ckpt)
        vocab = model.config.backbone.vocab_size if kind == "calm" else model.config.vocab_size
        if dataset.vocab_size > vocab:
            raise CalmError(f"the dataset's vocabulary ({dataset.vocab_size}) is larger than "
                            f"{init_ckpt}'s ({vocab})")
        chunk_size = model.config.chunk_size if kind == "calm" else 1
        if tcfg.block_size % chunk_size:
            raise CalmError(f"block size {tcfg.block_size} is not divisible by K={chunk_size}")
        seed_everything(tcfg.seed)
        ckpt_cfg.update(model=init_cfg["model"], init_from=str(init_ckpt))
        if kind == "calm":
            ckpt_cfg["autoencoder"] = init_cfg.get("autoencoder")
    elif kind == "calm":
        if not args.autoencoder:
            raise CalmError("calm train needs --autoencoder DIR (or --init-from DIR)")
        from calm.loading import autoencoder_record, load_autoencoder
        from calm.model import CALM

        ae, ae_ckpt, ae_cfg = load_autoencoder(args.autoencoder, device)
        check_same_tokenizer(ae_cfg, dataset, ae_ckpt)
        K = ae.config.chunk_size
        if tcfg.block_size % K:
            raise CalmError(f"block size {tcfg.block_size} is not divisible by K={K}")
        chunks = tcfg.block_size // K
        if chunks < 2:
            raise CalmError(f"block size {tcfg.block_size} holds fewer than 2 chunks of K={K}")
        backbone = dataclasses.replace(backbone, max_seq_len=max(backbone.max_seq_len, chunks))
        head = dataclasses.replace(HeadConfig(), **{**rec.head,
                                                    **overrides(args, HeadConfig, prefix="head-")})
        cfg = CALMConfig(backbone=backbone, head=head, chunk_size=K,
                         latent_size=ae.config.latent_size, input_scheme=args.input_scheme)
        seed_everything(tcfg.seed)
        model = CALM(cfg, ae)
        ckpt_cfg.update(model=to_dict(cfg), autoencoder=autoencoder_record(ae_ckpt, ae_cfg))
        chunk_size = K
    else:
        from calm.baseline import TokenLM

        backbone = dataclasses.replace(
            backbone, max_seq_len=max(backbone.max_seq_len, tcfg.block_size)
        )
        seed_everything(tcfg.seed)
        model = TokenLM(backbone)
        ckpt_cfg.update(model=to_dict(backbone))
        chunk_size = 1

    loader, val = sharded_batches(dataset, tcfg, chunk_size=chunk_size)
    resume = prepare_run(lambda: prepare_out_dir(args.out, args.overwrite, resume=bool(args.resume)),
                         args.resume, args.out)
    flops = None
    try:
        from calm.flops import training_flops_per_token

        flops = training_flops_per_token(model, tcfg.block_size)
    except ImportError:
        pass
    model = dist.wrap(model.to(device), dist.default_mode(args.dist, env.world_size), device)
    n = dist.unwrap(model).trainable_parameters()
    if env.is_main:
        print(f"{kind}: {n / 1e6:.2f}M trainable parameters on {device}")

    brier = None
    if getattr(args, "eval_brier", False):
        from calm.evaluate import brier_eval_fn

        brier = brier_eval_fn(dataset, block_size=tcfg.block_size, batch_size=tcfg.batch_size,
                              max_tokens=args.eval_brier_tokens, seed=tcfg.seed,
                              precision=precision)

    def evaluate(m):
        # Sums over rows, reduced across ranks by the loop; each batch draws its noise
        # from its own seed, so validation figures do not depend on the world size.
        tot, cnt = 0.0, 0
        for j, b in zip(val.batch_ids, val):
            g = torch.Generator(device=device).manual_seed(micro_batch_seed(tcfg.seed, -1 - j))
            loss, _ = m(b.to(device), generator=g)
            tot += float(loss) * len(b)
            cnt += len(b)
        figures = {"loss": (tot, cnt)}
        if brier is not None:
            figures.update(brier(m))
        return figures

    result = train(
        model, tcfg, iter(loader), run_dir=args.out, device=device, evaluate=evaluate,
        checkpoint_config=ckpt_cfg, tokenizer=dataset.tokenizer, loader_state=loader.state_dict,
        flops_per_token=flops, progress=not args.no_progress, desc=f"train {kind}",
        time_limit=limit, resume=resume, keep_checkpoints=args.keep_checkpoints,
        max_bad_steps=args.max_bad_steps, precision=precision,
    )
    if env.is_main:
        print(json.dumps({"step": result.step, **{k: round(v, 5) for k, v in result.last_metrics.items()},
                          **result.last_eval, "tokens_per_s": round(result.tokens_per_second, 1),
                          "checkpoint": str(result.checkpoint)}))
    dist.cleanup()
    return 0


def run(args) -> int:
    return run_training(args, kind="calm")
