"""Training and inference FLOPs of a model, part by part (paper §7.2, Table 1).

Counts matrix products in closed form (calm.flops): per training token
(forward + backward at the block size) and per generated token (one step with
a KV cache at the context length). No weights are loaded: the model is built
from its config on the meta device.

Examples:
  calm flops --model runs/calm
  calm flops --preset M --kind calm --vocab-size 128256 --block-size 8192 --context 8192
  calm flops --preset S --kind baseline --vocab-size 128256 --block-size 2048 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from calm.cli.common import add_config_flags, overrides, presets_of
from calm.config import HeadConfig, preset
from calm.flops import DEFAULT_BLOCK, model_from_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="CALM or baseline run or checkpoint folder")
    src.add_argument(
        "--preset", choices=presets_of("transformer"), help="a backbone preset, no weights"
    )
    p.add_argument(
        "--kind", choices=["calm", "baseline"], default="calm", help="with --preset: model kind"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="with --preset: vocabulary size (default: the preset's)",
    )
    p.add_argument("--chunk-size", type=int, default=4, help="with --preset, CALM: K")
    p.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="with --preset, CALM: l (default: the autoencoder preset's)",
    )
    p.add_argument(
        "--ae-preset",
        choices=presets_of("autoencoder"),
        default=None,
        help="with --preset, CALM: autoencoder preset (default: the preset's name if it has one, "
        "else reference)",
    )
    p.add_argument(
        "--input-scheme",
        default="discrete",
        choices=["discrete", "continuous", "both"],
        help="with --preset, CALM: how the previous chunk enters",
    )
    g = p.add_argument_group("generative head (with --preset)")
    add_config_flags(
        g,
        HeadConfig,
        prefix="head-",
        only=["noise_size", "width", "num_blocks", "num_samples", "num_targets"],
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="training tokens per sequence (default: the run's, else 512)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="inference context in tokens (default: the block size)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_from_preset(args):
    from calm.config import PRESETS, CALMConfig
    from calm.flops import build_for_counting

    backbone = preset("transformer", args.preset, vocab_size=args.vocab_size)
    if args.kind == "baseline":
        return build_for_counting("baseline", backbone)
    ae_name = args.ae_preset or (
        args.preset if args.preset in PRESETS["autoencoder"] else "reference"
    )
    ae = preset(
        "autoencoder",
        ae_name,
        vocab_size=backbone.vocab_size,
        chunk_size=args.chunk_size,
        latent_size=args.latent_size,
    )
    head = dataclasses.replace(HeadConfig(), **overrides(args, HeadConfig, prefix="head-"))
    cfg = CALMConfig(
        backbone=backbone,
        head=head,
        chunk_size=ae.chunk_size,
        latent_size=ae.latent_size,
        input_scheme=args.input_scheme,
    )
    return build_for_counting("calm", cfg, ae)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_breakdown(b: dict) -> str:
    """The breakdown of calm.flops.flops_breakdown as a plain-text table."""
    p = b["params"]
    kind = b["kind"] + (f" (K={b['chunk_size']})" if b["kind"] == "calm" else "")
    counts = (
        f"{_fmt_params(p['trainable'])} trainable, {_fmt_params(p['non_embedding'])} "
        f"non-embedding, {_fmt_params(p['total'])} total"
    )
    lines = [f"model              {kind}", f"parameters         {counts}"]
    for key, title, at in (
        (
            "training",
            "training FLOPs per token (forward + backward)",
            f"block {b['block_size']} tokens",
        ),
        ("inference", "inference FLOPs per generated token", f"context {b['context_len']} tokens"),
    ):
        total = b[key]["per_token"]
        lines += ["", f"{title}, {at}"]
        for name, v in b[key]["parts"].items():
            share = 100 * v / total if total else 0.0
            lines.append(f"  {name:<40} {v:>12.4g}  {share:5.1f} %")
        lines.append(f"  {'total':<40} {total:>12.4g}")
    return "\n".join(lines)


def run(args) -> int:
    from calm.flops import flops_breakdown

    if args.model:
        model, ckpt, block = model_from_checkpoint(args.model)
    else:
        model, ckpt, block = model_from_preset(args), None, None
    block = args.block_size or block or DEFAULT_BLOCK
    b = flops_breakdown(model, block, args.context or block)
    if ckpt is not None:
        b["checkpoint"] = str(ckpt)
    if args.json:
        print(json.dumps(b))
    else:
        print(format_breakdown(b))
    return 0
