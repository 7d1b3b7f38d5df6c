"""Speed of CALM against the token-level baseline, side by side in one process.

Setting (both models share the backbone): hidden 512, intermediate 1376, 8
layers, 8 heads, vocab 32000; CALM with K = 4, an energy head of 2 blocks and
N = 8 samples, and the reference-size autoencoder. Random weights: speed does
not depend on them (generation never stops early: no end-of-text).

- generation tokens/s at temperature 1, prompt 32 tokens, 256 new tokens, batch 1 and 8,
  with each model's share of its memory-bandwidth or compute limit;
- training tokens/s, batch 8 × 512 tokens;
- BrierLM evaluation time of one 1024-token sequence.

Usage: python benchmarks/speed.py [--threads 2] [--decode-threads 1] [--repeat 3] [--only gen,train]
Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed, write  # noqa: E402

from calm.autoencoder import Autoencoder  # noqa: E402
from calm.baseline import TokenLM  # noqa: E402
from calm.config import CALMConfig, HeadConfig, TrainConfig, preset  # noqa: E402
from calm.generate import generate  # noqa: E402
from calm.model import CALM  # noqa: E402
from calm.train import make_optimizer  # noqa: E402

PEAK_GFLOPS = 175.0  # fp32 matmul, 2 threads (DEVELOPERS.md)
PEAK_GBS = 40.0  # memory copy bandwidth
REFERENCE = {  # the authors' implementation on this machine (tokens/s)
    "gen_b1": {"calm": 137.0, "baseline": 58.0},
    "gen_b8": {"calm": 743.0, "baseline": 202.0},
    "train": {"calm": 1135.0, "baseline": 409.0},
}


def build(max_seq_len: int = 1024):
    torch.manual_seed(0)
    backbone = preset("transformer", "bench", max_seq_len=max_seq_len)
    ae = Autoencoder(preset("autoencoder", "reference")).eval()
    calm = CALM(CALMConfig(backbone=backbone, head=HeadConfig(num_blocks=2, num_samples=8),
                           chunk_size=4, latent_size=128), ae).eval()
    base = TokenLM(backbone).eval()
    return calm, base


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def per_token_costs(calm: CALM, base: TokenLM) -> dict:
    """Bytes of weights read and multiply-adds per generated token, at batch 1."""
    K = calm.config.chunk_size
    ae = calm.autoencoder
    dec = [ae.from_latent, *ae.dec_pre, ae.expand, *ae.dec_post, ae.dec_norm]
    dec_bytes = sum(weight_bytes(m) for m in dec) + weight_bytes(ae.embed)  # tied projection
    calm_step_bytes = (weight_bytes(calm.backbone) + weight_bytes(calm.compress)
                       + weight_bytes(calm.head) + dec_bytes)
    base_bytes = weight_bytes(base.backbone) + weight_bytes(base.lm_head)
    # Multiply-adds ≈ weights touched once per row (embedding lookups excluded), the
    # autoencoder's vocabulary projection counted once per each of the K positions.
    V, d_ae = ae.config.vocab_size, ae.config.hidden_size
    calm_macs = (calm_step_bytes - weight_bytes(ae.embed)) / 4 + K * V * d_ae
    base_macs = base_bytes / 4
    return {
        "calm_bytes_per_token": calm_step_bytes / K,
        "base_bytes_per_token": base_bytes,
        "calm_macs_per_token": calm_macs / K,
        "base_macs_per_token": base_macs,
    }


def bench_generation(calm, base, batch: int, new_tokens: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 32000, (batch, 32), generator=g).tolist()
    out = {}
    for name, model in (("calm", calm), ("baseline", base)):
        def run(model=model):
            generate(model, prompts, max_new_tokens=new_tokens, eot_id=None,
                     generator=torch.Generator().manual_seed(1))
        t = timed(run, warmup=1, repeat=repeat)
        n = batch * new_tokens
        out[name] = {"seconds": t, "tokens_per_s": n / t["median"],
                     "tokens_per_s_min_max": [n / t["max"], n / t["min"]]}
    return out


def bench_training(calm, base, repeat: int) -> dict:
    x = torch.randint(0, 32000, (8, 512))
    out = {}
    for name, model in (("calm", calm), ("baseline", base)):
        model.train()
        opt = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, opt=opt, params=params):
            loss, _ = model(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = timed(step, warmup=1, repeat=repeat)
        out[name] = {"seconds": t, "tokens_per_s": x.numel() / t["median"],
                     "tokens_per_s_min_max": [x.numel() / t["max"], x.numel() / t["min"]]}
        model.eval()
    return out


def bench_eval(calm, base, repeat: int) -> dict:
    """BrierLM (Brier-1..4) of one 1024-token sequence, random weights."""
    from calm.evaluate import brier_for_model

    x = torch.randint(1, 32000, (1, 1024), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in (("calm", calm), ("baseline", base)):
        def run(model=model):
            with torch.no_grad():
                brier_for_model(model, x, generator=torch.Generator().manual_seed(0))
        t = timed(run, warmup=1, repeat=repeat)
        out[name] = {"seconds": t}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for training and batch 8")
    p.add_argument("--decode-threads", type=int, default=1,
                   help="intra-op threads for batch-1 decoding (small ops: 1 thread avoids pool waits)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--only", default="gen,train,eval", help="comma list of: gen, train, eval")
    args = p.parse_args()
    only = set(args.only.split(","))
    calm, base = build()
    costs = per_token_costs(calm, base)
    result: dict = {"setting": {"backbone": "hidden 512, ffn 1376, 8 layers, 8 heads, vocab 32000",
                                "K": 4, "head_blocks": 2, "N": 8, "prompt": 32,
                                "new_tokens": args.new_tokens, "threads": args.threads,
                                "decode_threads_batch1": args.decode_threads},
                    "costs": costs, "reference": REFERENCE}
    rows = []
    if "gen" in only:
        for batch, threads in ((1, args.decode_threads), (8, args.threads)):
            torch.set_num_threads(threads)
            g = bench_generation(calm, base, batch, args.new_tokens, args.repeat)
            for name, key in (("calm", "calm"), ("baseline", "base")):
                tps = g[name]["tokens_per_s"]
                if batch == 1:  # bound by reading the weights
                    limit = PEAK_GBS * 1e9 / costs[f"{key}_bytes_per_token"]
                else:  # bound by compute
                    limit = PEAK_GFLOPS * 1e9 / (2 * costs[f"{key}_macs_per_token"])
                g[name]["limit_tokens_per_s"] = limit
                g[name]["share_of_limit"] = tps / limit
                lo, hi = g[name]["tokens_per_s_min_max"]
                ref = REFERENCE[f"gen_b{batch}"][name]
                rows.append([f"generate, batch {batch}, {threads} thr", name, f"{tps:.0f} ({lo:.0f}–{hi:.0f})",
                             f"{tps / limit:.0%} of {'memory' if batch == 1 else 'compute'} limit {limit:.0f}",
                             f"{tps / ref:.2f}×"])
            g["calm_over_baseline"] = g["calm"]["tokens_per_s"] / g["baseline"]["tokens_per_s"]
            rows.append([f"generate, batch {batch}", "CALM / baseline", f"{g['calm_over_baseline']:.2f}×",
                         "", ""])
            result[f"generation_batch{batch}"] = g
    if "train" in only:
        torch.set_num_threads(args.threads)
        t = bench_training(calm, base, args.repeat)
        for name in ("calm", "baseline"):
            tps = t[name]["tokens_per_s"]
            lo, hi = t[name]["tokens_per_s_min_max"]
            rows.append([f"train, 8×512, {args.threads} thr", name, f"{tps:.0f} ({lo:.0f}–{hi:.0f})", "",
                         f"{tps / REFERENCE['train'][name]:.2f}×"])
        result["training"] = t
    if "eval" in only:
        torch.set_num_threads(args.threads)
        e = bench_eval(calm, base, args.repeat)
        ref = {"calm": 1.0, "baseline": 59.0}
        for name in ("calm", "baseline"):
            t = e[name]["seconds"]
            rows.append([f"BrierLM of 1024 tokens, {args.threads} thr", name,
                         f"{t['median']:.2f} s ({t['min']:.2f}–{t['max']:.2f})", "",
                         f"{ref[name] / t['median']:.2f}× faster"])
        e["reference_seconds"] = ref
        result["evaluation"] = e
    path = write("speed", result)
    print(table(rows, ["what", "model", "tokens/s median (min–max)", "limit", "vs authors'"]))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
