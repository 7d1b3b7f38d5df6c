"""Train a CALM model on top of a frozen, trained autoencoder (SPEC §2).

The backbone runs over chunk positions; a generative head predicts the next
chunk's latent vector against the autoencoder's posterior: the energy head
trained with the energy loss (the paper's; every preset but demo), or the
flow-matching head (the demo preset's default: it learns faster at small scale).
K, the latent size and the tokenizer come from the autoencoder, which must have
been trained on data with the same tokenizer.

Example: calm train --autoencoder runs/ae --data data/shakespeare --out runs/calm --preset demo
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
from calm.config import HeadConfig, TransformerConfig
from calm.errors import stop_if_stopped
from calm.recipes import recipe
from calm.runs import LanguageModelJob, train_language_model


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
        "generative head (defaults: HeadConfig, then the preset's recipe: demo sets --head flow, "
        "bench --head-final-init default; see calm.recipes)")
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
    p.add_argument(
        "--token-loss-weight", type=float, default=0.0,
        help="weight of an auxiliary cross-entropy on the next chunk's tokens, read from the "
             "backbone by a probe that generation never uses (a training aid; default 0: the "
             "paper's objective alone)",
    )


def job_of(args, kind: str) -> LanguageModelJob:
    """The `calm.runs.LanguageModelJob` that `calm train` or `calm train-baseline` describes."""
    return LanguageModelJob(
        kind=kind, data=args.data, preset=args.preset,
        backbone=overrides(args, TransformerConfig, skip=("vocab_size",)),
        head=overrides(args, HeadConfig, prefix="head-") if kind == "calm" else {},
        input_scheme=getattr(args, "input_scheme", "discrete"),
        token_loss_weight=getattr(args, "token_loss_weight", 0.0),
        autoencoder=getattr(args, "autoencoder", None), init_from=args.init_from,
        train=train_config(args, recipe(kind, args.preset).train),
        eval_brier=args.eval_brier, eval_brier_tokens=args.eval_brier_tokens,
    )


def run(args) -> int:
    return stop_if_stopped(train_language_model(job_of(args, "calm"), run_settings(args)))
