"""Writing a dataset: documents tokenized in streaming batches into fixed-size shard files.

``prepare_dataset`` streams: text is read one document at a time (parquet
files one batch of rows at a time), documents are grouped into batches of about
1 MB of text, and token ids go to fixed-size shard files as they are produced, so
memory stays bounded by the largest document plus a few batches. With
``workers > 1`` the batches are tokenized by a pool of processes, a bounded
number in flight, and written back in input order, so the dataset is byte for
byte the same as with one worker. A dataset folder holds::

    tokenizer/            Tokenizer.save
    train_00000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32 ids
    val_00000.bin ...
    meta.json             counts, shards, tokenizer fingerprint, inputs

The validation split is made of whole documents, chosen by a hash of the
document's name (or forced by name), so a document is never cut in two.
"""

from __future__ import annotations

import datetime
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from calm.checkpoint import swap_into_place
from calm.corpus import _file_documents, _sha256, is_validation, resolve_inputs
from calm.errors import CalmError
from calm.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # max tokens per shard file
_BATCH_CHARS = 1 << 20  # tokenize documents in batches of about this many characters


# ---------------------------------------------------------------------- shards


class _ShardWriter:
    """Appends token ids to ``{split}_NNNNN.bin`` files of at most ``shard_tokens`` ids."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.cap = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._f is None or self.shards[-1]["tokens"] == self.cap:
                self._open()
            take = min(len(ids), self.cap - self.shards[-1]["tokens"])
            self._f.write(ids[:take].tobytes())
            self.shards[-1]["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------------- prepare


def _is_dataset(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CalmError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not _is_dataset(out):
            raise CalmError(
                f"output folder {out} is not empty and holds no dataset; refusing to use it"
            )
        if not overwrite:
            raise CalmError(
                f"output folder {out} already holds a dataset (pass --overwrite to replace it)"
            )


def prepare_dataset(
    inputs: list[str] | None,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | Tokenizer = "bpe",
    vocab_bpe: str | None = None,
    split_pattern: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    overwrite: bool = False,
    documents: Iterable[tuple[str, str]] | Callable[[], Iterable[tuple[str, str]]] | None = None,
    val_documents: set[str] | None = None,
    sources: list[dict[str, Any]] | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Tokenize a corpus into a dataset folder; returns its ``meta.json`` content.

    inputs: files, folders (recursively: .txt, .jsonl, .jsonl.zst, .parquet) and
        globs. A ``.jsonl`` file holds one document per line (field
        ``text_field``), a ``.parquet`` file one per row (string column
        ``text_field``; needs pyarrow); any other file is one document.
    documents: instead of ``inputs``, (name, text) pairs; a callable returning a
        fresh iterable, or a list (a one-shot iterator is held in memory when a
        BPE has to be trained, since that needs two passes; otherwise it streams).
    tokenizer: ``"bpe"`` (train a byte-level BPE of ``vocab_size`` on the corpus),
        a path (see ``resolve_tokenizer``) or a ``Tokenizer``.
    val_documents: names of documents forced into validation; when given, only
        they form the validation split (``val_fraction`` is not used).
    sources: what to record as the inputs in ``meta.json`` when ``documents`` is used.
    workers: processes that tokenize (1: in this process). The output does not
        depend on it.
    """
    out = Path(out_dir).expanduser()
    if not 0.0 <= val_fraction <= 1.0:
        raise CalmError(f"val fraction must be in [0, 1], got {val_fraction}")
    if shard_tokens < 1:
        raise CalmError("shard_tokens must be positive")
    if workers < 1:
        raise CalmError(f"workers must be at least 1, got {workers}")
    _check_out_dir(out, overwrite)

    # The document stream, re-playable for the two passes.
    if documents is not None:
        if inputs:
            raise CalmError("give either input paths or documents, not both")
        if callable(documents):
            doc_source = documents
        else:
            if iter(documents) is documents and tokenizer == "bpe":
                # A one-shot iterator, and training needs a second pass over it.
                documents = list(documents)

            def doc_source():
                return documents

        input_meta = list(sources or [])
        total_bytes = None
    else:
        files = resolve_inputs(inputs or [])
        input_meta = []
        for f, _ in files:  # also checks every file is readable before any work
            digest, size = _sha256(f)
            input_meta.append({"path": str(f), "sha256": digest, "bytes": size})
        total_bytes = sum(m["bytes"] for m in input_meta)

        def doc_source(stats=None):
            st = stats if stats is not None else {"replaced_bytes": 0, "bytes": 0}
            for f, name in files:
                yield from _file_documents(f, name, text_field, st)

    if val_documents is not None:
        forced = set(val_documents)

        def in_val(name: str) -> bool:
            return name in forced
    else:

        def in_val(name: str) -> bool:
            return is_validation(name, val_fraction)

    # Pass 1 (only when training a BPE): the tokenizer learns from the training
    # documents only, so held-out text cannot get words of its own (a name that
    # occurs only in validation is split into pieces that training has seen).
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer == "bpe":
        seen = [0, 0]  # documents with text: training, validation

        def texts():
            for name, text in doc_source():
                if text:
                    held_out = in_val(name)
                    seen[held_out] += 1
                    if not held_out:
                        yield text

        tok = resolve_tokenizer("bpe", texts=texts(), vocab_size=vocab_size)
        if seen[0] == 0 and seen[1] == 0:
            raise CalmError("the corpus holds no text")
        if seen[0] == 0 and val_fraction == 1.0 and val_documents is None:
            raise CalmError("an evaluation-only dataset (--val-fraction 1) cannot train its BPE: "
                            "give the model's tokenizer with --tokenizer")
        if seen[0] == 0:
            raise CalmError(
                "the training split is empty: every document went to validation; "
                "lower --val-fraction or give more documents"
            )
    else:
        tok = resolve_tokenizer(str(tokenizer), vocab_bpe, split_pattern)
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        meta = _tokenize_into(
            tmp,
            tok,
            doc_source,
            in_val,
            dtype=dtype,
            shard_tokens=shard_tokens,
            progress=progress,
            total_bytes=total_bytes,
            from_files=documents is None,
            workers=workers,
        )
        meta["val_fraction"] = None if val_documents is not None else val_fraction
        _check_splits(meta, val_fraction, val_documents)
        meta["inputs"] = input_meta
        if val_documents is not None:
            meta["val_documents"] = sorted(val_documents)
        tok.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _check_out_dir(out, overwrite)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if meta["replaced_bytes"]:
        print(
            f"warning: {meta['replaced_bytes']} bytes of invalid UTF-8 were replaced by U+FFFD",
            file=sys.stderr,
        )
    return meta


def _check_splits(meta: dict, val_fraction: float, val_documents: set[str] | None) -> None:
    ndocs = meta["train"]["documents"] + meta["val"]["documents"]
    for split, what in (("val", "validation"), ("train", "training")):
        if meta[split]["documents"]:
            continue
        if val_documents is None and val_fraction == (0.0 if split == "val" else 1.0):
            continue  # asked for: a training-only (0) or an evaluation-only (1) dataset
        if val_documents is not None:
            raise CalmError(
                f"{what} split is empty: the {len(val_documents)} forced validation "
                f"document name(s) match {meta['val']['documents']} of {ndocs} documents"
            )
        hint = "raise --val-fraction" if split == "val" else "lower --val-fraction"
        raise CalmError(
            f"{what} split is empty ({ndocs} document(s), val fraction {val_fraction}): "
            f"{hint}, or split the corpus into more documents"
        )
    if val_documents is not None and meta["val"]["documents"] < len(val_documents):
        missing = len(val_documents) - meta["val"]["documents"]
        print(f"warning: {missing} forced validation document(s) not found", file=sys.stderr)


def _encode_texts(
    tok: Tokenizer, texts: list[str], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts``, each followed by end of text, laid end to end.

    Returns the ids, (sum of len(doc) + 1,) in the dataset's dtype (uint16 halves
    what a worker sends back), and the (n,) lengths, end of text included.
    """
    ids = tok.encode_batch(texts)
    doc_lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))  # (n,)
    body = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=dtype, count=int(doc_lens.sum())
    )  # (sum len,)
    # One end of text after each document: inserted before each document's end offset.
    flat = np.insert(body, np.cumsum(doc_lens), np.asarray(tok.eot_id, dtype=dtype))
    return flat, doc_lens + 1


_worker: dict[str, Any] = {}


def _worker_init(tok_dir: str, dtype: str) -> None:
    # Parallelism comes from the processes; the Rust thread pool of HF tokenizers
    # on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["tok"] = load_tokenizer(tok_dir)
    _worker["dtype"] = np.dtype(dtype)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_texts(_worker["tok"], texts, _worker["dtype"])


def _encoded_batches(
    batches: Iterator[tuple[list[str], list[str], int]],
    tok: Tokenizer,
    dtype: np.dtype,
    workers: int,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, int]]:
    """(names, flat ids, lengths, progress) for each (names, texts, progress) batch, in order.

    With several workers, at most 2 * workers batches are in flight, so memory
    stays bounded however fast the input is read. A corpus of one batch is
    encoded here, without starting a pool.
    """
    first = next(batches, None)
    second = next(batches, None) if first is not None else None
    if workers == 1 or second is None:
        for names, texts, done in itertools.chain(filter(None, (first, second)), batches):
            yield (names, *_encode_texts(tok, texts, dtype), done)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork is cheap and shares the loaded modules; spawn where fork is not the norm.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # Children inherit the environment when they start (on the first submissions):
    # keep HF tokenizers from warning about, and disabling, its threads after a fork.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="calm-tok-") as tok_dir:
            tok.save(tok_dir)
            pool = ProcessPoolExecutor(workers, ctx, _worker_init, (tok_dir, dtype.str))
            try:
                pending: deque = deque()
                for names, texts, done in itertools.chain((first, second), batches):
                    pending.append((names, pool.submit(_worker_encode, texts), done))
                    del texts
                    if len(pending) >= 2 * workers:
                        names, fut, done = pending.popleft()
                        yield (names, *fut.result(), done)
                while pending:
                    names, fut, done = pending.popleft()
                    yield (names, *fut.result(), done)
            except BrokenProcessPool:
                raise CalmError(
                    "a tokenizing worker process died (out of memory?); try fewer --workers"
                ) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _tokenize_into(
    folder: Path,
    tok: Tokenizer,
    doc_source: Callable,
    in_val: Callable[[str], bool],
    *,
    dtype: np.dtype,
    shard_tokens: int,
    progress: bool,
    total_bytes: int | None,
    from_files: bool,
    workers: int = 1,
) -> dict[str, Any]:
    """Pass 2: tokenize every document into the shard writers of its split."""
    from tqdm import tqdm

    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    stats = {"replaced_bytes": 0, "bytes": 0}
    docs = doc_source(stats) if from_files else doc_source()
    if from_files:
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=not progress,
            file=sys.stderr,
        )
    else:
        bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr)
    empty = [0]

    def batches() -> Iterator[tuple[list[str], list[str], int]]:
        """Documents grouped into about _BATCH_CHARS characters, with the progress so far."""
        names: list[str] = []
        texts: list[str] = []
        chars = ndocs = 0
        for name, text in docs:
            if not text:
                empty[0] += 1
                continue
            names.append(name)
            texts.append(text)
            chars += len(text)
            ndocs += 1
            if chars >= _BATCH_CHARS:
                yield names, texts, stats["bytes"] if from_files else ndocs
                names, texts, chars = [], [], 0
        if names:
            yield names, texts, stats["bytes"] if from_files else ndocs

    try:
        for names, ids, lens, done in _encoded_batches(batches(), tok, dtype, workers):
            is_val = np.fromiter((in_val(n) for n in names), dtype=bool, count=len(names))  # (n,)
            token_val = np.repeat(is_val, lens)  # (len(ids),) split of every token
            for split, doc_sel, tok_sel in (
                ("train", ~is_val, ~token_val),
                ("val", is_val, token_val),
            ):
                if doc_sel.any():
                    # Skip the copy when the whole batch goes to one split.
                    writers[split].write(ids if doc_sel.all() else ids[tok_sel])
                    writers[split].documents += int(doc_sel.sum())
            bar.update(done - bar.n)
    finally:
        bar.close()
        for w in writers.values():
            w.close()

    if sum(w.documents for w in writers.values()) == 0:
        raise CalmError("the corpus holds no text outside the validation split")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "tokenizer": tok.describe(),
        **{
            s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
            for s, w in writers.items()
        },
        "empty_documents": empty[0],
        "replaced_bytes": stats["replaced_bytes"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return meta
