"""FLOPs accounting (calm.flops) against PyTorch's own counter, Table 1, and `calm compare`.

The closed forms are checked against ``torch.utils.flop_counter.FlopCounterMode``
on real forward + backward passes (training) and real KV-cache steps
(inference). Like the closed forms, FlopCounterMode counts matrix products only:
norms, activations, softmax, rotary embeddings and the optimizer are excluded on
both sides. Two adjustments make the counter see everything that runs:
- attention runs on SDPA's math backend, whose QKᵀ and AV are plain bmm's; the
  fused CPU kernel has no FLOPs formula and would count 0;
- the fused cross-entropy (calm.ops) accumulates its weight gradient with an
  in-place addmm_, which has no formula either; one is registered here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from calm import flops
from calm.autoencoder import Autoencoder
from calm.baseline import TokenLM
from calm.cli import main
from calm.config import CALMConfig, HeadConfig, preset, to_dict
from calm.model import CALM

V = 4096  # vocabulary of the counted models
BLOCK = {"demo": 64, "S": 32}  # training block (tokens) per preset: short, so S runs in seconds


def _inplace_addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counter() -> FlopCounterMode:
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flop}
    )


def build(kind: str, name: str):
    torch.manual_seed(0)
    bb = preset("transformer", name, vocab_size=V)
    if kind == "baseline":
        return TokenLM(bb)
    ae = Autoencoder(preset("autoencoder", "tiny" if name == "tiny" else "demo", vocab_size=V))
    return CALM(CALMConfig(backbone=bb, chunk_size=4, latent_size=ae.config.latent_size), ae)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind: str, name: str):
        if (kind, name) not in cache:
            cache[(kind, name)] = build(kind, name)
        return cache[(kind, name)]

    return get


def count_training(model, tokens: torch.Tensor) -> tuple[int, dict]:
    model.train()
    fc = counter()
    with sdpa_kernel(SDPBackend.MATH), fc:
        loss, _ = model(tokens, generator=torch.Generator().manual_seed(0))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops(), {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


@torch.no_grad()
def count_step(model, keys: int) -> int:
    """FLOPs of one generation step after a cache of keys − 1 positions."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    if model.kind == "calm":
        K = model.config.chunk_size
        cache = model.make_cache(1, keys)
        model.step(torch.randint(0, V, (1, keys - 1, K), generator=g), None, cache=cache)
        fc = counter()
        with sdpa_kernel(SDPBackend.MATH), fc:
            h = model.step(torch.randint(0, V, (1, 1, K), generator=g), None, cache=cache)
            z = model.head.sample(h, generator=g)
            model.autoencoder.decode_tokens(z)
        return fc.get_total_flops()
    cache = model.make_cache(1, keys)
    model.logits(torch.randint(0, V, (1, keys - 1), generator=g), cache=cache)
    fc = counter()
    with sdpa_kernel(SDPBackend.MATH), fc:
        model.logits(torch.randint(0, V, (1, 1), generator=g), cache=cache)
    return fc.get_total_flops()


# ----------------------------------------------------------------------------- vs FlopCounterMode


@pytest.mark.parametrize("name", ["demo", "S"])
@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_training_flops_match_flop_counter(models, kind, name):
    model = models(kind, name)
    T = BLOCK[name]
    tokens = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    got, by_module = count_training(model, tokens)
    parts = flops.training_parts(model, T)
    want = flops.training_flops_per_token(model, T) * T
    assert abs(got - want) <= 0.05 * want, (got, want)
    assert got == pytest.approx(want, rel=1e-6)  # in fact exact: every matmul is accounted for
    # The backbone alone (its matmuls and attention), as the counter attributes it by module.
    top = type(model).__name__
    backbone = (parts["backbone"] + parts["backbone attention scores"]) * T
    assert by_module[f"{top}.backbone"] == pytest.approx(backbone, rel=1e-6)
    if kind == "calm":
        head = next(v for k, v in parts.items() if k.startswith("head")) * T
        assert by_module["CALM.head"] == pytest.approx(head, rel=1e-6)


@pytest.mark.parametrize("name", ["demo", "S"])
@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_inference_flops_match_flop_counter(models, kind, name):
    model = models(kind, name)
    K = model.config.chunk_size if kind == "calm" else 1
    keys = BLOCK[name] // K
    got = count_step(model, keys)
    want = flops.inference_flops_per_token(model, keys * K) * K  # one step emits K tokens
    assert abs(got - want) <= 0.05 * want, (got, want)
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "kind, scheme, kv, token_loss",
    [("calm", "both", 1, 0.0), ("calm", "continuous", 2, 0.0), ("calm", "discrete", 1, 1.0),
     ("baseline", None, 1, 0.0)],
)
def test_variants_match_flop_counter(kind, scheme, kv, token_loss):
    """Other input schemes, grouped KV heads, the auxiliary token loss and a tied lm head, at
    the tiny preset."""
    torch.manual_seed(0)
    bb = preset(
        "transformer", "tiny", vocab_size=V, num_kv_heads=kv, tie_embeddings=kind == "baseline"
    )
    if kind == "calm":
        ae = Autoencoder(preset("autoencoder", "tiny", vocab_size=V, num_encoder_layers=3))
        model = CALM(
            CALMConfig(
                backbone=bb,
                chunk_size=4,
                latent_size=16,
                input_scheme=scheme,
                head=HeadConfig(num_samples=4, num_targets=7),
                token_loss_weight=token_loss,
            ),
            ae,
        )
    else:
        model = TokenLM(bb)
    tokens = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    fc = counter()
    with sdpa_kernel(SDPBackend.MATH), fc:
        model(tokens)[0].backward()
    want = flops.training_flops_per_token(model, 32) * tokens.numel()
    assert fc.get_total_flops() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "head",
    [
        HeadConfig(kind="flow", flow_solver="euler", flow_steps=3, num_samples=3),
        HeadConfig(kind="flow", flow_steps=2, num_samples=2),
        HeadConfig(kind="diffusion", diffusion_steps=3, num_samples=4),
    ],
    ids=["flow-euler", "flow-midpoint", "diffusion"],
)
def test_iterative_heads_match_flop_counter(head):
    """Flow and diffusion heads: N replicas in training, every sampler step at inference."""
    torch.manual_seed(0)
    ae = Autoencoder(preset("autoencoder", "tiny", vocab_size=V))
    bb = preset("transformer", "tiny", vocab_size=V, num_layers=4)
    model = CALM(CALMConfig(backbone=bb, chunk_size=4, latent_size=16, head=head), ae)
    tokens = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(1))
    got, _ = count_training(model, tokens)
    assert got == pytest.approx(flops.training_flops_per_token(model, 32) * 32, rel=1e-6)
    got = count_step(model, 8)
    assert got == pytest.approx(flops.inference_flops_per_token(model, 32) * 4, rel=1e-6)


def test_parameter_counts():
    torch.manual_seed(0)
    m = build("calm", "tiny")
    p = flops.parameter_counts(m)
    ae = sum(t.numel() for t in m.autoencoder.parameters())
    assert p["total"] == sum(t.numel() for t in m.parameters())
    assert p["frozen"] == ae and p["trainable"] == p["total"] - ae
    assert p["non_embedding"] == p["trainable"] - V * m.config.backbone.hidden_size
    tied = TokenLM(preset("transformer", "tiny", vocab_size=V, tie_embeddings=True))
    untied = TokenLM(preset("transformer", "tiny", vocab_size=V))
    d = tied.config.hidden_size
    assert flops.parameter_counts(untied)["total"] - flops.parameter_counts(tied)["total"] == V * d
    assert flops.parameter_counts(tied)["non_embedding"] == tied.backbone.num_parameters()
    assert flops.parameter_counts(untied)["non_embedding"] == untied.backbone.num_parameters()


# ----------------------------------------------------------------------------- the paper's Table 1

# (params, train FLOPs for 250k steps × 2M tokens, inference FLOPs per token at 2048 steps)
TABLE_1 = {
    ("baseline", "S"): (281e6, 6.6e20, 4.4e8),
    ("baseline", "M"): (465e6, 11.9e20, 7.9e8),
    ("baseline", "L"): (849e6, 22.5e20, 15.0e8),
    ("calm", "M"): (371e6, 3.7e20, 2.9e8),
    ("calm", "L"): (735e6, 7.7e20, 4.6e8),
    ("calm", "XL"): (1.82e9, 19.5e20, 9.4e8),
}


@pytest.mark.parametrize("kind, name", list(TABLE_1))
def test_reproduces_paper_table_1(kind, name):
    """Llama 3 vocabulary (128256), the reference autoencoder (hidden 512, ~75M
    parameters), context 2048 steps (8192 tokens for CALM, K=4), 5e11 training
    tokens. The paper's figures are rounded and it does not publish how it counts
    the head, so training FLOPs get 8 %, the rest 5 % (most are within 1-3 %)."""
    vocab = 128256
    bb = preset("transformer", name, vocab_size=vocab)
    if kind == "calm":
        ae = preset("autoencoder", "reference", vocab_size=vocab)
        model = flops.build_for_counting("calm", CALMConfig(backbone=bb, chunk_size=4), ae)
        steps = 4 * 2048
    else:
        model = flops.build_for_counting("baseline", bb)
        steps = 2048
    params, train, infer = TABLE_1[(kind, name)]
    assert flops.parameter_counts(model)["trainable"] == pytest.approx(params, rel=0.01)
    assert flops.training_flops_per_token(model, steps) * 5e11 == pytest.approx(train, rel=0.08)
    assert flops.inference_flops_per_token(model, steps) == pytest.approx(infer, rel=0.05)


def test_build_for_counting_errors():
    from calm.errors import CalmError

    with pytest.raises(CalmError):
        flops.build_for_counting("calm", CALMConfig(), None)
    with pytest.raises(CalmError):
        flops.build_for_counting("autoencoder", {})
    with pytest.raises(CalmError, match="block size"):
        flops.training_flops_per_token(
            flops.build_for_counting("calm", CALMConfig(), preset("autoencoder", "demo")), 6
        )


# ----------------------------------------------------------------------------- the commands


def test_flops_command_preset(capsys):
    assert (
        main(
            [
                "flops",
                "--preset",
                "M",
                "--kind",
                "calm",
                "--vocab-size",
                "128256",
                "--ae-preset",
                "reference",
                "--block-size",
                "8192",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    model = flops.build_for_counting(
        "calm",
        CALMConfig(backbone=preset("transformer", "M", vocab_size=128256)),
        preset("autoencoder", "reference", vocab_size=128256),
    )
    assert out == json.loads(json.dumps(flops.flops_breakdown(model, 8192, 8192)))
    assert main(["flops", "--preset", "S", "--kind", "baseline"]) == 0
    text = capsys.readouterr().out
    assert "lm head" in text and "total" in text


def _fake_run(
    root: Path,
    name: str,
    kind: str,
    *,
    steps: int,
    tokens_per_step: int,
    flops_logged: bool,
    eval_json: dict | None,
) -> tuple[Path, object]:
    """A run folder as the training commands leave it (weights are a placeholder:
    `calm compare` reads configs, metrics and eval.json only)."""
    run = root / name
    ckpt = run / "checkpoints" / f"step_{steps:06d}"
    ckpt.mkdir(parents=True)
    bb = preset("transformer", "S", vocab_size=V)
    if kind == "calm":
        ae = preset("autoencoder", "demo", vocab_size=V)
        cfg = CALMConfig(backbone=bb, chunk_size=4, latent_size=ae.latent_size)
        config = {
            "format_version": 1,
            "kind": "calm",
            "model": to_dict(cfg),
            "autoencoder": {"path": "/nowhere", "model": to_dict(ae)},
        }
        model = flops.build_for_counting("calm", cfg, ae)
    else:
        config = {"format_version": 1, "kind": "baseline", "model": to_dict(bb)}
        model = flops.build_for_counting("baseline", bb)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"")
    train_cfg = {"block_size": 256, "batch_size": tokens_per_step // 256}
    (ckpt / "state.json").write_text(
        json.dumps(
            {"step": steps, "train_config": train_cfg, "tokens_seen": steps * tokens_per_step}
        )
    )
    per_token = flops.training_flops_per_token(model, 256)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(10, steps + 1, 10):
            rec = {"step": s, "loss": 1.0, "tokens": s * tokens_per_step}
            if flops_logged:
                rec["train_flops"] = 123.0 * s  # an arbitrary logged figure: compare must use it
            f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"step": s, "val/loss": 2.0}) + "\n")  # an eval record
        f.write('{"step": 99')  # a line cut short by a crash
    if eval_json is not None:
        (run / "eval.json").write_text(json.dumps(eval_json))
    return run, (model, per_token)


def test_compare_fake_runs(tmp_path, capsys):
    ev_calm = {
        "brier_1": 0.31234,
        "brier_2": 0.1,
        "brier_3": 0.05,
        "brier_4": 0.02,
        "brier_lm": 7.5219,
        "brier_lm_se": 0.12,
        "brier_1_se": 0.01,
    }
    ev_base = {
        "brier_1": 0.4,
        "brier_2": 0.2,
        "brier_3": 0.1,
        "brier_4": 0.05,
        "brier_lm": 14.142,
        "cross_entropy": 3.0,
        "perplexity": 20.0855,
    }
    calm_run, (calm_model, calm_pt) = _fake_run(
        tmp_path,
        "calm-run",
        "calm",
        steps=40,
        tokens_per_step=1024,
        flops_logged=False,
        eval_json=ev_calm,
    )
    base_run, (base_model, _) = _fake_run(
        tmp_path,
        "base-run",
        "baseline",
        steps=30,
        tokens_per_step=512,
        flops_logged=True,
        eval_json=ev_base,
    )
    bare_run, _ = _fake_run(
        tmp_path,
        "bare",
        "baseline",
        steps=10,
        tokens_per_step=512,
        flops_logged=False,
        eval_json=None,
    )
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert (
        main(
            [
                "compare",
                str(calm_run),
                str(base_run),
                str(bare_run),
                "--out",
                str(md),
                "--json",
                str(js),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert md.read_text().strip() == printed.strip()
    rows = json.loads(js.read_text())
    c, b, bare = rows
    assert c["model"] == "CALM-S (K=4)" and b["model"] == "Transformer-S"
    assert c["params"] == flops.parameter_counts(calm_model)["trainable"]
    assert b["params"] == flops.parameter_counts(base_model)["trainable"]
    # no train_flops logged: tokens × per-token; logged: the last logged figure
    assert c["tokens"] == 40 * 1024 and c["train_flops"] == pytest.approx(40 * 1024 * calm_pt)
    assert b["train_flops"] == 123.0 * 30 and b["train_flops_source"] == "metrics"
    assert c["infer_flops_per_token"] == flops.inference_flops_per_token(calm_model, 256)
    assert b["infer_flops_per_token"] == flops.inference_flops_per_token(base_model, 256)
    assert c["brier_1"] == 0.31234 and c["perplexity"] is None
    assert b["perplexity"] == 20.0855 and bare["brier_lm"] is None
    lines = printed.splitlines()
    calm_line = next(line for line in lines if line.startswith("| calm-run"))
    base_line = next(line for line in lines if line.startswith("| base-run"))
    bare_line = next(line for line in lines if line.startswith("| bare"))
    assert "0.3123" in calm_line and "7.52 ± 0.12" in calm_line and calm_line.endswith("| – |")
    assert "3.69e3" in base_line and "20.09" in base_line and "14.14" in base_line
    assert bare_line.count("–") == 6  # four Brier-n, BrierLM, PPL
    assert main(["compare", str(calm_run), "--context", "1024", "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())
    assert row["context"] == 1024
    assert row["infer_flops_per_token"] == flops.inference_flops_per_token(calm_model, 1024)


def test_compare_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing")]) == 2
    run, _ = _fake_run(
        tmp_path, "r", "baseline", steps=10, tokens_per_step=512, flops_logged=False, eval_json=None
    )
    assert main(["compare", str(run), "--evaluate"]) == 2
    (run / "eval.json").write_text("{not json")
    assert main(["compare", str(run)]) == 2
    assert "eval.json" in capsys.readouterr().err


def test_compare_evaluates_trained_runs(
    copy_run, calm_run, base_run, dataset_dir, tmp_path, capsys
):
    """End to end on the tiny runs trained by the real commands: their logged
    train_flops are steps × tokens × the per-token count, and --evaluate writes
    eval.json with the evaluation's own figures."""
    runs = [copy_run(calm_run), copy_run(base_run)]
    for r in runs:
        (r / "eval.json").unlink(missing_ok=True)
    js = tmp_path / "rows.json"
    assert (
        main(
            [
                "compare",
                *map(str, runs),
                "--evaluate",
                "--data",
                str(dataset_dir),
                "--max-tokens",
                "128",
                "--json",
                str(js),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads(js.read_text())
    for r, row in zip(runs, rows):
        ev = json.loads((r / "eval.json").read_text())
        assert row["brier_lm"] == ev["brier_lm"] and row["brier_1"] == ev["brier_1"]
        assert row["train_flops_source"] == "metrics"
        assert row["train_flops"] == pytest.approx(row["tokens"] * row["train_flops_per_token"])
    assert rows[1]["perplexity"] == json.loads((runs[1] / "eval.json").read_text())["perplexity"]
    # `calm flops --model` on the same run: its block size is the run's
    capsys.readouterr()
    assert main(["flops", "--model", str(runs[0]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["block_size"] == rows[0]["block_size"] == 32
    assert out["training"]["per_token"] == rows[0]["train_flops_per_token"]
    assert out["inference"]["per_token"] == rows[0]["infer_flops_per_token"]
    assert main(["flops", "--model", str(runs[0]), "--context", "1024"]) == 0
    assert "context 1024 tokens" in capsys.readouterr().out
    shutil.rmtree(runs[0])
