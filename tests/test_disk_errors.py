"""A full or read-only disk: one clear line, exit 2, and nothing lost or half-written."""

import errno

import pytest

from calm.checkpoint import list_checkpoints
from calm.cli import main

TRAIN = ["--preset", "tiny", "--batch-size", "2", "--block-size", "32", "--no-progress",
         "--threads", "1", "--eval-every", "0"]


def _fail_with(code, message):
    def boom(*args, **kwargs):
        raise OSError(code, message)

    return boom


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
def test_checkpoint_write_failure_keeps_earlier_checkpoints(tmp_path, dataset_dir, capsys,
                                                            monkeypatch, code, message):
    run = tmp_path / "run"
    assert main(["train-baseline", "--data", str(dataset_dir), "--out", str(run), "--steps", "2",
                 *TRAIN]) == 0
    before = [p.name for p in list_checkpoints(run)]
    assert before == ["step_000002"]
    capsys.readouterr()
    # The disk fills up (or turns read-only) when the resumed run saves again.
    monkeypatch.setattr("calm.checkpoint.save_file", _fail_with(code, message))
    rc = main(["train-baseline", "--data", str(dataset_dir), "--out", str(run), "--steps", "4",
               "--resume", "auto", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("calm train-baseline: error: cannot write checkpoint")
    assert message in err[-1]
    assert [p.name for p in list_checkpoints(run)] == before  # the good one is intact
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written temporary folder


def test_metrics_write_failure_is_one_line(tmp_path, dataset_dir, capsys, monkeypatch):
    import builtins

    real_open = builtins.open

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    rc = main(["train-baseline", "--data", str(dataset_dir), "--out", str(tmp_path / "r"),
               "--steps", "2", "--log-every", "1", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "cannot write" in err[-1] and "No space left on device" in err[-1]
