"""Evaluate a CALM or baseline checkpoint on held-out data: BrierLM (SPEC §3).

Reports Brier-1..4 with standard errors and BrierLM = 100 · (Π Brier-n)^(1/4)
(0 when any Brier-n ≤ 0). Baselines also report cross-entropy and perplexity;
CALM models report their energy loss. Windows are consecutive blocks from the
start of the split; --seed fixes every sample drawn.

Examples:
  calm eval --model runs/calm --data data/shakespeare
  calm eval --model runs/calm-m/calm --text wikitext103-test.jsonl --block-size 8192 --batch-size 1 --seed 1 --max-tokens 0
  calm eval --model runs/base --data data/shakespeare --max-tokens 32768 --json
"""

from __future__ import annotations

import argparse
import json
import math

from calm.cli.common import add_runtime_flags, precision_of
from calm.errors import CalmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="CALM or baseline run/checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset folder made by `calm prepare`")
    src.add_argument("--text", nargs="+", metavar="FILE",
                     help="text to score instead, tokenized with the model's own tokenizer: .txt "
                          "files (one document each), .jsonl (a \"text\" field per line) or folders; "
                          "documents are joined, each followed by end of text, as `calm prepare` does, and cut into windows")
    p.add_argument("--text-field", default="text", help="JSON field holding a document (--text)")
    p.add_argument("--split", default="val", help="dataset split: val (or validation) or train")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="evaluate at most this many tokens (0: all of them)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per window (default: the model's training block size, else 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the model samples")
    p.add_argument("--samples", type=int, default=2, metavar="S",
                   help="CALM: sampled n-grams per chunk start for Brier-n (default 2, the paper's "
                        "estimator; more give the same expectation at a lower variance, e.g. a "
                        "measurable Brier-4 for an undertrained model, at S/2 times the head's "
                        "and the decoder's work, and of the rollouts' when K < 4). The baseline "
                        "uses exact probabilities")
    p.add_argument("--autoencoder", default=None,
                   help="CALM: the autoencoder folder, if not where the checkpoint recorded it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_runtime_flags(p)


def _default_block(ckpt, model) -> int:
    """The block size the model was trained with (state.json), else 512; within its context."""
    block = 512
    try:
        state = json.loads((ckpt / "state.json").read_text())
        block = int(state["train_config"]["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if model.kind == "calm":
        K = model.config.chunk_size
        return min(block, model.config.backbone.max_seq_len * K) // K * K
    return min(block, model.config.max_seq_len)


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def run(args) -> int:
    from calm.data import TokenDataset
    from calm.evaluate import evaluate_model
    from calm.loading import check_same_tokenizer, checkpoint_kind, load_model
    from calm.runtime import pick_device, set_threads

    set_threads(args.threads)
    device = pick_device(args.device)
    ckpt, cfg = checkpoint_kind(args.model)
    if cfg["kind"] == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; evaluate it with `calm eval-ae`")
    if cfg["kind"] == "calm" and args.autoencoder:
        from calm.loading import load_calm

        model, ckpt, cfg = load_calm(ckpt, device, autoencoder_path=args.autoencoder)
    else:
        model, ckpt, cfg = load_model(ckpt, device)
    if args.text:
        from calm.documents import DocumentTokens
        from calm.loading import load_checkpoint_tokenizer

        dataset = DocumentTokens.from_files(args.text, load_checkpoint_tokenizer(ckpt),
                                            text_field=args.text_field,
                                            progress=not args.no_progress and not args.json)
        split = "val"
    else:
        dataset = TokenDataset(args.data)
        check_same_tokenizer(cfg, dataset, ckpt)
        split = args.split
    block = args.block_size if args.block_size is not None else _default_block(ckpt, model)
    if args.max_tokens < 0:
        raise CalmError(f"--max-tokens must be 0 (all) or positive, got {args.max_tokens}")
    if args.samples < 2:
        raise CalmError(f"--samples must be at least 2, got {args.samples}")
    r = evaluate_model(
        model, dataset, split, block_size=block, batch_size=args.batch_size,
        max_tokens=args.max_tokens or None, seed=args.seed,
        progress=not args.no_progress and not args.json,
        precision=precision_of(args, device), samples=args.samples,
    )
    r["checkpoint"] = str(ckpt)
    if args.json:
        # Strict JSON: an undefined figure (NaN standard error, infinite perplexity) is null.
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in r.items()}))
        return 0
    kind = r["kind"] + (f" (K={model.config.chunk_size})" if r["kind"] == "calm" else "")
    print(f"checkpoint   {ckpt}")
    print(f"model        {kind}")
    where = f"{dataset.path} ({dataset.documents} documents)" if args.text else r["split"]
    print(f"data         {where}: {r['tokens']} tokens in {r['windows']} windows of "
          f"{r['block_size']}" + (f"; {r['samples']} samples per chunk start" if "samples" in r else ""))
    for n in range(1, 5):
        print(f"Brier-{n}      {_fmt(r[f'brier_{n}'])} ± {_fmt(r[f'brier_{n}_se'])}"
              f"   ({r[f'count_{n}']} n-grams)")
    print(f"BrierLM      {_fmt(r['brier_lm'], 2)} ± {_fmt(r['brier_lm_se'], 2)}")
    if "cross_entropy" in r:
        print(f"cross-entropy {_fmt(r['cross_entropy'])} nats/token")
        print(f"perplexity   {r['perplexity']:.2f}")
    if "energy_loss" in r:
        print(f"energy loss  {_fmt(r['energy_loss'])}")
    return 0
