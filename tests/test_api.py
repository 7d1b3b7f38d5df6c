"""The Python API (calm.load) on the authors' fixtures and on an own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import calm
from calm.errors import CalmError

FIX = Path(__file__).parent / "fixtures" / "authors-format"
TEXTS = [s["text"] for s in json.loads((FIX / "expected.json").read_text())["tokenizer_samples"]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import os

    os.environ["CALM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return calm.load(FIX / "calm-energy-bin")
    finally:
        del os.environ["CALM_CACHE"]


def test_surface():
    assert {"load", "LanguageModel"} <= set(calm.__all__)
    assert all(hasattr(calm, n) for n in calm.__all__)


def test_load_imports_once_and_reloads_own_folder(model, tmp_path):
    assert model.kind == "calm" and model.checkpoint.name == "calm"
    again = calm.load(model.checkpoint)  # the imported folder is an own checkpoint now
    assert again.checkpoint == model.checkpoint


def test_encode_decode(model):
    ids = model.encode(TEXTS[0])
    assert model.decode(ids) == TEXTS[0]


def test_generate_is_seeded_and_stream_matches(model):
    a = model.generate(TEXTS[:2], max_new_tokens=8, seed=3)
    b = model.generate(TEXTS[:2], max_new_tokens=8, seed=3)
    assert a == b and len(a) == 2 and all(isinstance(t, str) for t in a)
    pieces = list(model.stream(TEXTS[0], max_new_tokens=8, seed=3))
    assert "".join(pieces) == model.generate(TEXTS[:1], max_new_tokens=8, seed=3)[0]
    low = model.generate(TEXTS[:1], max_new_tokens=8, temperature=0.5, num_candidates=16, seed=1)
    assert isinstance(low[0], str)


def test_brier(model):
    r = model.brier(TEXTS * 4, block_size=64)
    assert r["tokens"] > 0 and all(f"brier_{n}" in r for n in range(1, 5))
    assert r == model.brier(TEXTS * 4, block_size=64)  # seeded


def test_bad_input(model):
    with pytest.raises(CalmError):
        model.generate("one string, not a list")
    with pytest.raises(CalmError):
        model.generate([""])
    with pytest.raises(CalmError, match="fewer than one block"):
        model.brier(["short"], block_size=512)
    with pytest.raises(CalmError, match="autoencoder"):
        calm.load(model.checkpoint.parent / "autoencoder")


def test_baseline_answers_the_same_calls(model, tmp_path):
    from calm.cli import main as calm_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"d{i}.txt").write_text(" ".join(TEXTS) * 5)
    data, run = tmp_path / "data", tmp_path / "base"
    assert calm_main(["prepare", str(corpus), "--out", str(data), "--tokenizer",
                      str(model.checkpoint / "tokenizer"), "--val-fraction", "0.2", "--no-progress"]) == 0
    assert calm_main(["train-baseline", "--data", str(data), "--out", str(run), "--preset", "tiny",
                      "--steps", "2", "--batch-size", "2", "--block-size", "64", "--eval-every", "0",
                      "--no-progress"]) == 0
    base = calm.load(run)
    assert base.kind == "baseline"
    assert base.generate(TEXTS[:1], max_new_tokens=5, seed=0) == base.generate(TEXTS[:1], max_new_tokens=5, seed=0)
    assert "brier_lm" in base.brier(TEXTS * 4, block_size=64)
