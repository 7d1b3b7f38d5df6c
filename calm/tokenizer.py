"""Tokenizers: train, load and save them, fully offline.

The autoencoder of SPEC §1 works on token chunks, so everything starts from a
tokenizer. One ``Tokenizer`` class wraps two backends:

* Hugging Face ``tokenizers`` (byte-level BPE trained here, any ``tokenizer.json``,
  GPT-2 ``encoder.json`` + ``vocab.bpe`` files);
* ``tiktoken`` rank files (``*.tiktoken``, and Llama 3's ``tokenizer.model``,
  which is the same format: one base64 token and its rank per line). The paper
  (§7.1) uses the Llama 3 tokenizer: ``from_tiktoken("tokenizer.model", "llama3")``.

Conventions:

* Text is always text: a special-token string such as ``<|endoftext|>`` written
  inside a document is encoded as ordinary characters, never as the special
  token, so a document cannot fake a document boundary. The end-of-text token
  (``eot_id``) is only ever inserted by the data pipeline.
* ``encode`` adds nothing (no BOS/EOS from a post-processor).
* Every tokenizer has an end-of-text token. Where the backend has none, a special
  ``<|endoftext|>`` is added at the next free id. For tiktoken files that id is
  the number of ranks (max rank + 1); for the ``llama3`` pattern we add Meta's
  ``<|begin_of_text|>`` and ``<|end_of_text|>`` at ranks + 0 and ranks + 1 (their
  ids in Llama 3, 128000 and 128001) and use ``<|end_of_text|>`` as end of text.
* ``save(dir)`` writes the backend file (``tokenizer.json`` or
  ``tokenizer.tiktoken``) and ``calm_tokenizer.json`` (kind, end-of-text token,
  split pattern, special tokens, source). The ``fingerprint`` is a sha256 over the
  backend file's bytes and the canonical JSON of those fields except ``source``,
  so the same tokenizer loaded from two places has the same fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from calm.errors import CalmError

EOT = "<|endoftext|>"
META_FILE = "calm_tokenizer.json"
FORMAT_VERSION = 1

# Split (pre-tokenization) regexes of the well-known tiktoken encodings.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "cl100k": CL100K_PATTERN,
    "o200k": O200K_PATTERN,
    "llama3": LLAMA3_PATTERN,
}

# End-of-text names of common tokenizer.json files, most specific first.
_KNOWN_EOT = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def _import_tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise CalmError(
            "tiktoken files need the tiktoken package: pip install 'calm-lm[tiktoken]'"
        ) from None
    return tiktoken


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class Tokenizer:
    """Text <-> token ids, with an end-of-text id and a fingerprint.

    Build one with ``train_bpe``, ``from_tokenizer_json``, ``from_gpt2_files``,
    ``from_tiktoken`` or ``load_tokenizer``; not with the constructor directly.
    """

    def __init__(
        self,
        kind: str,
        backend: Any,
        *,
        eot_token: str,
        source: str,
        pattern: str | None = None,
        ranks: dict[bytes, int] | None = None,
        special_tokens: dict[str, int] | None = None,
    ):
        self.kind = kind  # "hf" or "tiktoken"
        self.source = source
        self.eot_token = eot_token
        self._backend = backend
        self._pattern = pattern
        self._ranks = ranks
        self._special_tokens = special_tokens
        if kind == "hf":
            # Special-token strings in text stay text (see the module docstring).
            backend.encode_special_tokens = True
            eot_id = backend.token_to_id(eot_token)
            if eot_id is None:
                raise CalmError(f"tokenizer has no {eot_token!r} token")
            self.eot_id = int(eot_id)
            vocab = backend.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        else:
            self.eot_id = int(special_tokens[eot_token])
            self.vocab_size = int(backend.max_token_value) + 1
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ encode/decode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added or recognised)."""
        if self.kind == "hf":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of several texts (in parallel threads where the backend can)."""
        texts = list(texts)
        if self.kind == "hf":
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self._backend.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special tokens are written out, broken UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids, errors="replace")

    # ------------------------------------------------------------------ save/identity

    def _files(self) -> dict[str, bytes]:
        """The canonical files: name -> bytes (what ``save`` writes, minus the source)."""
        spec: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "eot_token": self.eot_token,
            "eot_id": self.eot_id,
            "vocab_size": self.vocab_size,
        }
        if self.kind == "hf":
            body = self._backend.to_str(pretty=False).encode()
            files = {"tokenizer.json": body}
        else:
            # Sorted by rank so equal tokenizers give equal bytes.
            lines = [
                base64.b64encode(tok) + b" " + str(rank).encode()
                for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1])
            ]
            files = {"tokenizer.tiktoken": b"\n".join(lines) + b"\n"}
            spec["pattern"] = self._pattern
            spec["special_tokens"] = self._special_tokens
        files[META_FILE] = _canonical_json(spec)
        return files

    @property
    def fingerprint(self) -> str:
        """sha256 over the canonical saved files (the source path is not part of it)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, data in sorted(self._files().items()):
                h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into ``directory`` so ``load_tokenizer`` rebuilds it offline."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = self._files()
        meta = json.loads(files.pop(META_FILE))
        meta["source"] = self.source
        meta["fingerprint"] = self.fingerprint
        for name, data in files.items():
            (d / name).write_bytes(data)
        (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return d

    def describe(self) -> dict[str, Any]:
        """A short JSON-able summary (stored in dataset and checkpoint metadata)."""
        out = {
            "kind": self.kind,
            "source": self.source,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "eot_token": self.eot_token,
            "fingerprint": self.fingerprint,
        }
        if self._pattern is not None:
            out["pattern"] = self._pattern
        return out

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id}, "
            f"source={self.source!r})"
        )


# ---------------------------------------------------------------------- HF backends


class TextStream:
    """Generated token ids → text pieces as they come, never splitting a multi-byte
    character: a trailing replacement character is held back until the next ids (or
    ``finish``) complete it. End-of-text ids are dropped."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(t for t in ids if t != self.tokenizer.eot_id)
        text = self.tokenizer.decode(self.ids)
        safe = max(self.shown, len(text.rstrip("\ufffd")))
        piece, self.shown = text[self.shown : safe], safe
        return piece

    def finish(self) -> str:
        """What was held back: at the end it is no longer half a character."""
        piece = self.tokenizer.decode(self.ids)[self.shown :]
        self.shown += len(piece)
        return piece


def _with_eot(tok, source: str) -> Tokenizer:
    """Wrap an HF tokenizer, picking (or adding) its end-of-text token."""
    from tokenizers import AddedToken

    for name in _KNOWN_EOT:
        if tok.token_to_id(name) is not None:
            eot = name
            break
    else:
        eot = EOT
    # Registering as special is a no-op for an existing special token and keeps the id
    # of an existing ordinary one (GPT-2's encoder.json lists <|endoftext|> as a token).
    tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return Tokenizer("hf", tok, eot_token=eot, source=source)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on an iterable of texts.

    The 256 byte symbols and ``<|endoftext|>`` are always in the vocabulary, so any
    text round-trips exactly.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise CalmError(
            f"BPE vocab size must be at least 257 (256 bytes + end of text), got {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer("hf", tok, eot_token=EOT, source=f"bpe:{vocab_size}")


def from_tokenizer_json(path: str | os.PathLike) -> Tokenizer:
    """Any Hugging Face ``tokenizer.json``."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    if not p.is_file():
        raise CalmError(f"tokenizer file not found: {p}")
    try:
        tok = HFTokenizer.from_str(p.read_text(encoding="utf-8"))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise CalmError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    return _with_eot(tok, str(p))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order,
    to the code points 256, 257, ...
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(0xA1, 0xAC + 1))
        + list(range(0xAE, 0xFF + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def from_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
    """GPT-2 style ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges) files."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    enc_p, bpe_p = Path(encoder_json), Path(vocab_bpe)
    for p in (enc_p, bpe_p):
        if not p.is_file():
            raise CalmError(f"tokenizer file not found: {p}")
    try:
        vocab = json.loads(enc_p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CalmError(f"{enc_p}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CalmError(f"{enc_p}: expected a JSON object of token -> id")
    merges = []
    for n, line in enumerate(bpe_p.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CalmError(f"{bpe_p}:{n}: expected two symbols separated by a space")
        merges.append((parts[0], parts[1]))
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:
        raise CalmError(f"{bpe_p}: merges do not match {enc_p.name} ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _with_eot(tok, f"{enc_p}+{bpe_p.name}")


# ---------------------------------------------------------------------- tiktoken backend


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalmError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError:
            hint = " (a SentencePiece model? convert it to tokenizer.json)" if not ranks else ""
            raise CalmError(f"{path}:{n}: not a tiktoken rank line 'BASE64 RANK'{hint}") from None
        ranks[tok] = rank
    if not ranks:
        raise CalmError(f"{path}: empty rank file")
    return ranks


def _encoding(ranks: dict[bytes, int], pattern: str, special: dict[str, int], name: str):
    tiktoken = _import_tiktoken()
    try:
        return tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
        )
    except Exception as e:
        raise CalmError(f"cannot build a tiktoken encoding from {name}: {e}") from None


def from_tiktoken(path: str | os.PathLike, pattern: str = "cl100k") -> Tokenizer:
    """A tiktoken rank file with a named split pattern (or a regex of your own).

    ``pattern``: ``cl100k``, ``o200k``, ``llama3``, ``gpt2`` or a regex string.
    """
    p = Path(path)
    if not p.is_file():
        raise CalmError(f"tokenizer file not found: {p}")
    regex = PATTERNS.get(pattern, pattern)
    ranks = _read_ranks(p)
    n = max(ranks.values()) + 1
    if pattern == "llama3":
        special = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1}
        eot = "<|end_of_text|>"
    else:
        special = {EOT: n}
        eot = EOT
    enc = _encoding(ranks, regex, special, p.name)
    return Tokenizer(
        "tiktoken",
        enc,
        eot_token=eot,
        source=str(p),
        pattern=regex,
        ranks=ranks,
        special_tokens=special,
    )


# ---------------------------------------------------------------------- load / resolve


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Reload what ``Tokenizer.save`` wrote (checks the stored fingerprint)."""
    d = Path(directory)
    meta_p = d / META_FILE
    try:
        meta = json.loads(meta_p.read_text())
    except FileNotFoundError:
        raise CalmError(f"no saved tokenizer in {d} (missing {META_FILE})") from None
    except (OSError, ValueError) as e:
        raise CalmError(f"{meta_p}: unreadable ({e})") from None
    kind = meta.get("kind")
    if kind == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:
            raise CalmError(
                f"{d / 'tokenizer.json'}: unreadable ({str(e).splitlines()[0]})"
            ) from None
        tok = Tokenizer(
            "hf", backend, eot_token=meta["eot_token"], source=meta.get("source", str(d))
        )
    elif kind == "tiktoken":
        ranks = _read_ranks(d / "tokenizer.tiktoken")
        special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
        enc = _encoding(ranks, meta["pattern"], special, str(d))
        tok = Tokenizer(
            "tiktoken",
            enc,
            eot_token=meta["eot_token"],
            source=meta.get("source", str(d)),
            pattern=meta["pattern"],
            ranks=ranks,
            special_tokens=special,
        )
    else:
        raise CalmError(f"{meta_p}: unknown tokenizer kind {kind!r}")
    if meta.get("fingerprint") and meta["fingerprint"] != tok.fingerprint:
        raise CalmError(
            f"{d}: tokenizer files do not match their stored fingerprint (edited or corrupt)"
        )
    return tok


def _guess_pattern(path: Path) -> str:
    name = path.name.lower()
    if name == "tokenizer.model" or "llama" in name:
        return "llama3"
    for key, pat in (
        ("o200k", "o200k"),
        ("cl100k", "cl100k"),
        ("r50k", "gpt2"),
        ("p50k", "gpt2"),
        ("gpt2", "gpt2"),
    ):
        if key in name:
            return pat
    return "cl100k"


def resolve_tokenizer(
    spec: str,
    vocab_bpe: str | os.PathLike | None = None,
    pattern: str | None = None,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 4096,
) -> Tokenizer:
    """Pick the constructor from a command-line spec.

    ``bpe``: train a byte-level BPE on ``texts``. A path: ``tokenizer.json`` (or any
    ``.json`` other than ``encoder.json``), ``encoder.json`` (with ``vocab_bpe`` or a
    ``vocab.bpe`` beside it), ``*.tiktoken`` or ``tokenizer.model`` (tiktoken format;
    ``pattern`` names the split regex, guessed from the file name otherwise), or a
    folder: a saved tokenizer, a dataset folder (its ``tokenizer/``), or a folder
    holding one of the files above.
    """
    if spec == "bpe":
        if texts is None:
            raise CalmError("training a BPE tokenizer needs texts")
        return train_bpe(texts, vocab_size)
    p = Path(spec).expanduser()
    if not p.exists():
        raise CalmError(f"tokenizer not found: {spec} (use 'bpe' to train one, or a path)")
    if p.is_dir():
        if (p / META_FILE).is_file():
            return load_tokenizer(p)
        if (p / "tokenizer" / META_FILE).is_file():
            return load_tokenizer(p / "tokenizer")
        for name in ("tokenizer.json", "encoder.json", "tokenizer.model"):
            if (p / name).is_file():
                return resolve_tokenizer(str(p / name), vocab_bpe, pattern)
        tk = sorted(p.glob("*.tiktoken"))
        if tk:
            return resolve_tokenizer(str(tk[0]), vocab_bpe, pattern)
        raise CalmError(f"no tokenizer found in folder {p}")
    name = p.name.lower()
    if name == "encoder.json":
        bpe = Path(vocab_bpe) if vocab_bpe else p.with_name("vocab.bpe")
        if not bpe.is_file():
            raise CalmError(f"{p} needs its merges file: pass --vocab-bpe PATH")
        return from_gpt2_files(p, bpe)
    if name.endswith((".tiktoken", ".model")):
        return from_tiktoken(p, pattern or _guess_pattern(p))
    if name.endswith(".json"):
        return from_tokenizer_json(p)
    raise CalmError(
        f"cannot tell the tokenizer format of {p}: expected tokenizer.json, encoder.json, "
        "*.tiktoken or tokenizer.model"
    )
