"""The accuracy-diversity trade-off of temperature sampling (paper §7.5, Figure 11): the computation.

Points of the curve for CALM (Algorithm 2 over a grid of batch sizes N and of
temperatures T = 1/n) and for a token-level baseline (softmax temperatures), at
teacher-forced held-out positions, and the plot. ``calm tradeoff`` parses its
flags, calls these and prints the table.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from calm.errors import CalmError

# Head samples per piece of positions (two streams × N each): bounds memory at large N.
SAMPLES_PER_PIECE = 8192


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


def position_windows(dataset, split: str, block: int, unit: int, positions: int, per_window: int):
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
        curve(ax, n_sweep["points"], f"CALM, N varies (T = {frac_label(n_sweep['temperature'])})",
              "N", lambda v: f"N={v}", "o")
        curve(ax, t_sweep["points"], f"CALM, T varies (N = {t_sweep['num_candidates']})",
              "temperature", lambda v: f"T={frac_label(v)}", "s", below=True)
        ax.set_title("CALM: batch size N vs temperature T")
    if base:
        ax = axes[-1]
        if calm:
            curve(ax, n_sweep["points"], f"CALM, N varies (T = {frac_label(n_sweep['temperature'])})",
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


def frac_label(t: float) -> str:
    n = round(1 / t)
    return f"1/{n}" if n > 1 and abs(t - 1 / n) < 1e-6 else f"{t:g}"


# ---------------------------------------------------------------------------- command
