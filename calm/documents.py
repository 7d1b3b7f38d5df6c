"""Text files read straight into evaluation windows, with a model's own tokenizer.

``calm eval --text FILE`` scores documents without preparing a dataset first:
each document (a ``.txt`` file, or one JSON line's "text" field of a ``.jsonl``)
is tokenized and followed by end of text, and the documents are joined into one
stream, exactly as ``calm prepare`` writes a split; evaluation cuts that stream into consecutive windows, as
it cuts a prepared split. ``DocumentTokens`` offers the same reading interface as
``calm.data.TokenDataset`` (its one split is "val").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from calm.corpus import _file_documents, resolve_inputs
from calm.errors import CalmError


class DocumentTokens:
    """Tokenized documents held in memory, read like a prepared dataset's "val" split."""

    def __init__(self, tokens: np.ndarray, *, tokenizer, path: str, documents: int):
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.path = path
        self.documents = documents

    @classmethod
    def from_files(cls, inputs: Iterable[str] | str, tokenizer, *, text_field: str = "text",
                   progress: bool = False) -> DocumentTokens:
        files = resolve_inputs(inputs)
        stats = {"bytes": 0, "replaced_bytes": 0}
        ids: list[int] = []
        n_docs = 0
        docs = (d for f, name in files for d in _file_documents(f, name, text_field, stats))
        if progress:
            from tqdm import tqdm

            docs = tqdm(docs, desc="tokenizing", unit="doc", leave=False)
        for _, text in docs:
            if not text.strip():
                continue
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eot_id)
            n_docs += 1
        if not n_docs:
            raise CalmError(f"no non-empty document in {', '.join(str(f) for f, _ in files)}")
        name = str(files[0][0]) if len(files) == 1 else f"{files[0][0]} and {len(files) - 1} more"
        return cls(np.asarray(ids, dtype=np.int64), tokenizer=tokenizer, path=name, documents=n_docs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def fingerprint(self) -> str:
        return self.tokenizer.fingerprint

    def _check_split(self, split: str) -> None:
        if split != "val":
            raise CalmError(f"text given with --text is evaluated as one split; got split {split!r}")

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return int(self.tokens.shape[0])

    def num_documents(self, split: str) -> int:
        self._check_split(split)
        return self.documents

    def windows(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        self._check_split(split)
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
        return self.tokens[idx]


def read_documents(path: str | Path, tokenizer, **kwargs) -> DocumentTokens:
    return DocumentTokens.from_files([str(path)], tokenizer, **kwargs)
