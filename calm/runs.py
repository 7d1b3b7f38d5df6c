"""Training runs: a job in, a trained run folder out.

`calm train-ae`, `calm train` and `calm train-baseline` turn their arguments into
a job (what to train) and `RunSettings` (where, on what, for how long) once, then
call `train_autoencoder` or `train_language_model`. These open the dataset,
resolve the preset, its recipe and the job's overrides into the model's config,
build the model, and hand it to the loop in `calm.train`.

A job keeps its overrides as the fields the user set, apart from the preset:
the rest of a model's config depends on the data (vocabulary) and, for CALM, on
the autoencoder (K, latent size), known only once they are opened.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm import dist
from calm.checkpoint import has_checkpoint
from calm.config import (
    AutoencoderConfig,
    CALMConfig,
    HeadConfig,
    TrainConfig,
    preset,
    to_dict,
)
from calm.errors import CalmError
from calm.recipes import recipe


@dataclass(frozen=True)
class RunSettings:
    """Where a run writes, what it runs on, and how it ends."""

    out: Path
    overwrite: bool = False
    resume: str | None = None
    keep_checkpoints: int = 0
    max_bad_steps: int = 10
    max_minutes: float | None = None
    dist: str | None = None
    device: str = "auto"
    threads: int = 0
    precision: str | None = None
    """'auto', 'fp32' or 'bf16'; None: $CALM_PRECISION, else auto"""
    progress: bool = True

    def __post_init__(self):
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise CalmError(f"--max-minutes must be positive, got {self.max_minutes}")

    @property
    def time_limit(self) -> float | None:
        return None if self.max_minutes is None else 60.0 * self.max_minutes


@dataclass(frozen=True)
class AutoencoderJob:
    data: Path
    preset: str = "demo"
    model: dict[str, Any] = field(default_factory=dict)
    """AutoencoderConfig fields that override the preset's"""
    train: TrainConfig | None = None
    """None: the preset's recipe"""


@dataclass(frozen=True)
class LanguageModelJob:
    kind: str
    """'calm' or 'baseline'"""
    data: Path
    preset: str = "demo"
    backbone: dict[str, Any] = field(default_factory=dict)
    """TransformerConfig fields that override the preset's"""
    head: dict[str, Any] = field(default_factory=dict)
    """HeadConfig fields that override the recipe's (CALM only)"""
    input_scheme: str = "discrete"
    token_loss_weight: float = 0.0
    autoencoder: str | None = None
    init_from: str | None = None
    """fine-tune from this checkpoint, keeping its architecture"""
    train: TrainConfig | None = None
    """None: the preset's recipe"""
    eval_brier: bool = False
    eval_brier_tokens: int = 8192


def checked_train_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, or a one-line error naming the flag that is out of range."""
    for name in ("steps", "batch_size", "block_size", "grad_accum"):
        if getattr(cfg, name) <= 0:
            raise CalmError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise CalmError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.warmdown < 1:
        raise CalmError(f"--warmdown must be in [0, 1), got {cfg.warmdown}")
    return cfg


def prepare_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to clobber an existing checkpoint; clear it (metrics included) on --overwrite.
    With ``resume`` an existing run folder is continued, not refused."""
    if out.exists() and not out.is_dir():
        raise CalmError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise CalmError("--resume and --overwrite contradict each other; pass one of them")
    if has_checkpoint(out) and not resume:
        if not overwrite:
            raise CalmError(f"{out} already holds a checkpoint; pass --overwrite to replace it")
        import shutil

        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "config.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _check_writable(out)


def _check_writable(folder: Path) -> None:
    probe = folder / ".calm-write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CalmError(f"cannot write to {folder}: {e.strerror or e}") from None


def _start(settings: RunSettings):
    """Threads, device (and the process group under torchrun), precision."""
    from calm.precision import default_precision, resolve_precision
    from calm.runtime import pick_device, set_threads

    set_threads(settings.threads)
    env = dist.setup(pick_device(settings.device))  # under torchrun: cuda:LOCAL_RANK
    precision = resolve_precision(settings.precision or default_precision(), env.device)
    return env, precision


def _prepare(settings: RunSettings) -> Path | None:
    from calm.train import prepare_run

    return prepare_run(lambda: prepare_out_dir(settings.out, settings.overwrite,
                                               resume=bool(settings.resume)),
                       settings.resume, settings.out)


def _loop(model, tcfg: TrainConfig, loader, settings: RunSettings, env, precision: str, *,
          evaluate, checkpoint_config: dict, tokenizer, resume, desc: str, flops=None):
    from calm.train import train

    return train(
        model, tcfg, iter(loader), run_dir=settings.out, device=env.device, evaluate=evaluate,
        checkpoint_config=checkpoint_config, tokenizer=tokenizer, loader_state=loader.state_dict,
        flops_per_token=flops, progress=settings.progress, desc=desc,
        time_limit=settings.time_limit, resume=resume, keep_checkpoints=settings.keep_checkpoints,
        max_bad_steps=settings.max_bad_steps, precision=precision,
    )


def autoencoder_config(job: AutoencoderJob, vocab_size: int) -> AutoencoderConfig:
    cfg = preset("autoencoder", job.preset, vocab_size=vocab_size, **job.model)
    if cfg.chunk_size <= 0 or cfg.latent_size <= 0 or cfg.hidden_size <= 0:
        raise CalmError("chunk, latent and hidden sizes must be positive")
    return cfg


def train_autoencoder(job: AutoencoderJob, settings: RunSettings):
    """Train the chunk autoencoder (SPEC §1); prints its parameters and the final
    figures on the main process, and returns the loop's `TrainResult`."""
    from calm.autoencoder import Autoencoder, health
    from calm.data import TokenDataset
    from calm.runtime import seed_everything
    from calm.train import sharded_batches

    env, precision = _start(settings)
    dataset = TokenDataset(job.data)
    cfg = autoencoder_config(job, dataset.vocab_size)
    # The autoencoder is context-free, so the block only sets how many chunks a step sees.
    tcfg = checked_train_config(job.train or recipe("autoencoder", job.preset).train)
    if tcfg.block_size % cfg.chunk_size:
        raise CalmError(f"block size {tcfg.block_size} is not divisible by K={cfg.chunk_size}")
    loader, val = sharded_batches(dataset, tcfg, chunk_size=cfg.chunk_size)
    resume = _prepare(settings)
    seed_everything(tcfg.seed)
    model = Autoencoder(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if env.is_main:
        print(f"autoencoder: {n_params / 1e6:.2f}M parameters, K={cfg.chunk_size}, "
              f"latent {cfg.latent_size}, on {env.device}")
    model = dist.wrap(model.to(env.device), dist.default_mode(settings.dist, env.world_size),
                      env.device)

    def evaluate(m):
        # Each rank scores its share of the validation batches; the loop averages ranks.
        h = health(m, val)
        return {k: h[k] for k in ("acc_mean", "acc_sample", "sigma", "collapsed_dims")}

    result = _loop(
        model, tcfg, loader, settings, env, precision, evaluate=evaluate,
        checkpoint_config={"kind": "autoencoder", "model": to_dict(cfg),
                           "data": {"path": str(job.data), "tokenizer": dataset.fingerprint}},
        tokenizer=dataset.tokenizer, resume=resume, desc="train-ae",
    )
    if env.is_main:
        print(json.dumps({"step": result.step, **result.last_eval,
                          "tokens_per_s": round(result.tokens_per_second, 1),
                          "checkpoint": str(result.checkpoint)}))
    dist.cleanup()
    return result


def _fine_tuned(job: LanguageModelJob, dataset, tcfg: TrainConfig, device):
    """The model of ``job.init_from``, checked against the job and the data."""
    from calm.loading import check_same_tokenizer, load_model
    from calm.runtime import seed_everything

    fixed = {**job.backbone, **(job.head if job.kind == "calm" else {})}
    if fixed:
        flag = next(iter(fixed)).replace("_", "-")
        raise CalmError(f"--init-from keeps the checkpoint's architecture; drop --{flag}")
    if job.kind == "calm" and job.input_scheme != "discrete":
        raise CalmError("--init-from keeps the checkpoint's input scheme; drop --input-scheme")
    if job.kind == "calm" and job.token_loss_weight != 0:
        raise CalmError("--init-from keeps the checkpoint's token loss weight; drop "
                        "--token-loss-weight")
    model, init_ckpt, init_cfg = load_model(job.init_from, device)
    if init_cfg["kind"] != job.kind:
        raise CalmError(f"{init_ckpt} holds a {init_cfg['kind']} model; `calm "
                        f"{'train' if job.kind == 'calm' else 'train-baseline'}` needs a "
                        f"{job.kind} one")
    if job.kind == "calm" and job.autoencoder:
        raise CalmError("--init-from uses the autoencoder its checkpoint records; drop --autoencoder")
    check_same_tokenizer(init_cfg, dataset, init_ckpt)
    vocab = model.config.backbone.vocab_size if job.kind == "calm" else model.config.vocab_size
    if dataset.vocab_size > vocab:
        raise CalmError(f"the dataset's vocabulary ({dataset.vocab_size}) is larger than "
                        f"{init_ckpt}'s ({vocab})")
    chunk_size = model.config.chunk_size if job.kind == "calm" else 1
    if tcfg.block_size % chunk_size:
        raise CalmError(f"block size {tcfg.block_size} is not divisible by K={chunk_size}")
    seed_everything(tcfg.seed)
    record = {"model": init_cfg["model"], "init_from": str(init_ckpt)}
    if job.kind == "calm":
        record["autoencoder"] = init_cfg.get("autoencoder")
    return model, chunk_size, record


def _fresh_calm(job: LanguageModelJob, dataset, tcfg: TrainConfig, backbone, device):
    from calm.loading import autoencoder_record, check_same_tokenizer, load_autoencoder
    from calm.model import CALM
    from calm.runtime import seed_everything

    if not job.autoencoder:
        raise CalmError("calm train needs --autoencoder DIR (or --init-from DIR)")
    ae, ae_ckpt, ae_cfg = load_autoencoder(job.autoencoder, device)
    check_same_tokenizer(ae_cfg, dataset, ae_ckpt)
    K = ae.config.chunk_size
    if tcfg.block_size % K:
        raise CalmError(f"block size {tcfg.block_size} is not divisible by K={K}")
    chunks = tcfg.block_size // K
    if chunks < 2:
        raise CalmError(f"block size {tcfg.block_size} holds fewer than 2 chunks of K={K}")
    backbone = dataclasses.replace(backbone, max_seq_len=max(backbone.max_seq_len, chunks))
    head = dataclasses.replace(HeadConfig(), **{**recipe("calm", job.preset).head, **job.head})
    cfg = CALMConfig(backbone=backbone, head=head, chunk_size=K, latent_size=ae.config.latent_size,
                     input_scheme=job.input_scheme, token_loss_weight=job.token_loss_weight)
    seed_everything(tcfg.seed)
    return CALM(cfg, ae), K, {"model": to_dict(cfg),
                              "autoencoder": autoencoder_record(ae_ckpt, ae_cfg)}


def train_language_model(job: LanguageModelJob, settings: RunSettings):
    """Train CALM on a frozen autoencoder (SPEC §2) or the token-level baseline;
    prints the parameter count and the final figures on the main process, and
    returns the loop's `TrainResult`."""
    from calm.data import TokenDataset
    from calm.runtime import seed_everything
    from calm.train import micro_batch_seed, sharded_batches

    if job.kind not in ("calm", "baseline"):
        raise CalmError(f"unknown model kind {job.kind!r}; choose calm or baseline")
    env, precision = _start(settings)
    device = env.device
    dataset = TokenDataset(job.data)
    tcfg = checked_train_config(job.train or recipe(job.kind, job.preset).train)
    backbone = preset("transformer", job.preset, vocab_size=dataset.vocab_size, **job.backbone)
    ckpt_cfg: dict = {"kind": job.kind,
                      "data": {"path": str(job.data), "tokenizer": dataset.fingerprint}}

    if job.init_from:
        model, chunk_size, record = _fine_tuned(job, dataset, tcfg, device)
    elif job.kind == "calm":
        model, chunk_size, record = _fresh_calm(job, dataset, tcfg, backbone, device)
    else:
        from calm.baseline import TokenLM

        backbone = dataclasses.replace(
            backbone, max_seq_len=max(backbone.max_seq_len, tcfg.block_size))
        seed_everything(tcfg.seed)
        model, chunk_size, record = TokenLM(backbone), 1, {"model": to_dict(backbone)}
    ckpt_cfg.update(record)

    loader, val = sharded_batches(dataset, tcfg, chunk_size=chunk_size)
    resume = _prepare(settings)
    from calm.flops import training_flops_per_token

    flops = training_flops_per_token(model, tcfg.block_size)
    model = dist.wrap(model.to(device), dist.default_mode(settings.dist, env.world_size), device)
    n = dist.unwrap(model).trainable_parameters()
    if env.is_main:
        print(f"{job.kind}: {n / 1e6:.2f}M trainable parameters on {device}")

    brier = None
    if job.eval_brier:
        from calm.evaluate import brier_eval_fn

        brier = brier_eval_fn(dataset, block_size=tcfg.block_size, batch_size=tcfg.batch_size,
                              max_tokens=job.eval_brier_tokens, seed=tcfg.seed,
                              precision=precision)

    def evaluate(m):
        # Sums over rows, reduced across ranks by the loop; each batch draws its noise
        # from its own seed, so validation figures do not depend on the world size.
        tot, cnt = 0.0, 0
        for j, b in zip(val.batch_ids, val):
            g = torch.Generator(device=device).manual_seed(micro_batch_seed(tcfg.seed, -1 - j))
            loss, _ = m(b.to(device), generator=g)
            tot += float(loss) * len(b)
            cnt += len(b)
        figures = {"loss": (tot, cnt)}
        if brier is not None:
            figures.update(brier(m))
        return figures

    result = _loop(model, tcfg, loader, settings, env, precision, evaluate=evaluate,
                   checkpoint_config=ckpt_cfg, tokenizer=dataset.tokenizer, resume=resume,
                   desc=f"train {job.kind}", flops=flops)
    if env.is_main:
        print(json.dumps({"step": result.step,
                          **{k: round(v, 5) for k, v in result.last_metrics.items()},
                          **result.last_eval, "tokens_per_s": round(result.tokens_per_second, 1),
                          "checkpoint": str(result.checkpoint)}))
    dist.cleanup()
    return result
