"""Generate text from a CALM or baseline checkpoint.

Each prompt is treated as the start of a document (an end-of-text token is put
before it, as in training; for a model imported with `calm import`, the authors'
<|begin_of_text|>) unless --no-document-start. Generation stops at
end-of-text or after --max-new-tokens.

CALM at temperature 1 draws one head sample per step. Below 1 it uses the
likelihood-free samplers: --sampler batch (Algorithm 2, T = 1/n, N candidates
per step) or --sampler exact (Algorithm 1, any T in (0, 1]). The baseline scales
its softmax by the temperature.

Examples:
  calm generate --model runs/calm --prompt "ROMEO:" --max-new-tokens 64 --seed 0
  calm generate --model runs/calm --prompt-file prompts.txt --temperature 0.5 --sampler exact
  calm generate --model runs/calm --prompt "ROMEO:" --max-new-tokens 2048 --compile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from calm.cli.common import add_runtime_flags, precision_of
from calm.errors import CalmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="CALM or baseline run/checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", type=Path, help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature in (0, 1]")
    p.add_argument("--sampler", choices=["batch", "exact"], default="batch",
                   help="CALM below temperature 1: batch approximation (T = 1/n) or exact")
    p.add_argument("--num-candidates", type=int, default=200,
                   help="CALM batch sampler: head samples drawn per step (N)")
    p.add_argument("--max-calls", type=int, default=100000,
                   help="CALM exact sampler: give up after this many draws per step")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: nondeterministic)")
    p.add_argument("--autoencoder", default=None, help="CALM: use this autoencoder folder instead of the recorded one")
    p.add_argument("--no-document-start", action="store_true", help="do not put end-of-text before the prompt")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--json", action="store_true", help="print JSON lines (prompt, text, tokens/s)")
    p.add_argument("--compile", action="store_true",
                   help="CALM at temperature 1: run the head's sampler and the autoencoder's "
                        "decoder through torch.compile (energy and flow heads; in fp32 the same "
                        "samples). "
                        "Compiling takes up to a minute before the first token (a C++ compiler "
                        "on a CPU), so it pays in long generations; tokens/s excludes it")
    add_runtime_flags(p)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CalmError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalmError("give a prompt with --prompt TEXT or --prompt-file FILE")
    for p in prompts:
        if not p.strip():
            raise CalmError("empty prompt: give at least one character of text")
    return prompts


def run(args) -> int:
    from calm.generate import generate
    from calm.loading import (
        checkpoint_kind,
        document_start_id,
        load_checkpoint_tokenizer,
        load_model,
    )
    from calm.runtime import pick_device, set_threads

    set_threads(args.threads)
    device = pick_device(args.device)
    if not 0 < args.temperature <= 1:
        raise CalmError(f"--temperature must be in (0, 1], got {args.temperature}")
    prompts = read_prompts(args)
    ckpt, cfg = checkpoint_kind(args.model)
    if cfg["kind"] == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; generate from a CALM or baseline checkpoint")
    if args.compile and (cfg["kind"] != "calm" or args.temperature != 1.0):
        raise CalmError("--compile applies to CALM at temperature 1 (its head and decoder), "
                        f"not to {'a baseline' if cfg['kind'] != 'calm' else 'temperature sampling'}")
    if cfg["kind"] == "calm":
        from calm.loading import load_calm

        model, ckpt, cfg = load_calm(ckpt, device, autoencoder_path=args.autoencoder)
    else:
        model, ckpt, cfg = load_model(ckpt, device)
    tok = load_checkpoint_tokenizer(ckpt)
    start = document_start_id(cfg, tok)
    ids = []
    for p in prompts:
        t = tok.encode(p)
        ids.append(([] if args.no_document_start else [start]) + t)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    chooser = None
    if cfg["kind"] == "calm" and args.temperature != 1.0:
        from calm.temperature_sampling import temperature_chooser

        chooser = temperature_chooser(
            model, args.temperature, sampler=args.sampler, num_candidates=args.num_candidates,
            max_calls=args.max_calls, generator=generator,
        )
    stream = args.stream and len(prompts) == 1 and not args.json
    on_step = None
    if stream:
        from calm.tokenizer import TextStream

        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        text_stream = TextStream(tok)

        def on_step(added):
            sys.stdout.write(text_stream.push(added[0]))
            sys.stdout.flush()

    precision = precision_of(args, device)
    if args.compile:
        # Compile on one step of the same batch (its own noise), so that tokens/s is the steps'.
        print("compiling the head and the decoder ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=1, precision=precision, compile=True,
                 generator=torch.Generator(device=device).manual_seed(0))
        print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   eot_id=tok.eot_id, generator=generator, chooser=chooser, on_step=on_step,
                   precision=precision, compile=args.compile)
    dt = time.perf_counter() - t0
    n_new = sum(len(t) for t in out.tokens)
    if stream:
        # The end: what was held back is not half a character any more; show it all.
        sys.stdout.write(text_stream.finish())
        print()
        print(f"[{n_new} tokens in {dt:.2f} s, {n_new / dt:.1f} tokens/s, {out.steps} steps]",
              file=sys.stderr)
        return 0
    for p, new in zip(prompts, out.tokens):
        text = tok.decode([t for t in new if t != tok.eot_id])
        if args.json:
            print(json.dumps({"prompt": p, "text": text, "tokens": len(new),
                              "tokens_per_s": n_new / dt, "steps": out.steps}))
        else:
            print(p + text)
            print("-" * 40)
    if not args.json:
        print(f"[{n_new} tokens in {dt:.2f} s, {n_new / dt:.1f} tokens/s, {out.steps} steps]",
              file=sys.stderr)
    return 0
