"""The one training loop, shared by the autoencoder, CALM and the baseline.

The model owns its loss: ``model(batch, generator=g) -> (loss, metrics)``.
Everything else — warm-up, gradient accumulation, clipping, validation,
checkpoints, metrics, faults — is visible here, in one explicit ``while True``
loop whose ``last_step`` flag makes sure the final validation and save always run.

Randomness of the forward (head noise, target draws, dropout) comes from a
generator seeded by (seed, global micro-batch number), never from the global RNG:
global micro-batch k of step s is number (s·A + a)·W + r for accumulation index
a of A and rank r of W. A resumed run therefore draws exactly what the
uninterrupted run drew, and W processes with A micro-batches each draw the same
numbers for the same rows as one process with W·A micro-batches (the data
loader hands rank r the same windows as that process's micro-batch).

Several processes: the model arrives already wrapped (calm.dist.wrap); metrics
and validation figures are reduced across ranks as sums, and only rank 0 logs
and writes checkpoints. Under FSDP every rank takes part in gathering the full
state dict, which rank 0 then writes in the same format as one process, so a
checkpoint does not depend on how it was trained.

Faults: a step with a non-finite loss or gradient is skipped (no update); after
``max_bad_steps`` of them in a row the run stops with an error that names the
last checkpoint written before the trouble (periodic saves wait for a finite
step, so no checkpoint is taken in the middle of a bad streak). SIGINT and
SIGTERM finish the current step, save and return.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm import dist
from calm.checkpoint import (
    check_resumable,
    clean_partial_checkpoints,
    join_optimizer_state,
    prune_checkpoints,
    read_config,
    read_state,
    read_tensors,
    read_weights,
    resume_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from calm.config import TrainConfig, to_dict
from calm.errors import CalmError
from calm.precision import autocast, default_precision, resolve_precision


class NonFiniteTraining(CalmError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up to the peak, then constant (the reference's schedule), then, with
    ``cfg.warmdown`` > 0, a linear fall to 0 over that last fraction of the run.

    ``progress`` in [0, 1]: how far the run is (default step / steps; a time-budgeted
    run passes the larger of that and its share of the budget used)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.warmdown > 0:
        done = step / max(cfg.steps, 1) if progress is None else progress
        left = 1.0 - min(max(done, 0.0), 1.0)
        if left < cfg.warmdown:
            return cfg.lr * left / cfg.warmdown
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight matrices decay, the rest does not.

    Token embeddings do not decay either: a rare token's row gets a gradient only
    when the token occurs, but decoupled decay shrinks it at every step, which
    costs small-data runs their rare words (measured on the demo autoencoder).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    sharded = any(type(p).__name__ == "DTensor" for p in params)  # FSDP2 parameters
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        # One fused kernel per step instead of a dozen passes over every parameter:
        # on a CPU the optimizer step of a small model is otherwise a sixth of the step.
        fused=(device.type in ("cuda", "cpu") and not sharded) or None,
    )


def micro_batch_seed(seed: int, index: int) -> int:
    """Seed of the generator for global micro-batch ``index`` (63 bits)."""
    digest = hashlib.sha256(f"calm-train:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        # Strict JSON has no NaN or inf: a non-finite figure is written as null.
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
        }
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as e:
            raise CalmError(f"cannot write {self.path}: {e.strerror or e}") from None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (and a line cut short by a crash): on a resume
        from step N, the steps after N are about to be redone."""
        if self.path is None or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float]
    last_eval: dict[str, float]
    checkpoint: Path | None
    tokens_per_second: float
    stopped_by: str | None = None
    """The signal that stopped the run early (``SIGINT``/``SIGTERM``), else None."""


# ----------------------------------------------------------------------------- state


def _checkpoint_keys(core: nn.Module) -> list[str]:
    sd = core.checkpoint_state() if hasattr(core, "checkpoint_state") else core.state_dict()
    return list(sd)


def _param_order(core: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's numbering (the order of its param groups)."""
    names = {id(p): n for n, p in core.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _gather_state(model: nn.Module, opt: torch.optim.Optimizer, main: bool):
    """(weights to save, optimizer state dict) on rank 0, (None, None) elsewhere.

    Under FSDP this is a collective: every rank sends its shards, rank 0 receives
    full tensors (on the CPU) and renumbers the optimizer state from parameter
    names to the optimizer's integer ids, the format of a one-process run.
    """
    core = dist.unwrap(model)
    keys = set(_checkpoint_keys(core))
    if dist.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, opt, options=opts)
        if not main:
            return None, None
        index = {n: i for i, n in enumerate(_param_order(core, opt))}
        osd = {
            "state": {index[n]: st for n, st in osd["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
            ],
        }
        return {k: v for k, v in weights.items() if k in keys}, osd
    if not main:
        return None, None
    sd = core.state_dict()
    return {k: sd[k] for k in sd if k in keys}, opt.state_dict()


def _load_state(model: nn.Module, opt: torch.optim.Optimizer, ckpt: Path) -> None:
    """Weights and optimizer state of ``ckpt`` into the (possibly wrapped) model."""
    core = dist.unwrap(model)
    weights = read_weights(ckpt)
    keys = _checkpoint_keys(core)
    own = core.state_dict()
    missing, unexpected = sorted(set(keys) - set(weights)), sorted(set(weights) - set(keys))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CalmError(f"cannot resume {ckpt}: its weights do not match the model ({what})")
    for k, v in weights.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CalmError(
                f"cannot resume {ckpt}: weight {k} has shape {tuple(v.shape)}, "
                f"the model needs {tuple(own[k].shape)}"
            )
    osd = join_optimizer_state(
        read_tensors(ckpt / "optimizer.safetensors"),
        json.loads((ckpt / "optimizer.json").read_text()),
    )
    try:
        if dist.is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, weights, options=full)
            order = _param_order(core, opt)
            named = {
                "state": {order[i]: st for i, st in osd["state"].items()},
                "param_groups": [
                    {**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]
                ],
            }
            set_optimizer_state_dict(model, opt, named, options=full)
        else:
            core.load_state_dict(weights, strict=False)
            opt.load_state_dict(osd)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CalmError(f"cannot resume {ckpt}: the optimizer state does not fit ({e})") from None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second one acts at once."""

    def __init__(self, enabled: bool):
        self.received: str | None = None
        self._old: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
        print(
            f"\n{self.received}: finishing the current step, then saving a checkpoint "
            "(send it again to quit at once)",
            file=sys.stderr, flush=True,
        )

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- run set-up


def prepare_run(prepare: Callable[[], None], resume: str | None, run_dir: Path) -> Path | None:
    """Rank 0 readies the run folder (``prepare``) and resolves ``--resume``
    (``auto``: the newest valid checkpoint of ``run_dir``, damaged ones skipped with
    a message; None when there is none yet); every rank gets the same answer."""
    answer: tuple[str, str | None] = ("ok", None)
    if dist.is_main():
        try:
            prepare()
            ckpt = resume_checkpoint(resume, run_dir) if resume else None
            if resume == "auto" and ckpt is None:
                print(f"--resume auto: no checkpoint in {run_dir} yet, starting from scratch")
            answer = ("ok", str(ckpt) if ckpt else None)
        except CalmError as e:
            answer = ("error", str(e))
    answer = dist.broadcast_object(answer)
    if answer[0] == "error":
        raise CalmError(answer[1])
    return Path(answer[1]) if answer[1] else None


def sharded_batches(dataset, cfg: TrainConfig, *, chunk_size: int = 1):
    """This rank's training stream and validation batches.

    Training: rank r of W reads global micro-batches r, r + W, ... (BatchLoader).
    Validation: the first ``cfg.eval_batches`` batches, cut to a multiple of W so
    that every rank runs the same number of forwards (FSDP needs them in step).
    """
    from calm.data import BatchLoader, eval_batches

    W, R = dist.world_size(), dist.rank()
    rows = cfg.batch_size * cfg.grad_accum * W
    windows = dataset.num_tokens("train") // cfg.block_size
    if W > 1 and rows > windows:
        raise CalmError(
            f"{W} processes × batch {cfg.batch_size} × accumulation {cfg.grad_accum} = {rows} "
            f"sequences per step, but the training split holds only {windows} windows of "
            f"{cfg.block_size} tokens; use fewer processes or a smaller batch"
        )
    loader = BatchLoader(dataset, "train", cfg.block_size, cfg.batch_size, seed=cfg.seed,
                         rank=R, world_size=W, chunk_size=chunk_size)
    total = len(eval_batches(dataset, "val", cfg.block_size, cfg.batch_size,
                             max_batches=cfg.eval_batches))
    if W > 1 and total < W:
        raise CalmError(
            f"the validation split gives {total} batch(es) of {cfg.batch_size} × {cfg.block_size} "
            f"tokens, fewer than the {W} processes; use fewer processes or a smaller batch"
        )
    val = eval_batches(dataset, "val", cfg.block_size, cfg.batch_size,
                       max_batches=total - total % W, rank=R, world_size=W)
    return loader, val


# ----------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    cfg: TrainConfig,
    batches: Iterator[torch.Tensor],
    *,
    run_dir: Path | None,
    checkpoint_config: dict[str, Any] | None = None,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    tokenizer=None,
    device: torch.device | str = "cpu",
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    loader_state: Callable[[], dict] | None = None,
    flops_per_token: float | None = None,
    progress: bool = True,
    desc: str = "train",
    keep_checkpoints: int = 0,
    resume: Path | None = None,
    max_bad_steps: int = 10,
    handle_signals: bool = True,
    time_limit: float | None = None,
    precision: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; return the final figures.

    ``model`` may be wrapped by ``calm.dist.wrap``. ``batches`` yields this rank's
    (B, T) token tensors; when it is a ``BatchLoader`` its position is saved and
    restored. ``evaluate(model)`` returns validation figures, each a number or a
    (sum, count) pair reduced across ranks (called every ``cfg.eval_every`` steps
    and at the end, in eval mode). Checkpoints go to ``run_dir/checkpoints/step_N``
    every ``cfg.save_every`` steps, at the end and on SIGINT/SIGTERM; the newest
    ``keep_checkpoints`` are kept (0: all). ``resume``: a validated checkpoint to
    continue from (model, optimizer, step, data position, RNG). A run stops with
    ``NonFiniteTraining`` after ``max_bad_steps`` non-finite steps in a row (0: never).
    ``flops_per_token`` (training FLOPs) adds a running FLOPs count. ``time_limit``
    (seconds of training) ends a run early, e.g. a quickstart's budget.
    ``precision``: 'auto', 'fp32' or 'bf16' (autocast over fp32 weights and optimizer
    state; calm.precision); None takes ``$CALM_PRECISION``, else 'auto'.
    """
    device = torch.device(device)
    # Every rank runs at rank 0's choice (the timing behind 'auto' could differ per process).
    precision = dist.broadcast_object(resolve_precision(precision or default_precision(), device))
    core = dist.unwrap(model)
    if core is model and not dist.is_fsdp(model):
        model.to(device)
    W, R = dist.world_size(), dist.rank()
    main = R == 0
    opt = optimizer or make_optimizer(model, cfg, device)
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None and main else None)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = batches if hasattr(batches, "load_state_dict") else None
    if loader_state is None and loader is not None:
        loader_state = loader.state_dict
    fwd = inspect.signature(core.forward).parameters
    takes_generator = "generator" in fwd or any(p.kind is p.VAR_KEYWORD for p in fwd.values())
    eval_model = core  # DDP: the bare module (no gradient hooks); FSDP: the sharded module itself
    rows_per_step = cfg.batch_size * cfg.grad_accum * W

    def say(msg: str) -> None:
        if not main:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def save(step: int) -> Path | None:
        if run_dir is None:
            return None
        weights, osd = _gather_state(model, opt, main)  # a collective under FSDP
        path = None
        if main:
            state = {
                "step": step,
                "train_config": to_dict(cfg),
                "data": loader_state() if loader_state else None,
                "tokens_seen": step * rows_per_step * cfg.block_size,
                "world_size": W,
            }
            path = save_checkpoint(
                run_dir / "checkpoints" / step_dir_name(step),
                model_state=weights,
                config=checkpoint_config or {},
                state=state,
                optimizer=osd,
                rng=_rng_state(device),
                tokenizer=tokenizer,
            )
            prune_checkpoints(run_dir, keep_checkpoints)
        dist.barrier()
        return path

    step = start_step
    ckpt: Path | None = None
    if resume is not None:
        resume = Path(resume)
        if checkpoint_config is not None:
            check_resumable(read_config(resume), checkpoint_config, resume)
        _load_state(model, opt, resume)
        state = read_state(resume)
        step = int(state["step"])
        if loader is not None and state.get("data"):
            loader.load_state_dict(state["data"])
        _set_rng_state(read_tensors(resume / "rng.safetensors"), device)
        ckpt = resume
    start = step
    if run_dir is not None and main:
        clean_partial_checkpoints(run_dir)
        log.truncate_after(step)

    last_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    skipped = 0
    bad_in_row = 0
    save_due = False
    stopping = False
    time_up = False
    t_train = 0.0  # seconds spent in optimizer steps (excludes eval and saving)
    tokens_done = 0
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
            file=sys.stderr,
        )
    if main:
        print(
            f"{desc}: global batch {rows_per_step} sequences = {cfg.batch_size} per device × "
            f"{cfg.grad_accum} accumulation × {W} process{'es' if W > 1 else ''} "
            f"({rows_per_step * cfg.block_size} tokens per step), {precision}"
            + (f"; resuming from {resume} at step {step}" if resume is not None else ""),
            flush=True,
        )
    signals = _StopSignals(handle_signals)
    try:
        while True:
            last_step = step >= cfg.steps or time_up
            if evaluate is not None and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > start)):
                model.eval()
                with torch.no_grad(), autocast(device, precision):
                    figures = evaluate(eval_model)
                model.train()
                last_eval = {f"val/{k}": v for k, v in dist.reduce_eval(figures).items()}
                log.write({"step": step, **last_eval})
                say(f"step {step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in last_eval.items()))
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step > start:
                save_due = True
            # A periodic save waits for a finite step: never checkpoint inside a bad streak.
            if run_dir is not None and (last_step or stopping or (save_due and bad_in_row == 0)):
                ckpt = save(step)
                save_due = False
            if last_step or stopping:
                break

            # ---- one optimizer step
            t0 = time.perf_counter()
            progress = step / max(cfg.steps, 1)
            if time_limit is not None:
                progress = max(progress, t_train / time_limit)
            lr = lr_at(step, cfg, progress)
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            sums: dict[str, float] = {}
            step_tokens = 0
            for a in range(cfg.grad_accum):
                batch = next(batches).to(device, non_blocking=True)
                step_tokens += batch.numel()
                kwargs = {}
                if takes_generator:
                    index = (step * cfg.grad_accum + a) * W + R  # global micro-batch number
                    gen = torch.Generator(device=device)
                    kwargs["generator"] = gen.manual_seed(micro_batch_seed(cfg.seed, index))
                # DDP / FSDP reduce gradients on the last micro-batch of the step only.
                with dist.no_sync(model, a == cfg.grad_accum - 1):
                    with autocast(device, precision):
                        loss, metrics = model(batch, **kwargs)
                    (loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            # One reduction per step: metric sums, the micro-batch count, and the
            # decisions every rank must take together (a stop request, the time budget).
            sums["_stop"] = 1.0 if signals.received else 0.0
            elapsed = t_train + time.perf_counter() - t0
            sums["_time_up"] = 1.0 if time_limit is not None and elapsed >= time_limit else 0.0
            reduced = dist.reduce_means(sums, cfg.grad_accum)
            stopping = reduced.pop("_stop") > 0
            time_up = reduced.pop("_time_up") > 0
            last_metrics = reduced
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            finite = math.isfinite(last_metrics.get("loss", 0.0)) and math.isfinite(grad_norm)
            if finite:
                opt.step()
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            t_train += dt
            step_tokens *= W
            tokens_done += step_tokens
            tps = tokens_done / max(t_train, 1e-9)
            if bar is not None:
                shown = {k: f"{v:.4g}" for k, v in last_metrics.items() if k in ("loss", "acc", "ce")}
                bar.set_postfix(**shown, tok_s=f"{tps:.0f}", refresh=False)
                if time_limit is not None and step > start:
                    # A time budget: the bar's end is the step the budget will reach.
                    per_step = t_train / (step - start)
                    reach = step + int(max(0.0, time_limit - t_train) / per_step)
                    bar.total = max(step + 1, min(cfg.steps, reach))
                bar.update(1)
            if not finite or step % cfg.log_every == 0 or step == cfg.steps:
                record = {
                    "step": step,
                    "lr": lr,
                    **last_metrics,
                    "grad_norm": grad_norm,
                    "tokens": step * step_tokens,
                    "tokens_per_s": tps,
                    "skipped_steps": skipped,
                    "time": t_train,
                }
                if flops_per_token is not None:
                    record["train_flops"] = flops_per_token * step * step_tokens
                log.write(record)
            if not finite:
                say(f"step {step}: non-finite loss or gradient, update skipped "
                    f"({bad_in_row} in a row)")
                if max_bad_steps > 0 and bad_in_row >= max_bad_steps:
                    where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was saved"
                    raise NonFiniteTraining(
                        f"stopped at step {step}: {bad_in_row} steps in a row had a non-finite loss "
                        f"or gradient; {where} (resume from it with a lower --lr, or raise "
                        "--max-bad-steps)"
                    )
    finally:
        signals.restore()
        if bar is not None:
            bar.close()
    if stopping and main:
        print(
            f"{desc}: stopped by {signals.received or 'a signal on another rank'} at step {step}; "
            f"checkpoint {ckpt}; continue with --resume auto",
            file=sys.stderr, flush=True,
        )
    return TrainResult(
        step=step,
        last_metrics=last_metrics,
        last_eval=last_eval,
        checkpoint=ckpt,
        tokens_per_second=tokens_done / max(t_train, 1e-9),
        stopped_by=(signals.received or "signal") if stopping else None,
    )
