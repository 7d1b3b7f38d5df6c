"""Reading a dataset: token windows and training batches from its shards.

The data side of the training setup (paper §7.1, SPEC §5): documents are
tokenized, each followed by the end-of-text token, and concatenated into one
token stream per split. Models read fixed-length windows of that stream; the
chunk autoencoder and CALM cut each window into chunks of K tokens, so the
window length must be a multiple of K.

Writing a dataset is ``calm.dataset.prepare_dataset``; reading a corpus is ``calm.corpus``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from calm.dataset import FORMAT_VERSION, SPLITS
from calm.errors import CalmError
from calm.tokenizer import Tokenizer, load_tokenizer

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
