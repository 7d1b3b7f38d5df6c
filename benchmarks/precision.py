"""fp32 against bf16 training on the demo corpus: the same curves, at a different speed.

Trains, through the command line and with each preset's demo recipe, for the same
number of steps and the same seed at each precision:

1. the demo autoencoder (fp32, bf16);
2. CALM on the fp32 autoencoder (fp32, bf16, and fp32 with a second seed: the
   seed-to-seed spread is the noise that a precision difference is compared with);
3. the demo baseline (fp32, bf16, fp32 second seed).

Reports each run's validation curve (loss against step), its last validation
figures, the held-out BrierLM / Brier-1 of the language models on the same
16,384 tokens (±SE), and training tokens/s; plots the curves. bf16 needs a CPU
with fast bf16 matrix instructions (or CUDA) to be faster; it runs anywhere.

Usage: python benchmarks/precision.py [--ae-steps 300] [--lm-steps 300] [--threads 2]
Writes benchmarks/results/precision-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_tag, run_cli, table, write  # noqa: E402


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path, key: str) -> list[list[float]]:
    return [[m["step"], m[key]] for m in metrics(run) if key in m and m[key] is not None]


def speed(run: Path) -> float:
    rows = [m for m in metrics(run) if "tokens_per_s" in m]
    return rows[-1]["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--out", type=Path, default=Path("runs/precision"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "meta.json").is_file():
        run_cli(["prepare", "--demo", "--out", str(args.data)])
    common = ["--data", str(args.data), "--preset", "demo", "--overwrite", "--no-progress",
              "--threads", str(args.threads), "--eval-every", str(args.eval_every)]
    runs: dict[str, dict] = {}

    def train(name: str, cmd: str, precision: str, steps: int, extra: list[str]) -> Path:
        out = args.out / name
        print(f"--- {name}", flush=True)
        run_cli([cmd, *common, "--out", str(out), "--steps", str(steps), "--precision", precision,
             *extra], capture=True)
        runs[name] = {"precision": precision, "tokens_per_s": speed(out), "run": str(out)}
        return out

    for prec in ("fp32", "bf16"):
        out = train(f"ae-{prec}", "train-ae", prec, args.ae_steps, [])
        runs[f"ae-{prec}"]["curve"] = curve(out, "val/acc_sample")
        runs[f"ae-{prec}"]["last"] = {k: v for k, v in metrics(out)[-1].items() if k.startswith("val/")}
    ae = args.out / "ae-fp32"
    lm = [("calm-fp32", "train", "fp32", ["--autoencoder", str(ae)]),
          ("calm-bf16", "train", "bf16", ["--autoencoder", str(ae)]),
          ("calm-fp32-seed2", "train", "fp32", ["--autoencoder", str(ae), "--seed", "2"]),
          ("baseline-fp32", "train-baseline", "fp32", []),
          ("baseline-bf16", "train-baseline", "bf16", []),
          ("baseline-fp32-seed2", "train-baseline", "fp32", ["--seed", "2"])]
    for name, cmd, prec, extra in lm:
        out = train(name, cmd, prec, args.lm_steps, extra)
        runs[name]["curve"] = curve(out, "val/loss")
        # Held-out Brier scores, always evaluated in fp32 so only the training differs.
        ev = json.loads(run_cli(["eval", "--model", str(out), "--data", str(args.data), "--max-tokens",
                             str(args.eval_tokens), "--json", "--no-progress", "--precision",
                             "fp32", "--threads", str(args.threads)], capture=True))
        runs[name]["eval"] = {k: ev[k] for k in ev if k.startswith(("brier", "cross", "perp", "energy"))}

    rows = []
    for name, r in runs.items():
        if name.startswith("ae"):
            last = r["last"]
            rows.append([name, r["precision"], f"{r['tokens_per_s']:.0f}",
                         f"acc at z {100 * last['val/acc_sample']:.2f} %, σ {last['val/sigma']:.3f}", "", ""])
        else:
            e = r["eval"]
            loss = e.get("energy_loss", e.get("cross_entropy"))
            rows.append([name, r["precision"], f"{r['tokens_per_s']:.0f}", f"val loss {loss:.4f}",
                         f"{e['brier_1']:.4f} ± {e['brier_1_se']:.4f}", f"{e['brier_lm']:.2f}"])
    ratios = {k: runs[f"{k}-bf16"]["tokens_per_s"] / runs[f"{k}-fp32"]["tokens_per_s"]
              for k in ("ae", "calm", "baseline")}
    path = write("precision", {"settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
                               "runs": runs, "bf16_over_fp32_tokens_per_s": ratios}, per_machine=True)
    print(table(rows, ["run", "precision", "train tokens/s", "last validation", "Brier-1 ± SE",
                       "BrierLM"]))
    print("bf16 / fp32 training tokens/s: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
    plot(runs, RESULTS / f"precision-{machine_tag()}.png")
    print(f"\nwritten to {path}")


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("ae", "autoencoder: held-out accuracy at a sampled z"),
              ("calm", "CALM: validation energy loss"),
              ("baseline", "baseline: validation cross-entropy"))
    for ax, (prefix, title) in zip(axes, panels):
        for name, r in runs.items():
            if not name.startswith(prefix):
                continue
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            style = "--" if r["precision"] == "bf16" else (":" if "seed2" in name else "-")
            ax.plot(xs, ys, style, marker=".", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
