"""Precision: the automatic choice, bf16 autocast training, and bf16 decoding kernels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK, cli_ok

from calm import precision as P
from calm.baseline import TokenLM
from calm.config import TrainConfig, preset
from calm.errors import CalmError
from calm.layers import decoding_layout, mkl_packing_available
from calm.ops import linear_cross_entropy
from calm.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- the choice


def test_explicit_choices_are_kept():
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # allowed everywhere, even if slow


def test_auto_falls_back_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: False)
    monkeypatch.setattr(P, "cpu_bf16_speedup", lambda *a, **k: pytest.fail("timed needlessly"))
    assert P.resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("speedup, want", [(1.1, "fp32"), (P.MIN_SPEEDUP, "bf16"), (6.0, "bf16")])
def test_auto_needs_a_measured_speedup(monkeypatch, speedup, want):
    monkeypatch.setattr(P, "cpu_bf16_instructions", lambda: True)
    monkeypatch.setattr(P, "cpu_bf16_speedup", lambda *a, **k: speedup)
    assert P.resolve_precision("auto", "cpu") == want


def test_speedup_is_measured():
    s = P.cpu_bf16_speedup(None, size=64, repeat=2)
    assert s > 0 and s == P.cpu_bf16_speedup(None, size=64, repeat=2)  # cached


def test_bad_precision_is_refused(monkeypatch):
    with pytest.raises(CalmError, match="unknown precision"):
        P.resolve_precision("fp16", "cpu")
    monkeypatch.setenv("CALM_PRECISION", "half")
    with pytest.raises(CalmError, match="CALM_PRECISION"):
        P.default_precision()
    monkeypatch.setenv("CALM_PRECISION", "BF16")
    assert P.default_precision() == "bf16"


def test_autocast_contexts():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    with P.autocast("cpu", "bf16"):
        assert F.linear(x, w).dtype == torch.bfloat16
        assert P.matmul_dtype("cpu", torch.float32) == torch.bfloat16
    with P.autocast("cpu", "fp32"):
        assert F.linear(x, w).dtype == torch.float32
        assert P.matmul_dtype("cpu", torch.float32) == torch.float32
    with pytest.raises(ValueError):
        P.autocast("cpu", "auto")


# ---------------------------------------------------------------------- kernels


def test_fused_cross_entropy_under_autocast_matches_fp32():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = torch.randn(50, 32, generator=g).mul_(0.3).requires_grad_()
    t = torch.randint(0, 50, (300,), generator=g)
    ref = F.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = linear_cross_entropy(h, w, t, chunk_rows=64)
    assert loss.dtype == torch.float32
    bh, bw = torch.autograd.grad(loss, (h, w))
    assert bh.dtype == h.dtype and bw.dtype == w.dtype
    assert abs(float(loss.detach()) - float(ref.detach())) < 0.02 * float(ref.detach())
    assert torch.allclose(bh, gh, atol=0.02 * gh.abs().max().item())
    assert torch.allclose(bw, gw, atol=0.02 * gw.abs().max().item())


def test_decoding_layout_bf16_paths():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    one, few, many = torch.randn(1, 64), torch.randn(4, 64), torch.randn(20, 64)
    want = {k: F.linear(x, lin.weight, lin.bias) for k, x in
            (("one", one), ("few", few), ("many", many))}
    with decoding_layout(lin, bf16=True), torch.autocast("cpu", dtype=torch.bfloat16):
        got_one, got_few, got_many = lin(one), lin(few), lin(many)
    # One row: the fp32 matrix-vector path, exact up to summation order.
    assert got_one.dtype == torch.float32
    assert torch.allclose(got_one, want["one"], atol=1e-5)
    # Several rows (a few, or a prompt's prefill): the bf16 copy, bf16-close.
    for got, ref in ((got_few, want["few"]), (got_many, want["many"])):
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), ref, atol=0.05, rtol=0.02)
    assert "forward" not in lin.__dict__  # restored on exit


@pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch build has no MKL packing")
def test_decoding_layout_fp32_packs_weights_for_a_steady_row_count():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    xs = [torch.randn(rows, 64) for rows in (1, 4, 4, 4, 3, 8, 8, 1)]
    with decoding_layout(lin):
        got = [lin(x) for x in xs]
        packed = lin.__dict__["_decode_weight_packed"]
        assert packed.rows == 8  # packed for 4 rows at the second 4-row call, then for 8
    for x, y in zip(xs, got):
        assert y.dtype == torch.float32
        assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert "forward" not in lin.__dict__ and "_decode_weight_packed" not in lin.__dict__
    with torch.no_grad():
        lin.weight.mul_(2)  # packed anew in the next decoding layout
    with decoding_layout(lin):
        x = torch.randn(2, 64)
        y = [lin(x) for _ in range(3)][-1]
    assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)


def test_generate_in_bf16_matches_fp32_lengths(make_calm):
    from calm.generate import generate

    model = make_calm(random_head=True)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    outs = {}
    for prec in ("fp32", "bf16"):
        outs[prec] = generate(model, prompts, max_new_tokens=12,
                              generator=torch.Generator().manual_seed(0), precision=prec)
    assert [len(t) for t in outs["bf16"].tokens] == [12, 12]
    V = model.config.backbone.vocab_size
    assert all(0 <= t < V for row in outs["bf16"].tokens for t in row)


# ---------------------------------------------------------------------- training


def _fixed_batches(dataset_dir, n=4, B=4):
    from calm.data import BatchLoader, TokenDataset

    loader = BatchLoader(TokenDataset(dataset_dir), "train", BLOCK, B, seed=0, chunk_size=4)
    batches = [next(iter(loader)) for _ in range(n)]
    while True:
        yield from batches


def _train_losses(model, dataset_dir, precision, steps=30):
    x = next(_fixed_batches(dataset_dir))

    def loss_now():
        model.eval()
        with torch.no_grad():
            return float(model(x, generator=torch.Generator().manual_seed(0))[0])

    before = loss_now()
    cfg = TrainConfig(steps=steps, batch_size=4, block_size=BLOCK, lr=3e-3, warmup_steps=2,
                      eval_every=0, log_every=1000)
    train(model, cfg, _fixed_batches(dataset_dir), run_dir=None, progress=False,
          handle_signals=False, precision=precision)
    return before, loss_now()


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_bf16_steps_lower_the_loss_as_fp32_steps_do(kind, make_calm, dataset_dir):
    results = {}
    for prec in ("fp32", "bf16"):
        if kind == "calm":
            model = make_calm(seed=3)
        else:
            torch.manual_seed(3)
            model = TokenLM(preset("transformer", "tiny", vocab_size=300))
        results[prec] = _train_losses(model, dataset_dir, prec)
    (b32, a32), (b16, a16) = results["fp32"], results["bf16"]
    assert abs(b32 - b16) < 1e-6 * abs(b32) + 1e-6  # same start (the eval runs in fp32)
    drop32, drop16 = b32 - a32, b16 - a16
    assert drop32 > 0.5 and drop16 > 0.5, results
    assert abs(drop16 - drop32) < 0.25 * drop32, results
    for p in model.parameters():  # master weights stay fp32
        assert p.dtype == torch.float32


def test_cli_precision_flag(tmp_path, dataset_dir, ae_run):
    out = tmp_path / "calm16"
    cli_ok(["train", "--autoencoder", str(ae_run), "--data", str(dataset_dir), "--out", str(out),
            "--preset", "tiny", "--steps", "3", "--block-size", str(BLOCK), "--batch-size", "4",
            "--head-num-targets", "8", "--eval-batches", "1", "--no-progress",
            "--precision", "bf16"])
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val/loss"] == last["val/loss"]  # finite, not NaN
    cli_ok(["generate", "--model", str(out), "--prompt", "the king", "--max-new-tokens", "8",
            "--seed", "0", "--precision", "bf16"])
    cli_ok(["eval", "--model", str(out), "--data", str(dataset_dir), "--max-tokens", "256",
            "--block-size", str(BLOCK), "--precision", "bf16", "--json", "--no-progress"])
