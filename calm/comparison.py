"""Comparison of trained runs in the paper's Table 1 form: rows read from run folders.

``run_row`` gathers one run's figures (parameters, training FLOPs, inference FLOPs
per token, the Brier figures of its ``eval.json``); ``evaluate_run`` writes that
``eval.json``; ``markdown_table`` formats rows. ``calm compare`` and the run
reports (calm.report) print them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from calm.errors import CalmError

EVAL_FILE = "eval.json"
EVAL_KEYS = (
    [f"brier_{n}" for n in range(1, 5)]
    + [f"brier_{n}_se" for n in range(1, 5)]
    + ["brier_lm", "brier_lm_se", "cross_entropy", "perplexity", "energy_loss"]
)
DASH = "–"


def read_metrics(run_dir: Path) -> tuple[float | None, int | None, int | None]:
    """(last train_flops, last tokens count, last step) logged in RUN/metrics.jsonl."""
    flops = tokens = step = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None, None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("train_flops"), (int, float)):
            flops = float(rec["train_flops"])
        if isinstance(rec.get("tokens"), (int, float)):
            tokens = int(rec["tokens"])
        if isinstance(rec.get("step"), int):
            step = rec["step"]
    return flops, tokens, step


def read_eval(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalmError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CalmError(f"{path} must hold a JSON object")
    return data


def preset_name(backbone: dict) -> str | None:
    """The backbone preset whose sizes these are (vocabulary and context aside), if any."""
    from calm.config import PRESETS

    keys = ("hidden_size", "intermediate_size", "num_layers", "num_heads")
    for name, cfg in PRESETS["transformer"].items():
        if all(backbone.get(k) == getattr(cfg, k) for k in keys):
            return name
    return None


def model_label(kind: str, model_cfg: dict) -> str:
    if kind == "calm":
        name = preset_name(model_cfg.get("backbone") or {})
        return f"CALM{'-' + name if name else ''} (K={model_cfg.get('chunk_size')})"
    name = preset_name(model_cfg)
    return f"Transformer{'-' + name if name else ''}"


def run_row(run_dir: Path, context: int | None = None) -> dict[str, Any]:
    """One row of the table for a run folder."""
    from calm.checkpoint import read_state
    from calm.flops import (
        DEFAULT_BLOCK,
        inference_flops_per_token,
        model_from_checkpoint,
        parameter_counts,
        training_flops_per_token,
    )
    from calm.loading import checkpoint_kind

    run_dir = Path(run_dir)
    ckpt, cfg = checkpoint_kind(run_dir)
    model, _, block = model_from_checkpoint(ckpt)
    block = block or DEFAULT_BLOCK
    per_token = training_flops_per_token(model, block)
    flops, tokens, step = read_metrics(run_dir)
    state = read_state(ckpt)
    if tokens is None and isinstance(state.get("tokens_seen"), (int, float)):
        tokens = int(state["tokens_seen"])
    source = "metrics"
    if flops is None:
        flops = per_token * tokens if tokens is not None else None
        source = "tokens × per-token" if tokens is not None else None
    params = parameter_counts(model)
    ev = read_eval(run_dir)
    row: dict[str, Any] = {
        "run": str(run_dir),
        "model": model_label(cfg["kind"], cfg.get("model") or {}),
        "kind": cfg["kind"],
        "chunk_size": model.config.chunk_size if cfg["kind"] == "calm" else 1,
        "checkpoint": str(ckpt),
        "step": step if step is not None else state.get("step"),
        "params": params["trainable"],
        "params_total": params["total"],
        "params_non_embedding": params["non_embedding"],
        "block_size": block,
        "tokens": tokens,
        "train_flops": flops,
        "train_flops_source": source,
        "train_flops_per_token": per_token,
        "context": context or block,
        "infer_flops_per_token": inference_flops_per_token(model, context or block),
    }
    row.update({k: ev.get(k) for k in EVAL_KEYS})
    row["eval_tokens"] = ev.get("tokens")
    return row


# ----------------------------------------------------------------------------- evaluation


def evaluate_run(
    run_dir: Path,
    data: str | Path,
    *,
    device=None,
    block_size: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = 65536,
    seed: int = 0,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate the run's latest checkpoint on a dataset and save RUN/eval.json."""
    from calm.checkpoint import read_state
    from calm.data import TokenDataset
    from calm.evaluate import evaluate_model
    from calm.loading import check_same_tokenizer, load_model

    model, ckpt, cfg = load_model(run_dir, device or "cpu")
    if cfg["kind"] == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; compare CALM and baseline runs")
    dataset = TokenDataset(data)
    check_same_tokenizer(cfg, dataset, ckpt)
    block = block_size or (read_state(ckpt).get("train_config") or {}).get("block_size") or 512
    K = model.config.chunk_size if cfg["kind"] == "calm" else 1
    limit = (
        (model.config.backbone.max_seq_len * K)
        if cfg["kind"] == "calm"
        else model.config.max_seq_len
    )
    block = min(int(block), limit) // K * K
    r = evaluate_model(
        model,
        dataset,
        split="val",
        block_size=block,
        batch_size=batch_size,
        max_tokens=max_tokens,
        seed=seed,
        precision=precision,
    )
    r = dict(r)
    r["checkpoint"] = str(ckpt)
    (Path(run_dir) / EVAL_FILE).write_text(json.dumps(r, indent=2) + "\n")
    return r


# ----------------------------------------------------------------------------- formatting


def _num(x, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return f"{x:.{digits}f}"


def _sci(x) -> str:
    """1.234e+20 → 1.23e20."""
    if x is None:
        return DASH
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    m = x / 10**e
    if round(m, 2) >= 10:
        m, e = m / 10, e + 1
    return f"{m:.2f}e{e}"


def _count(n) -> str:
    if n is None:
        return DASH
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "run",
        "model",
        "params",
        "tokens",
        "train FLOPs",
        "infer FLOPs/token",
        "Brier-1",
        "Brier-2",
        "Brier-3",
        "Brier-4",
        "BrierLM",
        "PPL",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        brier_lm = _num(r.get("brier_lm"), 2)
        if brier_lm != DASH and _num(r.get("brier_lm_se"), 2) != DASH:
            brier_lm += f" ± {_num(r['brier_lm_se'], 2)}"
        cells = [
            Path(r["run"]).name or r["run"],
            r["model"],
            _count(r["params"]),
            _sci(r["tokens"]),
            _sci(r["train_flops"]),
            _sci(r["infer_flops_per_token"]),
            *(_num(r.get(f"brier_{n}"), 4) for n in range(1, 5)),
            brier_lm,
            _num(r.get("perplexity"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ctx = sorted({r["context"] for r in rows})
    note = (
        f"Inference FLOPs per generated token at a context of {', '.join(map(str, ctx))} tokens; "
        "params are trainable parameters (CALM's frozen autoencoder not included)."
    )
    lines += ["", note]
    return "\n".join(lines)
