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
import math
import sys
from fractions import Fraction
from pathlib import Path

import torch

from calm.cli.common import add_runtime_flags
from calm.errors import CalmError

N_GRID = "1,2,5,10,20,50,100,200,500"
INVERSE_TEMPERATURES = "1,2,3,4,6,8"
BASELINE_TEMPERATURES = "1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3"
# Head samples per piece of positions (two streams × N each): bounds memory at large N.
SAMPLES_PER_PIECE = 8192


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


def geometric_mean(xs: list[float]) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _point(acc: torch.Tensor, coll: torch.Tensor, **extra) -> dict:
    """acc, coll (P, n) per-position estimates → one point of the curve."""
    a = acc.double().mean(0).tolist()
    c = coll.double().mean(0).tolist()
    return {**extra, "accuracy": geometric_mean(a), "collision": geometric_mean(c),
            "accuracy_n": a, "collision_n": c, "brier_n": [2 * x - y for x, y in zip(a, c)]}


def _windows(dataset, split: str, block: int, unit: int, positions: int, per_window: int):
    """The first ⌈positions / per_window⌉ consecutive windows of the split: (W, block) long."""
    import numpy as np

    if block % unit:
        raise CalmError(f"block size {block} is not divisible by K={unit}")
    if per_window < 1:
        raise CalmError(f"block size {block} leaves no position with a whole next chunk of K={unit}")
    have = dataset.num_tokens(split) // block
    if have < 1:
        raise CalmError(f"the {split} split has fewer than {block} tokens; use a smaller --block-size")
    want = min(have, -(-positions // per_window))
    return torch.from_numpy(dataset.windows(split, np.arange(want) * block, block))


@torch.no_grad()
def calm_contexts(model, tokens: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone states at every chunk boundary of tokens (W, T) and the true next chunks.

    Returns h (P, d) and truth (P, K) for the first ``positions`` boundaries (row-major).
    """
    K = model.config.chunk_size
    W, T = tokens.shape
    chunks = tokens.view(W, T // K, K)
    latents = model.input_latents(chunks[:, :-1])
    h = model.backbone(model.inputs(chunks[:, :-1], latents))  # (W, C−1, d)
    return h.reshape(-1, h.shape[-1])[:positions], chunks[:, 1:].reshape(-1, K)[:positions]


@torch.no_grad()
def calm_point(model, h, truth, num_candidates: int, n: int, max_n: int, seed: int,
               prune: bool = True) -> dict:
    """Accuracy and collision of Algorithm 2 (N = num_candidates, T = 1/n) at states h (P, d)."""
    from calm.temperature_sampling import ChunkDecoder, batch_choose_full, batch_choose_pruned

    dec = ChunkDecoder(model.autoencoder)
    g = torch.Generator(device=h.device).manual_seed(seed)
    N = num_candidates
    piece = max(1, SAMPLES_PER_PIECE // (2 * N))
    acc, coll = [], []
    projections = full = 0
    for lo in range(0, h.shape[0], piece):
        hp, y = h[lo : lo + piece], truth[lo : lo + piece, :max_n]
        P = hp.shape[0]
        z = model.head.sample_n(hp, 2 * N, generator=g)  # (P, 2N, l)
        z = z.view(P, 2, N, -1).transpose(0, 1).reshape(2 * P, N, -1)  # two streams of N draws
        if prune:
            s, _, st = batch_choose_pruned(z, dec, n, g)
            projections += st["projections"]
        else:
            s, _ = batch_choose_full(z, dec, n, g)
            projections += z.shape[0] * N * dec.K
        full += z.shape[0] * N * dec.K
        s1, s2 = s[:P, :max_n], s[P:, :max_n]  # (P, max_n)
        # the first n tokens match ⇔ the cumulative product of token matches at n is 1
        hit1 = (s1 == y).long().cumprod(1).double()
        hit2 = (s2 == y).long().cumprod(1).double()
        acc.append((hit1 + hit2) / 2)
        coll.append((s1 == s2).long().cumprod(1).double())
    return _point(torch.cat(acc), torch.cat(coll), N=N, temperature=1.0 / n,
                  skipped_fraction=1.0 - projections / full)


class _Tempered:
    """A token LM whose logits are divided by a softmax temperature."""

    kind = "baseline"

    def __init__(self, model, temperature: float):
        self.model, self.t = model, temperature

    def logits(self, *args, **kw):
        return self.model.logits(*args, **kw) / self.t

    def make_cache(self, *args):
        return self.model.make_cache(*args)


@torch.no_grad()
def baseline_point(model, tokens, positions: torch.Tensor, max_n: int, temperature: float,
                   seed: int, count: int) -> dict:
    """Accuracy and collision of softmax sampling at ``temperature`` after the prefixes
    tokens[w, :t+1] for t in ``positions`` (per window w), the first ``count`` of them.

    Accuracy: the exact P_T(true n-gram). Collision: 2·accuracy − the low-variance
    Brier-n estimate of ``calm.evaluate.token_lm_estimates`` at that temperature.
    """
    import torch.nn.functional as F

    from calm.evaluate import token_lm_estimates

    g = torch.Generator(device=tokens.device).manual_seed(seed)
    W = tokens.shape[0]
    need = positions[:, None] + torch.arange(max_n, device=tokens.device)  # (P, n)
    read, inverse = torch.unique(need, return_inverse=True)
    acc, coll = [], []
    for w in range(W):  # one window at a time keeps the (rows, P, V) logits small
        x = tokens[w : w + 1]
        logp = F.log_softmax(model.logits(x, read=read).float() / temperature, -1)  # (1, U, V)
        lp = logp.gather(-1, x[:, read + 1, None]).squeeze(-1)  # (1, U)
        p_true = lp[:, inverse].cumsum(-1).exp()[0]  # (P, n)
        brier = token_lm_estimates(_Tempered(model, temperature), x, max_n, g, positions)[0]
        acc.append(p_true.double())
        coll.append((2 * p_true - brier).double().clamp(min=0))
    return _point(torch.cat(acc)[:count], torch.cat(coll)[:count], temperature=temperature)


# ---------------------------------------------------------------------------- plot


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CalmError("--plot needs matplotlib (pip install matplotlib)") from None

    calm, base = result.get("calm"), result.get("baseline")
    panels = (1 if calm else 0) + (1 if calm and base else 0) or 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    axes = axes[0]

    labels: list[tuple] = []  # (axes, x, y, text, below): drawn once the limits are final

    def curve(ax, points, label, key, fmt, marker, below=False):
        xs = [p["collision"] for p in points]
        ys = [p["accuracy"] for p in points]
        ax.plot(xs, ys, marker=marker, label=label)
        labels.extend((ax, x, y, fmt(p[key]), below) for p, x, y in zip(points, xs, ys))

    n_sweep = calm and calm["batch_size_sweep"]
    t_sweep = calm and calm["temperature_sweep"]
    if calm:
        ax = axes[0]
        curve(ax, n_sweep["points"], f"CALM, N varies (T = {_frac(n_sweep['temperature'])})",
              "N", lambda v: f"N={v}", "o")
        curve(ax, t_sweep["points"], f"CALM, T varies (N = {t_sweep['num_candidates']})",
              "temperature", lambda v: f"T={_frac(v)}", "s", below=True)
        ax.set_title("CALM: batch size N vs temperature T")
    if base:
        ax = axes[-1]
        if calm:
            curve(ax, n_sweep["points"], f"CALM, N varies (T = {_frac(n_sweep['temperature'])})",
                  "N", lambda v: f"N={v}", "o")
        curve(ax, base["points"], "Transformer, softmax temperature", "temperature",
              lambda v: f"T={v:g}", "^", below=True)
        ax.set_title("CALM vs Transformer" if calm else "Transformer: softmax temperature")
    for ax in axes:
        ax.set_xlabel("collision rate (two samples agree; lower = more diverse)")
        ax.set_ylabel("accuracy (a sample matches the truth)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Accuracy-diversity trade-off, geometric mean over n = 1..{result['max_n']}, "
                 f"{result['positions']} positions")
    fig.tight_layout()
    _draw_labels(fig, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_labels(fig, labels: list[tuple]) -> None:
    """Point labels that do not overlap: a label that would cover another joins it ("N=1, 10")."""
    fig.canvas.draw()  # final axis limits
    renderer = fig.canvas.get_renderer()
    placed: list[dict] = []
    for ax, x, y, text, below in sorted(labels, key=lambda t: (id(t[0]), t[4],
                                                               *t[0].transData.transform((t[1], t[2])))):
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -11 if below else 5),
                          fontsize=7)
        box = ann.get_window_extent(renderer).padded(10)
        clash = next((q for q in placed if q["ax"] is ax and q["below"] == below
                      and box.overlaps(q["box"])), None)
        if clash is None:
            placed.append({"ax": ax, "below": below, "ann": ann, "texts": [text], "box": box})
            continue
        ann.remove()
        clash["texts"].append(text)
        first = clash["texts"][0]
        name = first.split("=")[0] + "=" if "=" in first else ""
        clash["ann"].set_text(", ".join([first, *(t.removeprefix(name) for t in clash["texts"][1:])]))
        clash["box"] = clash["ann"].get_window_extent(renderer).padded(10)


def _frac(t: float) -> str:
    n = round(1 / t)
    return f"1/{n}" if n > 1 and abs(t - 1 / n) < 1e-6 else f"{t:g}"


# ---------------------------------------------------------------------------- command


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
    tokens = _windows(dataset, args.split, block, K, args.positions, per_window).to(device)
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
            rows.append((f"CALM N={p['N']} T={_frac(p['temperature'])}", p))
    for p in r.get("baseline", {}).get("points", []):
        rows.append((f"baseline T={p['temperature']:g}", p))
    print(f"{'setting':<28} {'accuracy':>9} {'collision':>9} {'Brier-mean':>10}")
    for name, p in rows:
        print(f"{name:<28} {p['accuracy']:>9.4f} {p['collision']:>9.4f} "
              f"{sum(p['brier_n']) / len(p['brier_n']):>10.4f}")
