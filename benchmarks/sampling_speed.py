"""Generation speed of CALM with likelihood-free temperature sampling (T = 1/3, N = 200).

Setting: the benchmark backbone (hidden 512, intermediate 1376, 8 layers, 8 heads,
vocab 32000), K = 4, the reference-size autoencoder, an energy head of 2 blocks,
random weights; prompts of 32 tokens, 256 new tokens, batch 1 and 8. The batch
sampler (Algorithm 2) decodes its N = 200 draws per step either in full (the
vocabulary projection at K positions for every draw, ~32 GFLOP per row and step)
or pruned (``calm.temperature_sampling.batch_choose_pruned``: same distribution).

What pruning saves depends on how often the draws of a step coincide, which random
weights do not fix, so the head is put in three regimes (a random last layer of
scale s, and a bias that gives the draws a common centre or not):

- ``concentrated``: ~20 distinct outcomes of 200, the top one ~60 times (a confident step);
- ``mixed``: ~110 distinct, the top one ~10 times;
- ``diverse``: every draw distinct, ~190 distinct first tokens (the worst case).

Reported per run: tokens/s, the fraction of vocabulary projections skipped, and the
regime's outcome statistics at the first step. Temperature 1 (one head sample per
step) is the ceiling.

Usage: python benchmarks/sampling_speed.py [--new-tokens 256] [--threads 2]
       [--batches 1,8] [--regimes concentrated,mixed,diverse] [--no-full]
Writes benchmarks/results/sampling_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

from calm.autoencoder import Autoencoder  # noqa: E402
from calm.config import CALMConfig, HeadConfig, preset  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.model import CALM  # noqa: E402
from calm.sampling import outcome_group_ids  # noqa: E402
from calm.temperature_sampling import temperature_chooser  # noqa: E402

PROMPT = 32
TEMPERATURE = 1 / 3
N = 200
REGIMES = {  # name: (scale of the head's last layer, with a common bias)
    "concentrated": (0.3, True),
    "mixed": (1.0, True),
    "diverse": (5.0, False),
}


def build() -> CALM:
    torch.manual_seed(0)
    backbone = preset("transformer", "bench", max_seq_len=1024)
    ae = Autoencoder(preset("autoencoder", "reference")).eval()
    cfg = CALMConfig(backbone=backbone, head=HeadConfig(num_blocks=2), chunk_size=4, latent_size=128)
    return CALM(cfg, ae).eval()


def set_regime(model: CALM, name: str) -> None:
    """The head's last layer: random of scale s (it starts at zero: every draw equal)."""
    scale, bias = REGIMES[name]
    g = torch.Generator().manual_seed(1)
    out = model.head.final_out
    with torch.no_grad():
        w = torch.randn(out.weight.shape, generator=g) / out.in_features**0.5
        out.weight.copy_(w * scale)
        out.bias.copy_(torch.randn(out.bias.shape, generator=g) if bias else torch.zeros_like(out.bias))


@torch.no_grad()
def outcome_stats(model: CALM, prompts: torch.Tensor) -> dict:
    """Distinct outcomes among N draws at the first step (mean over the prompts)."""
    K = model.config.chunk_size
    cache = model.make_cache(prompts.shape[0], prompts.shape[1] // K)
    h = model.step(prompts.view(prompts.shape[0], -1, K), None, cache=cache)
    z = model.head.sample_n(h, N, generator=torch.Generator().manual_seed(2))
    x = model.autoencoder.decode_tokens(z)  # (B, N, K)
    ids = outcome_group_ids(x)
    distinct, top, first = [], [], []
    for r in range(ids.shape[0]):  # a probe, not a hot path
        _, c = ids[r].unique(return_counts=True)
        distinct.append(c.numel())
        top.append(int(c.max()))
        first.append(x[r, :, 0].unique().numel())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"distinct_outcomes": mean(distinct), "top_outcome_count": mean(top),
            "distinct_first_tokens": mean(first)}


def run_once(model, prompts, new_tokens, *, temperature, prune) -> dict:
    g = torch.Generator().manual_seed(0)
    chooser = None
    if temperature != 1.0:
        chooser = temperature_chooser(model, temperature, num_candidates=N, generator=g, prune=prune)
    t = time.perf_counter()
    out = generate(model, prompts.tolist(), max_new_tokens=new_tokens, temperature=temperature,
                   generator=g, chooser=chooser)
    dt = time.perf_counter() - t
    n = sum(len(x) for x in out.tokens)
    r = {"seconds": dt, "tokens": n, "tokens_per_s": n / dt}
    if chooser is not None:
        r["skipped_fraction"] = chooser.skipped_fraction()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--no-full", action="store_true", help="skip the unpruned runs (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    batches = [int(b) for b in args.batches.split(",")]
    regimes = args.regimes.split(",")
    g = torch.Generator().manual_seed(3)
    results, rows = [], []
    for B in batches:
        prompts = torch.randint(0, model.config.backbone.vocab_size, (B, PROMPT), generator=g)
        set_regime(model, regimes[0])
        ceiling = run_once(model, prompts, args.new_tokens, temperature=1.0, prune=True)
        results.append({"batch": B, "sampler": "temperature 1 (one head sample)", **ceiling})
        rows.append([B, "T=1 (ceiling)", "-", f"{ceiling['tokens_per_s']:.1f}", "-", "-"])
        if not args.no_full:  # the full decode's cost does not depend on the regime
            full = run_once(model, prompts, args.new_tokens, temperature=TEMPERATURE, prune=False)
            results.append({"batch": B, "sampler": "batch, full decode", **full})
            rows.append([B, "full decode", "any", f"{full['tokens_per_s']:.1f}", "0", "-"])
        for name in regimes:
            set_regime(model, name)
            st = outcome_stats(model, prompts)
            r = run_once(model, prompts, args.new_tokens, temperature=TEMPERATURE, prune=True)
            results.append({"batch": B, "sampler": "batch, pruned", "regime": name, **st, **r})
            rows.append([B, "pruned", name, f"{r['tokens_per_s']:.1f}",
                         f"{r['skipped_fraction']:.3f}",
                         f"{st['distinct_outcomes']:.0f} / top {st['top_outcome_count']:.0f}"])
            print(rows[-1], flush=True)
    print(table(rows, ["batch", "sampler", "regime", "tokens/s", "skipped", "outcomes of 200"]))
    path = write("sampling_speed", {
        "setting": {"prompt": PROMPT, "new_tokens": args.new_tokens, "temperature": TEMPERATURE,
                    "num_candidates": N, "backbone": "bench", "autoencoder": "reference",
                    "note": "random weights; the shared CPU may be loaded by other work"},
        "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
