"""The one training loop, shared by the autoencoder, CALM and the baseline.

The model owns its loss: ``model(batch) -> (loss, metrics)``. Everything else —
warm-up, gradient accumulation, clipping, validation, checkpoints, metrics — is
visible here, in one explicit ``while True`` loop whose ``last_step`` flag makes
sure the final validation and save always run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.checkpoint import prune_checkpoints, save_checkpoint, step_dir_name
from calm.config import TrainConfig, to_dict


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then constant (the reference's schedule)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda" or None,
    )


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPUs here lack fast bf16)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float]
    last_eval: dict[str, float]
    checkpoint: Path | None
    tokens_per_second: float


def _mean_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


def train(
    model: nn.Module,
    cfg: TrainConfig,
    batches: Iterator[torch.Tensor],
    *,
    run_dir: Path | None,
    checkpoint_config: dict[str, Any] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    tokenizer=None,
    device: torch.device | str = "cpu",
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    loader_state: Callable[[], dict] | None = None,
    flops_per_token: float | None = None,
    progress: bool = True,
    desc: str = "train",
    keep_checkpoints: int = 0,
    time_limit: float | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; return the final figures.

    ``batches`` yields (B, T) token tensors; ``evaluate(model)`` returns validation
    figures (called every ``cfg.eval_every`` steps and at the end, in eval mode);
    checkpoints go to ``run_dir/checkpoints/step_N`` every ``cfg.save_every`` steps
    and at the end. ``flops_per_token`` (training FLOPs) adds a running FLOPs count.
    """
    device = torch.device(device)
    model.to(device)
    opt = optimizer or make_optimizer(model, cfg, device)
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None else None)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> Path | None:
        if run_dir is None:
            return None
        state = {
            "step": step,
            "train_config": to_dict(cfg),
            "data": loader_state() if loader_state else None,
            "tokens_seen": step * tokens_per_step,
        }
        path = save_checkpoint(
            run_dir / "checkpoints" / step_dir_name(step),
            model_state=(
                model.checkpoint_state() if hasattr(model, "checkpoint_state") else model.state_dict()
            ),
            config=checkpoint_config or {},
            state=state,
            optimizer=opt,
            rng={"torch": torch.get_rng_state()},
            tokenizer=tokenizer,
        )
        prune_checkpoints(run_dir, keep_checkpoints)
        return path

    step = start_step
    tokens_per_step = 0
    last_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    ckpt: Path | None = None
    skipped = 0
    t_train = 0.0  # seconds spent in optimizer steps (excludes eval and saving)
    tokens_done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
            file=sys.stderr,
        )
    try:
        while True:
            # time_limit (seconds of training) ends a run early, e.g. a quickstart's budget.
            last_step = step >= cfg.steps or (time_limit is not None and t_train >= time_limit)
            if evaluate is not None and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > start_step)):
                model.eval()
                with torch.no_grad(), autocast_for(device):
                    last_eval = {f"val/{k}": float(v) for k, v in evaluate(model).items()}
                model.train()
                log.write({"step": step, **last_eval})
                if bar is not None:
                    bar.write(
                        f"step {step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in last_eval.items())
                    )
            if run_dir is not None and (last_step or (cfg.save_every > 0 and step % cfg.save_every == 0 and step > start_step)):
                ckpt = save(step)
            if last_step:
                break

            # ---- one optimizer step
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            sums: dict[str, float] = {}
            step_tokens = 0
            for _ in range(cfg.grad_accum):
                batch = next(batches).to(device, non_blocking=True)
                step_tokens += batch.numel()
                with autocast_for(device):
                    loss, metrics = model(batch)
                (loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            tokens_per_step = step_tokens
            finite = math.isfinite(sums.get("loss", 0.0))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            finite = finite and bool(torch.isfinite(grad_norm))
            if finite:
                opt.step()
            else:
                skipped += 1  # a non-finite loss or gradient: skip the update, count it
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            t_train += dt
            tokens_done += step_tokens
            last_metrics = _mean_metrics(sums, cfg.grad_accum)
            tps = tokens_done / max(t_train, 1e-9)
            if bar is not None:
                shown = {k: f"{v:.4g}" for k, v in last_metrics.items() if k in ("loss", "acc", "ce")}
                bar.set_postfix(**shown, tok_s=f"{tps:.0f}", refresh=False)
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {
                    "step": step,
                    "lr": lr,
                    **last_metrics,
                    "grad_norm": float(grad_norm),
                    "tokens": step * step_tokens,
                    "tokens_per_s": tps,
                    "skipped_steps": skipped,
                    "time": t_train,
                }
                if flops_per_token is not None:
                    record["train_flops"] = flops_per_token * step * step_tokens
                log.write(record)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(
        step=step,
        last_metrics=last_metrics,
        last_eval=last_eval,
        checkpoint=ckpt,
        tokens_per_second=tokens_done / max(t_train, 1e-9),
    )
