"""Numerical faults: a non-finite loss or gradient skips the update; too many in a row stop the run.

NaNs are injected through a wrapped model forward (or a gradient hook); the checks
are on what must not change (the weights across a skipped step), on what is logged,
and on which checkpoints exist afterwards.
"""

from __future__ import annotations

import json

import pytest
import torch

from calm.baseline import TokenLM
from calm.checkpoint import list_checkpoints, read_state
from calm.cli import main
from calm.config import TrainConfig, preset
from calm.data import BatchLoader, TokenDataset
from calm.train import NonFiniteTraining, train

pytestmark = pytest.mark.usefixtures("single_thread")


class Faulty(torch.nn.Module):
    """A tiny baseline whose loss turns NaN on chosen steps (1-based forward calls);
    it records the weights each forward saw."""

    def __init__(self, vocab: int, bad: set[int]):
        super().__init__()
        torch.manual_seed(0)
        self.lm = TokenLM(preset("transformer", "tiny", vocab_size=vocab))
        self.bad, self.calls, self.seen = bad, 0, []

    def forward(self, tokens, **_):
        self.calls += 1
        self.seen.append({k: v.detach().clone() for k, v in self.lm.state_dict().items()})
        loss, metrics = self.lm(tokens)
        if self.calls in self.bad:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": loss.detach()}
        return loss, metrics


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def run(dataset_dir, tmp_path, model, steps=6, save_every=2, max_bad_steps=3):
    ds = TokenDataset(dataset_dir)
    cfg = TrainConfig(steps=steps, batch_size=2, block_size=32, lr=1e-2, warmup_steps=0,
                      save_every=save_every, log_every=1, eval_every=0)
    return train(model, cfg, iter(BatchLoader(ds, "train", 32, 2)), run_dir=tmp_path / "run",
                 checkpoint_config={"kind": "test"}, progress=False, max_bad_steps=max_bad_steps)


def log(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_bad_streak_stops_the_run_and_keeps_the_last_good_checkpoint(dataset_dir, tmp_path, capsys):
    model = Faulty(TokenDataset(dataset_dir).vocab_size, bad={4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteTraining, match="3 steps in a row") as e:
        run(dataset_dir, tmp_path, model, steps=10)
    assert model.calls == 6  # stopped right after the third bad step
    # Only step 2 was saved: the save due at step 4 waited for a finite step that never came.
    ckpts = list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["step_000002"]
    assert str(ckpts[0]) in str(e.value)
    # No update was applied by the bad steps: steps 4, 5, 6 all saw step 3's weights.
    assert same(model.seen[3], model.seen[4]) and same(model.seen[4], model.seen[5])
    assert not same(model.seen[2], model.seen[3])  # the good step 3 did move them
    recs = log(tmp_path)
    assert [r["skipped_steps"] for r in recs] == [0, 0, 0, 1, 2, 3]
    assert [r["loss"] is None for r in recs] == [False] * 3 + [True] * 3  # NaN logged as null
    err = capsys.readouterr().err
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row)" in err


def test_a_transient_fault_is_skipped_and_training_goes_on(dataset_dir, tmp_path):
    model = Faulty(TokenDataset(dataset_dir).vocab_size, bad={3})
    res = run(dataset_dir, tmp_path, model, steps=6, save_every=3)
    assert res.step == 6 and model.calls == 6
    assert same(model.seen[2], model.seen[3])  # step 3 skipped: step 4 sees step 2's weights
    assert not same(model.seen[3], model.seen[4])
    assert log(tmp_path)[-1]["skipped_steps"] == 1
    # The save due at step 3 (just after the bad step) waited for step 4.
    assert [read_state(c)["step"] for c in list_checkpoints(tmp_path / "run")] == [4, 6]


def test_a_non_finite_gradient_alone_is_skipped(dataset_dir, tmp_path):
    model = Faulty(TokenDataset(dataset_dir).vocab_size, bad=set())
    w = model.lm.embed.weight
    calls = []

    def poison(g):  # a finite loss whose gradient holds a NaN on step 2
        calls.append(1)
        return g * float("nan") if len(calls) == 2 else g

    w.register_hook(poison)
    res = run(dataset_dir, tmp_path, model, steps=3, save_every=0)
    assert res.step == 3
    assert same(model.seen[1], model.seen[2])
    recs = log(tmp_path)
    assert recs[1]["loss"] is not None and recs[1]["grad_norm"] is None
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1]


def test_max_bad_steps_flag_through_the_command_line(dataset_dir, tmp_path, monkeypatch, capsys):
    forward = TokenLM.forward

    def nan_forward(self, tokens, **k):
        loss, metrics = forward(self, tokens, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(TokenLM, "forward", nan_forward)
    rc = main(["train-baseline", "--data", str(dataset_dir), "--out", str(tmp_path / "b"),
               "--preset", "tiny", "--block-size", "32", "--batch-size", "2", "--steps", "20",
               "--eval-batches", "1", "--no-progress", "--max-bad-steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("calm train-baseline: error: stopped at step 2: 2 steps in a row")
    assert "no checkpoint was saved" in err[-1]
    assert list_checkpoints(tmp_path / "b") == []
