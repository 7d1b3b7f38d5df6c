"""The run report: FLOPs of validation steps, and a report built from real (tiny) runs."""

from __future__ import annotations

import json
import shutil

import pytest

from calm.cli import main
from calm.report import flops_at_steps, write_report

pytestmark = pytest.mark.usefixtures("single_thread")


def test_flops_between_logged_steps():
    rows = [{"step": 10, "train_flops": 100.0}, {"step": 20, "train_flops": 200.0},
            {"step": 15, "val/loss": 1.0}, {"step": 20, "val/loss": 0.9},
            {"step": 23, "val/loss": 0.8}, {"step": 4, "val/loss": 2.0}]
    f = flops_at_steps(rows)
    assert f[15] == pytest.approx(150.0)  # between two logged steps
    assert f[20] == 200.0
    assert f[23] == pytest.approx(230.0)  # after the last logged step, at the average rate
    assert f[4] == pytest.approx(40.0)  # before the first, from zero
    assert flops_at_steps([{"step": 3, "val/loss": 1.0}]) == {}


def _capture(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_report_from_real_runs(tmp_path, capsys, ae_run, calm_run, base_run, dataset_dir):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(calm_run, run / "calm")
    shutil.copytree(base_run, run / "baseline")
    ae_eval = json.loads(_capture(capsys, ["eval-ae", "--model", str(ae_run), "--data",
                                           str(dataset_dir), "--json"]))
    (run / "autoencoder_eval.json").write_text(json.dumps(ae_eval))
    evals = {}
    for kind in ("calm", "baseline"):
        evals[kind] = json.loads(_capture(capsys, ["eval", "--model", str(run / kind), "--data",
                                                   str(dataset_dir), "--max-tokens", "256",
                                                   "--block-size", "32", "--json"]))
        (run / kind / "eval.json").write_text(json.dumps(evals[kind]))
    samples = []
    for kind in ("calm", "baseline"):
        out = _capture(capsys, ["generate", "--model", str(run / kind), "--prompt", "the",
                                "--max-new-tokens", "8", "--seed", "0", "--json"])
        samples += [{"model": kind, "temperature": 1.0, **json.loads(line)} for line in out.splitlines()]
    (run / "samples.json").write_text(json.dumps(samples))

    report = write_report(run).read_text()
    # Every figure in the report is one that was measured.
    assert f"{100 * ae_eval['acc_sample']:.3f} %" in report
    for kind in ("calm", "baseline"):
        assert f"{evals[kind]['brier_1']:.4f} ± {evals[kind]['brier_1_se']:.4f}" in report
    assert f"{evals['baseline']['perplexity']:.2f}" in report
    assert "| run | model | params | tokens | train FLOPs | infer FLOPs/token |" in report
    assert "| calm | CALM" in report and "| baseline |" in report
    for s in samples:
        assert s["text"].replace("\n", " ⏎ ") in report
    for png in ("robustness.png", "training.png"):
        assert (run / png).stat().st_size > 10_000, png  # a drawn plot, not an empty canvas
        assert f"]({png})" in report
    # `calm report` rebuilds the same report.
    (run / "report.md").unlink()
    assert _capture(capsys, ["report", str(run)]).strip() == str(run / "report.md")
    assert (run / "report.md").read_text() == report
