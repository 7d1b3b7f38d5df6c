"""Throughput and memory of `calm prepare` on a large synthetic corpus.

Writes a ~1 GB .jsonl of random words (Zipf-distributed over a made-up word
list, documents of 30 to 1,500 words) into a temporary folder, trains a 4096 BPE
on a small sample of it (so training does not dominate), then times
`calm prepare --tokenizer ... --workers N` run as a child process while polling
the memory of its whole process tree from /proc. The corpus and dataset are
deleted afterwards.

    python benchmarks/prepare.py [--size-mb 1024] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402

LIMIT_MB = 2048  # the peak memory the prepare run must stay under


def make_vocab(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct lowercase words of 2 to 10 letters, as an object array of bytes."""
    words: set[bytes] = set()
    while len(words) < n:
        lens = rng.integers(2, 11, size=n)
        letters = rng.integers(ord("a"), ord("z") + 1, size=(n, 10), dtype=np.uint8)
        words.update(bytes(row[:k]) for row, k in zip(letters, lens))
    return np.array(sorted(words)[:n], dtype=object)


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """A .jsonl of about size_mb MB, written in chunks of ~16 MB; returns its size."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(rng, 20_000)
    word_bytes = np.array([len(w) + 1 for w in vocab], dtype=np.int64)  # word + space
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.1)
    cdf /= cdf[-1]
    target = int(size_mb * 2**20)
    written = 0
    with open(path, "wb") as f:
        while written < target:
            # ~16 MB of text per chunk (about 6.6 bytes a word); less for the last one.
            n_words = int(min(2_500_000, max(10_000, (target - written) / 6.6)))
            idx = np.searchsorted(cdf, rng.random(n_words))  # (n_words,) Zipf word ids
            blob = b" ".join(vocab[idx]) + b" "
            ends = np.cumsum(word_bytes[idx])  # byte offset just past each word's space
            doc_words = rng.integers(30, 1500, size=n_words // 30)
            cuts = np.cumsum(doc_words)
            cuts = cuts[cuts < n_words]
            starts = np.concatenate([[0], ends[cuts - 1]])
            stops = np.concatenate([ends[cuts - 1], [ends[-1]]]) - 1  # drop the last space
            lines = [
                b'{"text": "' + blob[s:e] + b'."}\n'
                for s, e in zip(starts.tolist(), stops.tolist())
            ]
            chunk = b"".join(lines)
            f.write(chunk)
            written += len(chunk)
    return written


def _tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Polls the summed RSS and PSS (shared pages split between sharers) of a process tree."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss_kb = self.peak_pss_kb = self.peak_procs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="corpus size (default 1024)")
    ap.add_argument("--workers", type=int, default=2, help="calm prepare --workers (default 2)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    from calm.tokenizer import train_bpe

    scratch = Path(tempfile.mkdtemp(prefix="calm-prepare-bench-", dir=args.dir))
    try:
        corpus = scratch / "corpus.jsonl"
        t = time.perf_counter()
        size = write_corpus(corpus, args.size_mb)
        gen_s = time.perf_counter() - t
        print(f"corpus: {size / 2**20:.0f} MB in {gen_s:.1f} s ({corpus})", flush=True)

        t = time.perf_counter()
        sample = []
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                sample.append(json.loads(line)["text"])
                if sum(map(len, sample)) > 4 * 2**20:
                    break
        tok = train_bpe(sample, vocab_size=4096)
        tok.save(scratch / "tokenizer")
        bpe_s = time.perf_counter() - t
        print(f"BPE 4096 on {sum(map(len, sample)) / 2**20:.1f} MB: {bpe_s:.1f} s", flush=True)
        del sample

        cmd = [
            sys.executable,
            "-c",
            "import sys; from calm.cli import main; sys.exit(main(sys.argv[1:]))",
            "prepare",
            str(corpus),
            "--out",
            str(scratch / "ds"),
            "--tokenizer",
            str(scratch / "tokenizer"),
            "--workers",
            str(args.workers),
            "--no-progress",
        ]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd)
        mon = TreeMemory(proc.pid)
        mon.start()
        rc = proc.wait()
        wall = time.perf_counter() - t
        mon.stop.set()
        mon.join()
        if rc != 0:
            raise SystemExit(f"calm prepare failed with exit status {rc}")
        import resource

        max_child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        meta = json.loads((scratch / "ds" / "meta.json").read_text())
        tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
        docs = meta["train"]["documents"] + meta["val"]["documents"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "corpus_mb": round(size / 2**20, 1),
        "documents": docs,
        "tokens": tokens,
        "workers": args.workers,
        "wall_s": round(wall, 2),
        "mb_per_s": round(size / 2**20 / wall, 2),
        "tokens_per_s": round(tokens / wall),
        "peak_tree_rss_mb": round(mon.peak_rss_kb / 1024),
        "peak_tree_pss_mb": round(mon.peak_pss_kb / 1024),
        "max_process_rss_mb": round(max_child_mb),
        "processes": mon.peak_procs,
        "limit_mb": LIMIT_MB,
        "corpus_generation_s": round(gen_s, 1),
        "bpe_training_s": round(bpe_s, 1),
    }
    print(
        table(
            [
                [
                    result["corpus_mb"],
                    args.workers,
                    result["wall_s"],
                    result["mb_per_s"],
                    f"{tokens / wall / 1e6:.2f}",
                    result["peak_tree_rss_mb"],
                    result["peak_tree_pss_mb"],
                    result["max_process_rss_mb"],
                ]
            ],
            [
                "corpus MB",
                "workers",
                "wall s",
                "MB/s",
                "Mtok/s",
                "tree RSS MB",
                "tree PSS MB",
                "max proc RSS MB",
            ],
        )
    )
    path = write("prepare", result)
    print(f"wrote {path}")
    # RSS counts pages a forked worker shares with its parent once per process;
    # PSS splits them, so it is the tree's real footprint.
    assert result["peak_tree_pss_mb"] < LIMIT_MB, f"peak memory {result['peak_tree_pss_mb']} MB"
    print(f"peak memory under {LIMIT_MB} MB: ok")


if __name__ == "__main__":
    main()
