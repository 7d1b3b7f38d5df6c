"""Reading a corpus: text files, JSON lines (optionally zstd) and parquet, one document at a time.

``resolve_inputs`` expands files, folders and globs; ``_file_documents`` yields
(name, text) of each document with invalid UTF-8 replaced and counted;
``is_validation`` is the split rule (a hash of the document's name).
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from calm.errors import CalmError

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
