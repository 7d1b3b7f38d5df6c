"""The paper's evaluation protocol: its cost at CALM-M's size, and its block-size sensitivity.

1. Throughput: a CALM with CALM-M's shapes (random weights; backbone hidden 1024,
   intermediate 2752, 16 layers, 16 heads; energy head 4 blocks, noise 64;
   autoencoder 512 / 1280 / 2 + 2 layers, latent 128; vocabulary 128257) scores
   windows of --block-size tokens of WikiText-103's document-level test set
   (--text, one JSON object with "text" per line) at batch 1, seed 1, as
   `calm eval --text` does, BrierLM and the energy loss both. Tokens/s, and from
   it the time to score the whole test set. The real Llama 3 tokenizer is not
   here: a small byte-level BPE stands in, so the test set's token count under
   Llama 3 is an estimate (its words, counted, times --tokens-per-word, an
   assumption) while the per-token cost is the model's.
2. Sensitivity (--models DIR ...): own CALM / baseline checkpoints scored on the
   same held-out text at several block sizes (those within each model's context).

Usage:
  python benchmarks/eval_protocol.py --text ../shared/data/wikitext103-test.jsonl [--windows 2]
  python benchmarks/eval_protocol.py --skip-throughput --models runs/quickstart/calm runs/quickstart/baseline \\
      --data data/shakespeare --blocks 512,1024,2048,4096
Writes benchmarks/results/eval_protocol.json (merged with earlier parts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

from calm.config import AutoencoderConfig, CALMConfig, HeadConfig, TransformerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def m_size_calm():
    from calm.autoencoder import Autoencoder
    from calm.model import CALM

    V = 128257
    ae = Autoencoder(AutoencoderConfig(vocab_size=V, hidden_size=512, intermediate_size=1280,
                                       latent_size=128, projection_bias=True, token_mask="id0"))
    cfg = CALMConfig(
        backbone=TransformerConfig(vocab_size=V, hidden_size=1024, intermediate_size=2752,
                                   num_layers=16, num_heads=16, max_seq_len=4096, rope_theta=500000.0),
        head=HeadConfig(noise_size=64, num_blocks=4, final_init="default"),
        chunk_size=4, latent_size=128)
    return CALM(cfg, ae).eval()


def throughput(args) -> dict:
    from calm.documents import DocumentTokens
    from calm.evaluate import evaluate_model
    from calm.tokenizer import from_tokenizer_json

    tok = from_tokenizer_json(ROOT / "tests" / "fixtures" / "authors-format" / "calm-energy" / "tokenizer.json")
    docs = DocumentTokens.from_files([str(args.text)], tok)
    torch.manual_seed(0)
    model = m_size_calm()
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))
    block = args.block_size
    # Warm-up on one short window, then the measured windows.
    evaluate_model(model, docs, "val", block_size=512, batch_size=1, max_tokens=512, seed=1,
                   precision=args.precision)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = evaluate_model(model, docs, "val", block_size=block, batch_size=1,
                           max_tokens=args.windows * block, seed=1, precision=args.precision)
        times.append(time.perf_counter() - t0)
    tokens = r["tokens"]
    med = sorted(times)[len(times) // 2]
    tps = tokens / med
    # Words counted in the file (whitespace-separated); Llama 3 tokens per word is an assumption
    # (--tokens-per-word): its tokenizer is not on this machine.
    words = sum(len(json.loads(line)["text"].split()) for line in args.text.open() if line.strip())
    llama_tokens = words * args.tokens_per_word
    out = {"parameters_without_autoencoder": n_params, "block_size": block, "windows": args.windows,
           "tokens": tokens, "seconds": times, "tokens_per_s": tps, "precision": args.precision,
           "stand_in_tokens_of_test_set": docs.num_tokens("val"), "test_set_words": words,
           "assumed_llama3_tokens_per_word": args.tokens_per_word,
           "llama3_tokens_of_test_set_estimate": llama_tokens,
           "projected_minutes_for_test_set": llama_tokens / tps / 60}
    print(table([[f"{n_params / 1e6:.0f}M", block, tokens, f"{med:.1f} s ({min(times):.1f}–{max(times):.1f})",
                  f"{tps:.0f}", f"{out['projected_minutes_for_test_set']:.0f} min"]],
                ["CALM-M shapes", "block", "tokens", "time, median (min–max)", "tokens/s",
                 f"whole test set (≈ {llama_tokens / 1e3:.0f}k tokens)"]))
    return out


def sensitivity(args) -> list[dict]:
    from calm.data import TokenDataset
    from calm.evaluate import evaluate_model
    from calm.loading import load_model

    ds = TokenDataset(args.data)
    rows = []
    for path in args.models:
        model, ckpt, cfg = load_model(path)
        K = model.config.chunk_size if cfg["kind"] == "calm" else 1
        ctx = model.config.backbone.max_seq_len * K if cfg["kind"] == "calm" else model.config.max_seq_len
        for block in map(int, args.blocks.split(",")):
            if block > ctx:
                rows.append({"model": str(path), "kind": cfg["kind"], "block_size": block,
                             "skipped": f"beyond the model's context of {ctx} tokens"})
                continue
            r = evaluate_model(model, ds, "val", block_size=block, batch_size=1,
                               max_tokens=args.sensitivity_tokens, seed=1, brier_only=True,
                               precision="fp32")
            rows.append({"model": str(path), "kind": cfg["kind"], "block_size": block,
                         **{k: r[k] for k in r if k.startswith("brier") or k == "tokens"}})
            print(f"{path} block {block}: BrierLM {r['brier_lm']:.3f}, Brier-1 {r['brier_1']:.4f}",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext103-test.jsonl")
    p.add_argument("--block-size", type=int, default=8192)
    p.add_argument("--tokens-per-word", type=float, default=1.3,
                   help="assumed Llama 3 tokens per word of the test set (its tokenizer is not here)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--data", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--blocks", default="512,1024,2048,4096,8192")
    p.add_argument("--sensitivity-tokens", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "eval_protocol.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    out["machine"] = machine()
    if not args.skip_throughput:
        out["throughput"] = throughput(args)
    if args.models:
        out["sensitivity"] = sensitivity(args)
        rows = [[r["model"], r["kind"], r["block_size"], r.get("skipped") or f"{r['brier_lm']:.3f}",
                 "" if "skipped" in r else f"{r['brier_1']:.4f} ± {r['brier_1_se']:.4f}",
                 "" if "skipped" in r else f"{r['brier_4']:.4f}"] for r in out["sensitivity"]]
        print(table(rows, ["model", "kind", "block", "BrierLM", "Brier-1 ± SE", "Brier-4"]))
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
