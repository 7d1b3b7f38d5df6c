"""How long to train the autoencoder for CALM: CALM's Brier-n on autoencoders of several budgets.

A better autoencoder (higher held-out accuracy at a sampled z) is not obviously a
better target space for CALM: an autoencoder trained longer spreads its chunk
latents further apart, and a sample that lands between two latents decodes to
neither (see the latent study). This benchmark trains the demo autoencoder for
each budget in ``--ae-minutes`` (its recipe, LR warm-down included), then the
demo CALM on each for the same ``--calm-minutes`` (the quickstart's CALM time, 3.95, by
default), one after the other, and scores every CALM on every held-out token
with 16 sampled chunks per start (``calm eval --samples 16 --max-tokens 0``),
with the autoencoder's accuracy and σ beside it.

Usage: python benchmarks/autoencoder_budget.py [--data data/shakespeare]
       [--ae-minutes 0.5,1,2] [--calm-minutes 3.952] [--out runs/ae_budget]
Writes benchmarks/results/autoencoder_budget.json; rerunning reuses finished
stages in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICKSTART_CALM_MINUTES, last_logged, number_list, run_cli, table, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"),
                   help="prepared dataset (made from the demo corpus if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/ae_budget"), help="folder of the trainings")
    p.add_argument("--ae-minutes", default="0.5,1,2", help="comma-separated autoencoder budgets")
    p.add_argument("--calm-minutes", type=float, default=QUICKSTART_CALM_MINUTES)
    p.add_argument("--samples", type=int, default=16, help="sampled chunks per start in CALM's scores")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    budgets = number_list(args.ae_minutes, "--ae-minutes")
    if args.calm_minutes <= 0:
        p.error(f"--calm-minutes must be positive, got {args.calm_minutes:g}")
    if not (args.data / "meta.json").is_file():
        run_cli(["prepare", "--demo", "--out", str(args.data)])
    common = ["--data", str(args.data), "--preset", "demo", "--steps", "1000000", "--overwrite",
              "--no-progress", "--eval-every", "0", "--threads", str(args.threads)]
    t0 = time.perf_counter()
    results: dict = {"calm_minutes": args.calm_minutes, "samples_per_start": args.samples, "arms": []}
    rows = []
    for minutes in budgets:
        ae, calm = args.out / f"ae-{minutes:g}min", args.out / f"calm-on-ae-{minutes:g}min"
        for folder, cmd in ((ae, ["train-ae", "--max-minutes", f"{minutes:.3f}"]),
                            (calm, ["train", "--autoencoder", str(ae),
                                    "--max-minutes", f"{args.calm_minutes:.3f}"])):
            if not (folder / "DONE").is_file():
                print(f"--- {folder.name}", flush=True)
                run_cli([cmd[0], *common, "--out", str(folder), *cmd[1:]])
                (folder / "DONE").touch()
        ae_eval = json.loads(run_cli(["eval-ae", "--model", str(ae), "--data", str(args.data), "--json",
                                      "--threads", str(args.threads)], capture=True))
        ev = json.loads(run_cli(["eval", "--model", str(calm), "--data", str(args.data), "--max-tokens", "0",
                                 "--samples", str(args.samples), "--json", "--no-progress",
                                 "--threads", str(args.threads)], capture=True))
        a, c = last_logged(ae), last_logged(calm)
        arm = {"ae_minutes": minutes, "ae_steps": a["step"],
               "autoencoder": {k: ae_eval[k] for k in ("acc_mean", "acc_sample", "sigma", "collapsed_dims")},
               "calm_steps": c["step"], "calm_tokens": c["tokens"], "calm_tokens_per_s": c["tokens_per_s"],
               "eval": ev}
        results["arms"].append(arm)
        rows.append([f"{minutes:g}", str(a["step"]), f"{100 * ae_eval['acc_sample']:.2f} %",
                     f"{ae_eval['sigma']:.3f}", str(c["step"]),
                     *(f"{ev[f'brier_{n}']:.4f} ± {ev[f'brier_{n}_se']:.4f}" for n in range(1, 5)),
                     f"{ev['brier_lm']:.2f}"])
        print(f"autoencoder {minutes:g} min: CALM Brier-1 {ev['brier_1']:.4f}, BrierLM {ev['brier_lm']:.2f}",
              flush=True)
    results["wall_minutes"] = (time.perf_counter() - t0) / 60
    path = write("autoencoder_budget", results)
    print(table(rows, ["AE minutes", "AE steps", "AE acc. (sampled z)", "σ", "CALM steps",
                       "Brier-1", "Brier-2", "Brier-3", "Brier-4", "BrierLM"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
