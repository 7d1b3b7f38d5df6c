"""Checkpoints and resume: a resumed run repeats the uninterrupted one step for step.

The reference is one uninterrupted CALM run (whose forward draws head noise, target
samples and partial first chunks); runs cut short — by deleting later checkpoints,
by SIGKILL between checkpoints, by SIGINT / SIGTERM — resume with ``--resume auto``
and must log the very same losses. Damaged checkpoints are skipped, never loaded;
a different model, autoencoder or dataset is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calm.checkpoint import (
    CorruptCheckpoint,
    list_checkpoints,
    read_state,
    read_weights,
    validate_checkpoint,
)
from calm.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def calm_argv(dataset_dir, ae_run, out, steps=6, *extra) -> list[str]:
    return ["train", "--autoencoder", str(ae_run), "--data", str(dataset_dir), "--out", str(out),
            "--preset", "tiny", "--block-size", "32", "--batch-size", "2", "--steps", str(steps),
            "--head-num-targets", "8", "--eval-batches", "2", "--eval-every", "3",
            "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress",
            "--threads", "1", *extra]


def records(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def assert_identical(run: Path, ref: Path, from_step: int = 0) -> int:
    """The same loss (and validation loss) at every step: exact equality on the CPU."""
    got, want = records(run), records(ref)
    assert sorted(got) == sorted(want)
    n = 0
    for step in want:
        if step <= from_step:
            continue
        for k in ("loss", "energy/fidelity", "val/loss"):
            if k in want[step]:
                assert got[step][k] == want[step][k], (step, k, got[step][k], want[step][k])
                n += 1
    return n


def run_cli(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_dir, ae_run) -> Path:
    """6 uninterrupted steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("resume") / "ref"
    assert main(calm_argv(dataset_dir, ae_run, out, 6, "--save-every", "2")) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004", "step_000006"]
    return out


def cut_back(run: Path, keep_step: int) -> None:
    """Make a run folder look as if it had crashed just after the checkpoint at keep_step."""
    for ckpt in list_checkpoints(run):
        if read_state(ckpt)["step"] > keep_step:
            shutil.rmtree(ckpt)


# ----------------------------------------------------------------------------- exact resume


def test_resume_repeats_the_uninterrupted_run(capsys, reference, copy_run, dataset_dir, ae_run):
    run = copy_run(reference, "cut")
    cut_back(run, 2)
    rc, out, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--save-every", "2",
                                            "--resume", "auto"))
    assert rc == 0, err
    assert "resuming from" in out and "step_000002 at step 2" in out
    # metrics.jsonl: the steps after 2 were dropped and redone, not duplicated.
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 3, 4, 5, 6, 6]
    assert assert_identical(run, reference) >= 12
    a, b = read_weights(list_checkpoints(run)[-1]), read_weights(list_checkpoints(reference)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_the_optimizer_state(capsys, reference, copy_run, dataset_dir, ae_run):
    """The equality above is not free: a resume that restarts AdamW's moments differs
    (from step 4 on: step 3's loss is computed before step 3's update)."""
    run = copy_run(reference, "noopt")
    cut_back(run, 2)
    from safetensors.torch import load_file, save_file

    f = list_checkpoints(run)[-1] / "optimizer.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(f)).items()}, str(f))
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--resume", "auto"))
    assert rc == 0, err
    assert records(run)[3]["loss"] == records(reference)[3]["loss"]
    assert records(run)[4]["loss"] != records(reference)[4]["loss"]


def test_sigint_saves_then_resume_continues(capsys, monkeypatch, reference, tmp_path, dataset_dir,
                                            ae_run):
    """SIGINT in the middle of step 3: the step finishes, step_000003 is saved, the
    command exits 130 (the shell's code for SIGINT, so a script does not go on as if the
    run had finished); resuming gives the uninterrupted run's losses."""
    from calm.model import CALM

    forward, calls = CALM.forward, [0]

    def interrupting(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3 and self.training:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *a, **k)

    monkeypatch.setattr(CALM, "forward", interrupting)
    run = tmp_path / "run"
    # Python's own handler, or SIG_IGN when the suite runs in a background job
    before = signal.getsignal(signal.SIGINT)
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--save-every", "2"))
    assert rc == 130, err
    assert "SIGINT: finishing the current step" in err and "stopped by SIGINT at step 3" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000003"]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.setattr(CALM, "forward", forward)
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--save-every", "2",
                                          "--resume", "auto"))
    assert rc == 0, err
    assert assert_identical(run, reference) >= 12


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.safetensors"),
    "bad state JSON": lambda c: (c / "state.json").write_text('{"step": 6, "data": '),
    "missing rng": lambda c: (c / "rng.safetensors").unlink(),
    "bad config JSON": lambda c: (c / "config.json").write_text("{]"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_skipped(capsys, damage, reference, copy_run, dataset_dir,
                                              ae_run):
    run = copy_run(reference, "damaged")
    latest = list_checkpoints(run)[-1]
    DAMAGE[damage](latest)
    with pytest.raises(CorruptCheckpoint):
        validate_checkpoint(latest)
    # An explicit --resume of the damaged folder is refused, never loaded.
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--resume", str(latest)))
    assert rc == 2 and "error" in err
    rc, out, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--save-every", "2",
                                            "--resume", "auto"))
    assert rc == 0, err
    assert "skipping checkpoint step_000006" in out and "step_000004 at step 4" in out
    assert assert_identical(run, reference) >= 12
    validate_checkpoint(list_checkpoints(run)[-1])  # the damaged one was replaced


def test_leftover_partial_save_is_ignored_and_removed(capsys, reference, copy_run, dataset_dir,
                                                      ae_run):
    run = copy_run(reference, "partial")
    cut_back(run, 4)
    partial = run / "checkpoints" / ".tmp-step_000006-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    rc, out, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--resume", "auto"))
    assert rc == 0, err
    assert "step_000004 at step 4" in out and not partial.exists()


# ----------------------------------------------------------------------------- refusals


def _err_line(capsys, argv) -> str:
    rc, _, err = run_cli(capsys, argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calm train: error: "), err
    return lines[0]


def test_resume_refuses_another_model_or_dataset(capsys, reference, copy_run, dataset_dir, ae_run,
                                                  tmp_path):
    run = copy_run(reference, "refuse")
    argv = calm_argv(dataset_dir, ae_run, run, 8, "--resume", "auto")
    line = _err_line(capsys, argv + ["--num-layers", "3"])
    assert "different model config" in line and "backbone.num_layers is 2" in line
    line = _err_line(capsys, argv + ["--head-noise-size", "32"])
    assert "head.noise_size" in line
    moved = tmp_path / "data-copy"
    shutil.copytree(dataset_dir, moved)
    line = _err_line(capsys, calm_argv(moved, ae_run, run, 8, "--resume", "auto"))
    assert "different dataset" in line
    # Nothing was written by the refused attempts.
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004", "step_000006"]


def test_resume_refuses_another_tokenizer(capsys, tmp_path, dataset_dir, other_dataset_dir):
    base = ["train-baseline", "--preset", "tiny", "--block-size", "32", "--batch-size", "2",
            "--steps", "2", "--eval-batches", "1", "--no-progress"]
    run = tmp_path / "base"
    assert main(base + ["--data", str(dataset_dir), "--out", str(run)]) == 0
    capsys.readouterr()
    rc, _, err = run_cli(capsys, base + ["--data", str(other_dataset_dir), "--out", str(run),
                                         "--resume", "auto"])
    assert rc == 2 and "different dataset: its tokenizer differs" in err


def test_newer_format_is_an_error_not_a_skip(capsys, reference, copy_run, dataset_dir, ae_run):
    run = copy_run(reference, "newer")
    cfg_file = list_checkpoints(run)[-1] / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    line = _err_line(capsys, calm_argv(dataset_dir, ae_run, run, 8, "--resume", "auto"))
    assert "format 99" in line and "upgrade calm" in line


def test_existing_folder_needs_resume_or_overwrite(capsys, reference, copy_run, dataset_dir, ae_run):
    run = copy_run(reference, "exists")
    assert "already holds a checkpoint" in _err_line(capsys, calm_argv(dataset_dir, ae_run, run))
    line = _err_line(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--resume", "auto", "--overwrite"))
    assert "contradict" in line


def test_keep_last_checkpoints(capsys, tmp_path, dataset_dir, ae_run):
    run = tmp_path / "keep"
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 5, "--save-every", "1",
                                          "--keep-checkpoints", "2"))
    assert rc == 0, err
    assert [p.name for p in list_checkpoints(run)] == ["step_000004", "step_000005"]


def test_loading_runs_no_pickle(capsys, monkeypatch, reference, copy_run, dataset_dir, ae_run):
    """Resuming reads safetensors and JSON only: pickle and torch.load are never called."""

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    run = copy_run(reference, "nopickle")
    cut_back(run, 4)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    rc, _, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, 6, "--resume", "auto"))
    assert rc == 0, err


# ----------------------------------------------------------------------------- real processes


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "calm", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until a training record at or past ``step``; return the step seen."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("the run ended early: " + proc.stderr.read()[-2000:])
        if metrics.is_file():
            for line in metrics.read_text().splitlines()[::-1]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "lr" in rec and rec["step"] >= step:
                    return rec["step"]
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the run made no progress")


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume(capsys, tmp_path, dataset_dir, ae_run):
    steps = 120  # headroom: the kill must land well before the end
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(calm_argv(dataset_dir, ae_run, ref, steps, "--save-every", "3")) == 0
    proc = _spawn(calm_argv(dataset_dir, ae_run, run, steps, "--save-every", "3"))
    seen = _wait_for_step(proc, run / "metrics.jsonl", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = [read_state(c)["step"] for c in list_checkpoints(run)]
    assert saved and max(saved) < steps, saved  # killed part-way, not after the end
    rc, out, err = run_cli(capsys, calm_argv(dataset_dir, ae_run, run, steps, "--save-every", "3",
                                            "--resume", "auto"))
    assert rc == 0, err
    resumed_at = int(out.split(" at step ")[1].split()[0].rstrip(";"))
    assert resumed_at <= seen and resumed_at == max(saved)
    assert assert_identical(run, ref) >= steps


@pytest.mark.slow
def test_sigterm_saves_a_clean_final_checkpoint(tmp_path, dataset_dir, ae_run):
    run = tmp_path / "run"
    proc = _spawn(calm_argv(dataset_dir, ae_run, run, 10_000, "--save-every", "1000"))
    _wait_for_step(proc, run / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: finishing the current step" in err and "stopped by SIGTERM" in err
    ckpt = list_checkpoints(run)[-1]
    validate_checkpoint(ckpt)
    last_logged = max(records(run))
    assert read_state(ckpt)["step"] == last_logged >= 3


def test_quickstart_stops_on_a_stopped_stage(capsys, monkeypatch, tmp_path, dataset_dir):
    """A stage stopped by a signal stops the quickstart with the signal's exit code and is
    not marked finished, so a rerun redoes it instead of building on a half-trained model."""
    import calm.cli.train_ae as train_ae
    from calm.train import TrainResult

    def stopped(job, settings):
        return TrainResult(step=3, last_metrics={}, last_eval={}, checkpoint=None,
                           tokens_per_second=1.0, stopped_by="SIGINT")

    monkeypatch.setattr(train_ae, "train_autoencoder", stopped)
    out = tmp_path / "qs"
    rc, _, err = run_cli(capsys, ["quickstart", "--data", str(dataset_dir), "--out", str(out),
                                  "--minutes", "1"])
    assert rc == 130, err
    assert "stopped by SIGINT in stage `calm train-ae`" in err
    assert not (out / "autoencoder" / "DONE").exists()
    assert not (out / "calm").exists()
