"""Shared fixtures: a tiny synthetic corpus, its prepared dataset and tiny trained models.

Everything expensive is session-scoped and built once, through the real command
line, so the model, generation and CLI tests all read the same small run folders.
Tests that damage a checkpoint copy it first (``copy_run``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# Figures that do not depend on the CPU: fp32 unless a test asks for bf16 itself
# (set before calm is imported; subprocesses inherit it).
os.environ["CALM_PRECISION"] = "fp32"

from calm.cli import main  # noqa: E402
from calm.config import CALMConfig, HeadConfig, preset  # noqa: E402

WORDS = [
    "the", "king", "queen", "crown", "sword", "night", "day", "love", "death", "river", "stone",
    "wind", "fire", "sea", "castle", "horse", "bread", "song", "old", "young", "gold", "iron",
]

BLOCK = 32  # tokens per training sequence in the tiny runs (8 chunks of K=4)


def write_corpus(folder: Path, n: int = 40, seed: int = 0, words=WORDS) -> Path:
    """n short documents of pseudo-random sentences, one .txt file each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        lines = [f"Story {i}."] + [
            " ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(4 + i % 3)
        ]
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def cli_ok(argv: list[str]) -> None:
    with one_thread():
        rc = main(argv)
    assert rc == 0, f"calm {' '.join(argv)} failed with {rc}"


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one intra-op thread (the test machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def single_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "txt")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("data") / "main"
    cli_ok(["prepare", str(corpus_dir), "--out", str(out), "--vocab-size", "300",
            "--val-fraction", "0.2", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def other_dataset_dir(tmp_path_factory) -> Path:
    """A dataset with another tokenizer (other text, other vocabulary size)."""
    root = tmp_path_factory.mktemp("other")
    corpus = write_corpus(root / "txt", n=30, seed=7, words=[w[::-1] for w in WORDS])
    out = root / "data"
    cli_ok(["prepare", str(corpus), "--out", str(out), "--vocab-size", "280",
            "--val-fraction", "0.2", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def ae_run(tmp_path_factory, dataset_dir) -> Path:
    """A tiny autoencoder (K=4, latent 16) trained for a few steps."""
    out = tmp_path_factory.mktemp("runs") / "ae"
    cli_ok(["train-ae", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny",
            "--steps", "40", "--block-size", str(BLOCK), "--batch-size", "8",
            "--eval-batches", "2", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def calm_run(tmp_path_factory, dataset_dir, ae_run) -> Path:
    out = tmp_path_factory.mktemp("runs") / "calm"
    cli_ok(["train", "--autoencoder", str(ae_run), "--data", str(dataset_dir), "--out", str(out),
            "--preset", "tiny", "--steps", "6", "--block-size", str(BLOCK), "--batch-size", "4",
            "--head-num-targets", "16", "--eval-batches", "2", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, dataset_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    cli_ok(["train-baseline", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny",
            "--steps", "5", "--block-size", str(BLOCK), "--batch-size", "4",
            "--eval-batches", "2", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def tiny_ae(ae_run):
    """The trained tiny autoencoder, loaded (frozen, eval mode)."""
    from calm.loading import load_autoencoder

    ae, _, _ = load_autoencoder(ae_run)
    return ae


@pytest.fixture(scope="session")
def make_calm(tiny_ae):
    """Factory: a fresh tiny CALM on the trained autoencoder.

    ``random_head=True`` gives the head large random weights (last layer included),
    so that samples depend strongly on the noise and on h: an untrained head always
    outputs z = 0, and a freshly initialised one barely depends on h.
    """

    def make(input_scheme: str = "discrete", *, seed: int = 0, random_head: bool = False,
             num_targets: int = 16, token_loss_weight: float = 0.0,
             **backbone) -> torch.nn.Module:
        from calm.model import CALM

        ae = copy.deepcopy(tiny_ae)  # each model owns its copy: tests may not leak into others
        torch.manual_seed(seed)
        cfg = CALMConfig(
            backbone=preset("transformer", "tiny", vocab_size=ae.config.vocab_size, **backbone),
            head=HeadConfig(num_targets=num_targets),
            chunk_size=ae.config.chunk_size,
            latent_size=ae.config.latent_size,
            input_scheme=input_scheme,
            token_loss_weight=token_loss_weight,
        )
        model = CALM(cfg, ae)
        if random_head:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for m in model.head.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.normal_(0.0, 2.0 / m.in_features**0.5, generator=g)
                        m.bias.normal_(0.0, 0.5, generator=g)
        return model.eval()

    return make


@pytest.fixture
def copy_run(tmp_path):
    """Copy a run folder into this test's tmp folder (to damage it safely)."""

    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return copy
