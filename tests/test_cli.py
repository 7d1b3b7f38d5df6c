"""The command line end to end, and its answers to bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from calm.checkpoint import FORMAT_VERSION, list_checkpoints
from calm.cli import _available, main

pytestmark = pytest.mark.usefixtures("single_thread")

BLOCK = "32"
TINY_TRAIN = ["--preset", "tiny", "--block-size", BLOCK, "--batch-size", "4", "--eval-batches", "1",
              "--no-progress"]


def run_ok(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def run_err(capsys, argv: list[str], *needles: str) -> str:
    """Run a command that must fail: exit 2 and exactly one line on stderr naming the problem."""
    capsys.readouterr()
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"calm {argv[0]}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under a folder → its sha256 (to check a folder is unchanged)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def latest(run: Path) -> Path:
    return list_checkpoints(run)[-1]


def edit_config(ckpt: Path, change) -> None:
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    change(cfg)
    p.write_text(json.dumps(cfg))


# ---------------------------------------------------------------------- the pipeline


def test_pipeline(tmp_path, capsys, corpus_dir):
    data, ae, calm, base = (tmp_path / n for n in ("data", "ae", "calm", "base"))
    out = run_ok(capsys, ["prepare", str(corpus_dir), "--out", str(data), "--vocab-size", "300",
                          "--val-fraction", "0.2", "--no-progress"])
    assert "vocab 300" in out and (data / "meta.json").is_file()
    run_ok(capsys, ["train-ae", "--data", str(data), "--out", str(ae), "--steps", "4", *TINY_TRAIN])
    assert [p.name for p in list_checkpoints(ae)] == ["step_000004"]
    assert (ae / "metrics.jsonl").is_file()

    h = json.loads(run_ok(capsys, ["eval-ae", "--model", str(ae), "--data", str(data),
                                   "--block-size", BLOCK, "--json"]))
    assert 0 <= h["acc_mean"] <= 1 and 0 <= h["acc_sample"] <= 1 and h["latent_size"] == 16
    assert h["tokens"] > 0 and len(h["robustness"]) > 1
    table = run_ok(capsys, ["eval-ae", "--model", str(ae), "--data", str(data),
                            "--block-size", BLOCK])
    assert "accuracy (mean)" in table and "collapsed dims" in table

    out = run_ok(capsys, ["train", "--autoencoder", str(ae), "--data", str(data),
                          "--out", str(calm),
                          "--steps", "3", "--head-num-targets", "8", *TINY_TRAIN])
    assert json.loads(out.strip().splitlines()[-1])["step"] == 3
    cfg = json.loads((latest(calm) / "config.json").read_text())
    assert cfg["kind"] == "calm" and cfg["format_version"] == FORMAT_VERSION
    assert cfg["autoencoder"]["path"] == str(latest(ae).resolve())
    assert cfg["model"]["head"]["num_targets"] == 8 and cfg["model"]["chunk_size"] == 4
    assert (latest(calm) / "tokenizer").is_dir()
    weights = load_file(latest(calm) / "model.safetensors")
    assert weights and not any(k.startswith("autoencoder.") for k in weights)

    run_ok(capsys, ["train-baseline", "--data", str(data), "--out", str(base), "--steps", "3",
                    *TINY_TRAIN])
    assert json.loads((latest(base) / "config.json").read_text())["kind"] == "baseline"

    for model in (calm, base):
        argv = ["generate", "--model", str(model), "--prompt", "the king", "--prompt", "Sea",
                "--max-new-tokens", "7", "--seed", "3", "--json"]
        rows = [json.loads(line) for line in run_ok(capsys, argv).splitlines()]
        assert [r["prompt"] for r in rows] == ["the king", "Sea"]
        assert all(1 <= r["tokens"] <= 7 for r in rows)
        again = [json.loads(line) for line in run_ok(capsys, argv).splitlines()]
        assert [r["text"] for r in again] == [r["text"] for r in rows]  # same seed, same text
        plain = run_ok(capsys, ["generate", "--model", str(model), "--prompt", "the king",
                                "--max-new-tokens", "5", "--seed", "0"])
        assert plain.startswith("the king")
        streamed = run_ok(capsys, ["generate", "--model", str(model), "--prompt", "the king",
                                   "--max-new-tokens", "5", "--seed", "0", "--stream"])
        assert streamed.strip() == plain.splitlines()[0].strip()


def test_help_of_every_command(capsys):
    names = list(_available())
    assert {"prepare", "train-ae", "eval-ae", "train", "train-baseline", "generate"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: calm {name}"), name
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(n in out for n in names)
    assert main([]) == 2  # no command: the help, and a non-zero exit


# ---------------------------------------------------------------------- bad input: training


def test_missing_data_folder(tmp_path, capsys, ae_run):
    missing = str(tmp_path / "nope")
    out = tmp_path / "out"
    for argv in (
        ["train-ae", "--data", missing, "--out", str(out), *TINY_TRAIN],
        ["train", "--autoencoder", str(ae_run), "--data", missing, "--out", str(out), *TINY_TRAIN],
        ["train-baseline", "--data", missing, "--out", str(out), *TINY_TRAIN],
        ["eval-ae", "--model", str(ae_run), "--data", missing],
    ):
        run_err(capsys, argv, "nope")
        assert not out.exists()


def test_block_size_not_divisible_by_k(tmp_path, capsys, dataset_dir, ae_run):
    out = tmp_path / "out"
    run_err(capsys, ["train-ae", "--data", str(dataset_dir), "--out", str(out), "--preset", "tiny",
                     "--block-size", "30", "--no-progress"], "divisible", "K=4")
    assert not out.exists()
    run_err(capsys, ["train", "--autoencoder", str(ae_run), "--data", str(dataset_dir),
                     "--out", str(out), "--preset", "tiny", "--block-size", "30", "--no-progress"],
            "divisible", "K=4")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train-ae", "train", "train-baseline"])
def test_existing_checkpoint_needs_overwrite(capsys, copy_run, ae_run, calm_run, base_run,
                                             dataset_dir, command):
    src = {"train-ae": ae_run, "train": calm_run, "train-baseline": base_run}[command]
    run = copy_run(src)
    before = digest(run)
    argv = [command, "--data", str(dataset_dir), "--out", str(run), "--steps", "2", *TINY_TRAIN]
    if command == "train":
        argv += ["--autoencoder", str(ae_run), "--head-num-targets", "4"]
    run_err(capsys, argv, "--overwrite", str(run))
    assert digest(run) == before
    run_ok(capsys, argv + ["--overwrite"])
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]  # old steps are gone
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the old run's metrics were cleared too


def test_out_is_a_file(tmp_path, capsys, dataset_dir):
    f = tmp_path / "file"
    f.write_text("keep me")
    run_err(capsys, ["train-baseline", "--data", str(dataset_dir), "--out", str(f), *TINY_TRAIN],
            "not a folder")
    assert f.read_text() == "keep me"


def test_dataset_with_another_tokenizer(tmp_path, capsys, ae_run, other_dataset_dir):
    out = tmp_path / "out"
    run_err(capsys, ["train", "--autoencoder", str(ae_run), "--data", str(other_dataset_dir),
                     "--out", str(out), *TINY_TRAIN], "tokenizer")
    assert not out.exists()
    run_err(capsys, ["eval-ae", "--model", str(ae_run), "--data", str(other_dataset_dir),
                     "--block-size", BLOCK], "tokenizer")


def test_missing_autoencoder_for_train(tmp_path, capsys, dataset_dir):
    out = tmp_path / "out"
    run_err(capsys, ["train", "--autoencoder", str(tmp_path / "no_ae"), "--data", str(dataset_dir),
                     "--out", str(out), *TINY_TRAIN], "no_ae")
    assert not out.exists()


# ---------------------------------------------------------------------- bad input: checkpoints


def gen_argv(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "the king", "--max-new-tokens", "4",
            "--seed", "0", *extra]


def test_calm_autoencoder_moved_or_mismatched(tmp_path, capsys, copy_run, ae_run, dataset_dir):
    ae = copy_run(ae_run, "ae")
    calm = tmp_path / "calm"
    run_ok(capsys, ["train", "--autoencoder", str(ae), "--data", str(dataset_dir),
                    "--out", str(calm),
                    "--steps", "2", "--head-num-targets", "4", *TINY_TRAIN])
    want = run_ok(capsys, gen_argv(calm))

    moved = tmp_path / "ae_moved"
    ae.rename(moved)
    run_err(capsys, gen_argv(calm), "autoencoder", "--autoencoder")
    # Pointing at the moved folder (run or checkpoint folder) works, with the same output.
    assert run_ok(capsys, gen_argv(calm, "--autoencoder", str(moved))) == want
    assert run_ok(capsys, gen_argv(calm, "--autoencoder", str(latest(moved)))) == want

    # Another autoencoder of the same shape: refused (its weights are not the recorded ones).
    other = tmp_path / "ae_other"
    run_ok(capsys, ["train-ae", "--data", str(dataset_dir), "--out", str(other), "--steps", "1",
                    "--seed", "5", *TINY_TRAIN])
    run_err(capsys, gen_argv(calm, "--autoencoder", str(other)), "autoencoder")
    # One of another shape (K=2): refused too.
    k2 = tmp_path / "ae_k2"
    run_ok(capsys, ["train-ae", "--data", str(dataset_dir), "--out", str(k2), "--steps", "1",
                    "--chunk-size", "2", *TINY_TRAIN])
    run_err(capsys, gen_argv(calm, "--autoencoder", str(k2)), "autoencoder")

    # The recorded autoencoder's weights changed in place: refused.
    f = latest(moved) / "model.safetensors"
    w = load_file(f)
    name = min(w)
    w[name] = w[name] + 0.01
    save_file(w, f, metadata={"format": "pt"})
    run_err(capsys, gen_argv(calm, "--autoencoder", str(moved)), "weights differ")


def test_generate_from_an_autoencoder(capsys, ae_run):
    run_err(capsys, gen_argv(ae_run), "autoencoder")


def test_eval_ae_of_a_calm_checkpoint(capsys, calm_run, dataset_dir):
    run_err(capsys, ["eval-ae", "--model", str(calm_run), "--data", str(dataset_dir)],
            "not an autoencoder")


@pytest.mark.parametrize("which", ["calm", "base", "ae"])
def test_truncated_weights(capsys, copy_run, calm_run, base_run, ae_run, dataset_dir, which):
    run = copy_run({"calm": calm_run, "base": base_run, "ae": ae_run}[which])
    f = latest(run) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    if which == "ae":
        run_err(capsys, ["eval-ae", "--model", str(run), "--data", str(dataset_dir)], "truncated")
        f.write_bytes(b"")
        run_err(capsys, ["eval-ae", "--model", str(run), "--data", str(dataset_dir)], "truncated")
    else:
        run_err(capsys, gen_argv(run), "truncated")
        f.write_bytes(data[:5])
        run_err(capsys, gen_argv(run), "truncated")


def test_missing_weights_or_config(capsys, copy_run, base_run, tmp_path):
    ckpt = latest(copy_run(base_run))
    (ckpt / "model.safetensors").unlink()
    run_err(capsys, gen_argv(ckpt), "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    run_err(capsys, gen_argv(empty), "no checkpoint")
    run_err(capsys, gen_argv(tmp_path / "absent"), "does not exist")


BAD_CONFIGS = {
    "unknown model field": (lambda c: c["model"].update(dropout_rate=0.1), "unknown field"),
    "ill-typed int": (lambda c: c["model"].update(hidden_size="32"), "hidden_size"),
    "float for an int": (lambda c: c["model"].update(num_layers=2.5), "num_layers"),
    "bool for an int": (lambda c: c["model"].update(num_heads=True), "num_heads"),
    "model not an object": (lambda c: c.update(model=[1, 2]), "model"),
    "unknown kind": (lambda c: c.update(kind="gpt"), "kind"),
    "newer format": (lambda c: c.update(format_version=FORMAT_VERSION + 1), "newer"),
    "no format": (lambda c: c.pop("format_version"), "format_version"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_baseline_config(capsys, copy_run, base_run, case):
    change, needle = BAD_CONFIGS[case]
    run = copy_run(base_run)
    edit_config(latest(run), change)
    run_err(capsys, gen_argv(run), needle)


@pytest.mark.parametrize("case", ["unknown head field", "ill-typed backbone", "newer format",
                                  "not json"])
def test_bad_calm_config(capsys, copy_run, calm_run, case):
    run = copy_run(calm_run)
    ckpt = latest(run)
    if case == "not json":
        (ckpt / "config.json").write_text("{ not json")
        run_err(capsys, gen_argv(run), "JSON")
        return
    change, needle = {
        "unknown head field": (lambda c: c["model"]["head"].update(temperature=2), "unknown field"),
        "ill-typed backbone": (lambda c: c["model"]["backbone"].update(num_layers="two"),
                               "num_layers"),
        "newer format": (lambda c: c.update(format_version=FORMAT_VERSION + 1), "newer"),
    }[case]
    edit_config(ckpt, change)
    run_err(capsys, gen_argv(run), needle)


def test_bad_autoencoder_config(capsys, copy_run, ae_run, dataset_dir):
    run = copy_run(ae_run)
    edit_config(latest(run), lambda c: c["model"].update(latent_size=16.5))
    run_err(capsys, ["eval-ae", "--model", str(run), "--data", str(dataset_dir)], "latent_size")


# ---------------------------------------------------------------------- bad input: generate


def test_generate_bad_prompts_and_flags(capsys, base_run, calm_run, tmp_path):
    for run in (base_run, calm_run):
        run_err(capsys, ["generate", "--model", str(run)], "prompt")
        run_err(capsys, ["generate", "--model", str(run), "--prompt", "  "], "empty prompt")
        for t in ("0", "-1", "1.5"):
            run_err(capsys, gen_argv(run, "--temperature", t), "temperature")
        run_err(capsys, gen_argv(run, "--max-new-tokens", "0"), "max new tokens")
    run_err(capsys, ["generate", "--model", str(base_run),
                     "--prompt-file", str(tmp_path / "x.txt")],
            "prompt-file")
    long = "the king " * 400  # far more tokens than the tiny context (256 positions)
    run_err(capsys, ["generate", "--model", str(base_run), "--prompt", long], "context")
    run_err(capsys, ["generate", "--model", str(calm_run), "--prompt", long * 3], "context")
    run_err(capsys, gen_argv(base_run, "--compile"), "--compile applies to CALM")
    run_err(capsys, gen_argv(calm_run, "--compile", "--temperature", "0.5"), "temperature sampling")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_generate_compiled_says_the_same(capsys, calm_run):
    argv = ["generate", "--model", str(calm_run), "--prompt", "the king", "--prompt", "Sea",
            "--max-new-tokens", "12", "--seed", "3", "--precision", "fp32", "--json"]
    plain = [json.loads(line)["text"] for line in run_ok(capsys, argv).splitlines()]
    compiled = [json.loads(line)["text"] for line in run_ok(capsys, [*argv, "--compile"]).splitlines()]
    assert compiled == plain


@pytest.mark.parametrize("flags,needle", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--max-minutes", "0"], "--max-minutes"),
    (["--num-heads", "3"], "num_heads"),
    (["--head-num-samples", "1"], "num_samples"),
    (["--block-size", "4"], "fewer than 2 chunks"),
    (["--token-loss-weight", "-1"], "token_loss_weight"),
    (["--token-loss-weight", "1", "--input-scheme", "continuous"], "discrete or both"),
])
def test_bad_training_flags_write_nothing(tmp_path, capsys, ae_run, dataset_dir, flags, needle):
    out = tmp_path / "out"
    run_err(capsys, ["train", "--autoencoder", str(ae_run), "--data", str(dataset_dir),
                     "--out", str(out), "--preset", "tiny", "--no-progress", *flags], needle)
    assert not out.exists()


def test_generate_below_temperature_one(capsys, calm_run, base_run):
    argv = ["--prompt", "the king", "--max-new-tokens", "8", "--temperature", "0.5", "--seed", "1"]
    out = run_ok(capsys, ["generate", "--model", str(calm_run), *argv, "--sampler", "batch",
                          "--num-candidates", "16"])
    assert out.startswith("the king")
    run_ok(capsys, ["generate", "--model", str(base_run), *argv])
    run_err(capsys, ["generate", "--model", str(calm_run), *argv, "--num-candidates", "0"],
            "candidates")


def test_library_training_run_equals_the_command(tmp_path, dataset_dir, ae_run, calm_run):
    """`calm train` is `calm.runs.train_language_model` on the job its flags describe."""
    import dataclasses

    import torch

    from calm.checkpoint import resolve_checkpoint
    from calm.recipes import recipe
    from calm.runs import LanguageModelJob, RunSettings, train_language_model

    train = dataclasses.replace(recipe("calm", "tiny").train, steps=6, block_size=int(BLOCK),
                                batch_size=4, eval_batches=2)
    job = LanguageModelJob(kind="calm", data=dataset_dir, preset="tiny",
                           head={"num_targets": 16}, autoencoder=str(ae_run), train=train)
    result = train_language_model(job, RunSettings(out=tmp_path / "lib", progress=False))
    assert result.step == 6
    ours = load_file(str(result.checkpoint / "model.safetensors"))
    theirs = load_file(str(resolve_checkpoint(calm_run) / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_commands_ask_for_huge_pages_unless_told_not_to(monkeypatch, tmp_path, capsys):
    import os

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["eval", "--model", str(tmp_path / "none"), "--text", "hi"]) == 2  # fails, after the setting
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    main(["eval", "--model", str(tmp_path / "none"), "--text", "hi"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"  # the user's choice is kept
    capsys.readouterr()
