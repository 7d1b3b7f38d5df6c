"""CALM (SPEC §2) and the token baseline: shapes, layout, training, frozen AE, checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from calm.baseline import TokenLM
from calm.checkpoint import read_weights, save_checkpoint
from calm.config import CALMConfig, TrainConfig, preset, to_dict
from calm.data import BatchLoader, TokenDataset
from calm.errors import CalmError
from calm.generate import generate
from calm.loading import autoencoder_record, load_autoencoder, load_model
from calm.model import CALM
from calm.train import make_optimizer, train

BLOCK = 32  # the tiny runs' block size (tests/conftest.py)

pytestmark = pytest.mark.usefixtures("single_thread")


def fixed_batch(dataset_dir, batch_size=4, seed=0) -> torch.Tensor:
    ds = TokenDataset(dataset_dir)
    return next(iter(BatchLoader(ds, "train", BLOCK, batch_size, seed=seed, chunk_size=4)))


# ---------------------------------------------------------------------- shapes and layout


def test_shapes_tiny(make_calm, dataset_dir):
    model = make_calm()
    K, l = model.config.chunk_size, model.config.latent_size
    d = model.config.backbone.hidden_size
    x = fixed_batch(dataset_dir)  # (4, 32)
    B, T = x.shape
    chunks = x.view(B, T // K, K)
    assert model.inputs(chunks).shape == (B, T // K, d)
    model.train()
    loss, metrics = model(x)
    assert loss.shape == () and torch.isfinite(loss)
    assert float(metrics["loss"]) == pytest.approx(loss.item())
    h = model.backbone(model.inputs(chunks[:, :-1]))
    assert h.shape == (B, T // K - 1, d)
    assert model.head.sample(h).shape == (B, T // K - 1, l)
    assert model.head.sample_n(h[:, 0], 5).shape == (B, 5, l)
    cache = model.make_cache(B, T // K)
    assert model.step(chunks, None, cache=cache).shape == (B, d)
    with pytest.raises(CalmError, match="divisible"):
        model(x[:, :30])


def test_loss_layout_matches_hand_assembly(make_calm, dataset_dir):
    """Inputs are chunks 0..C−2, targets the AE posteriors of chunks 1..C−1 (eval mode)."""
    model = make_calm(random_head=True).eval()
    x = fixed_batch(dataset_dir)
    B, T = x.shape
    chunks = x.view(B, T // 4, 4)
    loss, _ = model(x, generator=torch.Generator().manual_seed(5))
    e = model.embed(chunks[:, :-1]).flatten(-2)  # (B, C−1, 4d): discrete input by hand
    h = model.backbone(model.compress(e))
    mean, log_std = model.autoencoder.encode(chunks[:, 1:])
    want, _ = model.head.loss(h, mean, log_std, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, want)
    # Shifting the targets by one chunk gives a different loss: the layout matters.
    mean2, log_std2 = model.autoencoder.encode(chunks[:, :-1])
    off, _ = model.head.loss(h, mean2, log_std2, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(off, want)


def test_absent_slots_read_the_pad_embedding(make_calm):
    """A partial chunk: absent slots take the learned pad vector, not token 0's embedding."""
    model = make_calm("both")
    chunks = torch.tensor([[[7, 8, 9, 10], [11, 12, 13, 14]]])  # (1, 2, K)
    known = torch.ones(1, 2, 4, dtype=torch.bool)
    known[0, 0, :3] = False  # the first chunk holds only its last token
    latents = torch.randn(1, 2, model.config.latent_size)
    e = model.embed(chunks).clone()  # (1, 2, K, d)
    e[0, 0, :3] = model.pad_embed
    want = model.compress(e.flatten(-2)) + model.latent_in(latents)
    torch.testing.assert_close(model.inputs(chunks, latents, known), want)
    plain = model.inputs(chunks, latents)
    assert not torch.allclose(plain[0, 0], want[0, 0])
    torch.testing.assert_close(plain[0, 1], want[0, 1])  # other chunks are untouched


def test_training_shows_partial_first_chunks(make_calm, monkeypatch):
    """Training drops a random prefix of chunk 0 in about PARTIAL_FIRST_CHUNK of the rows."""
    from calm.model import PARTIAL_FIRST_CHUNK

    model = make_calm()
    seen = []
    inputs = model.inputs

    def spy(chunks, latents=None, known=None):
        seen.append(known)
        return inputs(chunks, latents, known)

    monkeypatch.setattr(model, "inputs", spy)
    x = torch.randint(1, 300, (400, 12))
    model.train()
    model(x, generator=torch.Generator().manual_seed(0))
    known = seen[-1]  # (B, C−1, K)
    assert known.shape == (400, 2, 4) and known[:, 1:].all()
    first = known[:, 0]
    partial = ~first.all(-1)
    assert abs(float(partial.float().mean()) - PARTIAL_FIRST_CHUNK) < 0.08
    assert first.any(-1).all()  # at least the last token stays
    # The absent slots form a prefix: once a slot is known, every later one is too.
    assert torch.equal(first, first.long().cummax(-1).values.bool())
    cuts = (~first).sum(-1)[partial]
    assert set(cuts.tolist()) == {1, 2, 3}
    model.eval()
    model(x[:4])
    assert seen[-1] is None  # evaluation reads whole chunks


def test_head_last_layer_zero_initialised(make_calm):
    model = make_calm()
    assert torch.count_nonzero(model.head.final_out.weight) == 0
    assert torch.count_nonzero(model.head.final_out.bias) == 0
    # So every sample starts at exactly zero, whatever h and the noise.
    z = model.head.sample_n(torch.randn(3, model.config.backbone.hidden_size), 4)
    assert torch.equal(z, torch.zeros_like(z))
    # The rest of the head is not zero (it would never train otherwise).
    assert torch.count_nonzero(model.head.final_hidden.weight) > 0


def test_autoencoder_mismatch_refused(tiny_ae):
    cfg = dataclasses.replace(calm_config_for(tiny_ae), chunk_size=2)
    with pytest.raises(CalmError, match="K="):
        CALM(cfg, tiny_ae)
    cfg = calm_config_for(tiny_ae, vocab_size=tiny_ae.config.vocab_size + 1)
    with pytest.raises(CalmError, match="vocabulary"):
        CALM(cfg, tiny_ae)
    cfg = dataclasses.replace(calm_config_for(tiny_ae), input_scheme="latent")
    with pytest.raises(CalmError, match="input scheme"):
        CALM(cfg, tiny_ae)


def calm_config_for(ae, vocab_size=None):
    return CALMConfig(
        backbone=preset("transformer", "tiny", vocab_size=vocab_size or ae.config.vocab_size),
        chunk_size=ae.config.chunk_size,
        latent_size=ae.config.latent_size,
    )


# ---------------------------------------------------------------------- training


def test_training_steps_reduce_loss(make_calm, dataset_dir):
    model = make_calm()
    x = fixed_batch(dataset_dir)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return float(model(x, generator=torch.Generator().manual_seed(0))[0])

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(40):
        loss, _ = model(x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # The energy loss cannot go below E‖y − y'‖ of the targets (≈ 5.6 here, σ ≈ 1 in 16 dims);
    # the zero-initialised head starts near 7.8. Forty steps close most of that gap.
    assert after < before - 1.0, (before, after)


def test_frozen_autoencoder(make_calm, dataset_dir):
    model = make_calm()
    ae_before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    model.train()
    assert model.training and model.backbone.training and model.head.training
    assert not model.autoencoder.training
    assert not any(m.training for m in model.autoencoder.modules())
    assert not any(p.requires_grad for p in model.autoencoder.parameters())

    loss, _ = model(fixed_batch(dataset_dir))
    loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.embed.weight.grad is not None and model.head.final_out.weight.grad is not None

    # The optimizer never sees the autoencoder, and the real loop leaves it untouched.
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    n_ae = sum(p.numel() for p in model.autoencoder.parameters())
    assert n_opt == model.trainable_parameters() == (
        sum(p.numel() for p in model.parameters()) - n_ae
    )
    model.zero_grad(set_to_none=True)
    ds = TokenDataset(dataset_dir)
    cfg = TrainConfig(steps=3, batch_size=2, block_size=BLOCK, lr=1e-2, warmup_steps=0,
                      eval_every=0, log_every=1)
    head_before = model.head.final_out.weight.clone()
    train(model, cfg, iter(BatchLoader(ds, "train", BLOCK, 2, chunk_size=4)), run_dir=None,
          progress=False, evaluate=lambda m: {"x": 0.0})
    assert not model.autoencoder.training
    for k, v in model.autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k
    assert not torch.equal(model.head.final_out.weight, head_before)  # CALM itself did train


def test_checkpoint_state_excludes_autoencoder(make_calm):
    model = make_calm("both")
    state = model.checkpoint_state()
    full = model.state_dict()
    assert state and not any(k.startswith("autoencoder.") for k in state)
    assert set(state) == {k for k in full if not k.startswith("autoencoder.")}
    assert any(k.startswith("head.") for k in state) and "pad_embed" in state
    assert "latent_in.weight" in state and "compress.0.weight" in state


@pytest.mark.parametrize("scheme", ["discrete", "continuous", "both"])
def test_input_schemes_train_and_generate(make_calm, dataset_dir, scheme):
    model = make_calm(scheme)
    assert hasattr(model, "embed") == (scheme != "continuous")
    assert hasattr(model, "latent_in") == (scheme != "discrete")
    x = fixed_batch(dataset_dir, batch_size=2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    entry = model.embed.weight if scheme != "continuous" else model.latent_in.weight
    before = entry.clone()
    loss, _ = model(x)
    loss.backward()
    # After one step the zero head is not zero any more, so the input path gets gradients next.
    opt.step()
    opt.zero_grad()
    loss, _ = model(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert entry.grad is not None and entry.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(entry, before)
    model.eval()
    out = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=6,
                   generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [6, 6]
    V = model.config.backbone.vocab_size
    assert all(0 <= t < V for row in out.tokens for t in row)


def test_token_loss_adds_weighted_cross_entropy(make_calm, dataset_dir):
    """The auxiliary loss: the head's loss + w · CE of the next chunk's K tokens, the probe's
    K vectors per position scored against the tied input embedding."""
    model = make_calm(random_head=True, token_loss_weight=0.5).eval()
    plain = make_calm(random_head=True)
    assert not hasattr(plain, "token_probe")
    assert not any(k.startswith("token_probe.") for k in plain.checkpoint_state())
    x = fixed_batch(dataset_dir)
    B, T = x.shape
    chunks = x.view(B, T // 4, 4)
    loss, metrics = model(x, generator=torch.Generator().manual_seed(5))
    h = model.backbone(model.inputs(chunks[:, :-1]))
    head_loss, _ = model.head.loss(h, *model.autoencoder.encode(chunks[:, 1:]),
                                   generator=torch.Generator().manual_seed(5))
    logits = model.token_probe(h) @ model.embed.weight.t()  # (B, C−1, K, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2), chunks[:, 1:].flatten())
    torch.testing.assert_close(loss, head_loss + 0.5 * ce)
    torch.testing.assert_close(metrics["token/ce"], ce)
    loss.backward()
    assert model.token_probe[0].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_token_probe_is_not_used_to_generate(make_calm):
    model = make_calm(random_head=True, token_loss_weight=1.0).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    a = generate(model, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for q in model.token_probe.parameters():
            q.normal_()
    b = generate(model, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert a.tokens == b.tokens


def test_token_loss_refusals(make_calm):
    with pytest.raises(CalmError, match="token_loss_weight must be >= 0"):
        make_calm(token_loss_weight=-1.0)
    with pytest.raises(CalmError, match="discrete or both input scheme"):
        make_calm("continuous", token_loss_weight=1.0)


# ---------------------------------------------------------------------- checkpoints


def _calm_ckpt_config(model, ae_run, dataset_dir):
    _, ae_ckpt, ae_cfg = load_autoencoder(ae_run)
    ds = TokenDataset(dataset_dir)
    return {
        "kind": "calm",
        "model": to_dict(model.config),
        "data": {"path": str(dataset_dir), "tokenizer": ds.fingerprint},
        "autoencoder": autoencoder_record(ae_ckpt, ae_cfg),
    }


@pytest.mark.parametrize("token_loss_weight", [0.0, 1.0])
def test_calm_checkpoint_round_trip(make_calm, ae_run, dataset_dir, tmp_path, token_loss_weight):
    model = make_calm("both", token_loss_weight=token_loss_weight)
    ds = TokenDataset(dataset_dir)
    cfg = TrainConfig(steps=3, batch_size=2, block_size=BLOCK, lr=3e-3, warmup_steps=0,
                      eval_every=0, log_every=1)
    res = train(model, cfg, iter(BatchLoader(ds, "train", BLOCK, 2, chunk_size=4)),
                run_dir=tmp_path / "run",
                checkpoint_config=_calm_ckpt_config(model, ae_run, dataset_dir),
                tokenizer=ds.tokenizer, progress=False)
    assert res.checkpoint is not None and res.checkpoint.name == "step_000003"
    assert not any(k.startswith("autoencoder.") for k in read_weights(res.checkpoint))

    loaded, ckpt, cfg_json = load_model(tmp_path / "run")  # the run folder → its latest step
    assert ckpt == res.checkpoint and cfg_json["kind"] == "calm"
    assert isinstance(loaded, CALM) and not loaded.training and not loaded.autoencoder.training
    assert loaded.config == model.config
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k

    model.eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    a = generate(model, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(11))
    b = generate(loaded, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(11))
    assert a.tokens == b.tokens


@pytest.mark.parametrize("tie", [False, True])
def test_baseline_checkpoint_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    cfg = preset("transformer", "tiny", vocab_size=300, tie_embeddings=tie)
    model = TokenLM(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(),
                           config={"kind": "baseline", "model": to_dict(cfg)})
    loaded, path, _ = load_model(ckpt)
    assert isinstance(loaded, TokenLM) and path == ckpt
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    if tie:
        assert loaded.lm_head.weight is loaded.embed.weight
    prompts = [[5, 6, 7], [8]]
    a = generate(model, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(2))
    b = generate(loaded, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(2))
    assert a.tokens == b.tokens


def test_baseline_loss_and_shapes():
    torch.manual_seed(0)
    V = 50
    model = TokenLM(preset("transformer", "tiny", vocab_size=V))
    x = torch.randint(0, V, (3, 16))
    loss, m = model(x)
    # Reference: plain logits and cross-entropy of the next token.
    logits = model.logits(x[:, :-1])
    assert logits.shape == (3, 15, V)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    acc = (logits.argmax(-1) == x[:, 1:]).float().mean()
    torch.testing.assert_close(m["acc"], acc)
