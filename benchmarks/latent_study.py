"""Why CALM's Brier-3 and Brier-4 are so small: do its sampled chunks decode coherently?

CALM predicts a whole chunk of K = 4 tokens as one latent vector. A sample that
falls between the autoencoder's chunk latents need not decode to any whole
chunk: some tokens may be right, the chunk is not. Brier-1 does not see this
(it looks at the first token only); Brier-3 and Brier-4 do.
This study measures it, side by side, for arms that differ in one factor of
the autoencoder or of CALM's head from the demo recipes:

  base       the demo recipes (autoencoder β = 1e-3: σ ≈ 0.15; flow head, 1 block of width 256)
  kl01       autoencoder --kl-weight 0.01 (a stronger pull to the prior: σ ≈ 0.3)
  kl003      autoencoder --kl-weight 0.003
  head4      CALM --head-num-blocks 4 (a deeper head: can it fit a chunk's joint distribution?)
  head4x512  CALM --head-num-blocks 4 --head-width 512

Every arm trains its autoencoder (--ae-minutes), or takes the one given by
--autoencoder, and then a demo CALM on it (--lm-minutes), all arms at the same
time with --threads each, so a busy machine slows them alike. Then, on the
same held-out text:

- the autoencoder: accuracy decoding a sampled z, mean σ, and what lies
  between chunks: for pairs of held-out chunks A ≠ B, points on the line from
  μ_A to μ_B, the share that decode to exactly A or exactly B, and where A and
  B differ, whether a slot decodes to A's token, B's, or a third;
- CALM: Brier-1…4 ± SE (--eval-tokens, REPORT_SAMPLES sampled chunks per start), the chance that a sample's slot j is the
  true token, and the chance that its first n tokens are all true, with the
  conditional P(token n right | first n−1 right) — the chunk's coherence;
- a token-level baseline (--baseline): the same per-slot and pairwise chances
  for its K tokens sampled one by one from the same chunk boundaries, the
  control for how much the slots of a chunk agree in the text itself.

Usage: python benchmarks/latent_study.py --data data/shakespeare [--arms base,kl01]
       [--ae-minutes 6] [--lm-minutes 6] [--threads 1] [--out runs/latent_study]
       python benchmarks/latent_study.py --arms base,head4 --autoencoder runs/ae
       --lm-minutes 15 --label head --out runs/head_arms
       python benchmarks/latent_study.py --arms '' --model qs=runs/quickstart/calm
       --baseline qs=runs/quickstart/baseline --label quickstart
Rerunning reuses finished arms in --out. Writes benchmarks/results/latent_study.json,
keeping the arms of earlier runs that were not rerun (each records its settings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, run_cli, table, write  # noqa: E402

from calm.brier import rollout_layout, sample_categorical  # noqa: E402
from calm.checkpoint import has_checkpoint, read_config, read_state, resolve_checkpoint  # noqa: E402
from calm.data import TokenDataset, eval_batches  # noqa: E402
from calm.evaluate import REPORT_SAMPLES, calm_sample_ngrams  # noqa: E402
from calm.loading import load_model  # noqa: E402

POINTS = (0.1, 0.25, 0.4, 0.5)  # where on the line from μ_A to μ_B the decoding is read
# arm: (flags of `calm train-ae`, flags of `calm train`), one change from the demo recipes.
ARMS = {
    "base": ([], []),
    "kl01": (["--kl-weight", "0.01"], []),
    "kl003": (["--kl-weight", "0.003"], []),
    "head4": ([], ["--head-num-blocks", "4"]),
    "head4x512": ([], ["--head-num-blocks", "4", "--head-width", "512"]),
}


def train_arm(out: Path, data: Path, arm: tuple[list[str], list[str]], ae_minutes: float,
              lm_minutes: float, threads: int, autoencoder: Path | None) -> subprocess.Popen:
    """Start one arm (its autoencoder unless a shared one is given, then CALM) as a child process."""
    calm = [sys.executable, "-m", "calm"]
    common = ["--data", str(data), "--preset", "demo", "--steps", "1000000", "--threads", str(threads),
              "--overwrite", "--no-progress"]
    ae_flags, lm_flags = arm
    steps = []
    if autoencoder is None:
        autoencoder = out / "ae"
        steps.append(" ".join([*calm, "train-ae", *common, "--out", str(autoencoder),
                               "--max-minutes", f"{ae_minutes:g}", *ae_flags]))
    steps += [
        " ".join([*calm, "train", *common, "--autoencoder", str(autoencoder), "--out", str(out / "calm"),
                  "--max-minutes", f"{lm_minutes:g}", *lm_flags]),
        f"touch {out / 'DONE'}",
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "w")
    return subprocess.Popen(["bash", "-c", " && ".join(steps)], stdout=log, stderr=subprocess.STDOUT)


@torch.no_grad()
def midpoint_coherence(ae, val, pairs: int = 4096, seed: int = 0,
                       points: tuple[float, ...] = POINTS) -> dict:
    """What points between two different held-out chunks' means decode to.

    For pairs of chunks A ≠ B and points (1 − t)·μ_A + t·μ_B: the share decoding to
    exactly A or exactly B, and, over the slots where A and B differ, the shares
    decoding to A's token, to B's token, and to a third token.
    """
    g = torch.Generator().manual_seed(seed)
    chunks = torch.cat([b.reshape(-1, ae.config.chunk_size) for b in val])
    i = torch.randint(0, chunks.shape[0], (pairs,), generator=g)
    j = torch.randint(0, chunks.shape[0], (pairs,), generator=g)
    a, b = chunks[i], chunks[j]
    keep = (a != b).any(-1)
    a, b = a[keep], b[keep]
    mu_a, _ = ae.encode(a)
    mu_b, _ = ae.encode(b)
    differ = a != b
    line = []
    for t in points:
        dec = ae.decode_tokens((1 - t) * mu_a + t * mu_b)
        to_a = float(((dec == a) & differ).sum() / differ.sum())
        to_b = float(((dec == b) & differ).sum() / differ.sum())
        line.append({"t": t, "whole_chunk": float(((dec == a).all(-1) | (dec == b).all(-1)).float().mean()),
                     "differing_slots_to_a": to_a, "differing_slots_to_b": to_b,
                     "differing_slots_to_other": 1 - to_a - to_b})
    mid = next((r for r in line if r["t"] == 0.5), line[-1])
    return {"pairs": int(keep.sum()), "whole_chunk": mid["whole_chunk"], "line": line,
            "median_distance": float((mu_a - mu_b).norm(dim=-1).median()),
            "median_norm": float(mu_a.norm(dim=-1).median())}


@torch.no_grad()
def token_sample_ngrams(model, tokens: torch.Tensor, K: int, generator: torch.Generator):
    """A token-level model's sampled K tokens after every chunk boundary, and the true ones.

    The same starts as ``calm_sample_ngrams`` (after chunk i, i = 0..C−2, the prefix
    being chunks 0..i), each rolled out token by token from the model's own samples
    (one forward per token for all starts, under ``rollout_layout``).
    Returns samples, targets, each (B, P, K) long.
    """
    B, T = tokens.shape
    starts = torch.arange(K - 1, T - K, K)  # the last token of chunk i
    P = starts.numel()
    lay = rollout_layout(T, K - 1, starts)
    cache = model.make_cache(B, T + (K - 1) * P)
    logits = model.logits(tokens, cache=cache, read=starts)  # (B, P, V)
    s = sample_categorical(F.softmax(logits.float(), -1), generator)
    samples = [s]
    for j in range(K - 1):
        new = slice(T + j * P, T + (j + 1) * P)
        logits = model.logits(s, positions=lay.position_ids[new], cache=cache,
                              attn_mask=lay.attn_mask[new, : new.stop])
        s = sample_categorical(F.softmax(logits.float(), -1), generator)
        samples.append(s)
    return torch.stack(samples, -1), tokens[:, starts[:, None] + 1 + torch.arange(K)]


@torch.no_grad()
def sample_coherence(model, val, max_batches: int, seed: int = 0, chunk_size: int | None = None) -> dict:
    """Per-slot and prefix accuracy of a model's sampled next chunk against the true one.

    CALM samples the chunk from its head; a token-level model (``chunk_size`` given)
    samples its K tokens one by one from the same starts: the control for how much
    the slots of a sampled chunk agree in text itself.
    """
    g = torch.Generator().manual_seed(seed)
    K = chunk_size or model.config.chunk_size
    slot = torch.zeros(K)
    prefix = torch.zeros(K)
    both = torch.zeros(K, K)
    n = 0
    for k, b in enumerate(val):
        if k >= max_batches:
            break
        if chunk_size is None:
            s1, _, t = calm_sample_ngrams(model, b, K, generator=g)
        else:
            s1, t = token_sample_ngrams(model, b, K, g)
        right = (s1 == t).flatten(0, 1).float()  # (positions, K)
        slot += right.sum(0)
        prefix += right.cumprod(-1).sum(0)
        both += right.T @ right
        n += right.shape[0]
    # pairwise[i][j] = P(slot j right | slot i right): above the marginal, the slots agree.
    pairwise = (both / both.diagonal()[:, None].clamp_min(1)).tolist()
    slot, prefix = slot / n, prefix / n
    cond = [float(prefix[0])] + [float(prefix[i] / prefix[i - 1]) if prefix[i - 1] > 0 else None
                                 for i in range(1, K)]
    return {"positions": n, "slot_right": slot.tolist(), "first_n_right": prefix.tolist(),
            "next_right_given_prefix": cond, "pairwise_right_given_right": pairwise}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--out", type=Path, default=Path("runs/latent_study"))
    p.add_argument("--arms", default="base,kl01", help=f"comma list from {', '.join(ARMS)}")
    p.add_argument("--ae-minutes", type=float, default=6.0)
    p.add_argument("--lm-minutes", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1, help="threads per arm (the arms run together)")
    p.add_argument("--autoencoder", type=Path, default=None,
                   help="one trained autoencoder for every arm (then no arm may change the autoencoder)")
    p.add_argument("--label", default="",
                   help="prefix of this run's arms in the results file (LABEL/arm), so that arms run "
                        "under other settings, e.g. on a shared autoencoder, keep their own entries")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                   help="also measure a CALM trained elsewhere (its run folder), without training; "
                        "repeatable; --arms '' measures only these")
    p.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH",
                   help="also sample a token-level baseline (its run folder) K tokens at a time from "
                        "the same chunk boundaries: the control for the slots' agreement; repeatable")
    p.add_argument("--eval-tokens", type=int, default=65536)
    args = p.parse_args()

    def labelled(items: list[str], flag: str, what: str) -> dict[str, Path]:
        found = {}
        for item in items:
            label, sep, path = item.partition("=")
            if not sep or not label or not has_checkpoint(path):
                p.error(f"{flag} {item!r}: give LABEL=PATH with a trained {what} run folder at PATH")
            found[label] = Path(path)
        return found

    extra = labelled(args.model, "--model", "CALM")
    controls = labelled(args.baseline, "--baseline", "baseline")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if min(args.ae_minutes, args.lm_minutes) <= 0 or args.threads < 1:
        p.error("--ae-minutes and --lm-minutes must be positive, --threads at least 1")
    if args.autoencoder is not None:
        if not has_checkpoint(args.autoencoder):
            p.error(f"--autoencoder {args.autoencoder}: no checkpoint there")
        changed = [a for a in arms if ARMS[a][0]]
        if changed:
            p.error(f"arm(s) {', '.join(changed)} change the autoencoder; drop --autoencoder for them")
    if not (args.data / "meta.json").is_file():
        run_cli(["prepare", "--demo", "--out", str(args.data)])

    procs = {a: train_arm(args.out / a, args.data, ARMS[a], args.ae_minutes, args.lm_minutes, args.threads,
                          args.autoencoder)
             for a in arms if not (args.out / a / "DONE").is_file()}
    for a, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"arm {a} failed; see {args.out / a / 'train.log'}")

    torch.set_num_threads(args.threads * max(1, len(arms)))
    ds = TokenDataset(args.data)
    val = eval_batches(ds, "val", 512, 16)
    # What to measure: this run's arms, then the CALMs given by --model.
    todo = {}
    for a in arms:
        todo[a] = (args.out / a / "calm", args.autoencoder or args.out / a / "ae", {
            "autoencoder_flags": ARMS[a][0], "calm_flags": ARMS[a][1],
            "ae_minutes": None if args.autoencoder is not None else args.ae_minutes,
            "lm_minutes": args.lm_minutes, "threads": args.threads, "run_together": arms})
    for label, path in extra.items():
        todo[label] = (path, None, {"model_path": str(path)})
    results = {}
    for a, (calm_dir, ae_dir, meta) in todo.items():
        model, _, _ = load_model(calm_dir)
        model.eval()
        if ae_dir is None:  # a CALM trained elsewhere: its autoencoder's run folder, as it recorded
            ae_dir = Path(read_config(resolve_checkpoint(calm_dir))["autoencoder"]["path"])
        ae_eval = json.loads(run_cli(["eval-ae", "--model", str(ae_dir), "--data", str(args.data),
                                      "--json"], capture=True))
        lm_eval = json.loads(run_cli(["eval", "--model", str(calm_dir), "--data", str(args.data),
                                      "--max-tokens", str(args.eval_tokens), "--samples", str(REPORT_SAMPLES), "--json"],
                                     capture=True))
        results[a] = {
            **meta,
            "autoencoder_path": str(ae_dir),
            "calm_steps": read_state(resolve_checkpoint(calm_dir)).get("step"),
            "autoencoder": {k: ae_eval[k] for k in ("acc_mean", "acc_sample", "sigma", "collapsed_dims")},
            "midpoints": midpoint_coherence(model.autoencoder, val),
            "calm": {k: lm_eval.get(k) for k in ("tokens", "brier_1", "brier_1_se", "brier_2", "brier_2_se",
                                                  "brier_3", "brier_3_se", "brier_4", "brier_4_se",
                                                  "brier_lm")},
            "samples": sample_coherence(model, val, max_batches=24),
        }
        print(a, json.dumps(results[a]), flush=True)
    K = len(next(iter(results.values()))["samples"]["slot_right"]) if results else 4
    baselines = {}
    for label, path in controls.items():
        model, _, _ = load_model(path)
        model.eval()
        baselines[label] = {"model_path": str(path), "steps": read_state(resolve_checkpoint(path)).get("step"),
                            "samples": sample_coherence(model, val, max_batches=24, chunk_size=K)}
        print(label, json.dumps(baselines[label]), flush=True)

    # Arms measured in earlier runs stay in the file, each with the settings it ran under.
    previous = RESULTS / "latent_study.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    mach = machine()
    for r in [*results.values(), *baselines.values()]:
        r["measured"] = mach["date"]
    prefix = f"{args.label}/" if args.label else ""
    path = write("latent_study", {
        "arms": {**old.get("arms", {}), **{prefix + a: r for a, r in results.items()}},
        "baseline_controls": {**old.get("baseline_controls", {}),
                              **{prefix + a: r for a, r in baselines.items()}},
        "machine": mach})
    rows = []
    for a, r in results.items():
        c, s = r["calm"], r["samples"]
        cond = " / ".join("–" if v is None else f"{v:.3f}" for v in s["next_right_given_prefix"])
        rows.append([a, f"{r['autoencoder']['sigma']:.3f}", f"{100 * r['autoencoder']['acc_sample']:.2f} %",
                     f"{100 * r['midpoints']['whole_chunk']:.1f} %",
                     " / ".join(f"{100 * x['differing_slots_to_other']:.0f} %" for x in r["midpoints"]["line"]),
                     *(f"{c[f'brier_{n}']:.4f} ± {c[f'brier_{n}_se']:.4f}" for n in range(1, 5)), cond])
    print(table(rows, ["arm", "σ", "AE acc. (sampled z)", "midpoints → a whole chunk",
                       "slots → a third token at t = " + " / ".join(f"{t:g}" for t in POINTS), "Brier-1", "Brier-2",
                       "Brier-3", "Brier-4", "P(token n right | first n−1 right)"]))
    coherence = [(a, "CALM", r["samples"]) for a, r in results.items()]
    coherence += [(a, "baseline", r["samples"]) for a, r in baselines.items()]
    if coherence:
        rows = []
        for a, kind, smp in coherence:
            pw = smp["pairwise_right_given_right"]
            rows.append([a, kind, " / ".join(f"{x:.3f}" for x in smp["slot_right"]),
                         *(f"{pw[i][j]:.3f}" for i, j in ((0, 1), (1, 2), (0, 2), (0, 3))),
                         f"{smp['first_n_right'][-1]:.5f}"])
        print(table(rows, ["model", "kind", "P(slot j right)", "P(2 | 1)", "P(3 | 2)", "P(3 | 1)", "P(4 | 1)",
                           "all K right"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
