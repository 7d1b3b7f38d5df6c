"""Corpus -> token shards -> batches of token windows.

The data side of the training setup (paper §7.1, SPEC §5): documents are
tokenized, each followed by the end-of-text token, and concatenated into one
token stream per split. Models read fixed-length windows of that stream; the
chunk autoencoder and CALM cut each window into chunks of K tokens, so the
window length must be a multiple of K.

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

import codecs
import datetime
import glob as globlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm.errors import CalmError
from calm.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # max tokens per shard file
_BATCH_CHARS = 1 << 20  # tokenize documents in batches of about this many characters

# ---------------------------------------------------------------------- UTF-8 decoding

_count_lock = threading.Lock()
_replaced = [0]


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("calm.count_replace", _count_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``data.decode('utf-8', errors='replace')`` and the number of bytes replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    with _count_lock:
        _replaced[0] = 0
        text = data.decode("utf-8", errors="calm.count_replace")
        return text, _replaced[0]


# ---------------------------------------------------------------------- inputs

_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl.zst"):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    return "txt"


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                n += len(block)
    except OSError as e:
        raise CalmError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest(), n


def resolve_inputs(inputs: Iterable[str]) -> list[tuple[Path, str]]:
    """Expand files, folders (recursively) and globs into (file, document-name prefix).

    Files found inside a folder are named by their path relative to it, so the
    split does not depend on where the folder lives.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[tuple[Path, str]] = []
    for spec in inputs:
        spec = str(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(globlib.glob(os.path.expanduser(spec), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise CalmError(f"no file matches {spec}")
            out += [(f, f.name) for f in files]
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(_SUFFIXES)
            )
            if not files:
                raise CalmError(f"no .txt, .jsonl, .jsonl.zst or .parquet files under {p}")
            out += [(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise CalmError(f"input not found: {spec}")
    if not out:
        raise CalmError("no inputs given")
    return out


def _jsonl_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Lines of a (possibly zstandard-compressed) file, with the file bytes read so far."""
    with open(path, "rb") as raw:
        if _kind(path) == "jsonl.zst":
            try:
                import zstandard
            except ImportError:
                raise CalmError(
                    f"{path}: .zst files need zstandard: pip install 'calm-lm[data]'"
                ) from None
            # Streamed (never the whole file in memory); files made of several
            # frames (concatenated .zst files) are read to the end.
            reader = io.BufferedReader(
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            )
            try:
                for line in reader:
                    yield line, raw.tell()
            except zstandard.ZstdError as e:
                raise CalmError(f"{path}: corrupt zstandard stream ({e})") from None
        else:
            for line in raw:
                yield line, raw.tell()


def _import_parquet():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise CalmError(".parquet files need pyarrow: pip install 'calm-lm[data]'") from None
    return pyarrow, pyarrow.parquet


def _parquet_documents(
    path: Path, name: str, text_field: str, stats: dict
) -> Iterator[tuple[str, str]]:
    """Rows of a parquet file's string column, read a batch of rows at a time.

    Documents are named ``{name}:{row}`` (rows counted from 1, like .jsonl lines);
    a null text is an empty document.
    """
    pa, pq = _import_parquet()
    try:
        pf = pq.ParquetFile(str(path))
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises several types for a broken file
        raise CalmError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in schema.names:
        raise CalmError(f"{path}: no {text_field!r} column (pass --text-field)")
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise CalmError(f"{path}: column {text_field!r} holds {kind}, not strings")
    rows = max(pf.metadata.num_rows, 1)
    size = path.stat().st_size
    base = stats["bytes"]  # progress: the file's size times the share of rows read
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                n += 1
                yield f"{name}:{n}", text or ""
            stats["bytes"] = base + size * n // rows
    except (OSError, pa.ArrowException) as e:
        raise CalmError(f"{path}: cannot read row {n + 1} ({e})") from None


def _file_documents(
    path: Path, name: str, text_field: str, stats: dict
) -> Iterator[tuple[str, str]]:
    """Documents of one input file; counts replaced bytes into ``stats``."""
    if _kind(path) == "parquet":
        yield from _parquet_documents(path, name, text_field, stats)
        return
    if _kind(path) == "txt":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CalmError(f"cannot read {path}: {e.strerror}") from None
        text, bad = decode_utf8(data)
        stats["replaced_bytes"] += bad
        stats["bytes"] += len(data)
        yield name, text
        return
    base = stats["bytes"]  # progress is counted in bytes of the file on disk
    for n, (line, pos) in enumerate(_jsonl_lines(path), 1):
        stats["bytes"] = base + pos
        if not line.strip():
            continue
        text, bad = decode_utf8(line)
        stats["replaced_bytes"] += bad
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise CalmError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise CalmError(f"{path}:{n}: no {text_field!r} field")
        if not isinstance(obj[text_field], str):
            raise CalmError(f"{path}:{n}: field {text_field!r} is not a string")
        yield f"{name}:{n}", obj[text_field]


# ---------------------------------------------------------------------- split rule


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic document-level split: a hash of the name, as a number in [0, 1)."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return u / 2**64 < val_fraction


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
        if out.exists():
            # Swap in the new dataset, then drop the old one.
            old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
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


# ---------------------------------------------------------------------- reading


class TokenDataset:
    """A prepared dataset folder: metadata, tokenizer and memory-mapped token shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        meta_p = self.path / "meta.json"
        try:
            meta = json.loads(meta_p.read_text())
        except FileNotFoundError:
            raise CalmError(
                f"{self.path} is not a dataset folder (no meta.json; run calm prepare)"
            ) from None
        except (OSError, ValueError) as e:
            raise CalmError(f"{meta_p}: unreadable ({e})") from None
        try:
            if meta["format_version"] != FORMAT_VERSION:
                raise CalmError(f"{meta_p}: unsupported format version {meta['format_version']}")
            self.dtype = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[meta["dtype"]]
            for s in SPLITS:
                if sum(sh["tokens"] for sh in meta[s]["shards"]) != meta[s]["tokens"]:
                    raise ValueError(f"{s} shard sizes do not add up")
            int(meta["vocab_size"]), int(meta["eot_id"]), meta["tokenizer"]["fingerprint"]
        except (KeyError, TypeError, ValueError):
            raise CalmError(f"{meta_p}: invalid dataset metadata") from None
        self.meta = meta
        self._tokenizer: Tokenizer | None = None
        self._shards: dict[str, list[np.ndarray]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def fingerprint(self) -> str:
        """The tokenizer's fingerprint: a model and a dataset must agree on it."""
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path / "tokenizer")
        return self._tokenizer

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise CalmError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return int(self.meta[split]["tokens"])

    def num_documents(self, split: str) -> int:
        self._check_split(split)
        return int(self.meta[split]["documents"])

    def shards(self, split: str) -> list[np.ndarray]:
        """Read-only memmaps of the split's shard files, in order."""
        self._check_split(split)
        if split not in self._shards:
            maps = []
            for sh in self.meta[split]["shards"]:
                f = self.path / sh["file"]
                size = f.stat().st_size if f.is_file() else -1
                if size != sh["tokens"] * self.dtype.itemsize:
                    raise CalmError(
                        f"{f}: missing or truncated shard (expected {sh['tokens']} tokens)"
                    )
                maps.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(sh["tokens"],)))
            self._shards[split] = maps
        return self._shards[split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream. One shard: a memmap; several: concatenated in memory."""
        maps = self.shards(split)
        return maps[0] if len(maps) == 1 else np.concatenate(maps)

    def windows(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        """Token windows ``stream[s : s + length]`` for each start: (B, length) int64.

        Vectorised over rows; windows may cross shard boundaries.
        """
        maps = self.shards(split)
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(
            length, dtype=np.int64
        )  # (B, L)
        if len(maps) == 1:
            return maps[0][idx].astype(np.int64)
        bounds = np.cumsum([0] + [len(m) for m in maps])  # (n_shards + 1,)
        which = np.searchsorted(bounds, idx, side="right") - 1  # (B, L) shard of each position
        out = np.empty(idx.shape, dtype=np.int64)
        for k in np.unique(which):
            sel = which == k
            out[sel] = maps[k][idx[sel] - bounds[k]]
        return out

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, train={self.num_tokens('train')}, "
            f"val={self.num_tokens('val')}, vocab={self.vocab_size})"
        )


def _check_block(dataset: TokenDataset, split: str, block_size: int, chunk_size: int = 1) -> int:
    if block_size < 1:
        raise CalmError(f"block size must be positive, got {block_size}")
    if chunk_size < 1 or block_size % chunk_size:
        raise CalmError(f"block size {block_size} is not divisible by K={chunk_size}")
    n = dataset.num_tokens(split)
    if n < block_size:
        raise CalmError(
            f"the {split} split of {dataset.path} has {n} tokens, "
            f"fewer than one block of {block_size}"
        )
    return n


def _epoch_seed(seed: int, epoch: int) -> int:
    return (
        int.from_bytes(hashlib.sha256(f"calm-data:{seed}:{epoch}".encode()).digest()[:8], "big")
        >> 1
    )


class BatchLoader:
    """An endless, deterministic, resumable stream of (batch_size, block_size) windows.

    Epoch e cuts the split at o_e, o_e + L, o_e + 2L, ... into W_e = (n - o_e) // L
    non-overlapping windows, visited in a seeded random order. The offsets o_e run
    through a seeded permutation of 0 .. L-1 every L epochs, which moves the window
    borders so that every token is seen, at every position of a window, within L
    epochs. The epochs' orders are laid
    end to end as one stream of windows; global batch j takes the stream's windows
    [jB, (j+1)B) and rank r gets batches r, r + world_size, ... The position saved
    by ``state_dict`` is that of the next round of world_size batches, which is
    the same on every rank.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = 1,
    ):
        if batch_size < 1:
            raise CalmError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise CalmError(f"rank {rank} is not in [0, {world_size})")
        self.n = _check_block(dataset, split, block_size, chunk_size)
        self.dataset, self.split = dataset, split
        self.L, self.B = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.index = 0, 0  # start of the next round, in (epoch, window) terms
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}

    def _epoch(self, e: int) -> tuple[int, torch.Tensor]:
        """(offset, permutation of the epoch's window numbers)."""
        if e not in self._cache:
            # Offsets run through a seeded permutation of [0, m) every m epochs, so no
            # token stays in an uncovered head or tail for long; m <= n - L + 1 keeps
            # at least one whole window.
            m = min(self.L, self.n - self.L + 1)
            cycle, k = divmod(e, m)
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, -1 - cycle))
            offset = int(torch.randperm(m, generator=g)[k])
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, e))
            w = (self.n - offset) // self.L
            self._cache = {k: v for k, v in self._cache.items() if k >= e - 1}
            self._cache[e] = (offset, torch.randperm(w, generator=g))
        return self._cache[e]

    def _advance(self, epoch: int, index: int, k: int) -> tuple[int, int]:
        while k > 0:
            left = len(self._epoch(epoch)[1]) - index
            if k < left:
                return epoch, index + k
            k -= left
            epoch, index = epoch + 1, 0
        return epoch, index

    def _starts(self, epoch: int, index: int) -> np.ndarray:
        """Start positions of the B windows from stream position (epoch, index): (B,)."""
        parts, need = [], self.B
        while need:
            offset, perm = self._epoch(epoch)
            take = perm[index : index + need]
            parts.append(offset + take.numpy().astype(np.int64) * self.L)
            need -= len(take)
            epoch, index = epoch + 1, 0
        return np.concatenate(parts)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        e, i = self._advance(self.epoch, self.index, self.rank * self.B)
        x = self.dataset.windows(self.split, self._starts(e, i), self.L)  # (B, L)
        self.epoch, self.index = self._advance(self.epoch, self.index, self.world_size * self.B)
        return torch.from_numpy(x)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "block_size": self.L}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("block_size", self.L)):
            if key in state and int(state[key]) != mine:
                raise CalmError(f"data position was saved with {key} {state[key]}, not {mine}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self._epoch(epoch)[1]):
            raise CalmError(f"invalid data position (epoch {epoch}, index {index})")
        self.epoch, self.index = epoch, index


class EvalBatches:
    """Fixed evaluation windows, re-iterable: every pass yields the same batches."""

    def __init__(self, dataset, split, block_size, batch_size, num_batches, rank, world_size):
        self.dataset, self.split, self.L, self.B = dataset, split, block_size, batch_size
        self.windows = dataset.num_tokens(split) // block_size
        self.batch_ids = range(rank, num_batches, world_size)

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in self.batch_ids:
            k = np.arange(j * self.B, min((j + 1) * self.B, self.windows), dtype=np.int64)
            yield torch.from_numpy(self.dataset.windows(self.split, k * self.L, self.L))


def eval_batches(
    dataset: TokenDataset,
    split: str,
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> EvalBatches:
    """Fixed evaluation windows: the split cut from its start into consecutive blocks.

    An iterable (iterate it as often as needed: the same batches each time) of
    (batch_size, block_size) LongTensors; the last batch may hold fewer rows.
    ``max_batches`` counts global batches; rank r of world_size takes batches
    r, r + world_size, ...
    """
    n = _check_block(dataset, split, block_size)
    if batch_size < 1:
        raise CalmError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise CalmError(f"rank {rank} is not in [0, {world_size})")
    nb = -(-(n // block_size) // batch_size)
    if max_batches is not None:
        nb = min(nb, max_batches)
    return EvalBatches(dataset, split, block_size, batch_size, nb, rank, world_size)
