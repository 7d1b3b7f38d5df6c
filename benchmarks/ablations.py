"""Ablations of the generative head and the input scheme (paper §7.4, Table 5, Fig. 9).

At one fixed wall-clock budget per model on the demo corpus, trains CALM with
the energy, flow-matching and diffusion heads (discrete input) and with the
continuous and combined input schemes (energy head), then reports Brier-1…4 and
BrierLM on held-out text for each, the flow head at 1, 2, 4, 10 Euler and
midpoint steps and the diffusion head at 10, 25, 100 steps (sampling steps are
a generation-time choice, so one trained model serves each sweep), and the
generation tokens/s of each head. Plots BrierLM (and Brier-1) against sampling
steps.

Usage: python benchmarks/ablations.py --autoencoder runs/quickstart/autoencoder
           [--data runs/quickstart/data] [--minutes 2] [--max-tokens 8192]
Writes benchmarks/results/ablations.json and ablations.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write  # noqa: E402

from calm.checkpoint import list_checkpoints  # noqa: E402
from calm.cli import main as calm_main  # noqa: E402
from calm.data import TokenDataset  # noqa: E402
from calm.evaluate import evaluate_model  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.loading import load_model  # noqa: E402

VARIANTS = {
    "energy": ["--head", "energy"],
    "flow": ["--head", "flow"],
    "diffusion": ["--head", "diffusion"],
    "energy-continuous": ["--head", "energy", "--input-scheme", "continuous"],
    "energy-both": ["--head", "energy", "--input-scheme", "both"],
}
FLOW_STEPS = (1, 2, 4, 10)
DIFFUSION_STEPS = (10, 25, 100)


def gen_speed(model, batch: int = 8, new_tokens: int = 64) -> float:
    prompts = torch.randint(1, model.config.backbone.vocab_size, (batch, 16),
                            generator=torch.Generator().manual_seed(0)).tolist()
    t = time.perf_counter()
    generate(model, prompts, max_new_tokens=new_tokens, eot_id=None,
             generator=torch.Generator().manual_seed(0))
    return batch * new_tokens / (time.perf_counter() - t)


def score(model, ds, max_tokens: int) -> dict:
    r = evaluate_model(model, ds, "val", block_size=512, batch_size=4, max_tokens=max_tokens,
                       seed=0, brier_only=True)
    return {k: r.get(k) for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brier_lm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True, type=Path)
    p.add_argument("--data", type=Path, default=Path("runs/quickstart/data"))
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = TokenDataset(args.data)
    rows, out = [], {"minutes_per_model": args.minutes, "variants": {}}
    for name in args.only.split(","):
        run = args.out / name
        if not list_checkpoints(run):
            rc = calm_main(["train", "--autoencoder", str(args.autoencoder), "--data", str(args.data),
                            "--out", str(run), "--preset", "demo", "--steps", "100000",
                            "--max-minutes", str(args.minutes), "--eval-every", "0", "--overwrite",
                            "--no-progress", *VARIANTS[name]])
            assert rc == 0, f"training {name} failed"
        model, _, _ = load_model(run)
        head = model.head
        settings: list[tuple[str, dict]] = [("default", {})]
        if name == "flow":
            settings = [(f"{solver} {s}", {"steps": s, "solver": solver})
                        for solver in ("euler", "midpoint") for s in FLOW_STEPS]
        elif name == "diffusion":
            settings = [(f"{s} steps", {"steps": s}) for s in DIFFUSION_STEPS]
        res = []
        for label, kw in settings:
            for k, v in kw.items():
                setattr(head, k, v)
            figures = score(model, ds, args.max_tokens)
            figures["tokens_per_s"] = gen_speed(model)
            figures["setting"] = label
            figures.update(kw)
            res.append(figures)
            rows.append([name, label, *(f"{figures[f'brier_{n}']:.4f}" for n in range(1, 5)),
                         f"{figures['brier_lm']:.3f}", f"{figures['tokens_per_s']:.0f}"])
            print(rows[-1], flush=True)
        out["variants"][name] = res
    path = write("ablations", out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
        for ax, key, title in ((axes[0], "brier_lm", "BrierLM"), (axes[1], "brier_1", "Brier-1")):
            for name, style in (("flow", "o-"), ("diffusion", "s-")):
                for solver in (("euler", "midpoint") if name == "flow" else (None,)):
                    pts = [r for r in out["variants"].get(name, []) if r.get("solver") == solver]
                    if pts:
                        lab = f"flow, {solver}" if solver else "diffusion"
                        ax.plot([r["steps"] for r in pts], [r[key] for r in pts], style, label=lab)
            if out["variants"].get("energy"):
                ax.axhline(out["variants"]["energy"][0][key], color="black", ls="--",
                           label="energy (1 step)")
            ax.set_xscale("log")
            ax.set_xlabel("sampling steps (midpoint evaluates the network twice per step)")
            ax.set_ylabel(title)
            ax.set_title(f"{title} against sampling steps ({args.minutes:g} min of training each)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "ablations.png")
    except ImportError:
        pass
    print(table(rows, ["variant", "sampling", "Brier-1", "Brier-2", "Brier-3", "Brier-4", "BrierLM",
                       "gen tokens/s"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
