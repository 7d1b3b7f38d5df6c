"""Why CALM's Brier-3 and Brier-4 stay at 0: do its sampled chunks decode coherently?

CALM predicts a whole chunk of K = 4 tokens as one latent vector. A sample that
falls between the autoencoder's chunk latents decodes slot by slot into tokens
of different chunks: each token may be plausible, the chunk is not. Brier-1
does not see this (it looks at the first token only); Brier-3 and Brier-4 do.
This study measures it, side by side, for autoencoders that differ in one
factor (arms), each followed by the same CALM:

  base       the demo autoencoder recipe (β = 1e-3: σ ≈ 0.15)
  kl01       --kl-weight 0.01 (a stronger pull to the prior: σ ≈ 0.35, the paper's value)

Every arm trains its autoencoder (--ae-minutes) and then a demo CALM on it
(--lm-minutes), all arms at the same time with --threads each, so a busy
machine slows them alike. Then, on the same held-out text:

- the autoencoder: accuracy decoding a sampled z, mean σ, and *midpoint
  coherence*: for pairs of held-out chunks A ≠ B, the share of midpoints
  (μ_A + μ_B) / 2 that decode to exactly A or exactly B (a smooth latent space
  decodes in-between points to one whole chunk, not to a mix);
- CALM: Brier-1…4 ± SE (--eval-tokens), the chance that a sample's slot j is the
  true token, and the chance that its first n tokens are all true, with the
  conditional P(token n right | first n−1 right) — the chunk's coherence.

Usage: python benchmarks/latent_study.py --data data/shakespeare [--arms base,kl01]
       [--ae-minutes 6] [--lm-minutes 6] [--threads 1] [--out runs/latent_study]
Rerunning reuses finished arms in --out. Writes benchmarks/results/latent_study.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_cli, table, write  # noqa: E402

from calm.data import TokenDataset, eval_batches  # noqa: E402
from calm.evaluate import calm_sample_ngrams  # noqa: E402
from calm.loading import load_model  # noqa: E402

ARMS = {
    "base": [],
    "kl01": ["--kl-weight", "0.01"],
    "kl003": ["--kl-weight", "0.003"],
}


def train_arm(out: Path, data: Path, flags: list[str], ae_minutes: float, lm_minutes: float,
              threads: int) -> subprocess.Popen:
    """Start one arm (autoencoder, then CALM) as a child process."""
    calm = [sys.executable, "-m", "calm"]
    common = ["--data", str(data), "--preset", "demo", "--steps", "1000000", "--threads", str(threads),
              "--overwrite", "--no-progress"]
    script = " && ".join([
        " ".join([*calm, "train-ae", *common, "--out", str(out / "ae"),
                  "--max-minutes", f"{ae_minutes:g}", *flags]),
        " ".join([*calm, "train", *common, "--autoencoder", str(out / "ae"), "--out", str(out / "calm"),
                  "--max-minutes", f"{lm_minutes:g}"]),
        f"touch {out / 'DONE'}",
    ])
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "w")
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT)


@torch.no_grad()
def midpoint_coherence(ae, val, pairs: int = 4096, seed: int = 0) -> dict:
    """Share of midpoints of two different held-out chunks' means that decode to one of them."""
    g = torch.Generator().manual_seed(seed)
    chunks = torch.cat([b.reshape(-1, ae.config.chunk_size) for b in val])
    i = torch.randint(0, chunks.shape[0], (pairs,), generator=g)
    j = torch.randint(0, chunks.shape[0], (pairs,), generator=g)
    a, b = chunks[i], chunks[j]
    keep = (a != b).any(-1)
    a, b = a[keep], b[keep]
    mu_a, _ = ae.encode(a)
    mu_b, _ = ae.encode(b)
    dec = ae.decode_tokens((mu_a + mu_b) / 2)
    is_a, is_b = (dec == a).all(-1), (dec == b).all(-1)
    return {"pairs": int(keep.sum()), "whole_chunk": float((is_a | is_b).float().mean()),
            "median_distance": float((mu_a - mu_b).norm(dim=-1).median())}


@torch.no_grad()
def sample_coherence(model, val, max_batches: int, seed: int = 0) -> dict:
    """Per-slot and prefix accuracy of CALM's sampled next chunk against the true one."""
    g = torch.Generator().manual_seed(seed)
    K = model.config.chunk_size
    slot = torch.zeros(K)
    prefix = torch.zeros(K)
    n = 0
    for k, b in enumerate(val):
        if k >= max_batches:
            break
        s1, _, t = calm_sample_ngrams(model, b, K, generator=g)
        right = (s1 == t).flatten(0, 1).float()  # (positions, K)
        slot += right.sum(0)
        prefix += right.cumprod(-1).sum(0)
        n += right.shape[0]
    slot, prefix = slot / n, prefix / n
    cond = [float(prefix[0])] + [float(prefix[i] / prefix[i - 1]) if prefix[i - 1] > 0 else None
                                 for i in range(1, K)]
    return {"positions": n, "slot_right": slot.tolist(), "first_n_right": prefix.tolist(),
            "next_right_given_prefix": cond}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--out", type=Path, default=Path("runs/latent_study"))
    p.add_argument("--arms", default="base,kl01", help=f"comma list from {', '.join(ARMS)}")
    p.add_argument("--ae-minutes", type=float, default=6.0)
    p.add_argument("--lm-minutes", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1, help="threads per arm (the arms run together)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    args = p.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if min(args.ae_minutes, args.lm_minutes) <= 0 or args.threads < 1:
        p.error("--ae-minutes and --lm-minutes must be positive, --threads at least 1")
    if not (args.data / "meta.json").is_file():
        run_cli(["prepare", "--demo", "--out", str(args.data)])

    procs = {a: train_arm(args.out / a, args.data, ARMS[a], args.ae_minutes, args.lm_minutes, args.threads)
             for a in arms if not (args.out / a / "DONE").is_file()}
    for a, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"arm {a} failed; see {args.out / a / 'train.log'}")

    torch.set_num_threads(max(1, args.threads * len(arms)))
    ds = TokenDataset(args.data)
    val = eval_batches(ds, "val", 512, 16)
    results = {}
    for a in arms:
        folder = args.out / a
        ae_eval = json.loads(run_cli(["eval-ae", "--model", str(folder / "ae"), "--data", str(args.data),
                                      "--json"], capture=True))
        lm_eval = json.loads(run_cli(["eval", "--model", str(folder / "calm"), "--data", str(args.data),
                                      "--max-tokens", str(args.eval_tokens), "--json"], capture=True))
        model, _, _ = load_model(folder / "calm")
        model.eval()
        results[a] = {
            "flags": ARMS[a],
            "autoencoder": {k: ae_eval[k] for k in ("acc_mean", "acc_sample", "sigma", "collapsed_dims")},
            "midpoints": midpoint_coherence(model.autoencoder, val),
            "calm": {k: lm_eval.get(k) for k in ("tokens", "brier_1", "brier_1_se", "brier_2", "brier_2_se",
                                                  "brier_3", "brier_3_se", "brier_4", "brier_4_se",
                                                  "brier_lm")},
            "samples": sample_coherence(model, val, max_batches=24),
        }
        print(a, json.dumps(results[a]), flush=True)

    path = write("latent_study", {"arms": results, "ae_minutes": args.ae_minutes,
                                  "lm_minutes": args.lm_minutes, "threads_per_arm": args.threads,
                                  "run_machine": machine()})
    rows = []
    for a, r in results.items():
        c, s = r["calm"], r["samples"]
        cond = " / ".join("–" if v is None else f"{v:.3f}" for v in s["next_right_given_prefix"])
        rows.append([a, f"{r['autoencoder']['sigma']:.3f}", f"{100 * r['autoencoder']['acc_sample']:.2f} %",
                     f"{100 * r['midpoints']['whole_chunk']:.1f} %",
                     *(f"{c[f'brier_{n}']:.4f} ± {c[f'brier_{n}_se']:.4f}" for n in range(1, 5)), cond])
    print(table(rows, ["arm", "σ", "AE acc. (sampled z)", "midpoints → a whole chunk", "Brier-1", "Brier-2",
                       "Brier-3", "Brier-4", "P(token n right | first n−1 right)"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
