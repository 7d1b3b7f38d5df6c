"""Does an auxiliary token loss make CALM learn faster at small scale?

At a few thousand small steps the generative head's loss (flow matching or the
energy score on a 128-dimensional latent) is a sparse, noisy signal for the
backbone, and CALM's backbone sees a quarter of the positions per token that the
baseline's does. A probe that reads the next chunk's K tokens from the
backbone's hidden state, trained by cross-entropy beside the head's loss
(``calm train --token-loss-weight W``), gives the backbone the baseline's dense
signal; the head and everything used to generate stay the paper's. The probe's
FLOPs are counted in the training FLOPs.

This benchmark trains the demo CALM on one autoencoder for the same
``--minutes`` at each weight in ``--weights``, one after the other (same seed,
same data order), and scores every CALM on every held-out token with 16 sampled
chunks per start (``calm eval --samples 16 --max-tokens 0``). ``--seeds 2`` adds
a second training seed for each weight. ``--extra`` passes more ``calm train``
flags to every run, so the same harness measures other one-factor changes at
this budget (e.g. ``--weights 0 --extra "--head-num-samples 2" --name ...``).

Usage: python benchmarks/token_loss.py --autoencoder runs/quality/ae-k4
       [--data data/shakespeare] [--weights 0,1] [--minutes 3.952] [--seeds 1]
       [--out runs/token_loss] [--name token_loss] [--extra "FLAGS"]
Writes benchmarks/results/NAME.json; rerunning reuses finished runs in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICKSTART_CALM_MINUTES, number_list, run_cli, table, write  # noqa: E402

from calm.report import flops_at_steps, read_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", type=Path, required=True, help="a trained demo autoencoder")
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"), help="prepared dataset")
    p.add_argument("--out", type=Path, default=Path("runs/token_loss"), help="folder of the trainings")
    p.add_argument("--weights", default="0,1", help="comma-separated token-loss weights")
    p.add_argument("--minutes", type=float, default=QUICKSTART_CALM_MINUTES, help="training minutes per run")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per weight (1337, 2, 3, …)")
    p.add_argument("--samples", type=int, default=16, help="sampled chunks per start in the scores")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more `calm train` flags for every run, one string")
    p.add_argument("--name", default="token_loss", help="result file name")
    args = p.parse_args()
    weights = number_list(args.weights, "--weights", allow_zero=True)
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes:g}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    for need in (args.data / "meta.json", args.autoencoder):
        if not need.exists():
            p.error(f"{need} does not exist")
    seeds = [1337, *range(2, args.seeds + 1)]
    common = ["--data", str(args.data), "--autoencoder", str(args.autoencoder), "--preset", "demo",
              "--steps", "1000000", "--overwrite", "--no-progress", "--eval-every", "0",
              "--threads", str(args.threads), "--max-minutes", f"{args.minutes:.3f}", *args.extra.split()]
    t0 = time.perf_counter()
    results: dict = {"minutes": args.minutes, "autoencoder": str(args.autoencoder), "extra": args.extra,
                     "samples_per_start": args.samples, "arms": []}
    rows = []
    for seed in seeds:
        for w in weights:
            folder = args.out / f"w{w:g}-s{seed}"
            if not (folder / "DONE").is_file():
                print(f"--- weight {w:g}, seed {seed}", flush=True)
                run_cli(["train", *common, "--out", str(folder), "--token-loss-weight", f"{w:g}",
                         "--seed", str(seed)])
                (folder / "DONE").touch()
            ev = json.loads(run_cli(["eval", "--model", str(folder), "--data", str(args.data),
                                     "--max-tokens", "0", "--samples", str(args.samples), "--json",
                                     "--no-progress", "--threads", str(args.threads)], capture=True))
            metrics = read_metrics(folder)
            last = [r for r in metrics if "tokens_per_s" in r][-1]
            arm = {"weight": w, "seed": seed, "steps": last["step"], "tokens": last["tokens"],
                   "tokens_per_s": last["tokens_per_s"],
                   "train_flops": flops_at_steps(metrics)[last["step"]],
                   "train_token_ce": last.get("token/ce"), "train_head_loss": last.get("flow/loss",
                                                                                       last.get("energy/loss")),
                   "eval": ev}
            results["arms"].append(arm)
            rows.append([f"{w:g}", str(seed), str(arm["steps"]), f"{arm['tokens'] / 1e6:.2f} M",
                         *(f"{ev[f'brier_{n}']:.4f} ± {ev[f'brier_{n}_se']:.4f}" for n in range(1, 5)),
                         f"{ev['brier_lm']:.2f}"])
            print(f"weight {w:g}, seed {seed}: Brier-1 {ev['brier_1']:.4f}, BrierLM {ev['brier_lm']:.2f}",
                  flush=True)
    results["wall_minutes"] = (time.perf_counter() - t0) / 60
    path = write(args.name, results)
    print(table(rows, ["token-loss weight", "seed", "steps", "tokens", "Brier-1", "Brier-2", "Brier-3",
                       "Brier-4", "BrierLM"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
