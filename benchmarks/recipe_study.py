"""Why CALM's energy head learns slowly at small scale: one factor at a time.

Base (stated once, changed one factor at a time): the demo corpus; one demo
autoencoder (trained first, or --autoencoder DIR); CALM with the demo backbone
(d 256, 4 layers), the demo recipe (batches of 4 × 512 tokens, lr 1e-3, 50
warm-up steps, AdamW β 0.9/0.95, weight decay 0.1, clip 1.0) and the energy head
(1 block of width 256, noise 64, N 8, M 100), trained for --steps optimizer
steps (equal steps, so the comparison does not depend on the machine's load),
with the head's last Linear zero-initialised as the reference does (the base
predates the demo recipe's final_init='default', which this study led to).
Every model is scored on the same held-out tokens (--eval-tokens, default
16,384) with Brier-1…4 ± SE, seed 0, in fp32.

Variants (names on the command line, --only a,b,c):
  base                     the base above
  init-reference           head Linears N(0, 0.02), zero biases (the reference's init)
  head-lr-3, head-lr-10    the head's learning rate × 3 / × 10 (its own param group)
  cond-gain-3              the condition path's LayerNorm gain starts at 3 (not 1)
  noise-gain-0.3           the noise path's LayerNorm gain starts at 0.3 (also -0.1)
  final-init-default       the head's last Linear keeps PyTorch's default init (not zero)
  final-init-0.02          the head's last Linear ~ N(0, 0.02), zero bias
  alpha-1.5, alpha-1.25    the energy score's exponent α (strictly proper in (0, 2))
  noise-16, noise-256      noise size 16 / 256
  latent-norm              targets divided by the RMS of the latent means (the head
                           predicts z / s; samples are multiplied back by s)
  n-4, n-16                N = 4 / 16 head samples
  width-512, blocks-2      head width 512 / 2 residual blocks
  lr-2e-3                  peak lr 2e-3
  warmdown-0.3             the LR falls linearly to 0 over the last 30 % of the steps
  batch-8x256, batch-2x1024  the same 2048 tokens per step in another shape
  flow                     the flow-matching head (midpoint, 4 steps) for comparison
  A+B                      both changes, e.g. final-init-default+warmdown-0.3
  lr-X                     peak lr X, e.g. lr-5e-4
  seedS:NAME               NAME with training seed S, e.g. seed2:base (the noise between seeds)

Usage: python benchmarks/recipe_study.py [--steps 300] [--only base,flow] [--autoencoder DIR]
Writes benchmarks/results/recipe_study.json (merged with earlier runs of other
variants) and recipe_study.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

from calm.autoencoder import health  # noqa: E402
from calm.config import CALMConfig, HeadConfig, TrainConfig, preset  # noqa: E402
from calm.data import BatchLoader, TokenDataset, eval_batches  # noqa: E402
from calm.evaluate import evaluate_model  # noqa: E402
from calm.loading import load_autoencoder  # noqa: E402
from calm.model import CALM  # noqa: E402
from calm.train import make_optimizer, train  # noqa: E402

VARIANTS = [
    "base", "init-reference", "head-lr-3", "head-lr-10", "cond-gain-3", "noise-gain-0.3",
    "noise-gain-0.1", "final-init-default", "final-init-0.02", "alpha-1.5", "alpha-1.25",
    "noise-16", "noise-256", "latent-norm", "n-4", "n-16", "width-512", "blocks-2", "lr-2e-3", "warmdown-0.3",
    "batch-8x256", "batch-2x1024", "flow",
]


class ScaledHead(nn.Module):
    """A head that works on latents divided by s: targets are scaled down, samples up."""

    def __init__(self, head: nn.Module, scale: float):
        super().__init__()
        self.inner = head
        self.scale = scale
        self.latent_size = head.latent_size

    def loss(self, h, target_mean, target_log_std, *, generator=None):
        return self.inner.loss(h, target_mean / self.scale, target_log_std - math.log(self.scale),
                               generator=generator)

    def sample_n(self, h, n, *, generator=None):
        return self.inner.sample_n(h, n, generator=generator) * self.scale

    def sample(self, h, *, generator=None):
        return self.sample_n(h, 1, generator=generator).squeeze(-2)

    def flops_per_sample(self):
        return self.inner.flops_per_sample()

    @property
    def sampling_steps(self):
        return self.inner.sampling_steps


def latent_rms(ae, ds: TokenDataset) -> float:
    batches = eval_batches(ds, "train", 512, 8, max_batches=4)
    with torch.no_grad():
        means = torch.cat([ae.encode(b.reshape(-1, 4))[0] for b in batches])
    return float(means.pow(2).mean().sqrt())


def build(name: str, ae, ds: TokenDataset, steps: int, seed: int):
    """(model, TrainConfig, optimizer or None) of one variant; 'a+b' applies both changes."""
    head = HeadConfig()
    tcfg = TrainConfig(steps=steps, batch_size=4, block_size=512, lr=1e-3, warmup_steps=50,
                       eval_every=0, log_every=10, seed=seed)
    parts = name.split("+")
    head_fields = {"noise-16": {"noise_size": 16}, "noise-256": {"noise_size": 256},
                   "n-4": {"num_samples": 4}, "n-16": {"num_samples": 16},
                   "width-512": {"width": 512}, "blocks-2": {"num_blocks": 2},
                   "flow": {"kind": "flow"}}
    for part in parts:
        if part in head_fields:
            head = dataclasses.replace(head, **head_fields[part])
        elif part.startswith("alpha-"):
            head = dataclasses.replace(head, alpha=float(part[len("alpha-"):]))
        elif part.startswith("lr-"):
            tcfg = dataclasses.replace(tcfg, lr=float(part[len("lr-"):]))
        elif part.startswith("warmdown-"):
            tcfg = dataclasses.replace(tcfg, warmdown=float(part[len("warmdown-"):]))
        elif part.startswith("batch-"):
            b, t = map(int, part[len("batch-"):].split("x"))
            tcfg = dataclasses.replace(tcfg, batch_size=b, block_size=t)
    cfg = CALMConfig(backbone=preset("transformer", "demo", vocab_size=ae.config.vocab_size,
                                     max_seq_len=max(1024, tcfg.block_size // 4)),
                     head=head, chunk_size=ae.config.chunk_size, latent_size=ae.config.latent_size)
    torch.manual_seed(seed)
    model = CALM(cfg, copy.deepcopy(ae))
    hd = model.head
    for part in parts:
        if part == "init-reference":
            for m in hd.modules():
                if isinstance(m, nn.Linear) and m is not hd.final_out:
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        elif part == "cond-gain-3":
            nn.init.constant_(hd.cond_norm.weight, 3.0)
        elif part.startswith("noise-gain-"):
            nn.init.constant_(hd.noise_norm.weight, float(part[len("noise-gain-"):]))
        elif part == "final-init-default":
            hd.final_out.reset_parameters()
        elif part == "final-init-0.02":
            nn.init.normal_(hd.final_out.weight, std=0.02)
        elif part == "latent-norm":
            model.head = ScaledHead(hd, latent_rms(ae, ds))
    head_lr = [p for p in parts if p.startswith("head-lr-")]
    opt = None
    if head_lr:
        mult = float(head_lr[0][len("head-lr-"):])
        opt = make_optimizer(model, tcfg, torch.device("cpu"))
        head_ids = {id(p) for p in model.head.parameters()}
        groups = []
        for g in opt.param_groups:
            for is_head in (False, True):
                ps = [p for p in g["params"] if (id(p) in head_ids) == is_head]
                if ps:
                    groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps,
                                   "lr_mult": mult if is_head else 1.0})
        opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
        _scale_group_lrs(opt)
    return model, tcfg, opt


def _scale_group_lrs(opt: torch.optim.Optimizer) -> None:
    """The loop sets every group's lr each step; a pre-step hook applies each group's multiplier."""

    def hook(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * g.get("lr_mult", 1.0)

    def undo(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] / g.get("lr_mult", 1.0)

    opt.register_step_pre_hook(hook)
    opt.register_step_post_hook(undo)


def run_variant(name: str, ae, ds, args) -> dict:
    seed = 1337
    base_name = name
    if name.startswith("seed") and ":" in name:
        seed, base_name = int(name[4 : name.index(":")]), name[name.index(":") + 1 :]
    unknown = [p for p in base_name.split("+") if p not in VARIANTS and not p.startswith("lr-")]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; see --help")
    model, tcfg, opt = build(base_name, ae, ds, args.steps, seed)
    loader = BatchLoader(ds, "train", tcfg.block_size, tcfg.batch_size, seed=seed, chunk_size=4)
    t0 = time.perf_counter()
    res = train(model, tcfg, iter(loader), run_dir=None, optimizer=opt, progress=False,
                handle_signals=False, precision=args.precision, desc=name)
    wall = time.perf_counter() - t0
    ev = evaluate_model(model, ds, "val", block_size=512, batch_size=8, max_tokens=args.eval_tokens,
                        seed=0, precision="fp32")
    out = {"variant": name, "steps": res.step, "train_seconds": wall,
           "tokens_per_s": res.tokens_per_second, "train_loss": res.last_metrics.get("loss"),
           **{k: ev[k] for k in ev if k.startswith("brier") or k in ("energy_loss", "tokens")}}
    print(f"{name}: Brier-1 {out['brier_1']:.4f} ± {out['brier_1_se']:.4f}, Brier-2 "
          f"{out['brier_2']:.4f}, energy loss {out.get('energy_loss', float('nan')):.3f}, "
          f"{wall:.0f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", default=",".join(VARIANTS))
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--autoencoder", type=Path, default=Path("runs/study/ae"))
    p.add_argument("--ae-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--name", default="recipe_study",
                   help="results/NAME.json and .png (runs of another --steps go to another name)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from calm.cli import main as calm_main

    if not (args.data / "meta.json").is_file():
        calm_main(["prepare", "--demo", "--out", str(args.data)])
    if not (args.autoencoder / "checkpoints").is_dir():
        calm_main(["train-ae", "--data", str(args.data), "--out", str(args.autoencoder),
                   "--preset", "demo", "--steps", str(args.ae_steps), "--no-progress",
                   "--precision", args.precision, "--eval-every", "100000"])
    ds = TokenDataset(args.data)
    ae, _, _ = load_autoencoder(args.autoencoder)
    h = health(ae, eval_batches(ds, "val", 512, 16), generator=torch.Generator().manual_seed(0))
    ae_fig = {"acc_sample": h["acc_sample"], "acc_mean": h["acc_mean"], "sigma": h["sigma"],
              "latent_rms": latent_rms(ae, ds), "steps": args.ae_steps}
    print(f"autoencoder: accuracy at a sampled z {100 * h['acc_sample']:.2f} %, σ {h['sigma']:.3f}, "
          f"latent RMS {ae_fig['latent_rms']:.2f}", flush=True)

    path = RESULTS / f"{args.name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    results = {r["variant"]: r for r in old.get("results", [])}
    if old.get("steps") not in (None, args.steps):
        results = {}  # another step count: not comparable
    for name in args.only.split(","):
        results[name] = run_variant(name.strip(), ae, ds, args)
        path.write_text(json.dumps({"machine": machine(), "steps": args.steps,
                                    "eval_tokens": args.eval_tokens, "autoencoder": ae_fig,
                                    "results": list(results.values())}, indent=2) + "\n")
    rows = []
    base = results.get("base")
    for r in results.values():
        d = "" if base is None or r is base else \
            f"{(r['brier_1'] - base['brier_1']) / math.hypot(r['brier_1_se'], base['brier_1_se']):+.1f}"
        rows.append([r["variant"], f"{r['brier_1']:.4f} ± {r['brier_1_se']:.4f}", d,
                     f"{r['brier_2']:.4f}", f"{r['brier_3']:.4f}", f"{r['brier_4']:.4f}",
                     f"{r['brier_lm']:.2f}", f"{r.get('energy_loss', float('nan')):.3f}",
                     f"{r['tokens_per_s']:.0f}"])
    print(table(rows, ["variant", "Brier-1 ± SE", "Δ/SE vs base", "Brier-2", "Brier-3", "Brier-4",
                       "BrierLM", "energy loss", "train tokens/s"]))
    plot(list(results.values()), RESULTS / f"{args.name}.png", args.steps)
    print(f"\nwritten to {path}")


def plot(results: list[dict], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(results) + 1.5))
    names = [r["variant"] for r in results]
    ax.barh(names, [r["brier_1"] for r in results], xerr=[2 * r["brier_1_se"] for r in results],
            color=["#888" if n == "base" else "#4a7" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("held-out Brier-1 (± 2 SE)")
    ax.set_title(f"CALM after {steps} training steps, one factor changed at a time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
