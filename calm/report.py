"""The quickstart's report: Markdown with PNG plots, built from a run folder's files.

Reads what the pipeline wrote — ``autoencoder_eval.json``, each model's
``metrics.jsonl`` and ``eval.json``, ``samples.json``, ``summary.json`` — and
writes ``report.md`` plus plots beside it. Every figure comes from those files;
a figure that was not measured is shown as "–", never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calm.errors import CalmError

MODELS = ("calm", "baseline")
LABEL = {"calm": "CALM (K=4)", "baseline": "Transformer baseline"}
COLOR = {"calm": "tab:blue", "baseline": "tab:orange"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise CalmError(f"{path} is not valid JSON: {e}") from None


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: skip it
    return rows


def flops_at_steps(rows: list[dict]) -> dict[int, float]:
    """Training FLOPs at every step that has a metrics row, interpolated between logged steps.

    Training rows log ``train_flops`` every few steps; validation rows may fall between them.
    FLOPs grow linearly with steps (every step trains the same number of tokens).
    """
    import numpy as np

    known = sorted((r["step"], r["train_flops"]) for r in rows if "train_flops" in r)
    if not known:
        return {}
    xs = np.array([0, *(s for s, _ in known)], dtype=np.float64)  # from (0, 0)
    ys = np.array([0.0, *(f for _, f in known)])
    steps = sorted({r["step"] for r in rows if "step" in r})
    out = dict(zip(steps, np.interp(steps, xs, ys).tolist()))
    last_step, last_flops = known[-1]
    for step in steps:
        if step > last_step:  # after the last logged step: extrapolate at the average rate
            out[step] = last_flops / last_step * step if last_step else last_flops
    return out


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CalmError("plots need matplotlib: pip install 'calm-lm[plot]'") from None
    return plt


def _brier_cell(v: float | None, se: float | None) -> str:
    """A Brier-n figure ± its SE: four decimals, or two significant digits when the figure
    is below 0.001 and not 0 (an undertrained CALM's Brier-4 is a few in 10⁵)."""
    if v is None:
        return "–"
    spec = ".4f" if v == 0 or abs(v) >= 1e-3 else ".1e"
    return f"{v:{spec}}" + ("" if se is None else f" ± {se:{spec}}")


def _fmt(x, spec=".3f", dash="–"):
    return dash if x is None else format(x, spec)


def plot_robustness(ae_eval: dict, path: Path) -> None:
    plt = _plt()
    xs = [r["noise"] for r in ae_eval["robustness"]]
    ys = [100 * r["acc"] for r in ae_eval["robustness"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, marker="o", color="tab:green")
    ax.set_xlabel("std of extra Gaussian noise added to a sampled z")
    ax.set_ylabel("token accuracy (%)")
    ax.set_title("Autoencoder robustness (held-out data)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training(metrics: dict[str, list[dict]], path: Path) -> None:
    """Training and validation loss of each model against training FLOPs (own units)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, kind in zip(axes, MODELS):
        rows = metrics.get(kind) or []
        tr = [(r["train_flops"], r["loss"]) for r in rows if "train_flops" in r and "loss" in r]
        flops_at = flops_at_steps(rows)
        va = [(flops_at[r["step"]], r["val/loss"]) for r in rows
              if "val/loss" in r and r["step"] in flops_at]
        if tr:
            ax.plot(*zip(*tr), color=COLOR[kind], alpha=0.6, label="training")
        if va:
            ax.plot(*zip(*va), "o-", color="black", label="validation")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("the head's loss (energy or flow matching)" if kind == "calm"
                      else "cross-entropy (nats/token)")
        ax.set_title(LABEL[kind])
        ax.grid(alpha=0.3)
        if tr or va:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_brier(metrics: dict[str, list[dict]], path: Path) -> bool:
    """BrierLM and Brier-1…4 against training FLOPs, if validation recorded them."""
    plt = _plt()
    have = False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), dpi=120)
    for kind in MODELS:
        rows = metrics.get(kind) or []
        flops_at = flops_at_steps(rows)
        pts = [r for r in rows if "val/brier_lm" in r and r["step"] in flops_at]
        if not pts:
            continue
        have = True
        x = [flops_at[r["step"]] for r in pts]
        axes[0].plot(x, [r["val/brier_lm"] for r in pts], "o-", color=COLOR[kind], label=LABEL[kind])
        for n, style in zip(range(1, 5), ("-", "--", "-.", ":")):
            axes[1].plot(x, [r[f"val/brier_{n}"] for r in pts], style, color=COLOR[kind],
                         label=f"{LABEL[kind]}, Brier-{n}")
    axes[0].set_title("BrierLM (higher is better)")
    axes[0].set_ylabel("BrierLM")
    axes[1].set_title("Brier-n (higher is better)")
    axes[1].set_ylabel("Brier-n")
    for ax in axes:
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
    if have:  # beside the plots, where no curve runs under it
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    if have:
        fig.savefig(path)
    plt.close(fig)
    return have


def write_report(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise CalmError(f"{run} is not a folder")
    ae_eval = _read_json(run / "autoencoder_eval.json")
    summary = _read_json(run / "summary.json") or {}
    samples = _read_json(run / "samples.json") or []
    metrics = {k: read_metrics(run / k) for k in MODELS}
    evals = {k: _read_json(run / k / "eval.json") for k in MODELS}
    lines = ["# calm quickstart report", ""]
    if summary.get("wall_minutes"):
        lines += [f"Pipeline wall time: {summary['wall_minutes']:.1f} min "
                  f"(budget {summary.get('minutes', '–')} min). Run folder: `{run}`.", ""]

    lines += ["## Autoencoder", ""]
    if ae_eval:
        plot_robustness(ae_eval, run / "robustness.png")
        lines += [
            "| figure | value |", "|---|---|",
            f"| token accuracy decoding μ | {100 * ae_eval['acc_mean']:.3f} % |",
            f"| token accuracy decoding a sampled z | {100 * ae_eval['acc_sample']:.3f} % |",
            f"| mean σ | {ae_eval['sigma']:.3f} |",
            f"| collapsed dimensions | {ae_eval['collapsed_dims']} / {ae_eval['latent_size']} |",
            f"| held-out tokens | {ae_eval['tokens']} |",
            "", "![autoencoder robustness](robustness.png)", "",
        ]
    else:
        lines += ["No autoencoder evaluation found.", ""]

    lines += ["## Training", ""]
    if any(metrics.values()):
        plot_training(metrics, run / "training.png")
        lines += ["![training curves](training.png)", ""]
    if plot_brier(metrics, run / "brier.png"):
        lines += ["![BrierLM during training](brier.png)", ""]

    lines += ["## Comparison", ""]
    lines += ["| model | BrierLM | Brier-1 | Brier-2 | Brier-3 | Brier-4 | perplexity | generation tokens/s |",
              "|---|---|---|---|---|---|---|---|"]
    for kind in MODELS:
        e = evals.get(kind) or {}
        tps = [s["tokens_per_s"] for s in samples if s.get("model") == kind and s.get("temperature") == 1.0]
        cells = [LABEL[kind], _fmt(e.get("brier_lm"), ".2f")]
        for n in range(1, 5):
            v, se = e.get(f"brier_{n}"), e.get(f"brier_{n}_se")
            cells.append(_brier_cell(v, se))
        cells += [_fmt(e.get("perplexity"), ".2f"), _fmt(tps[0] if tps else None, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Brier-n and BrierLM: higher is better; BrierLM is 0 when any Brier-n ≤ 0 "
              "(an undertrained model), so each Brier-n is shown beside it."]
    calm_samples = (evals.get("calm") or {}).get("samples")
    if calm_samples:
        lines += [f"CALM's Brier-n are estimated from {calm_samples} sampled chunks per chunk start, "
                  "the baseline's from its exact probabilities: both are unbiased."]
    lines += [""]
    runs = [run / k for k in MODELS if (run / k).is_dir()]
    if runs:
        from calm.comparison import markdown_table, run_row

        lines += ["Parameters, training and inference FLOPs (the paper's Table 1 form):", "",
                  markdown_table([run_row(r) for r in runs]), ""]

    lines += ["## Samples", ""]
    for s in samples:
        text = (s["prompt"] + s["text"]).replace("\n", " ⏎ ")
        lines.append(f"- **{LABEL.get(s['model'], s['model'])}**, T = {s['temperature']}: {text}")
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
