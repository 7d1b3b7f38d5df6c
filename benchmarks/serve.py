"""Serving: CALM against the token-level baseline behind `calm serve`'s HTTP stack.

Both models have the speed benchmark's backbone (hidden 512, ffn 1376, 8 layers,
8 heads; CALM with K = 4, an energy head of 2 blocks and the reference-size
autoencoder), random weights (speed does not depend on them; the head's last layer
at PyTorch's default init rather than zero, so that its samples, and the text they
decode to, vary as a trained model's do) and one BPE trained
on the benchmark data, whose size sets the vocabulary. Each is served in its own
process by `calm.server` exactly as `calm serve` does (FastAPI + uvicorn, the
batching engine with its defaults: max batch 16, 10 ms wait); clients in this
process stream completions over loopback (server-sent events), all at once, at
1, 4 and 16 concurrent clients, each sending --rounds requests one after another
(prompts of ~32 tokens from the data, max_tokens --new-tokens, temperature 1,
distinct seeds; `ignore_eos`, as random weights may end a text at once).

Reported per model and concurrency: aggregate tokens/s (completion tokens of all
requests / wall time of the phase), time to first token (request sent → first text
event) and time per output token ((last − first event) / (tokens − 1)), medians
over requests with min–max; the phase is repeated --repeat times and the median
aggregate taken. The clients share the machine's cores with the server.

Usage: python benchmarks/serve.py [--rounds 2] [--new-tokens 64] [--repeat 3]
Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext103-test.jsonl"
CONCURRENCY = (1, 4, 16)


def texts() -> list[str]:
    if not DATA.is_file():
        sys.exit(f"serve.py: benchmark data not found: {DATA}")
    return [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]


def build(kind: str, tokenizer_dir: str, threads: int):
    """A LanguageModel of ``kind`` with random weights and the speed benchmark's shapes."""
    import torch

    from calm.api import LanguageModel
    from calm.autoencoder import Autoencoder
    from calm.baseline import TokenLM
    from calm.config import CALMConfig, HeadConfig, preset
    from calm.model import CALM
    from calm.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    backbone = preset("transformer", "bench", max_seq_len=1024, vocab_size=tok.vocab_size)
    if kind == "calm":
        ae = Autoencoder(preset("autoencoder", "reference", vocab_size=tok.vocab_size)).eval()
        model = CALM(CALMConfig(backbone=backbone, head=HeadConfig(num_blocks=2, num_samples=8,
                                                               final_init="default"),
                                chunk_size=4, latent_size=128), ae).eval()
    else:
        model = TokenLM(backbone).eval()
    return LanguageModel(model, tok, Path("random"), {"kind": kind}, "fp32")


def serve_forever(kind: str, tokenizer_dir: str, threads: int, ready) -> None:
    from calm.server import Served, create_app

    lm = build(kind, tokenizer_dir, threads)
    served = Served(create_app(lm, model_id=kind, precision="fp32"))
    ready.put(served.url)
    threading.Event().wait()  # until the parent terminates this process


def stream(url: str, body: dict) -> dict:
    """One streaming request → its timings and token count."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = last = None
    tokens = 0
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if event["choices"]:  # a piece of text, or a row's end
            last = time.perf_counter()
            first = first or last
    conn.close()
    return {"ttft": first - t0, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


def phase(url: str, clients: int, rounds: int, prompts: list[str], new_tokens: int, seed0: int):
    results: list[dict] = []
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(rounds):
            k = (c * rounds + r) % len(prompts)
            results.append(stream(url, {"prompt": prompts[k], "max_tokens": new_tokens,
                                        "seed": seed0 + c * rounds + r, "stream": True,
                                        "ignore_eos": True}))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests": results}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="server threads (0: one per core)")
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()

    import os
    import tempfile

    from calm.tokenizer import train_bpe

    docs = texts()
    threads = args.threads or os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="calm-serve-bench-")
    tok = train_bpe(docs, vocab_size=args.vocab)
    tok.save(tmp)
    words = " ".join(docs).split()
    prompts = [" ".join(words[i * 997 : i * 997 + 24]) for i in range(64)]

    ctx = mp.get_context("spawn")
    out = {"machine": machine(), "setting": {
        "backbone": "hidden 512, ffn 1376, 8 layers, 8 heads", "vocab": tok.vocab_size, "K": 4,
        "head_blocks": 2, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "repeat": args.repeat, "server_threads": threads, "max_batch": 16, "wait_ms": 10,
        "precision": "fp32"}, "models": {}}
    rows = []
    for kind in ("calm", "baseline"):
        ready = ctx.Queue()
        proc = ctx.Process(target=serve_forever, args=(kind, tmp, threads, ready), daemon=True)
        proc.start()
        try:
            url = ready.get(timeout=300)
            phase(url, 1, 1, prompts, 8, 0)  # warm-up
            per = {}
            for clients in CONCURRENCY:
                runs = [phase(url, clients, args.rounds, prompts, args.new_tokens, 1000 * rep)
                        for rep in range(args.repeat)]
                reqs = [r for run in runs for r in run["requests"]]
                per[str(clients)] = {
                    "tokens_per_s": summary([r["tokens_per_s"] for r in runs]),
                    "ttft_s": summary([r["ttft"] for r in reqs]),
                    "tpot_s": summary([r["tpot"] for r in reqs]),
                    "requests": len(reqs), "tokens": sum(r["tokens"] for r in reqs),
                }
                p = per[str(clients)]
                rows.append([kind, clients,
                             f"{p['tokens_per_s']['median']:.0f} ({p['tokens_per_s']['min']:.0f}–{p['tokens_per_s']['max']:.0f})",
                             f"{1000 * p['ttft_s']['median']:.0f} ({1000 * p['ttft_s']['min']:.0f}–{1000 * p['ttft_s']['max']:.0f})",
                             f"{1000 * p['tpot_s']['median']:.1f} ({1000 * p['tpot_s']['min']:.1f}–{1000 * p['tpot_s']['max']:.1f})"])
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
            out["models"][kind] = per
        finally:
            proc.terminate()
            proc.join(10)
    for clients in CONCURRENCY:
        c, b = (out["models"][k][str(clients)]["tokens_per_s"]["median"] for k in ("calm", "baseline"))
        rows.append(["CALM / baseline", clients, f"{c / b:.2f}×", "", ""])
        out.setdefault("calm_over_baseline", {})[str(clients)] = c / b
    print()
    print(table(rows, ["model", "clients", "tokens/s median (min–max)",
                       "time to first token ms", "time per output token ms"]))
    print(f"\nwritten to {write('serve', out)}")


if __name__ == "__main__":
    main()
