"""Does BrierLM track cross-entropy? (paper §4.3: Pearson −0.966, Spearman −0.991)

Trains the demo-size token-level baseline on the demo corpus, keeps a checkpoint
every --save-every steps, evaluates each with cross-entropy and BrierLM on the
same held-out tokens, and reports the Pearson and Spearman correlations
between the two series (negative: lower cross-entropy, higher BrierLM).

Usage: python benchmarks/brier_correlation.py [--steps 600] [--save-every 50] [--max-tokens 16384]
Writes benchmarks/results/brier_correlation.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write  # noqa: E402

from calm.checkpoint import list_checkpoints  # noqa: E402
from calm.cli import main as calm_main  # noqa: E402
from calm.data import TokenDataset  # noqa: E402
from calm.evaluate import evaluate_model  # noqa: E402
from calm.loading import load_model  # noqa: E402


def pearson(x: list[float], y: list[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):  # average ranks of ties
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--out", type=Path, default=Path("runs/brier_correlation"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "meta.json").is_file():
        assert calm_main(["prepare", "--demo", "--out", str(args.data)]) == 0
    if not list_checkpoints(args.out):
        rc = calm_main(["train-baseline", "--data", str(args.data), "--out", str(args.out),
                        "--preset", "demo", "--steps", str(args.steps), "--save-every",
                        str(args.save_every), "--eval-every", "0", "--overwrite"])
        assert rc == 0
    ds = TokenDataset(args.data)
    rows = []
    for ckpt in list_checkpoints(args.out):
        model, _, _ = load_model(ckpt)
        r = evaluate_model(model, ds, "val", block_size=512, batch_size=4,
                           max_tokens=args.max_tokens, seed=0)
        step = int(ckpt.name.split("_")[1])
        rows.append({"step": step, **{k: r.get(k) for k in (
            "cross_entropy", "perplexity", "brier_1", "brier_2", "brier_3", "brier_4", "brier_lm")}})
        print(f"step {step}: CE {r['cross_entropy']:.4f}, BrierLM {r['brier_lm']:.3f}", flush=True)
    ce = [r["cross_entropy"] for r in rows]
    out = {"points": rows}
    for key in ("brier_lm", "brier_1", "brier_2"):
        y = [r[key] for r in rows]
        out[f"pearson_ce_{key}"] = pearson(ce, y)
        out[f"spearman_ce_{key}"] = spearman(ce, y)
    out["paper"] = {"pearson": -0.966, "spearman": -0.991}
    path = write("brier_correlation", out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot(ce, [r["brier_lm"] for r in rows], "o-")
        for r in rows:
            ax.annotate(str(r["step"]), (r["cross_entropy"], r["brier_lm"]), fontsize=7)
        ax.set_xlabel("validation cross-entropy (nats/token)")
        ax.set_ylabel("BrierLM")
        ax.set_title(f"Baseline checkpoints: Pearson {out['pearson_ce_brier_lm']:.3f}, "
                     f"Spearman {out['spearman_ce_brier_lm']:.3f}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "brier_correlation.png")
    except ImportError:
        pass
    print(table([[k, f"{out[f'pearson_ce_{k}']:.3f}", f"{out[f'spearman_ce_{k}']:.3f}"]
                 for k in ("brier_lm", "brier_1", "brier_2")],
                ["CE against", "Pearson", "Spearman"]))
    print(f"(paper: Pearson −0.966, Spearman −0.991 for BrierLM)\nwritten to {path}")


if __name__ == "__main__":
    main()
