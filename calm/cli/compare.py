"""A Table-1-style comparison of trained runs (paper §7.2, Table 1).

One row per run folder (made by `calm train` or `calm train-baseline`): model
kind, trainable parameters, training FLOPs so far, inference FLOPs per
generated token, Brier-1…4, BrierLM, and perplexity for baselines.

- training FLOPs: the last ``train_flops`` in RUN/metrics.jsonl; runs that did
  not log it get tokens trained × FLOPs per training token (calm.flops).
- inference FLOPs per token: one step at a context of the run's block size
  (or --context), in tokens.
- Brier figures: RUN/eval.json, the output of ``calm eval --json`` saved in the
  run folder (keys brier_1 … brier_4, brier_n_se, brier_lm, brier_lm_se and, for
  baselines, cross_entropy and perplexity). "–" where there is none;
  ``--evaluate --data DIR`` runs the evaluation and writes eval.json first.

Examples:
  calm compare runs/calm runs/base
  calm compare runs/calm runs/base --evaluate --data data/shakespeare \
      --out table.md --json table.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calm.cli.common import add_runtime_flags, precision_of
from calm.comparison import evaluate_run, markdown_table, run_row
from calm.errors import CalmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="training run folders")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON here"
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="inference context in tokens (default: each run's block size)",
    )
    g = p.add_argument_group("evaluation (--evaluate)")
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate each run on --data first and save RUN_DIR/eval.json",
    )
    g.add_argument("--data", default=None, help="dataset folder made by `calm prepare`")
    g.add_argument(
        "--max-tokens", type=int, default=65536, help="evaluate at most this many tokens"
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per window (default: each run's training block size, else 512)",
    )
    g.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    g.add_argument("--seed", type=int, default=0, help="seed of the model samples")
    add_runtime_flags(p)


# ----------------------------------------------------------------------------- reading runs


def run(args) -> int:
    from calm.runtime import set_threads

    set_threads(args.threads)
    if args.evaluate and not args.data:
        raise CalmError("--evaluate needs --data DIR")
    for run_dir in args.runs:
        if not run_dir.is_dir():
            raise CalmError(f"run folder {run_dir} does not exist")
    if args.evaluate:
        from calm.runtime import pick_device

        device = pick_device(args.device)
        for run_dir in args.runs:
            evaluate_run(run_dir, args.data, device=device, block_size=args.block_size,
                         batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                         precision=precision_of(args, device))
    rows = [run_row(r, args.context) for r in args.runs]
    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
