"""Preparing at scale: worker processes give the same dataset; parquet and .zst stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

import calm.dataset
from calm.cli import main
from calm.corpus import is_validation
from calm.data import TokenDataset
from calm.dataset import prepare_dataset
from calm.errors import CalmError
from calm.tokenizer import EOT, train_bpe

WORDS = "alpha beta gamma delta river stone wind fire sea night day ünï ✓".split()


def doc_text(i: int) -> str:
    rng = np.random.default_rng(i)
    words = rng.choice(WORDS, size=5 + (i * 7) % 40)
    text = f"Doc {i}: " + " ".join(words) + "."
    if i == 3:
        text += f" {EOT} stays text."
    return text


@pytest.fixture(scope="module")
def tok():
    return train_bpe([doc_text(i) for i in range(200)], vocab_size=300)


def dataset_files(folder):
    """Every shard's bytes and meta.json without its time stamp."""
    meta = json.loads((folder / "meta.json").read_text())
    del meta["created"]
    meta["inputs"] = [{k: v for k, v in m.items() if k != "path"} for m in meta["inputs"]]
    shards = {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}
    return meta, shards


def expected_streams(tok, names_texts, val_fraction):
    """Independent reference: encode each document alone, append EOT, route by name."""
    out = {"train": [], "val": []}
    for name, text in names_texts:
        if text:
            split = "val" if is_validation(name, val_fraction) else "train"
            out[split] += tok.encode(text) + [tok.eot_id]
    return out


def test_workers_give_identical_datasets(tmp_path, tok, monkeypatch):
    # Small batches, so a small corpus makes many batches and really uses the pool.
    monkeypatch.setattr(calm.dataset, "_BATCH_CHARS", 500)
    lines = [json.dumps({"text": doc_text(i)}) for i in range(300)]
    lines[10] = json.dumps({"text": ""})  # empty documents are skipped alike
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    results = []
    for workers in (1, 2, 3):
        out = tmp_path / f"ds{workers}"
        meta = prepare_dataset(
            [str(src)],
            out,
            tokenizer=tok,
            val_fraction=0.2,
            shard_tokens=1000,  # several shards, so shard boundaries are compared too
            progress=False,
            workers=workers,
        )
        assert meta["empty_documents"] == 1
        results.append(dataset_files(out))
    assert len(results[0][1]) > 4
    assert results[1] == results[0] and results[2] == results[0]

    ds = TokenDataset(tmp_path / "ds2")
    ref = expected_streams(
        tok, [(f"c.jsonl:{n}", json.loads(s)["text"]) for n, s in enumerate(lines, 1)], 0.2
    )
    for split in ("train", "val"):
        assert ds.tokens(split).tolist() == ref[split]
        assert ds.num_documents(split) == ref[split].count(tok.eot_id)


def test_documents_stream_with_workers(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(calm.dataset, "_BATCH_CHARS", 300)
    docs = [(f"d{i}", doc_text(i)) for i in range(120)]
    pulled = []

    def gen():  # a one-shot generator: not turned into a list with a given tokenizer
        for d in docs:
            pulled.append(d[0])
            yield d

    meta = prepare_dataset(
        None,
        tmp_path / "ds",
        documents=gen(),
        tokenizer=tok,
        val_fraction=0.3,
        progress=False,
        workers=2,
    )
    assert len(pulled) == len(docs)
    ds = TokenDataset(tmp_path / "ds")
    ref = expected_streams(tok, docs, 0.3)
    assert ds.tokens("train").tolist() == ref["train"]
    assert ds.tokens("val").tolist() == ref["val"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs)


def test_bad_worker_count(tmp_path, tok):
    with pytest.raises(CalmError, match="workers must be at least 1"):
        prepare_dataset(None, tmp_path / "x", documents=[("a", "b")], tokenizer=tok, workers=0)


def test_jsonl_zst_multiframe_streams(tmp_path, tok):
    zstandard = pytest.importorskip("zstandard")
    texts = [doc_text(i) for i in range(30)]
    c = zstandard.ZstdCompressor()
    # Two frames back to back (as `cat a.zst b.zst` makes): both must be read.
    frames = [
        c.compress(("\n".join(json.dumps({"t": t}) for t in part) + "\n").encode())
        for part in (texts[:12], texts[12:])
    ]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(frames))
    meta = prepare_dataset(
        [str(tmp_path / "c.jsonl.zst")],
        tmp_path / "ds",
        tokenizer=tok,
        text_field="t",
        val_fraction=0.2,
        progress=False,
        workers=2,
    )
    assert meta["train"]["documents"] + meta["val"]["documents"] == 30
    ref = expected_streams(tok, [(f"c.jsonl.zst:{n}", t) for n, t in enumerate(texts, 1)], 0.2)
    assert TokenDataset(tmp_path / "ds").tokens("train").tolist() == ref["train"]


def test_parquet_round_trip(tmp_path, tok, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(calm.dataset, "_BATCH_CHARS", 400)
    texts = [doc_text(i) for i in range(250)]
    texts[7] = None  # a null row is an empty document
    table = pa.table({"id": list(range(250)), "body": texts})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=64)  # several row groups
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t or ""}) + "\n" for t in texts))
    for name, workers in (("c.parquet", 2), ("c.jsonl", 1)):
        prepare_dataset(
            [str(tmp_path / name)],
            tmp_path / f"ds-{name}",
            tokenizer=tok,
            text_field="body",
            val_fraction=0.25,
            progress=False,
            workers=workers,
        )
    # Rows are named like .jsonl lines (file:row), so each file's split follows its rows.
    a, b = TokenDataset(tmp_path / "ds-c.parquet"), TokenDataset(tmp_path / "ds-c.jsonl")
    assert a.meta["empty_documents"] == 1
    for ds, name in ((a, "c.parquet"), (b, "c.jsonl")):
        ref = expected_streams(tok, [(f"{name}:{n}", t or "") for n, t in enumerate(texts, 1)], 0.25)
        for split in ("train", "val"):
            assert ds.tokens(split).tolist() == ref[split]
    with pytest.raises(CalmError, match="no 'text' column"):
        prepare_dataset([str(tmp_path / "c.parquet")], tmp_path / "x", tokenizer=tok)
    with pytest.raises(CalmError, match="'id' holds int64, not strings"):
        prepare_dataset(
            [str(tmp_path / "c.parquet")], tmp_path / "x", tokenizer=tok, text_field="id"
        )


def test_parquet_without_pyarrow_names_the_extra(tmp_path, tok, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(CalmError, match=r"pip install 'calm-lm\[data\]'"):
        prepare_dataset([str(tmp_path / "c.parquet")], tmp_path / "x", tokenizer=tok)
    assert not (tmp_path / "x").exists()


def test_cli_workers(tmp_path, tok, capsys):
    tok.save(tmp_path / "tok")
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": doc_text(i)}) + "\n" for i in range(50)))
    base = ["prepare", str(src), "--tokenizer", str(tmp_path / "tok"), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--workers", "2"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    assert dataset_files(tmp_path / "a") == dataset_files(tmp_path / "b")
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c"), "--workers", "0"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
