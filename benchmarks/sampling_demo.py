"""Temperature sampling on a trained model: Algorithm 2 (batch) against Algorithm 1 (exact).

At moderate temperatures a handful of exact draws might beat 200 approximate ones;
whether they do depends on how peaked the model's chunk distribution is: the
exact sampler's expected number of draws per step grows like 1 / Σ_x P(x)^{1/T}
(SPEC §4). Reports tokens/s, the batch sampler's skipped decoding work, and the
exact sampler's draws per step (or that it gave up after --max-calls).

Usage: python benchmarks/sampling_demo.py --model runs/quickstart/calm [--new-tokens 64]
Writes benchmarks/results/sampling_demo.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402

from calm.errors import CalmError  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.loading import load_checkpoint_tokenizer, load_model  # noqa: E402
from calm.temperature_sampling import temperature_chooser  # noqa: E402

PROMPTS = ["ROMEO:", "To be, or not", "KING.", "O, what", "My lord,", "HAMLET.", "Good morrow",
           "What say you"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-calls", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, ckpt, _ = load_model(args.model)
    tok = load_checkpoint_tokenizer(ckpt)
    prompts = [[tok.eot_id, *tok.encode(s)] for s in PROMPTS]
    runs = []
    for sampler, T in (("batch", 1 / 2), ("exact", 1 / 2), ("exact", 3 / 4), ("batch", 1 / 3)):
        ch = temperature_chooser(model, T, sampler=sampler, num_candidates=200, max_calls=args.max_calls,
                                 generator=torch.Generator().manual_seed(0))
        rec = {"sampler": sampler, "temperature": T, "batch": len(prompts)}
        t = time.perf_counter()
        try:
            g = generate(model, prompts, max_new_tokens=args.new_tokens, eot_id=None, chooser=ch)
            dt = time.perf_counter() - t
            rec.update(tokens_per_s=sum(len(x) for x in g.tokens) / dt, steps=g.steps)
        except CalmError as e:
            rec.update(tokens_per_s=None, error=str(e))
        st = dict(getattr(ch, "stats", {}))
        rec["stats"] = {k: float(v) for k, v in st.items() if isinstance(v, (int, float))}
        if sampler == "batch" and st.get("full_projections"):
            rec["skipped_fraction"] = 1 - st["projections"] / st["full_projections"]
        if sampler == "exact" and st.get("steps"):
            rec["draws_per_row_step"] = st.get("head_samples", 0) / max(st.get("rows", 1), 1)
        runs.append(rec)
    path = write("sampling_demo", {"model": str(ckpt), "new_tokens": args.new_tokens, "runs": runs})
    def work(r):
        if r["tokens_per_s"] is None:
            return f"> {args.max_calls} draws in a step"
        if r["sampler"] == "batch":
            return f"{r.get('skipped_fraction', 0):.2f} of projections skipped"
        return f"{r.get('draws_per_row_step', float('nan')):.0f} draws per step"

    rows = [[r["sampler"], f"{r['temperature']:.3f}",
             "gave up" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}", work(r)]
            for r in runs]
    print(table(rows, ["sampler", "T", "tokens/s", "skipped / draws"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
