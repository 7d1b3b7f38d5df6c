"""Quality benchmark: CALM against token-level baselines at the same wall-clock budget.

On the demo corpus (Shakespeare, *Othello* and *The Tempest* held out), within
one total budget on this machine:

1. trains one autoencoder per chunk size K = 1, 2, 4, 8 (latent 32·K, so the
   bits per token stay those of the K = 4, latent-128 reference);
2. trains CALM with K = 1, 2, 4, 8 (the paper's Fig. 5: semantic bandwidth as a
   scaling axis) and token-level baselines of two sizes, each for the same
   wall-clock share, with the library's default recipe for the preset; CALM K = 4
   also on the wide baseline's backbone (``--no-calm-wide`` skips it);
3. reports for each: BrierLM and Brier-1…4 on held-out text, perplexity
   (baselines), training FLOPs, inference FLOPs per generated token and
   generation tokens/s; plots BrierLM (and Brier-1, Brier-2) against training
   FLOPs, one curve per model, from the validations during training.

The headline comparison is the better CALM K = 4 against the best baseline at equal
training FLOPs: CALM's final BrierLM against the baseline's BrierLM at CALM's
FLOPs, read off the baseline's validation curve (linear interpolation), with the
ratio at equal wall time (both final scores) beside it.

Usage: python benchmarks/quality.py [--minutes 60] [--data data/shakespeare]
       python benchmarks/quality.py --lm-minutes 20 --sweep-minutes 6 --ae-minutes 8
       [--chunk-sizes 4]
--lm-minutes sets the time of CALM K = 4 and of each baseline, --sweep-minutes
that of CALM K = 1, 2, 8, --ae-minutes that of the K = 4 autoencoder (the other
K scale with it); without them --minutes is split by fixed weights.
Writes benchmarks/results/NAME.json and NAME.png (``--name``, default quality).
Rerunning reuses the trainings already finished in --out (delete it, or pass
--fresh, to redo them), so a run with --chunk-sizes 4 can be extended by the
sweep later.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_cli, table, timed, write  # noqa: E402

from calm.data import TokenDataset  # noqa: E402
from calm.evaluate import REPORT_SAMPLES  # noqa: E402
from calm.flops import inference_flops_per_token  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.loading import load_model  # noqa: E402
from calm.report import flops_at_steps, read_metrics  # noqa: E402

CHUNK_SIZES = (1, 2, 4, 8)
# Time weights of the trainings (autoencoders are cheap and K = 1 is easy to reconstruct).
AE_WEIGHT = {1: 0.75, 2: 1.0, 4: 1.5, 8: 2.0}
LM_WEIGHT = 2.0
TRAIN_SHARE = 0.86  # of --minutes; the rest is evaluation, FLOPs and generation speed
WIDE = ["--hidden-size", "384", "--intermediate-size", "1024", "--num-layers", "6", "--num-heads", "6"]
BASELINES = {
    # name: (label, preset, overrides of the preset)
    "baseline": ("baseline (d 256, 4 layers)", "demo", []),
    "baseline-wide": ("baseline (d 384, 6 layers)", "demo", WIDE),
}
# CALM K = 4 on the wide baseline's backbone too: K = 4 gives the backbone a quarter of the
# positions per token, so at equal time it can afford the larger one.
CALM_WIDE = ("calm-k4-wide", "CALM K=4 (d 384, 6 layers)", WIDE)
# The CALMs that train for --lm-minutes, as long as the baselines; the others for --sweep-minutes.
FULL_LENGTH = ("calm-k4", CALM_WIDE[0])
CALM_PRESET = "demo"
EVALS_PER_RUN = 6
ASSUMED_GFLOPS = 120.0  # only to space the validations: ~70 % of this machine's peak


def done(folder: Path) -> bool:
    return (folder / "DONE").is_file()


def steps_between_evals(kind: str, preset: str, flags: list[str], vocab: int, ae: Path | None,
                        minutes: float) -> int:
    """Validation spacing for about EVALS_PER_RUN validations in ``minutes`` (a FLOPs estimate)."""
    import dataclasses

    from calm.config import CALMConfig, HeadConfig
    from calm.config import preset as preset_config
    from calm.flops import build_for_counting, training_flops_per_token
    from calm.loading import load_autoencoder
    from calm.recipes import recipe

    rec = recipe(kind, preset)
    over = {flags[i][2:].replace("-", "_"): int(flags[i + 1]) for i in range(0, len(flags), 2)}
    backbone = preset_config("transformer", preset, vocab_size=vocab, **over)
    if kind == "calm":
        ae_model, _, _ = load_autoencoder(ae)
        cfg = CALMConfig(backbone=backbone, head=dataclasses.replace(HeadConfig(), **rec.head),
                         chunk_size=ae_model.config.chunk_size, latent_size=ae_model.config.latent_size)
        model = build_for_counting("calm", cfg, ae_model.config)
    else:
        model = build_for_counting("baseline", backbone)
    fpt = training_flops_per_token(model, rec.train.block_size)
    tokens_per_step = rec.train.batch_size * rec.train.block_size * rec.train.grad_accum
    steps = minutes * 60 * ASSUMED_GFLOPS * 1e9 / (fpt * tokens_per_step)
    return max(10, int(steps / EVALS_PER_RUN))


@torch.no_grad()
def generation_speed(model, batch: int = 8, new_tokens: int = 96, repeat: int = 3) -> dict:
    """Generated tokens/s: median, min and max over ``repeat`` runs after a warm-up."""
    prompts = torch.randint(1, model_vocab(model), (batch, 16),
                            generator=torch.Generator().manual_seed(0)).tolist()
    t = timed(lambda: generate(model, prompts, max_new_tokens=new_tokens, eot_id=None,
                               generator=torch.Generator().manual_seed(0)), repeat=repeat)
    n = batch * new_tokens
    return {"median": n / t["median"], "min": n / t["max"], "max": n / t["min"]}


def model_vocab(model) -> int:
    cfg = model.config
    return (cfg.backbone if hasattr(cfg, "backbone") else cfg).vocab_size


def curve(run: Path) -> list[dict]:
    rows = read_metrics(run)
    flops_at = flops_at_steps(rows)
    return [{"step": r["step"], "train_flops": flops_at[r["step"]],
             **{k[4:]: r[k] for k in r if k.startswith("val/brier")}}
            for r in rows if "val/brier_lm" in r and r["step"] in flops_at]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="total wall-clock budget")
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"),
                   help="prepared dataset (made from the demo corpus if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="folder of the trainings")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens of the final scores")
    p.add_argument("--calm-samples", type=int, default=REPORT_SAMPLES,
                   help="sampled chunks per start in CALM's final Brier-n (calm eval --samples; the "
                        "validation curves use the paper's 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="quality",
                   help="result files: benchmarks/results/NAME.json and NAME.png")
    p.add_argument("--fresh", action="store_true", help="redo every training")
    p.add_argument("--lm-minutes", type=float, default=None,
                   help="training minutes of CALM K=4 and of each baseline (default: from --minutes)")
    p.add_argument("--sweep-minutes", type=float, default=None,
                   help="training minutes of CALM K=1, 2, 8 (default: --lm-minutes)")
    p.add_argument("--ae-minutes", type=float, default=None,
                   help="training minutes of the K=4 autoencoder; other K scale with it "
                        "(default: from --minutes)")
    p.add_argument("--no-calm-wide", action="store_true",
                   help="skip CALM K=4 on the wide baseline's backbone (d 384, 6 layers)")
    p.add_argument("--chunk-sizes", default=",".join(map(str, CHUNK_SIZES)),
                   help="comma-separated K of the CALM sweep (K=4 is always included)")
    args = p.parse_args()
    try:
        sizes = sorted({4, *(int(k) for k in args.chunk_sizes.split(",") if k.strip())})
    except ValueError:
        p.error(f"--chunk-sizes: expected integers like 1,2,4,8, got {args.chunk_sizes!r}")
    if any(k not in AE_WEIGHT for k in sizes):
        p.error(f"--chunk-sizes: choose from {', '.join(map(str, CHUNK_SIZES))}")
    for flag in ("minutes", "lm_minutes", "sweep_minutes", "ae_minutes"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value:g}")
    if args.calm_samples < 2:
        p.error(f"--calm-samples must be at least 2, got {args.calm_samples}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data / "meta.json").is_file():
        run_cli(["prepare", "--demo", "--out", str(args.data)])
    ds = TokenDataset(args.data)
    common = ["--data", str(args.data), "--threads", str(args.threads), "--no-progress"]

    units = sum(AE_WEIGHT.values()) + LM_WEIGHT * (len(CHUNK_SIZES) + len(BASELINES))
    unit = args.minutes * TRAIN_SHARE / units
    lm_minutes = args.lm_minutes or LM_WEIGHT * unit
    sweep_minutes = args.sweep_minutes or lm_minutes
    ae_minutes = {K: (args.ae_minutes / AE_WEIGHT[4] if args.ae_minutes else unit) * AE_WEIGHT[K]
                  for K in sizes}
    print(f"{lm_minutes:.1f} min for CALM K=4 and each baseline, {sweep_minutes:.1f} for the other "
          "CALMs; autoencoders " + ", ".join(f"K={k}: {ae_minutes[k]:.1f}" for k in sizes), flush=True)

    results: dict = {"minutes": args.minutes, "lm_minutes": lm_minutes,
                     "sweep_minutes": sweep_minutes, "autoencoder_minutes": ae_minutes,
                     "autoencoders": {}, "models": {}}
    for K in sizes:
        ae = args.out / f"ae-k{K}"
        if not done(ae):
            print(f"--- autoencoder K={K}", flush=True)
            run_cli(["train-ae", *common, "--out", str(ae), "--preset", "demo", "--chunk-size", str(K),
                     "--latent-size", str(32 * K), "--steps", "1000000",
                     "--max-minutes", f"{ae_minutes[K]:.3f}", "--eval-every", "0", "--overwrite"])
            (ae / "DONE").write_text("{}\n")
        ev = json.loads(run_cli(["eval-ae", "--model", str(ae), "--data", str(args.data), "--json",
                                 "--threads", str(args.threads)], capture=True))
        results["autoencoders"][K] = {k: ev[k] for k in ("acc_mean", "acc_sample", "sigma",
                                                          "collapsed_dims", "latent_size")}
        print(f"autoencoder K={K}: {100 * ev['acc_sample']:.2f} % decoding a sampled z", flush=True)

    # name: (label, kind, preset, backbone overrides, autoencoder)
    runs: dict[str, tuple[str, str, str, list[str], Path | None]] = {
        f"calm-k{K}": (f"CALM K={K}", "calm", CALM_PRESET, [], args.out / f"ae-k{K}")
        for K in sizes
    }
    if not args.no_calm_wide:
        name, label, flags = CALM_WIDE
        runs[name] = (label, "calm", CALM_PRESET, flags, args.out / "ae-k4")
    for name, (label, preset, flags) in BASELINES.items():
        runs[name] = (label, "baseline", preset, flags, None)

    for name, (label, kind, preset, flags, ae) in runs.items():
        folder = args.out / name
        if not done(folder):
            print(f"--- {label}", flush=True)
            minutes = sweep_minutes if kind == "calm" and name not in FULL_LENGTH else lm_minutes
            every = steps_between_evals(kind, preset, flags, ds.vocab_size, ae, minutes)
            cmd = ["train", "--autoencoder", str(ae)] if kind == "calm" else ["train-baseline"]
            run_cli([*cmd, *common, "--out", str(folder), "--preset", preset, *flags, "--steps", "1000000",
                     "--max-minutes", f"{minutes:.3f}", "--eval-every", str(every), "--eval-brier",
                     "--eval-brier-tokens", "4096", "--overwrite"])
            (folder / "DONE").write_text("{}\n")
        samples = ["--samples", str(args.calm_samples)] if kind == "calm" else []
        ev = json.loads(run_cli(["eval", "--model", str(folder), "--data", str(args.data),
                                 "--max-tokens", str(args.eval_tokens), "--json", *samples,
                                 "--threads", str(args.threads)], capture=True))
        model, _, _ = load_model(folder)
        model.eval()
        metrics = read_metrics(folder)
        final = max(r["step"] for r in metrics if "step" in r)
        last = [r for r in metrics if "train_flops" in r][-1]
        res = {
            "label": label, "kind": kind,
            **{k: ev.get(k) for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brier_lm",
                                      "brier_1_se", "perplexity", "cross_entropy")},
            "steps": final, "train_tokens": last["tokens"] // last["step"] * final,
            "train_flops": flops_at_steps(metrics)[final],
            "train_tokens_per_s": last.get("tokens_per_s"),
            "inference_flops_per_token": inference_flops_per_token(model, 512),
            "parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "generation_tokens_per_s": generation_speed(model),
            "curve": curve(folder),
        }
        results["models"][name] = res
        print(f"{label}: BrierLM {res['brier_lm']:.3f}, Brier-1 {res['brier_1']:.4f}, "
              f"{res['train_flops']:.2e} training FLOPs", flush=True)

    calms = [n for n, r in results["models"].items() if r["kind"] == "calm"]
    # The sweep's shorter runs have no baseline of their length: equal FLOPs only.
    results["comparisons"] = {
        n: compare_at_equal_flops(results["models"], n,
                                  same_time=n in FULL_LENGTH or sweep_minutes == lm_minutes)
        for n in calms}
    # The headline: the better CALM K = 4 at its own FLOPs (the baselines' side is their best too).
    results["comparison"] = max((results["comparisons"][n] for n in FULL_LENGTH
                                 if results["comparisons"].get(n)),
                                key=lambda c: c["calm_brier_lm"], default=None)
    results["wall_minutes"] = (time.perf_counter() - t_start) / 60
    path = write(args.name, results)
    rows = []
    for r in results["models"].values():
        ppl = r.get("perplexity")
        rows.append([r["label"], f"{r['brier_lm']:.2f}",
                     *(f"{r[f'brier_{n}']:.4f}" for n in range(1, 5)),
                     "–" if ppl is None else f"{ppl:.1f}", f"{r['train_flops']:.2e}",
                     f"{r['inference_flops_per_token']:.2e}",
                     f"{r['generation_tokens_per_s']['median']:.0f}"])
    print(table(rows, ["model", "BrierLM", "Brier-1", "Brier-2", "Brier-3", "Brier-4", "perplexity",
                       "training FLOPs", "inference FLOPs/token", "gen tokens/s (batch 8)"]))
    aes = [[f"K={K}", f"{100 * a['acc_sample']:.2f} %", f"{a['sigma']:.3f}", a["collapsed_dims"]]
           for K, a in results["autoencoders"].items()]
    print(table(aes, ["autoencoder", "accuracy (sampled z)", "mean σ", "collapsed dims"]))
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for c in filter(None, results["comparisons"].values()):
        print(f"{c['calm_label']}: BrierLM {c['calm_brier_lm']:.3f} at {c['calm_train_flops']:.2e} FLOPs; "
              f"best baseline at those FLOPs: {c['baseline_label']} {c['baseline_brier_lm_at_calm_flops']:.3f}"
              f"{' (its curve ends earlier: its final score)' if c['baseline_curve_ends_early'] else ''}"
              f" → ratio {fmt(c['ratio_equal_flops'])} at equal FLOPs, "
              f"{fmt(c['ratio_equal_time'])} at equal time")
    plot(results, args.name)
    print(f"written to {path}")


def compare_at_equal_flops(models: dict, calm_name: str = "calm-k4",
                           same_time: bool = True) -> dict | None:
    """A CALM's final BrierLM against each baseline's BrierLM at that CALM's training FLOPs.

    A baseline's curve is its validations during training plus its final score; its value at
    CALM's FLOPs is interpolated linearly (its final score when the curve ends earlier).
    The best baseline is the one scoring highest at those FLOPs. ``same_time``: the CALM
    trained as long as the baselines, so their final scores give the ratio at equal time.
    """
    import numpy as np

    calm = models.get(calm_name)
    if calm is None:
        return None
    flops = calm["train_flops"]
    best = None
    for name, r in models.items():
        if r["kind"] != "baseline":
            continue
        pts = sorted([(q["train_flops"], q["brier_lm"]) for q in r["curve"]
                      if q["train_flops"] < r["train_flops"]] + [(r["train_flops"], r["brier_lm"])])
        xs, ys = np.array([0.0, *(x for x, _ in pts)]), np.array([0.0, *(y for _, y in pts)])
        at = float(np.interp(flops, xs, ys))
        if best is None or at > best["baseline_brier_lm_at_calm_flops"]:
            best = {"baseline": name, "baseline_label": r["label"],
                    "baseline_brier_lm_at_calm_flops": at,
                    "baseline_curve_ends_early": bool(flops > xs[-1]),
                    "baseline_final_brier_lm": r["brier_lm"]}
    if best is None:
        return None
    final_best = max(r["brier_lm"] for r in models.values() if r["kind"] == "baseline")
    ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731
    return {"calm": calm_name, "calm_label": calm["label"],
            "calm_brier_lm": calm["brier_lm"], "calm_train_flops": flops, **best,
            "ratio_equal_flops": ratio(calm["brier_lm"], best["baseline_brier_lm_at_calm_flops"]),
            "ratio_equal_time": ratio(calm["brier_lm"], final_best) if same_time else None}


def plot(results: dict, out_name: str = "quality") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=120)
    colors = {"calm-k1": "#9ecae1", "calm-k2": "#4292c6", "calm-k4": "#08519c", "calm-k8": "#08306b",
              "calm-k4-wide": "#6a51a3",
              "baseline": "#e6550d", "baseline-wide": "#a63603"}
    for ax, key, title in zip(axes, ("brier_lm", "brier_1", "brier_2"),
                              ("BrierLM (×100 scale)", "Brier-1", "Brier-2")):
        for name, r in results["models"].items():
            pts = r["curve"] or [{"train_flops": r["train_flops"], key: r[key]}]
            style = "o-" if r["kind"] == "calm" else "s--"
            ax.plot([q["train_flops"] for q in pts], [q[key] for q in pts], style,
                    color=colors.get(name), label=r["label"], markersize=4)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlim(left=0)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(title + " (higher is better)")
        ax.set_title(f"{title} against training FLOPs")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    sweep = ("" if results["sweep_minutes"] == results["lm_minutes"]
             else f" ({results['sweep_minutes']:.1f} for CALM K≠4)")
    fig.suptitle(f"Demo corpus, {results['lm_minutes']:.1f} min of training per model{sweep} "
                 "(2 CPU threads); validation on 4096 held-out tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
