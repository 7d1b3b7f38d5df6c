"""Several processes (gloo on the CPU): DDP gives one process's numbers, FSDP saves and resumes.

What makes 2 processes and 1 comparable: the global batch is the same (2 ranks × batch
2 against 1 process × batch 2 × 2 accumulation steps), the data loader hands rank r
exactly the rows of the single process's micro-batch r, and every micro-batch draws
its randomness (CALM's head noise, target draws, partial first chunks) from a
generator seeded by its global number, so both runs draw the same numbers for the
same rows. Any difference left is float summation order (relative 1e-5 allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm import dist
from calm.checkpoint import list_checkpoints, read_state, read_weights
from calm.cli import main
from calm.errors import CalmError

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "32"


def losses(run: Path) -> dict[int, dict[str, float]]:
    """step → the figures logged at that step (training and validation merged)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def assert_same_losses(a: Path, b: Path, keys=("loss", "val/loss"), rel=1e-5) -> int:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb)
    n = 0
    for step in la:
        for k in keys:
            if k in la[step] or k in lb[step]:
                assert la[step][k] == pytest.approx(lb[step][k], rel=rel), (step, k)
                n += 1
    return n


def torchrun(argv: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "calm", *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def one_process(argv: list[str]) -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(n)


def calm_args(kind: str, dataset_dir: Path, ae_run: Path, out: Path, steps: int = 4) -> list[str]:
    common = ["--data", str(dataset_dir), "--out", str(out), "--preset", "tiny",
              "--block-size", BLOCK, "--batch-size", "2", "--steps", str(steps),
              "--eval-batches", "2", "--eval-every", "2", "--log-every", "1",
              "--lr", "3e-3", "--warmup-steps", "0", "--no-progress", "--device", "cpu"]
    if kind == "calm":
        return ["train", "--autoencoder", str(ae_run), "--head-num-targets", "8", *common]
    return ["train-baseline", *common]


# ----------------------------------------------------------------------------- one process


def test_helpers_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = dist.setup("cpu")
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)
    assert dist.default_mode(None, 1) == "none"
    with pytest.raises(CalmError, match="torchrun"):
        dist.default_mode("ddp", 1)
    with pytest.raises(CalmError, match="unknown --dist"):
        dist.default_mode("zero3", 1)
    with pytest.raises(CalmError, match="2 separate models"):
        dist.default_mode("none", 2)
    # Sums and counts, then one division: (1 + 2 + 6) / 3, not a mean of means.
    assert dist.reduce_means({"loss": 9.0}, 3) == {"loss": 3.0}
    assert dist.reduce_eval({"loss": (6.0, 4), "acc": 0.5}) == {"acc": 0.5, "loss": 1.5}
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, "none", "cpu") is model and dist.unwrap(model) is model


def test_bad_world_size_is_a_clear_error(monkeypatch, dataset_dir):
    """A world size the data cannot feed: more sequences per step than windows."""
    from calm.config import TrainConfig
    from calm.data import TokenDataset
    from calm.train import sharded_batches

    ds = TokenDataset(dataset_dir)
    monkeypatch.setattr(dist, "world_size", lambda: 64)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    cfg = TrainConfig(batch_size=4, block_size=32, eval_batches=2)
    with pytest.raises(CalmError, match="64 processes × batch 4"):
        sharded_batches(ds, cfg)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(CalmError, match="fewer than the 3 processes"):
        sharded_batches(ds, cfg)  # 2 validation batches for 3 ranks
    _, val = sharded_batches(ds, TrainConfig(batch_size=4, block_size=32, eval_batches=7))
    assert len(val) == 2  # 7 batches cut to 6, so that each of the 3 ranks runs 2


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_ddp_matches_one_process(kind, tmp_path, dataset_dir, ae_run):
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(calm_args(kind, dataset_dir, ae_run, one) + ["--grad-accum", "2"])
    p = torchrun(calm_args(kind, dataset_dir, ae_run, two))
    assert "global batch 4 sequences = 2 per device × 1 accumulation × 2 processes" in p.stdout
    assert assert_same_losses(one, two) >= 6
    # Training moved the weights, and both runs moved them alike.
    a, b = read_weights(list_checkpoints(one)[-1]), read_weights(list_checkpoints(two)[-1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # Only rank 0 wrote: one metrics line per step, no duplicates.
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]


@pytest.mark.slow
def test_fsdp_saves_and_resumes(tmp_path, dataset_dir, ae_run):
    """FSDP2 over 2 processes: 4 steps, then 2 more resumed from its checkpoint; the
    result equals one uninterrupted process, and the checkpoint is a plain one."""
    run, ref = tmp_path / "fsdp", tmp_path / "ref"
    argv = calm_args("calm", dataset_dir, ae_run, run, steps=4) + ["--dist", "fsdp", "--save-every", "2"]
    torchrun(argv)
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]
    argv = calm_args("calm", dataset_dir, ae_run, run, steps=6) + ["--dist", "fsdp", "--resume", "auto"]
    p = torchrun(argv)
    assert "resuming from" in p.stdout and "step_000004 at step 4" in p.stdout
    one_process(calm_args("calm", dataset_dir, ae_run, ref, steps=6) + ["--grad-accum", "2"])
    assert assert_same_losses(ref, run) >= 9
    assert read_state(list_checkpoints(run)[-1])["step"] == 6

    from calm.loading import load_model

    model, _, _ = load_model(run)  # a one-device load of the gathered checkpoint
    assert model.trainable_parameters() > 0
