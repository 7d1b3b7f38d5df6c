"""Is the energy head the brake? Heads compared where the right answer is known.

Two settings, each training only a generative head (no backbone in the way):

1. toy: a conditional distribution known exactly. 32 contexts (random 256-d
   hidden states); each has its own mixture over 200 "chunks" (random 128-d
   latents, per-dimension std 1.15, so ‖μ‖ ≈ 13 and distances ≈ 18 as the demo
   autoencoder's) with Dirichlet(0.05) weights; targets are N(μ, 0.18²) as the
   demo autoencoder's posterior. A head sample counts as the chunk whose latent
   is nearest. Reported: the total-variation distance between the head's and
   the true distribution (512 samples per context), and the expected Brier
   score 2·Σ p q − Σ q² of the head's distribution against the true one
   (optimum Σ p², reached when q = p).
2. frozen (--frozen): real features. A CALM backbone on the demo corpus is
   trained for --backbone-steps with an extra cross-entropy probe on the next
   chunk's tokens (so its features carry what a token-level model would know);
   it is then frozen and fresh heads are trained on its hidden states; each is
   scored by Brier-1 on held-out chunk starts, beside the probe's own exact
   Brier-1 from its softmax.

Usage: python benchmarks/head_study.py [--steps 1000] [--frozen] [--autoencoder runs/study/ae]
Writes benchmarks/results/head_study.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

from calm.config import HeadConfig  # noqa: E402
from calm.heads import build_head  # noqa: E402

VARIANTS = {
    "energy": {"final_init": "default"},
    "energy, N 32": {"final_init": "default", "num_samples": 32},
    "energy, 4 blocks × 512": {"final_init": "default", "num_blocks": 4, "width": 512},
    "energy, lr 3e-3": {"final_init": "default", "lr": 3e-3},
    "energy, alpha 0.5": {"final_init": "default", "alpha": 0.5},
    "flow": {"kind": "flow"},
}


def make_head(spec: dict, hidden: int, latent: int):
    spec = dict(spec)
    lr = spec.pop("lr", 1e-3)
    head = build_head(HeadConfig(**spec), hidden, latent, 4)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return head, opt


def step(head, opt, h, mean, log_std) -> None:
    loss, _ = head.loss(h, mean, log_std)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()


# ----------------------------------------------------------------------------- toy


def toy(steps: int, seed: int = 0) -> list[dict]:
    L, H, C, M = 128, 256, 32, 200
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(M, L, generator=g) * 1.15
    gam = torch.distributions.Gamma(torch.full((C, M), 0.05), 1.0)
    torch.manual_seed(seed)
    P = gam.sample()
    P = P / P.sum(1, keepdim=True)
    ctx = torch.randn(C, H, generator=g)
    best = float((P * P).sum(1).mean())
    rows = []
    for name, spec in VARIANTS.items():
        torch.manual_seed(seed)
        head, opt = make_head(spec, H, L)
        t0 = time.perf_counter()
        curve = []
        for it in range(1, steps + 1):
            c = torch.randint(C, (512,))
            y = torch.multinomial(P[c], 1).squeeze(1)
            mean = modes[y]
            step(head, opt, ctx[c], mean, torch.full_like(mean, float(torch.log(torch.tensor(0.18)))))
            if it % (steps // 4) == 0:
                with torch.no_grad():
                    k = torch.cdist(head.sample_n(ctx, 512).reshape(-1, L), modes).argmin(1).view(C, 512)
                q = torch.zeros(C, M).scatter_add_(1, k, torch.ones(C, 512)) / 512
                curve.append({"step": it, "tv": float(0.5 * (P - q).abs().sum(1).mean()),
                              "brier": float((2 * (P * q).sum(1) - (q * q).sum(1)).mean())})
        rows.append({"setting": "toy", "head": name, "seconds": time.perf_counter() - t0,
                     "optimum_brier": best, **curve[-1], "curve": curve})
        print(f"toy {name}: TV {curve[-1]['tv']:.3f}, Brier {curve[-1]['brier']:.4f} "
              f"(optimum {best:.4f})", flush=True)
    return rows


# ----------------------------------------------------------------------------- frozen


def frozen(args) -> list[dict]:
    from calm.config import CALMConfig, TrainConfig, preset
    from calm.data import BatchLoader, TokenDataset, eval_batches
    from calm.loading import load_autoencoder
    from calm.model import CALM
    from calm.train import train

    ds = TokenDataset(args.data)
    ae, _, _ = load_autoencoder(args.autoencoder)
    K, V, d = ae.config.chunk_size, ae.config.vocab_size, 256
    cfg = CALMConfig(backbone=preset("transformer", "demo", vocab_size=V),
                     head=HeadConfig(final_init="default"), chunk_size=K, latent_size=ae.config.latent_size)
    torch.manual_seed(1337)
    model = CALM(cfg, copy.deepcopy(ae))
    model.probe = nn.Sequential(nn.Linear(d, K * d), nn.Unflatten(-1, (K, d)), nn.LayerNorm(d))

    def forward(tokens, *, generator=None):
        B, T = tokens.shape
        chunks = tokens.reshape(B, T // K, K)
        with torch.no_grad():
            mean, log_std = model.autoencoder.encode(chunks)
        h = model.backbone(model.inputs(chunks[:, :-1]))
        loss, metrics = model.head.loss(h, mean[:, 1:], log_std[:, 1:], generator=generator)
        logits = model.probe(h) @ model.embed.weight.t()
        ce = F.cross_entropy(logits.flatten(0, -2).float(), chunks[:, 1:].flatten())
        return loss + 4 * ce, {"loss": (loss + 4 * ce).detach(), "ce": ce.detach(), **metrics}

    model.forward = forward
    tcfg = TrainConfig(steps=args.backbone_steps, batch_size=4, block_size=512, lr=1e-3,
                       warmup_steps=50, eval_every=0, log_every=10, seed=1337)
    loader = BatchLoader(ds, "train", 512, 4, seed=1337, chunk_size=K)
    train(model, tcfg, iter(loader), run_dir=None, progress=False, handle_signals=False,
          precision=args.precision, desc="backbone + probe")
    model.eval().requires_grad_(False)
    val = list(eval_batches(ds, "val", 512, 4, max_batches=args.eval_batches))

    def feats(b):
        ch = b.reshape(b.shape[0], -1, K)
        return model.backbone(model.inputs(ch[:, :-1])), ch

    with torch.no_grad():
        tot = n = 0.0
        for b in val:
            h, ch = feats(b)
            q = (model.probe(h)[..., 0, :] @ model.embed.weight.t()).softmax(-1).reshape(-1, V)
            y = ch[:, 1:, 0].reshape(-1)
            tot += float((2 * q.gather(1, y[:, None]).squeeze(1) - q.pow(2).sum(1)).sum())
            n += len(y)
    rows = [{"setting": "frozen", "head": "cross-entropy probe (exact Brier-1)", "brier_1": tot / n,
             "tokens": int(n)}]
    print(f"frozen probe: Brier-1 {tot / n:.4f}", flush=True)
    for name in ("energy", "flow"):
        torch.manual_seed(0)
        head, opt = make_head(VARIANTS[name], d, ae.config.latent_size)
        it_loader = iter(BatchLoader(ds, "train", 512, 4, seed=7, chunk_size=K))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            b = next(it_loader)
            with torch.no_grad():
                h, ch = feats(b)
                mean, log_std = ae.encode(ch)
            step(head, opt, h, mean[:, 1:], log_std[:, 1:])
        g = torch.Generator().manual_seed(0)
        acc = coll = n = 0
        with torch.no_grad():
            for b in val:
                h, ch = feats(b)
                s = ae.decode_tokens(head.sample_n(h, 2, generator=g))[..., 0]  # (B, S, 2) first tokens
                y = ch[:, 1:, 0]
                acc += int((s[..., 0] == y).sum() + (s[..., 1] == y).sum())
                coll += int((s[..., 0] == s[..., 1]).sum())
                n += y.numel()
        rows.append({"setting": "frozen", "head": name, "brier_1": (acc - coll) / n, "tokens": n,
                     "collision": coll / n, "seconds": time.perf_counter() - t0})
        print(f"frozen {name}: Brier-1 {(acc - coll) / n:.4f}, collision {coll / n:.4f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="head training steps")
    p.add_argument("--frozen", action="store_true", help="also the frozen-feature setting")
    p.add_argument("--backbone-steps", type=int, default=600)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out 4 × 512-token batches")
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--autoencoder", type=Path, default=Path("runs/study/ae"))
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-toy", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "head_study.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = {(r["setting"], r["head"]): r for r in old.get("results", [])}  # merged with new runs
    new = ([] if args.skip_toy else toy(args.steps)) + (frozen(args) if args.frozen else [])
    kept.update({(r["setting"], r["head"]): r for r in new})
    rows = list(kept.values())
    path.write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": rows}, indent=2) + "\n")
    print(table([[r["setting"], r["head"], f"{r['tv']:.3f}" if "tv" in r else "",
                  f"{r.get('brier', r.get('brier_1')):.4f}",
                  f"{r['optimum_brier']:.4f}" if "optimum_brier" in r else ""] for r in rows],
                ["setting", "head", "TV to truth", "Brier (toy) / Brier-1 (frozen)", "optimum"]))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
