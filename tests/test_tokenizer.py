"""Tokenizers: exact round trips, hand-computed merges, save/load, fingerprints."""

from __future__ import annotations

import base64
import json
import shutil
import sys

import pytest

from calm.errors import CalmError
from calm.tokenizer import (
    EOT,
    from_gpt2_files,
    from_tiktoken,
    from_tokenizer_json,
    load_tokenizer,
    resolve_tokenizer,
    train_bpe,
)

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 😀🎉, Ελληνικά, русский",
    "",
]
CORPUS = [f"Document {i}: the cat sat on the mat, héllo wörld {i * 7}.\n" for i in range(200)]


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, written out for the test."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, nxt = {}, 256
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(nxt)
            nxt += 1
    return out


def write_gpt2_files(folder, with_eot=True):
    """256 byte tokens (id = byte) + merges h e, l l, he ll (ids 256..258)."""
    bc = byte_chars()
    vocab = {bc[b]: b for b in range(256)}
    vocab.update({"he": 256, "ll": 257, "hell": 258})
    if with_eot:
        vocab[EOT] = 259
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps(vocab))
    (folder / "vocab.bpe").write_text("#version: 0.2\nh e\nl l\nhe ll\n")
    return folder / "encoder.json", folder / "vocab.bpe"


def write_tiktoken_file(path, merges=(b"he", b"ll", b"hell")):
    """Ranks: byte b -> b, then the merges in order (256, 257, ...)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i, m in enumerate(merges):
        ranks[m] = 256 + i
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def write_hf_json(path, eos=None):
    """An HF byte-level BPE tokenizer.json built by hand (no training)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    bc = byte_chars()
    vocab = {bc[b]: b for b in range(256)}
    vocab.update({"t": ord("t"), "th": 256, "the": 257})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("th", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if eos:
        tok.add_special_tokens([eos])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def assert_round_trips(tok):
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert 0 <= tok.eot_id < tok.vocab_size


def test_trained_bpe_round_trip_and_determinism():
    tok = train_bpe(CORPUS, vocab_size=300)
    assert_round_trips(tok)
    assert tok.vocab_size == 300
    assert tok.decode([tok.eot_id]) == EOT
    # Frequent words were merged: fewer tokens than bytes.
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2
    assert train_bpe(CORPUS, vocab_size=300).fingerprint == tok.fingerprint
    assert train_bpe(CORPUS, vocab_size=280).fingerprint != tok.fingerprint


def test_special_token_text_is_not_a_boundary():
    tok = train_bpe(CORPUS, vocab_size=300)
    s = f"one {EOT} two"
    ids = tok.encode(s)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == s


def test_gpt2_files_hand_computed_merges(tmp_path):
    enc, bpe = write_gpt2_files(tmp_path / "g")
    tok = from_gpt2_files(enc, bpe)
    # "hello" -> h e l l o -> he ll o -> hell o ; " hello" keeps its space as byte 32.
    assert tok.encode("hello") == [258, ord("o")]
    assert tok.encode(" hello") == [32, 258, ord("o")]
    assert tok.encode("é") == list("é".encode())  # no merges: the UTF-8 bytes
    assert tok.eot_id == 259 and tok.vocab_size == 260
    assert_round_trips(tok)


def test_gpt2_files_without_eot_get_one(tmp_path):
    enc, bpe = write_gpt2_files(tmp_path / "g", with_eot=False)
    tok = from_gpt2_files(enc, bpe)
    assert tok.eot_id == 259 and tok.vocab_size == 260
    assert tok.decode([tok.eot_id]) == EOT


def test_tiktoken_file_hand_computed_merges(tmp_path):
    path = write_tiktoken_file(tmp_path / "tiny.tiktoken")
    tok = from_tiktoken(path, pattern="gpt2")
    assert tok.encode("hello") == [258, ord("o")]
    assert tok.encode("hello hello") == [258, ord("o"), 32, 258, ord("o")]
    assert tok.eot_id == 259 and tok.vocab_size == 260  # eot = number of ranks
    assert tok.decode([tok.eot_id]) == EOT
    assert tok.eot_id not in tok.encode(EOT)
    assert_round_trips(tok)
    for pattern in ("cl100k", "o200k"):
        assert_round_trips(from_tiktoken(path, pattern=pattern))


def test_tiktoken_llama3_specials(tmp_path):
    path = write_tiktoken_file(tmp_path / "tokenizer.model")
    tok = resolve_tokenizer(str(path))  # tokenizer.model -> llama3 pattern
    assert tok.eot_token == "<|end_of_text|>"
    assert tok.eot_id == 260 and tok.vocab_size == 261  # begin 259, end 260
    assert tok.decode([259, tok.eot_id]) == "<|begin_of_text|><|end_of_text|>"
    assert_round_trips(tok)


def test_tiktoken_bad_file_and_missing_package(tmp_path, monkeypatch):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # a SentencePiece proto
    with pytest.raises(
        CalmError, match=r"tokenizer.model:2: not a tiktoken rank line.*SentencePiece"
    ):
        from_tiktoken(bad)
    good = write_tiktoken_file(tmp_path / "tiny.tiktoken")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import now raises ImportError
    with pytest.raises(CalmError, match=r"pip install 'calm-lm\[tiktoken\]'"):
        from_tiktoken(good)


def test_hf_tokenizer_json(tmp_path):
    tok = from_tokenizer_json(write_hf_json(tmp_path / "tokenizer.json"))
    assert tok.encode("the") == [257]
    assert tok.encode("then") == [257, ord("n")]
    assert tok.eot_token == EOT and tok.eot_id == 258  # added after the vocabulary
    assert_round_trips(tok)
    tok2 = from_tokenizer_json(write_hf_json(tmp_path / "eos" / "tokenizer.json", eos="</s>"))
    assert tok2.eot_token == "</s>" and tok2.eot_id == 258


def test_save_load_round_trip(tmp_path):
    g_enc, g_bpe = write_gpt2_files(tmp_path / "g")
    toks = {
        "bpe": train_bpe(CORPUS, vocab_size=300),
        "gpt2": from_gpt2_files(g_enc, g_bpe),
        "tiktoken": from_tiktoken(write_tiktoken_file(tmp_path / "t.tiktoken"), pattern="cl100k"),
        "hf": from_tokenizer_json(write_hf_json(tmp_path / "tokenizer.json")),
    }
    for name, tok in toks.items():
        d = tok.save(tmp_path / "saved" / name)
        back = load_tokenizer(d)
        assert back.fingerprint == tok.fingerprint, name
        assert back.eot_id == tok.eot_id and back.vocab_size == tok.vocab_size
        for s in SAMPLES + CORPUS[:3]:
            assert back.encode(s) == tok.encode(s)
        assert back.describe() == tok.describe()
        # A folder holding a saved tokenizer resolves to it too.
        assert resolve_tokenizer(str(d)).fingerprint == tok.fingerprint
    fps = [t.fingerprint for t in toks.values()]
    assert len(set(fps)) == len(fps)


def test_fingerprint_ignores_location_but_not_content(tmp_path):
    a = write_hf_json(tmp_path / "a" / "tokenizer.json")
    b = tmp_path / "b" / "tokenizer.json"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert from_tokenizer_json(a).fingerprint == from_tokenizer_json(b).fingerprint
    t1 = write_tiktoken_file(tmp_path / "one.tiktoken")
    t2 = write_tiktoken_file(tmp_path / "two.tiktoken", merges=(b"he", b"ll"))
    assert from_tiktoken(t1).fingerprint != from_tiktoken(t2).fingerprint
    # Same ranks, different split pattern: a different tokenizer.
    assert from_tiktoken(t1, "gpt2").fingerprint != from_tiktoken(t1, "cl100k").fingerprint


def test_edited_saved_tokenizer_is_refused(tmp_path):
    d = from_tiktoken(write_tiktoken_file(tmp_path / "t.tiktoken")).save(tmp_path / "s")
    lines = (d / "tokenizer.tiktoken").read_text().splitlines()
    (d / "tokenizer.tiktoken").write_text("\n".join(lines[:-1]) + "\n")  # drop a merge
    with pytest.raises(CalmError, match="fingerprint"):
        load_tokenizer(d)


def test_resolve_tokenizer_dispatch(tmp_path):
    enc, _ = write_gpt2_files(tmp_path / "g")
    assert resolve_tokenizer(str(enc)).encode("hello") == [258, ord("o")]  # vocab.bpe beside it
    assert resolve_tokenizer(str(tmp_path / "g")).eot_id == 259  # a folder with encoder.json
    lone = tmp_path / "lone" / "encoder.json"
    lone.parent.mkdir()
    shutil.copy(enc, lone)
    with pytest.raises(CalmError, match="--vocab-bpe"):
        resolve_tokenizer(str(lone))
    assert resolve_tokenizer(str(lone), vocab_bpe=tmp_path / "g" / "vocab.bpe").eot_id == 259
    hf = write_hf_json(tmp_path / "h" / "tokenizer.json")
    assert resolve_tokenizer(str(hf)).encode("the") == [257]
    tk = write_tiktoken_file(tmp_path / "x.tiktoken")
    assert resolve_tokenizer(str(tk), pattern="gpt2").describe()["pattern"].startswith("'(?:")
    assert resolve_tokenizer("bpe", texts=CORPUS, vocab_size=280).vocab_size == 280
    with pytest.raises(CalmError, match="not found"):
        resolve_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "weird.bin").write_bytes(b"x")
    with pytest.raises(CalmError, match="cannot tell"):
        resolve_tokenizer(str(tmp_path / "weird.bin"))
