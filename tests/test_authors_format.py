"""Importing checkpoints written by the CALM authors' own code (tests/fixtures/authors-format).

The fixtures hold tiny random-weight models saved by their code as .bin and as
safetensors, and their code's outputs on fixed inputs (expected.safetensors):
every output of an imported model must match them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calm.authors_format import build_autoencoder, build_calm, import_checkpoint, read_folder
from calm.brier import generic_two_sample_brier
from calm.cli import main as calm_main
from calm.errors import CalmError
from calm.heads.energy import energy_loss
from calm.loading import load_model

FIX = Path(__file__).parent / "fixtures" / "authors-format"
E = load_file(str(FIX / "expected.safetensors"))
TOL = 1e-5
AE_FOLDERS = ["autoencoder", "autoencoder-bin"]
CALM_FOLDERS = ["calm-energy", "calm-energy-bin"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each fixture folder imported with `calm import`, then loaded as every command loads it."""
    out = {}
    for name in AE_FOLDERS + CALM_FOLDERS:
        dest = tmp_path_factory.mktemp("imp") / name
        assert calm_main(["import", str(FIX / name), "--out", str(dest)]) == 0
        kind = "calm" if name.startswith("calm") else "autoencoder"
        out[name] = load_model(dest / kind)[0]
    return out


def _ae(model):
    return model.autoencoder if hasattr(model, "autoencoder") else model


@pytest.mark.parametrize("name", AE_FOLDERS + CALM_FOLDERS)
def test_autoencoder_outputs(imported, name):
    ae = _ae(imported[name])
    with torch.no_grad():
        mean, log_std = ae.encode(E["ae_tokens"].view(4, 2, 4))
        logits = ae.decode(E["ae_z"]).reshape(4, 8, -1)
    assert close(mean, E["ae_mean"]) and close(log_std, E["ae_log_std"])
    assert close(logits, E["ae_logits"])


@pytest.mark.parametrize("name", CALM_FOLDERS)
def test_backbone_and_head_outputs(imported, name):
    model = imported[name]
    with torch.no_grad():
        x = model.inputs(E["calm_input_ids"].view(2, 8, 4), None)
        h = model.backbone(x)
        out = model.head(E["head_hidden"], E["head_noise"][:, None])[:, 0]
    assert close(x, E["calm_compressed"])
    assert close(h, E["calm_hidden"])
    assert close(out, E["head_out"])


def test_energy_score():
    y = E["energy_mean"][:, None] + E["energy_eps"].transpose(0, 1) * E["energy_log_std"].exp()[:, None]
    assert close(-energy_loss(E["energy_x"], y), E["energy_score"])


@pytest.mark.parametrize("name", CALM_FOLDERS)
def test_eval_forward_loss_and_brier(imported, name):
    """Their eval forward: backbone on chunks 1..7, targets chunks 2..8, their head noise."""
    model = imported[name]
    chunks = E["calm_input_ids"].view(2, 8, 4)
    with torch.no_grad():
        mean, log_std = model.autoencoder.encode(chunks[:, 1:])
        h = model.backbone(model.inputs(chunks[:, :-1], None)).reshape(14, -1)
        x = model.head(h, E["loss_rand"].transpose(0, 1) - 0.5)  # (14, 8, l)
        y = mean.reshape(14, 1, -1) + E["loss_eps"].transpose(0, 1) * log_std.exp().reshape(14, 1, -1)
        loss = energy_loss(x, y).mean()
        s = model.autoencoder.decode_tokens(x[:, :2])  # (14, 2, K)
    assert close(loss, E["calm_loss"])
    stats = generic_two_sample_brier(lambda: (s[:, 0], s[:, 1]), chunks[:, 1:].reshape(14, 4))
    got = torch.tensor([stats.summary()[f"brier_{n}"] for n in range(1, 5)])
    assert close(got, E["calm_brier"])


@pytest.mark.parametrize("name", CALM_FOLDERS)
def test_generation(imported, name):
    """Their generate at T = 1 with their noise: step latents, tokens and the output."""
    model = imported[name]
    prompt = E["gen_prompt"]  # (2, 8): two whole chunks
    B, K = prompt.shape[0], 4
    cache = model.make_cache(B, 8)
    with torch.no_grad():
        h = model.step(prompt.view(B, -1, K), None, cache=cache)
        tokens = []
        for step in range(4):
            z = model.head(h, (E["gen_rand"][step] - 0.5)[:, None])[:, 0]
            assert close(z, E["gen_step_latents"][step])
            t = model.autoencoder.decode_tokens(z)
            assert torch.equal(t, E["gen_step_tokens"][step])
            tokens.append(t)
            h = model.step(t[:, None], None, cache=cache)
    assert torch.equal(torch.cat([prompt, *tokens], 1), E["gen_output"])


def test_both_formats_give_the_same_weights(imported):
    for a, b in (AE_FOLDERS, CALM_FOLDERS):
        sa, sb = imported[a].state_dict(), imported[b].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_and_config(tmp_path):
    paths = import_checkpoint(FIX / "calm-energy-bin", tmp_path / "out",
                              autoencoder=FIX / "autoencoder-bin")
    from calm.loading import load_checkpoint_tokenizer

    tok = load_checkpoint_tokenizer(paths["calm"])
    sample = json.loads((FIX / "expected.json").read_text())["tokenizer_samples"][0]
    assert tok.encode(sample["text"]) == sample["ids"]
    assert tok.eot_id == 510 and tok.vocab_size == 512
    cfg = json.loads((paths["calm"] / "config.json").read_text())
    assert cfg["model"]["head"]["num_blocks"] == 2 and cfg["model"]["head"]["noise_size"] == 32
    assert cfg["autoencoder"]["path"] == str((tmp_path / "out" / "autoencoder").resolve())
    from calm.loading import document_start_id

    assert cfg["document_start"] == 509 and document_start_id(cfg, tok) == 509  # their bos
    assert document_start_id({}, tok) == tok.eot_id  # this library's own models
    # A moved folder still finds its autoencoder beside it.
    shutil.move(tmp_path / "out", tmp_path / "moved")
    model, _, _ = load_model(tmp_path / "moved" / "calm")
    assert model.autoencoder.config.projection_bias


def test_commands_accept_an_imported_model(tmp_path, capsys):
    out = tmp_path / "m"
    assert calm_main(["import", str(FIX / "calm-energy"), "--out", str(out)]) == 0
    rc = calm_main(["generate", "--model", str(out / "calm"), "--prompt", "The farmer",
                    "--max-new-tokens", "8", "--seed", "0", "--no-progress", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- errors


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _fails(capsys, *argv) -> str:
    assert calm_main(["import", *map(str, argv)]) != 0
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


def test_truncated_files_give_one_line(tmp_path, capsys):
    for name, file in (("calm-energy", "model.safetensors"), ("calm-energy-bin", "pytorch_model.bin")):
        src = _copy(name, tmp_path)
        data = (src / file).read_bytes()
        (src / file).write_bytes(data[: len(data) // 2])
        out = tmp_path / f"out-{name}"
        err = _fails(capsys, src, "--out", out)
        assert "corrupt" in err or "cannot read" in err
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_tampered_alias_is_refused(tmp_path, capsys):
    src = _copy("calm-energy-bin", tmp_path)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["mlp_generator.final_layer.linears.2.bias"] += 1.0  # no longer the generative_head tensor
    torch.save(sd, src / "pytorch_model.bin")
    err = _fails(capsys, src, "--out", tmp_path / "out")
    assert "differ" in err and not (tmp_path / "out").exists()


def test_tampered_shape_is_refused(tmp_path, capsys):
    src = _copy("autoencoder", tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    sd["encoder.squeeze_layer.bias"] = torch.zeros(3)
    save_file(sd, str(src / "model.safetensors"))
    assert "shape" in _fails(capsys, src, "--out", tmp_path / "out")


def test_pickle_with_code_is_refused(tmp_path, capsys):
    src = _copy("autoencoder-bin", tmp_path)
    torch.save({"weights": torch.zeros(2), "obj": Path("x")}, src / "pytorch_model.bin")
    assert "plain tensors" in _fails(capsys, src, "--out", tmp_path / "out")


def test_different_autoencoder_is_refused(tmp_path, capsys):
    ae = _copy("autoencoder", tmp_path)
    sd = load_file(str(ae / "model.safetensors"))
    sd["decoder.norm.weight"] = sd["decoder.norm.weight"] * 1.01
    save_file(sd, str(ae / "model.safetensors"))
    err = _fails(capsys, FIX / "calm-energy", "--autoencoder", ae, "--out", tmp_path / "out")
    assert "not the one inside" in err


def test_unknown_architecture_is_refused(tmp_path, capsys):
    src = _copy("calm-energy", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    for arch, words in (("FlowTransformer", "flow head"), ("GPT2LMHeadModel", "unknown architecture")):
        cfg["architectures"] = [arch]
        (src / "config.json").write_text(json.dumps(cfg))
        assert words in _fails(capsys, src, "--out", tmp_path / "out")


def test_existing_output_and_missing_hub(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert "already exists" in _fails(capsys, FIX / "autoencoder", "--out", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_hub_ids_without_the_extra_or_the_network(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the extra is not installed
    err = _fails(capsys, "cccczshao/CALM-M", "--out", tmp_path / "hub")
    assert "calm[hub]" in err and "local" in err
    import types

    def offline(*a, **k):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    err = _fails(capsys, "cccczshao/CALM-M", "--out", tmp_path / "hub")
    assert "cannot download" in err and "local path" in err
    assert not (tmp_path / "hub").exists()


def test_sharded_safetensors(tmp_path):
    src = _copy("autoencoder", tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(src / "model-00002-of-00002.safetensors"))
    (src / "model.safetensors").unlink()
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    ae, _ = build_autoencoder(read_folder(src))
    ref, _ = build_autoencoder(read_folder(FIX / "autoencoder"))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ae.state_dict().items())


def test_read_folder_errors(tmp_path):
    with pytest.raises(CalmError, match="no config.json"):
        read_folder(tmp_path)
    with pytest.raises(CalmError, match="holds no autoencoder"):
        ck = read_folder(FIX / "calm-energy")
        ck.tensors = {k: v for k, v in ck.tensors.items() if not k.startswith("ae_model.")}
        build_calm(ck)


# ----------------------------------------------------------------------------- fine-tuning


def test_fine_tune_an_imported_model(tmp_path, capsys):
    """Import, prepare text with the model's tokenizer, train a few steps from it."""
    out = tmp_path / "m"
    assert calm_main(["import", str(FIX / "calm-energy-bin"), "--out", str(out)]) == 0
    sample = json.loads((FIX / "expected.json").read_text())["tokenizer_samples"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(s["text"] for s in sample) * 6)
    data = tmp_path / "data"
    assert calm_main(["prepare", str(corpus), "--out", str(data), "--tokenizer",
                      str(out / "calm" / "tokenizer"), "--val-fraction", "0.2", "--no-progress"]) == 0
    run = tmp_path / "ft"
    assert calm_main(["train", "--init-from", str(out / "calm"), "--data", str(data), "--out", str(run),
                      "--steps", "3", "--batch-size", "2", "--block-size", "64", "--eval-every", "0",
                      "--no-progress"]) == 0
    tuned, _, cfg = load_model(run)
    cfg0 = json.loads((out / "calm" / "config.json").read_text())
    assert cfg["model"] == cfg0["model"] and cfg["init_from"].endswith("calm")
    before = load_model(out / "calm")[0].state_dict()
    after = tuned.state_dict()
    assert not torch.equal(before["backbone.norm.weight"], after["backbone.norm.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("autoencoder."))
    capsys.readouterr()
    assert calm_main(["train", "--init-from", str(out / "calm"), "--data", str(data), "--out",
                      str(tmp_path / "x"), "--hidden-size", "32"]) != 0
    assert "keeps the checkpoint's architecture" in capsys.readouterr().err
    assert calm_main(["train-baseline", "--init-from", str(out / "calm"), "--data", str(data),
                      "--out", str(tmp_path / "y")]) != 0
    assert "needs a baseline" in capsys.readouterr().err


def test_eval_text_file_equals_a_prepared_evaluation_only_dataset(tmp_path, capsys):
    out = tmp_path / "m"
    assert calm_main(["import", str(FIX / "calm-energy"), "--out", str(out)]) == 0
    texts = [s["text"] for s in json.loads((FIX / "expected.json").read_text())["tokenizer_samples"]]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": " ".join(texts) * (i + 2)}) + "\n" for i in range(6)))
    data = tmp_path / "test-only"
    assert calm_main(["prepare", str(jsonl), "--out", str(data), "--tokenizer",
                      str(out / "calm" / "tokenizer"), "--val-fraction", "1.0", "--no-progress"]) == 0
    capsys.readouterr()
    common = ["--model", str(out / "calm"), "--block-size", "64", "--max-tokens", "0", "--seed", "1",
              "--json", "--no-progress"]
    assert calm_main(["eval", "--text", str(jsonl), *common]) == 0
    a = json.loads(capsys.readouterr().out)
    assert calm_main(["eval", "--data", str(data), *common]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["tokens"] == b["tokens"] > 0
    assert all(a[f"brier_{n}"] == b[f"brier_{n}"] for n in range(1, 5))
    assert calm_main(["train", "--init-from", str(out / "calm"), "--data", str(data),
                      "--out", str(tmp_path / "ft"), "--steps", "1", "--no-progress"]) != 0
    assert "train split" in capsys.readouterr().err
