"""Where a model's Brier-n come from: held-out positions split by the text they predict.

Brier-n = 2 P(true n-gram) − Σ_x P(x)², averaged over positions. Where the model is
confident and wrong, a position adds up to −1; where it is unsure, it adds about 0.
The demo corpus holds out whole plays, so every speaker label of the held-out
split (a line such as ``IAGO.``) names a character the model never saw, while a
model trained for long is sure that a label comes after a blank line, and of
how a name it knows goes on. This benchmark scores each model's per-position
estimates (the same estimators as ``calm eval``) on the held-out split, and
splits them: positions whose outcome n-gram touches a speaker-label line, and
all others. It prints Brier-1…4 and BrierLM for all positions, for the labels
and for the rest, and the label positions' share.

Usage: python benchmarks/brier_positions.py --data data/shakespeare MODEL [MODEL ...]
       [--samples 16] [--max-tokens 0] [--name brier_positions]
(MODEL: a run folder, or LABEL=FOLDER). Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

from calm.brier import BrierStats, brier_lm, multi_sample_brier  # noqa: E402
from calm.data import TokenDataset, eval_batches  # noqa: E402
from calm.evaluate import LOGITS_BUDGET, calm_samples, token_lm_estimates  # noqa: E402
from calm.loading import load_model  # noqa: E402
from calm.precision import autocast, resolve_precision  # noqa: E402

MAX_N = 4
# A speaker label of the demo corpus: a line of capitals ending in a full stop ("IAGO.",
# "FIRST CITIZEN.", "DUKE OF VENICE.").
LABEL = re.compile(r"^[A-Z][A-Z0-9 ,'&-]*\.$", re.MULTILINE)


def label_tokens(ids: list[int], tokenizer) -> torch.Tensor:
    """(T,) bool: the tokens whose text touches a speaker-label line."""
    pieces = [tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    inside = torch.zeros(len(text) + 1, dtype=torch.int32)
    for m in LABEL.finditer(text):
        inside[m.start()] += 1
        inside[m.end()] -= 1
    inside = inside.cumsum(0)[:-1] > 0
    out, at = torch.zeros(len(ids), dtype=torch.bool), 0
    for k, piece in enumerate(pieces):
        if piece and bool(inside[at : at + len(piece)].any()):
            out[k] = True
        at += len(piece)
    return out


def per_position(model, x: torch.Tensor, g: torch.Generator, samples: int):
    """Per-start Brier-1..4 estimates (B, P, 4) and the outcome token indices (P, 4)."""
    B, T = x.shape
    if model.kind == "baseline":
        V = model.config.vocab_size
        piece = max(1, LOGITS_BUDGET // (2 * B * V))
        est = token_lm_estimates(model, x, MAX_N, g, piece=piece)  # (B, T−4, 4)
        starts = torch.arange(est.shape[1])
        return est, starts[:, None] + 1 + torch.arange(MAX_N)
    K = model.config.chunk_size
    draws, targets = calm_samples(model, x, MAX_N, num_samples=samples, generator=g)
    est = torch.stack([multi_sample_brier(draws[..., :n], targets[..., :n]) for n in range(1, MAX_N + 1)], -1)
    chunks = torch.arange(est.shape[1])
    return est, (chunks[:, None] + 1) * K + torch.arange(MAX_N)


def summary(stats: BrierStats) -> dict:
    s = stats.summary()
    s["brier_lm"] = brier_lm([s[f"brier_{n}"] for n in range(1, MAX_N + 1)])
    return s


def score(model, dataset, block: int, batch: int, max_tokens: int, samples: int, seed: int) -> dict:
    windows = dataset.num_tokens("val") // block
    if max_tokens:
        windows = min(windows, max(1, max_tokens // block))
    g = torch.Generator().manual_seed(seed)
    groups = {"all": BrierStats(MAX_N), "labels": BrierStats(MAX_N), "rest": BrierStats(MAX_N)}
    done = 0
    precision = resolve_precision("auto", torch.device("cpu"))
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        for x in eval_batches(dataset, "val", block, batch, max_batches=-(-windows // batch)):
            x = x[: windows - done]
            done += x.shape[0]
            est, outcome = per_position(model, x, g, samples)
            lab = torch.stack([label_tokens(row.tolist(), dataset.tokenizer) for row in x])  # (B, T)
            for n in range(1, MAX_N + 1):
                touches = lab[:, outcome[:, :n]].any(-1)  # (B, P)
                e = est[..., n - 1]
                groups["all"].update(n, e.reshape(-1))
                groups["labels"].update(n, e[touches])
                groups["rest"].update(n, e[~touches])
            if done >= windows:
                break
    out = {k: summary(v) for k, v in groups.items()}
    out["label_share"] = {n: out["labels"][f"count_{n}"] / out["all"][f"count_{n}"] for n in range(1, MAX_N + 1)}
    out["tokens"] = windows * block
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run folders, or LABEL=FOLDER")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset the models were trained on")
    p.add_argument("--samples", type=int, default=16, help="CALM's sampled chunks per start")
    p.add_argument("--max-tokens", type=int, default=0, help="held-out tokens to score (0: all)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="brier_positions", help="name of the results file")
    args = p.parse_args()
    if args.samples < 2:
        p.error(f"--samples must be at least 2, got {args.samples}")
    torch.set_num_threads(args.threads)
    dataset = TokenDataset(args.data)
    results: dict = {"data": str(args.data), "samples_per_start": args.samples, "models": {}}
    rows = []
    for spec in args.models:
        label, _, folder = spec.rpartition("=")
        label = label or Path(folder).name
        model, _, _ = load_model(folder)
        model.eval()
        r = score(model, dataset, args.block_size, args.batch_size, args.max_tokens, args.samples, args.seed)
        r["folder"], r["kind"] = folder, model.kind
        results["models"][label] = r
        for group in ("all", "labels", "rest"):
            g = r[group]
            share = "" if group == "all" else f"{100 * (r['label_share'][4] if group == 'labels' else 1 - r['label_share'][4]):.1f} %"
            lm = g["brier_lm"]
            rows.append([label, group, share,
                         *(f"{g[f'brier_{n}']:.4f} ± {g[f'brier_{n}_se']:.4f}" for n in range(1, MAX_N + 1)),
                         "–" if math.isnan(lm) else f"{lm:.2f}"])
        print(f"{label}: done", flush=True)
    path = write(args.name, results)
    print(table(rows, ["model", "positions", "share (n = 4)", "Brier-1", "Brier-2", "Brier-3", "Brier-4",
                       "BrierLM"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
