"""Accuracy-diversity trade-off of temperature sampling (paper §7.5, Figure 11).

At held-out positions (teacher-forced context, the next chunk as the truth) two
independent samples are drawn per position. Accuracy is the chance a sample
matches the truth, the collision rate the chance the two samples match (higher
= less diverse); both are reported per n = 1..4 (the first n tokens of the chunk)
and as their geometric mean, as BrierLM does (Brier-n = 2·accuracy − collision).

CALM: Algorithm 2 (batch sampler) over a grid of batch sizes N at a fixed
temperature (default T = 1/3) and over a grid of temperatures T = 1/n at a fixed
N (default 200). A token-level baseline (--baseline, or --model itself): softmax
temperatures, with the same positions and definitions; its accuracy is the exact
probability of the true n-gram and its collision rate the low-variance estimate of
the BrierLM evaluation (two sampled prefixes agree × Σ_v P(v | prefix)²).

Examples:
  calm tradeoff --model runs/calm --baseline runs/base --data data/shakespeare --plot tradeoff.png
  calm tradeoff --model runs/calm --data data/shakespeare --positions 256 --n-grid 2,20,200 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import torch

from calm.cli.common import add_runtime_flags
from calm.errors import CalmError
from calm.tradeoff import (
    baseline_point,
    calm_contexts,
    calm_point,
    frac_label,
    plot,
    position_windows,
)

N_GRID = "1,2,5,10,20,50,100,200,500"
INVERSE_TEMPERATURES = "1,2,3,4,6,8"
BASELINE_TEMPERATURES = "1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="CALM (or baseline) run/checkpoint folder")
    p.add_argument("--data", required=True, help="dataset folder made by `calm prepare`")
    p.add_argument("--baseline", default=None, help="a token-level baseline to compare with")
    p.add_argument("--autoencoder", default=None,
                   help="CALM: the autoencoder folder, if not where the checkpoint recorded it")
    p.add_argument("--split", default="val", help="dataset split: val or train")
    p.add_argument("--positions", type=int, default=512, help="held-out positions (chunk boundaries)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per context window (default: the training block size, else 512)")
    p.add_argument("--n-grid", default=N_GRID, help="CALM batch sizes N, at --temperature")
    p.add_argument("--temperature", default="1/3", help="CALM temperature of the N sweep (1/n)")
    p.add_argument("--inverse-temperatures", default=INVERSE_TEMPERATURES,
                   help="CALM temperature sweep: the n of T = 1/n, at --num-candidates")
    p.add_argument("--num-candidates", type=int, default=200, help="CALM N of the temperature sweep")
    p.add_argument("--baseline-temperatures", default=BASELINE_TEMPERATURES,
                   help="softmax temperatures of the baseline sweep")
    p.add_argument("--no-prune", action="store_true",
                   help="decode every candidate in full (same distribution, slower)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (the same for every setting)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    p.add_argument("--plot", type=Path, default=None, help="draw the trade-off into this PNG file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_runtime_flags(p)


# ---------------------------------------------------------------------------- parsing


def parse_number(text: str, what: str) -> float:
    """A positive number, possibly a fraction such as 1/3."""
    try:
        x = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise CalmError(f"{what}: {text!r} is not a number (e.g. 0.5 or 1/3)") from None
    if not x > 0:
        raise CalmError(f"{what}: {text!r} must be positive")
    return x


def parse_list(text: str, what: str, kind=float) -> list:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise CalmError(f"{what}: give at least one value")
    out = [parse_number(t, what) for t in items]
    if kind is int:
        if any(x != int(x) for x in out):
            raise CalmError(f"{what}: {text!r} must hold whole numbers")
        out = [int(x) for x in out]
    return out


# ---------------------------------------------------------------------------- figures


def _default_block(ckpt: Path, context: int, unit: int) -> int:
    block = 512
    try:
        block = int(json.loads((ckpt / "state.json").read_text())["train_config"]["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return min(block, context) // unit * unit


def _load(path, device, autoencoder=None):
    from calm.loading import checkpoint_kind, load_model

    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; give a CALM or baseline checkpoint")
    if cfg["kind"] == "calm":
        from calm.loading import load_calm

        return load_calm(ckpt, device, autoencoder_path=autoencoder)
    return load_model(ckpt, device)


def run(args) -> int:
    from calm.data import TokenDataset
    from calm.loading import check_same_tokenizer
    from calm.runtime import pick_device, set_threads
    from calm.sampling import batch_temperature_n

    set_threads(args.threads)
    device = pick_device(args.device)
    if args.positions < 1:
        raise CalmError(f"--positions must be at least 1, got {args.positions}")
    n_grid = parse_list(args.n_grid, "--n-grid", int)
    n_fixed = batch_temperature_n(parse_number(args.temperature, "--temperature"))
    inv_grid = parse_list(args.inverse_temperatures, "--inverse-temperatures", int)
    base_grid = parse_list(args.baseline_temperatures, "--baseline-temperatures")
    if any(t > 1 for t in base_grid):
        raise CalmError("--baseline-temperatures must lie in (0, 1]")
    if min(n_grid) < 1 or args.num_candidates < 1:
        raise CalmError("batch sizes N must be at least 1")
    if args.split not in ("val", "train"):
        raise CalmError(f"unknown split {args.split!r}; choose val or train")

    dataset = TokenDataset(args.data)
    model, ckpt, cfg = _load(args.model, device, args.autoencoder)
    check_same_tokenizer(cfg, dataset, ckpt)
    calm = model if model.kind == "calm" else None
    base, base_ckpt = (None if calm else model), (None if calm else ckpt)
    if args.baseline is not None:
        if base is not None:
            raise CalmError("--model is already a baseline; give a CALM model with --baseline")
        base, base_ckpt, bcfg = _load(args.baseline, device)
        if base.kind != "baseline":
            raise CalmError(f"--baseline {base_ckpt} holds a {base.kind} model, not a baseline")
        check_same_tokenizer(bcfg, dataset, base_ckpt)

    # The same text positions for both models: chunk boundaries of the CALM's K (4 alone).
    K = calm.config.chunk_size if calm else 4
    max_n = min(4, K)
    context = calm.config.backbone.max_seq_len * K if calm else base.config.max_seq_len
    if base is not None:
        context = min(context, base.config.max_seq_len)
    block = args.block_size or _default_block(ckpt, context, K)
    if block > context:
        raise CalmError(f"block size {block} exceeds the model's context of {context} tokens")
    per_window = block // K - 1
    tokens = position_windows(dataset, args.split, block, K, args.positions, per_window).to(device)
    P = min(args.positions, tokens.shape[0] * per_window)

    result: dict = {"model": str(ckpt), "data": str(args.data), "split": args.split,
                    "block_size": block, "positions": P, "max_n": max_n, "seed": args.seed}
    verbose = not args.json and not args.no_progress
    from calm.cli.common import precision_of
    from calm.precision import autocast

    with autocast(device, precision_of(args, device)):
        if calm is not None:
            calm.eval()
            h, truth = calm_contexts(calm, tokens, P)
            prune = not args.no_prune
            n_pts, t_pts = [], []
            for N in n_grid:
                n_pts.append(calm_point(calm, h, truth, N, n_fixed, max_n, args.seed, prune))
                _log(verbose, f"CALM N={N} T=1/{n_fixed}", n_pts[-1])
            for n in inv_grid:
                t_pts.append(calm_point(calm, h, truth, args.num_candidates, n, max_n, args.seed, prune))
                _log(verbose, f"CALM N={args.num_candidates} T=1/{n}", t_pts[-1])
            result["calm"] = {
                "chunk_size": K,
                "batch_size_sweep": {"temperature": 1.0 / n_fixed, "points": n_pts},
                "temperature_sweep": {"num_candidates": args.num_candidates, "points": t_pts},
            }
        if base is not None:
            base.eval()
            pos = torch.arange(1, per_window + 1, device=device) * K - 1  # prefix ends at a boundary
            pts = []
            for t in base_grid:
                pts.append(baseline_point(base, tokens, pos, max_n, t, args.seed, P))
                _log(verbose, f"baseline T={t:g}", pts[-1])
            result["baseline"] = {"model": str(base_ckpt), "points": pts}

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        _table(result)
    return 0


def _log(verbose: bool, what: str, p: dict) -> None:
    if verbose:
        print(f"  {what}: accuracy {p['accuracy']:.4f}, collision {p['collision']:.4f}",
              file=sys.stderr, flush=True)


def _table(r: dict) -> None:
    print(f"{r['positions']} positions of {r['data']} ({r['split']}), n = 1..{r['max_n']}")
    rows = []
    if "calm" in r:
        for p in r["calm"]["batch_size_sweep"]["points"] + r["calm"]["temperature_sweep"]["points"]:
            rows.append((f"CALM N={p['N']} T={frac_label(p['temperature'])}", p))
    for p in r.get("baseline", {}).get("points", []):
        rows.append((f"baseline T={p['temperature']:g}", p))
    print(f"{'setting':<28} {'accuracy':>9} {'collision':>9} {'Brier-mean':>10}")
    for name, p in rows:
        print(f"{name:<28} {p['accuracy']:>9.4f} {p['collision']:>9.4f} "
              f"{sum(p['brier_n']) / len(p['brier_n']):>10.4f}")
