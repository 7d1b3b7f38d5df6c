"""Autoencoder benchmark: quality on the demo corpus and training speed at the reference size.

1. Trains the demo-size autoencoder (K = 4, latent 128) on the demo corpus
   (Shakespeare) within a time budget, then reports held-out token accuracy
   decoding μ and decoding a sampled z (paper: ≥ 99.9 %), mean σ, collapsed
   dimensions and the robustness curve.
2. Measures training tokens/s at the reference size (vocab 32000, hidden 512,
   intermediate 1280, 2+2 layers, latent 128, K 4, batch 8 × 512 tokens) at each
   precision (fp32, and bf16 where `auto` picks it) and compares it with this
   machine's FLOP limit at that precision, measured when the benchmark starts.

Usage: python benchmarks/autoencoder.py [--minutes 9] [--threads 2] [--skip-quality]
       [--precision fp32,bf16]
Writes benchmarks/results/autoencoder-<machine>.json (one file per kind of CPU; --name
NAME writes NAME-<machine>.json instead, for a variant run side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    cpu_model,
    format_limits,
    machine_limits,
    machine_tag,
    table,
    timed,
    write,
)

from calm.autoencoder import Autoencoder, health  # noqa: E402
from calm.config import TrainConfig, preset  # noqa: E402
from calm.data import BatchLoader, TokenDataset, eval_batches  # noqa: E402
from calm.dataset import prepare_dataset  # noqa: E402
from calm.demo import DEMO_VALIDATION, demo_documents  # noqa: E402
from calm.precision import autocast, resolve_precision  # noqa: E402
from calm.recipes import recipe  # noqa: E402
from calm.train import make_optimizer, train  # noqa: E402

AUTHORS = {"AMD EPYC": 903.0, "Intel Xeon": 923.0}  # their code at the reference size, tokens/s


def authors_tokens_per_s() -> float | None:
    cpu = " ".join(cpu_model().replace("(R)", " ").replace("(TM)", " ").split())
    return next((v for k, v in AUTHORS.items() if cpu.startswith(k)), None)


def demo_dataset(path: Path) -> TokenDataset:
    if not (path / "meta.json").is_file():
        prepare_dataset([], path, documents=demo_documents(), val_documents=DEMO_VALIDATION)
    return TokenDataset(path)


@torch.no_grad()
def accuracy_by_training_count(model, ds: TokenDataset, val, bounds=(0, 1, 5, 20, 100)) -> list:
    """Held-out accuracy (decoding a sampled z) by how often a token occurs in training."""
    import numpy as np

    counts = torch.from_numpy(np.bincount(np.asarray(ds.tokens("train")), minlength=ds.vocab_size))
    edges = [*bounds, float("inf")]
    right = torch.zeros(len(bounds))
    total = torch.zeros(len(bounds))
    g = torch.Generator().manual_seed(1)
    for b in val:
        ch = b.reshape(-1, 4)
        mean, log_std = model.encode(ch)
        z = mean + log_std.exp() * torch.randn(mean.shape, generator=g)
        ok = (model.decode_tokens(z) == ch).flatten().float()
        c = counts[ch.flatten()].float()
        for i in range(len(bounds)):
            sel = (c >= edges[i]) & (c < edges[i + 1])
            right[i] += ok[sel].sum()
            total[i] += sel.sum()
    return [{"train_count": f"{edges[i]}–{edges[i + 1]}", "tokens": int(total[i]),
             "acc_sample": float(right[i] / total[i]) if total[i] else None} for i in range(len(bounds))]


def quality(ds: TokenDataset, minutes: float, steps: int, lr: float | None, batch: int | None,
            precision: str = "auto", warmdown: float | None = None) -> dict:
    """Train the demo autoencoder with the demo recipe (each argument given overrides it)."""
    cfg = preset("autoencoder", "demo", vocab_size=ds.vocab_size)
    rec = recipe("autoencoder", "demo").train
    tcfg = replace(rec, steps=steps, eval_every=0, seed=0,
                   **{k: v for k, v in (("lr", lr), ("batch_size", batch), ("warmdown", warmdown))
                      if v is not None})
    lr, batch = tcfg.lr, tcfg.batch_size
    torch.manual_seed(0)
    model = Autoencoder(cfg)
    loader = BatchLoader(ds, "train", tcfg.block_size, batch, seed=0, chunk_size=4)
    t0 = time.perf_counter()
    precision = resolve_precision(precision, "cpu")
    res = train(model, tcfg, iter(loader), run_dir=None, time_limit=60 * minutes, desc="demo AE",
                precision=precision)
    wall = time.perf_counter() - t0
    val = eval_batches(ds, "val", 512, 16)  # the whole held-out split
    h = health(model, val, generator=torch.Generator().manual_seed(0))
    h["by_training_count"] = accuracy_by_training_count(model, ds, val)
    return {"config": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                       "latent": cfg.latent_size, "K": cfg.chunk_size, "vocab": cfg.vocab_size,
                       "batch_tokens": batch * tcfg.block_size, "lr": lr,
                       "warmup_steps": tcfg.warmup_steps, "warmdown": tcfg.warmdown,
                       "precision": precision},
            "measured": {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                         "load_average_1min": os.getloadavg()[0]},
            "steps": res.step, "train_seconds": wall, "train_tokens_per_s": res.tokens_per_second,
            **h}


def reference_speed(repeat: int, precision: str, peak_gflops: float) -> dict:
    cfg = preset("autoencoder", "reference")
    torch.manual_seed(0)
    model = Autoencoder(cfg)
    opt = make_optimizer(model, TrainConfig(lr=3e-4), torch.device("cpu"))  # the library's AdamW
    x = torch.randint(0, cfg.vocab_size, (8, 512))

    def step():
        with autocast("cpu", precision):
            loss, _ = model(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, warmup=2, repeat=repeat)
    tokens = x.numel()
    # FLOPs of the matmuls: forward 2·MACs, backward twice that.
    d, f, V, K, l = 512, 1280, cfg.vocab_size, 4, 128
    per_token_macs = (
        V * d  # tied vocabulary projection
        + 3 * d * f  # one position-wise encoder layer
        + d * d  # squeeze (K·d → d, per chunk = d·d per token)
        + 3 * d * f / K  # one encoder layer on the chunk vector
        + 2 * d * l / K  # to latent
        + l * d / K + 3 * d * f / K + d * d  # from latent, decoder layer, expand
        + 3 * d * f  # position-wise decoder layer
    )
    flops = 6 * per_token_macs * tokens
    bound = peak_gflops * 1e9 / (6 * per_token_macs)
    return {"precision": precision, "tokens_per_step": tokens, "step_seconds": t,
            "tokens_per_s": tokens / t["median"],
            "tokens_per_s_min_max": [tokens / t["max"], tokens / t["min"]],
            "flops_per_step": flops, "achieved_gflops": flops / t["median"] / 1e9,
            "peak_gflops": peak_gflops, "flop_bound_tokens_per_s": bound,
            "authors_tokens_per_s": authors_tokens_per_s()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=9.0, help="training budget of the demo AE")
    p.add_argument("--steps", type=int, default=100000, help="step cap of the demo AE")
    p.add_argument("--lr", type=float, default=None, help="demo AE learning rate (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None,
                   help="demo AE sequences of 512 tokens per step (default: the recipe's)")
    p.add_argument("--warmdown", type=float, default=None,
                   help="demo AE: fraction of the run over which the LR falls to 0 (default: the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="autoencoder",
                   help="results file name: benchmarks/results/NAME-<machine>.json (another name keeps "
                        "a variant's figures apart, e.g. for runs side by side)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps at the reference size")
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--precision", default=None,
                   help="reference-size speed: comma list of fp32, bf16 (default: fp32, plus "
                        "bf16 where auto picks it)")
    p.add_argument("--quality-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision of the demo autoencoder's training")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", args.name):
        p.error(f"--name {args.name!r}: use lower-case letters, digits, '.', '_' and '-'")
    # Sections not rerun (--skip-quality / --skip-speed) keep their earlier figures.
    previous = RESULTS / f"{args.name}-{machine_tag()}.json"
    out: dict = {}
    if previous.is_file():
        old = json.loads(previous.read_text())
        keep = [] if not args.skip_quality else ["demo"]
        keep += [] if not args.skip_speed else ["limits", "reference_speed", "speed_machine"]
        out.update({k: old[k] for k in keep if k in old})
        if args.skip_speed and "reference_speed" in old and "speed_machine" not in old:
            out["speed_machine"] = old["machine"]  # when the kept speed figures were measured
    if not args.skip_speed:
        limits = machine_limits(sorted({1, args.threads}))
        print(f"{cpu_model()}: {format_limits(limits)}", flush=True)
        out["limits"] = limits
    if not args.skip_quality:
        out["demo"] = quality(demo_dataset(args.data), args.minutes, args.steps, args.lr, args.batch,
                              args.quality_precision, args.warmdown)
    if not args.skip_speed:
        if args.precision:
            precisions = [resolve_precision(x.strip(), "cpu") for x in args.precision.split(",")]
        else:
            precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", "cpu") == "bf16" else [])
        out["reference_speed"] = [
            reference_speed(args.repeat, prec, limits[str(args.threads)][f"matmul_{prec}_gflops"])
            for prec in precisions
        ]
    path = write(args.name, out, per_machine=True)
    rows = []
    if "demo" in out:
        q = out["demo"]
        rows += [
            ["demo: held-out accuracy decoding μ", f"{100 * q['acc_mean']:.3f} %"],
            ["demo: held-out accuracy decoding sampled z", f"{100 * q['acc_sample']:.3f} % (paper ≥ 99.9 %)"],
            ["demo: mean σ", f"{q['sigma']:.3f}"],
            *[[f"demo: accuracy, tokens seen {r['train_count']} times in training",
               "–" if r["acc_sample"] is None else f"{100 * r['acc_sample']:.2f} % of {r['tokens']}"]
              for r in q["by_training_count"]],
            ["demo: collapsed dimensions", f"{q['collapsed_dims']} / {q['latent_size']}"],
            ["demo: training", f"{q['steps']} steps, {q['train_seconds'] / 60:.1f} min, {q['train_tokens_per_s']:.0f} tokens/s"],
        ]
    for s in out.get("reference_speed", []):
        lo, hi = s["tokens_per_s_min_max"]
        prec, ref = s["precision"], s["authors_tokens_per_s"]
        rows += [
            [f"reference size, {prec}: training tokens/s",
             f"{s['tokens_per_s']:.0f} (min–max {lo:.0f}–{hi:.0f})"],
            [f"  vs the authors' {ref:.0f} tokens/s on this CPU kind" if ref else
             "  vs the authors'", f"{s['tokens_per_s'] / ref:.2f}×" if ref else "not measured here"],
            [f"  matmul GFLOP/s (share of the {prec} limit {s['peak_gflops']:.0f})",
             f"{s['achieved_gflops']:.0f} ({s['achieved_gflops'] / s['peak_gflops']:.0%})"],
            ["  FLOP-bound tokens/s", f"{s['flop_bound_tokens_per_s']:.0f}"],
        ]
    speeds = out.get("reference_speed", [])
    if len(speeds) == 2:
        rows.append([f"reference size: {speeds[1]['precision']} / {speeds[0]['precision']}",
                     f"{speeds[1]['tokens_per_s'] / speeds[0]['tokens_per_s']:.2f}×"])
    print(table(rows, ["figure", "value"]))
    print(f"\nwritten to {path} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
