"""BrierLM model drivers and `calm eval` (SPEC §3).

Toy models with exactly enumerable Brier-n: a token model and a chunk model
whose next-symbol distribution is a fixed table given the *two* previous
symbols. Their fake backbone finds the symbol one position back through the
attention mask, the rotary positions and the KV cache, so a wrong rollout
layout, a wrong cache or a stream rolled on the other stream's samples gives
wrong distributions. The real tiny models are checked against independent
paths (the uncached estimator, step-by-step decoding) and run end to end.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import calm.evaluate as ev
from calm.brier import BrierStats, token_model_estimates
from calm.cli import main
from calm.data import TokenDataset, eval_batches
from calm.errors import CalmError
from calm.evaluate import (
    brier_eval_fn,
    brier_for_model,
    calm_sample_ngrams,
    evaluate_model,
    token_lm_estimates,
)
from calm.transformer import KVCache

# ---------------------------------------------------------------------------
# A fake causal backbone: output at a slot = (symbol one position back, own symbol)
# ---------------------------------------------------------------------------


def fake_cache(rows: int, max_len: int) -> KVCache:
    """A real KVCache holding, per slot, the symbol (keys) and its rotary position (values)."""
    shape = (1, rows, 1, max_len, 1)  # (layers, rows, heads, slots, head size)
    return KVCache(torch.zeros(shape), torch.zeros(shape))


class FakeBackbone:
    def __init__(self, bos: int):
        self.bos = bos

    def __call__(self, x, *, positions=None, cache=None, attn_mask=None, key_mask=None):
        """x (rows, S, 1) symbol ids → (rows, S, 2) [previous symbol or BOS, own symbol]."""
        S = x.shape[1]
        start = cache.length if cache is not None else 0
        T = start + S
        if positions is None:
            positions = torch.arange(start, T)
        if cache is not None:
            assert T <= cache.max_len
            cache.keys[0, :, 0, start:T, 0] = x[..., 0]
            cache.values[0, :, 0, start:T, 0] = positions.float()
            cache.length = T
            kx, kpos = cache.keys[0, :, 0, :T, 0], cache.values[0, 0, 0, :T, 0].long()
        else:
            kx, kpos = x[..., 0], positions
        if attn_mask is None:
            mask = torch.arange(T)[None, :] <= torch.arange(start, T)[:, None]
        else:
            mask = attn_mask
        assert mask.shape == (S, T)
        assert mask[torch.arange(S), torch.arange(start, T)].all()  # each query sees itself
        back = mask & (kpos[None, :] == positions[:, None] - 1)  # (S, T)
        assert torch.equal(back.sum(1), (positions > 0).long()), "ambiguous or missing context"
        prev = torch.where(positions > 0, kx[:, back.float().argmax(1)], float(self.bos))
        return torch.stack([prev, x[..., 0]], -1)


def context_of(prev2: torch.Tensor, prev1: torch.Tensor, M: int, bos: int) -> torch.Tensor:
    """Row of the probability table for the two previous symbols (row M at the start)."""
    return torch.where(prev2 == bos, M, (3 * prev2 + prev1) % M)


def make_table(M: int, N: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(M + 1, N, generator=g, dtype=torch.float64), -1)


def sample_chain(table, M, length, rows, seed):
    """rows independent symbol chains of the given length, drawn from the table itself."""
    g = torch.Generator().manual_seed(seed)
    N, bos = table.shape[1], table.shape[1]
    x = torch.zeros(rows, length, dtype=torch.long)
    x[:, 0] = torch.randint(N, (rows,), generator=g)
    for i in range(1, length):
        prev2 = x[:, i - 2] if i > 1 else torch.full((rows,), bos)
        probs = table[context_of(prev2, x[:, i - 1], M, bos)]  # (rows, N)
        x[:, i] = torch.multinomial(probs, 1, generator=g)[:, 0]
    return x


# ---------------------------------------------------------------------------
# Token-level toy model
# ---------------------------------------------------------------------------

VT, MT = 6, 11  # token vocabulary, table contexts


class FakeTokenLM:
    kind = "baseline"

    def __init__(self, table):
        self.table = table
        self.config = SimpleNamespace(vocab_size=VT, max_seq_len=4096)
        self.backbone = FakeBackbone(bos=VT)

    def make_cache(self, rows, max_len):
        return fake_cache(rows, max_len)

    def logits(self, tokens, *, positions=None, cache=None, key_mask=None, attn_mask=None,
               read=None):
        h = self.backbone(tokens[..., None].float(), positions=positions, cache=cache,
                          attn_mask=attn_mask).long()
        out = self.table[context_of(h[..., 0], h[..., 1], MT, VT)].log()  # (rows, S, V)
        return out if read is None else out[:, read]


def exact_token_brier(table, x, n):
    """(R, P) exact Brier-n at every start t = 0..T−5 by enumerating all VT^n n-grams."""
    R, T = x.shape
    P = T - 4
    t = torch.arange(P)
    grams = torch.cartesian_prod(*[torch.arange(VT)] * n).view(-1, n)  # (G, n)
    prev2 = torch.where(t > 0, x[:, (t - 1).clamp(min=0)], VT)  # (R, P)
    seq = torch.cat([prev2[..., None], x[:, t, None]], -1)  # (R, P, 2)
    seq = torch.cat([seq[:, :, None].expand(-1, -1, len(grams), -1),
                     grams[None, None].expand(R, P, -1, -1)], -1)  # (R, P, G, n + 2)
    p = table[context_of(seq[..., :-2], seq[..., 1:-1], MT, VT), seq[..., 2:]].prod(-1)
    target = x[:, t[:, None] + 1 + torch.arange(n)]  # (R, P, n)
    code = (target * VT ** torch.arange(n - 1, -1, -1)).sum(-1)
    return 2 * p.gather(-1, code[..., None])[..., 0] - p.square().sum(-1)


def assert_unbiased(est, exact, label=""):
    """est, exact: (..., max_n); the pooled residual of each n is within 3 standard errors."""
    d = (est.double() - exact).reshape(-1, est.shape[-1])
    for n in range(d.shape[1]):
        mean, se = d[:, n].mean().item(), d[:, n].std().item() / math.sqrt(len(d))
        # float32 estimates: allow their rounding on top of the sampling noise
        assert abs(mean) < 3 * se + 1e-6, (label, n + 1, mean, se)


@pytest.fixture(scope="module")
def token_toy():
    table = make_table(MT, VT, seed=0)
    x = sample_chain(table, MT, 120, rows=40, seed=1)  # (40, 120)
    exact = torch.stack([exact_token_brier(table, x, n) for n in range(1, 5)], -1)  # (R, P, 4)
    return FakeTokenLM(table), x, exact


def test_baseline_driver_unbiased(token_toy, monkeypatch):
    model, x, exact = token_toy
    g = torch.Generator().manual_seed(0)
    est = token_lm_estimates(model, x, 4, g)
    # Brier-1 involves no sampling: it is exact at every position.
    torch.testing.assert_close(est[..., 0].double(), exact[..., 0], rtol=0, atol=1e-5)
    assert_unbiased(est, exact, "one piece")
    # Cut in pieces of positions and groups of rows (as for a large vocabulary).
    est = token_lm_estimates(model, x, 4, g, piece=13)
    assert_unbiased(est, exact, "pieces")
    monkeypatch.setattr(ev, "LOGITS_BUDGET", 3 * x.shape[1] * VT)  # groups of 3 rows
    stats = brier_for_model(model, x, generator=g)
    s = stats.summary()
    assert s["count_4"] == exact[..., 0].numel()
    for n in range(1, 5):
        ref = exact[..., n - 1].mean().item()
        assert abs(s[f"brier_{n}"] - ref) < max(3 * s[f"brier_{n}_se"], 1e-6), n


# ---------------------------------------------------------------------------
# Chunk-level toy CALM
# ---------------------------------------------------------------------------

VC, MC = 3, 7  # token vocabulary of the toy CALM, table contexts


def digits(ids, K):
    """Chunk ids (...) → tokens (..., K), most significant first."""
    return ids[..., None] // VC ** torch.arange(K - 1, -1, -1) % VC


class FakeHead:
    def __init__(self, table, bos):
        self.table, self.bos = table, bos

    def sample_n(self, h, n, *, generator=None):
        """h (..., 2) → n chunk ids per row as 1-d latents (..., n, 1)."""
        h = h.long()
        probs = self.table[context_of(h[..., 0], h[..., 1], MC, self.bos)]  # (..., NC)
        ids = torch.multinomial(probs.reshape(-1, probs.shape[-1]), n, replacement=True,
                                generator=generator)
        return ids.view(*h.shape[:-1], n, 1).float()

    def sample(self, h, *, generator=None):
        return self.sample_n(h, 1, generator=generator).squeeze(-2)


class FakeCALM:
    kind = "calm"

    def __init__(self, K, table):
        NC = VC**K
        self.config = SimpleNamespace(
            chunk_size=K, input_scheme="discrete",
            backbone=SimpleNamespace(vocab_size=VC, max_seq_len=4096),
        )
        self.backbone = FakeBackbone(bos=NC)
        self.head = FakeHead(table, bos=NC)
        self.autoencoder = SimpleNamespace(decode_tokens=lambda z: digits(z[..., 0].long(), K))

    def input_latents(self, chunks, known=None):
        return None  # the discrete input scheme

    def inputs(self, chunks, latents=None, known=None):
        K = chunks.shape[-1]
        return (chunks * VC ** torch.arange(K - 1, -1, -1)).sum(-1, keepdim=True).float()

    def make_cache(self, rows, max_len):
        return fake_cache(rows, max_len)


def exact_chunk_brier(table, K, ids, max_n=4):
    """(R, P, max_n) exact Brier-n after chunk i, i = 0..C−1−m, enumerating m-chunk paths."""
    R, C = ids.shape
    NC, m = VC**K, -(-max_n // K)
    P = C - m
    i = torch.arange(P)
    paths = torch.cartesian_prod(*[torch.arange(NC)] * m).view(-1, m)  # (G, m)
    prev2 = torch.where(i > 0, ids[:, (i - 1).clamp(min=0)], NC)  # (R, P)
    seq = torch.cat([prev2[..., None], ids[:, i, None]], -1)
    seq = torch.cat([seq[:, :, None].expand(-1, -1, len(paths), -1),
                     paths[None, None].expand(R, P, -1, -1)], -1)  # (R, P, G, m + 2)
    ctx = torch.where(seq[..., :-2] == NC, MC, (3 * seq[..., :-2] + seq[..., 1:-1]) % MC)
    p = table[ctx, seq[..., 2:]].prod(-1)  # (R, P, G)
    toks = digits(paths, K).flatten(-2)  # (G, m·K)
    true = digits(ids[:, 1:], K).flatten(-2)  # (R, (C−1)·K) tokens after chunk 0
    out = []
    for n in range(1, max_n + 1):
        code = (toks[:, :n] * VC ** torch.arange(n - 1, -1, -1)).sum(-1)  # (G,)
        pg = torch.zeros(R, P, VC**n, dtype=p.dtype).index_add_(2, code, p)  # (R, P, VC^n)
        tgt = true[:, i[:, None] * K + torch.arange(n)]  # (R, P, n)
        tcode = (tgt * VC ** torch.arange(n - 1, -1, -1)).sum(-1)
        out.append(2 * pg.gather(-1, tcode[..., None])[..., 0] - pg.square().sum(-1))
    return torch.stack(out, -1)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_calm_driver_unbiased(K):
    NC = VC**K
    table = make_table(MC, NC, seed=K)
    rows, C = {1: (30, 60), 2: (60, 40), 3: (60, 40), 4: (60, 40)}[K]
    ids = sample_chain(table, MC, C, rows=rows, seed=10 + K)  # (R, C) chunk ids
    tokens = digits(ids, K).flatten(1)  # (R, C·K)
    model = FakeCALM(K, table)
    exact = exact_chunk_brier(table, K, ids)
    g = torch.Generator().manual_seed(K)
    s1, s2, targets = calm_sample_ngrams(model, tokens, 4, generator=g)
    m = -(-4 // K)
    assert s1.shape == s2.shape == targets.shape == (rows, C - m, 4)
    assert torch.equal(targets, digits(ids[:, 1:], K).flatten(1)[:, torch.arange(C - m)[:, None] * K
                                                                  + torch.arange(4)])
    est = torch.stack([
        ((s1[..., :n] == targets[..., :n]).all(-1).double()
         + (s2[..., :n] == targets[..., :n]).all(-1).double()
         - (s1[..., :n] == s2[..., :n]).all(-1).double())
        for n in range(1, 5)
    ], -1)
    assert_unbiased(est, exact, f"K={K}")
    # Through the dispatcher: the same kind of numbers, reduced into sums.
    s = brier_for_model(model, tokens, generator=g).summary()
    assert s["count_1"] == s["count_4"] == exact[..., 0].numel()
    for n in range(1, 5):
        assert abs(s[f"brier_{n}"] - exact[..., n - 1].mean().item()) < 3 * s[f"brier_{n}_se"], n
    # More samples per start: the same expectation, a smaller standard error.
    many = brier_for_model(model, tokens, generator=g, samples=8).summary()
    for n in range(1, 5):
        assert abs(many[f"brier_{n}"] - exact[..., n - 1].mean().item()) < 3 * many[f"brier_{n}_se"], n
    assert many["brier_1_se"] < s["brier_1_se"]
    with pytest.raises(CalmError):
        brier_for_model(model, tokens, samples=1)


def test_calm_two_samples_unchanged_by_the_many_sample_path():
    """samples=2 scores exactly what the two-sample estimator scores on the same draws."""
    K = 2
    table = make_table(MC, VC**K, seed=3)
    ids = sample_chain(table, MC, 20, rows=8, seed=4)
    tokens = digits(ids, K).flatten(1)
    model = FakeCALM(K, table)
    s1, s2, targets = calm_sample_ngrams(model, tokens, 4, generator=torch.Generator().manual_seed(5))
    draws, t2 = ev.calm_samples(model, tokens, 4, num_samples=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draws[0], s1) and torch.equal(draws[1], s2) and torch.equal(t2, targets)
    a = brier_for_model(model, tokens, generator=torch.Generator().manual_seed(5)).summary()
    b = ev.generic_two_sample_brier(lambda: (s1, s2), targets).summary()
    assert a == b


def test_generic_sample_ngrams_dispatch():
    class Sampler:
        kind = "other"

        def sample_ngrams(self, tokens, n, *, generator=None):
            t = tokens[:, 1 : 1 + n][:, None]  # one start position, always right
            return t.clone(), t.clone(), t

    s = brier_for_model(Sampler(), torch.arange(10)[None].repeat(3, 1)).summary()
    assert [s[f"brier_{n}"] for n in range(1, 5)] == [1.0] * 4 and s["count_2"] == 3
    with pytest.raises(CalmError):
        brier_for_model(SimpleNamespace(kind="other"), torch.zeros(1, 8, dtype=torch.long))


# ---------------------------------------------------------------------------
# Real tiny models against independent paths
# ---------------------------------------------------------------------------


def test_token_lm_matches_uncached_estimator():
    from calm.baseline import TokenLM
    from calm.config import preset

    torch.manual_seed(0)
    model = TokenLM(preset("transformer", "tiny", vocab_size=40)).double().eval()
    x = torch.randint(40, (3, 24))

    def logits_fn(t, position_ids, attn_mask, read):
        return model.logits(t, positions=position_ids, attn_mask=attn_mask, read=read)

    ref = token_model_estimates(logits_fn, x, 4, torch.Generator().manual_seed(1))
    est = token_lm_estimates(model, x, 4, torch.Generator().manual_seed(1))
    # Same probabilities (one from a KV cache) and so the very same draws.
    torch.testing.assert_close(est, ref)
    pieces = token_lm_estimates(model, x, 4, torch.Generator().manual_seed(1), piece=5)
    torch.testing.assert_close(pieces[..., 0], ref[..., 0])


@pytest.mark.parametrize("K,scheme", [(1, "discrete"), (2, "discrete"), (2, "both")])
def test_calm_rollout_matches_step_by_step_decoding(K, scheme):
    """With a deterministic head, the batched rollouts equal plain cached generation."""
    from calm.autoencoder import Autoencoder
    from calm.config import CALMConfig, HeadConfig, preset
    from calm.model import CALM

    torch.manual_seed(0)
    V = 30
    ae = Autoencoder(preset("autoencoder", "tiny", vocab_size=V, chunk_size=K))
    cfg = CALMConfig(backbone=preset("transformer", "tiny", vocab_size=V), head=HeadConfig(),
                     chunk_size=K, latent_size=16, input_scheme=scheme)
    model = CALM(cfg, ae).double().eval()
    W = torch.randn(32, 16, dtype=torch.float64) * 3.0
    model.head.sample_n = lambda h, n, generator=None: (h @ W)[..., None, :].expand(
        *h.shape[:-1], n, 16)
    m = -(-4 // K)
    x = torch.randint(V, (2, 8 * K))
    s1, s2, _ = calm_sample_ngrams(model, x, 4)
    assert torch.equal(s1, s2)  # a deterministic head: both streams agree
    C = x.shape[1] // K
    for i in range(C - m):
        chunks = x[:, : (i + 1) * K].view(2, i + 1, K)
        lat = model.autoencoder.encode(chunks)[0] if scheme != "discrete" else None
        cache = model.make_cache(2, i + 1 + m)
        h = model.step(chunks, lat, cache=cache)
        out = []
        for _ in range(m):
            z = model.head.sample(h)
            tok = model.autoencoder.decode_tokens(z)  # (2, K)
            out.append(tok)
            # The continuous input reads the encoder's μ of the decoded tokens, as in training.
            prev = model.autoencoder.encode(tok[:, None])[0] if lat is not None else None
            h = model.step(tok[:, None], prev, cache=cache)
        assert torch.equal(s1[:, i], torch.cat(out, -1)[:, :4]), i


# ---------------------------------------------------------------------------
# End to end on the tiny trained runs
# ---------------------------------------------------------------------------

BLOCK = 32


def test_evaluate_model_baseline_and_calm(base_run, calm_run, dataset_dir):
    from calm.loading import load_model

    ds = TokenDataset(dataset_dir)
    windows = min(5, ds.num_tokens("val") // BLOCK)
    assert windows >= 2
    base, _, _ = load_model(base_run)
    r = evaluate_model(base, ds, "validation", block_size=BLOCK, batch_size=2,
                       max_tokens=windows * BLOCK, seed=3)
    assert r["split"] == "val" and r["windows"] == windows and r["tokens"] == windows * BLOCK
    for n in range(1, 5):
        assert r[f"count_{n}"] == windows * (BLOCK - 4)
        assert -1 <= r[f"brier_{n}"] <= 1 and r[f"brier_{n}_se"] > 0
    # Cross-entropy: an independent computation over the same windows.
    x = torch.cat(list(eval_batches(ds, "val", BLOCK, 8)))[:windows]
    with torch.no_grad():
        ce = F.cross_entropy(base.logits(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    assert r["cross_entropy"] == pytest.approx(ce, rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(ce), rel=1e-4)
    # Brier-1 of a token model is exact: 2 P(y) − Σ P², averaged over the positions.
    with torch.no_grad():
        p = torch.softmax(base.logits(x).double(), -1)[:, : BLOCK - 4]
    b1 = 2 * p.gather(-1, x[:, 1 : BLOCK - 3, None])[..., 0] - p.square().sum(-1)
    assert r["brier_1"] == pytest.approx(b1.mean().item(), abs=1e-5)
    other = evaluate_model(base, ds, "val", block_size=BLOCK, batch_size=3,
                           max_tokens=windows * BLOCK, seed=3)
    for k in ("brier_1", "brier_1_se", "cross_entropy", "count_4", "tokens"):
        assert other[k] == pytest.approx(r[k], rel=1e-6)  # another batching: same exact terms

    calm, _, _ = load_model(calm_run)
    calm.train()
    r = evaluate_model(calm, ds, "val", block_size=BLOCK, batch_size=2,
                       max_tokens=windows * BLOCK, seed=3)
    assert calm.training  # the model comes back in its mode
    assert r["kind"] == "calm" and math.isfinite(r["energy_loss"])
    assert r["count_1"] == windows * (BLOCK // 4 - 1)
    assert "cross_entropy" not in r
    again = evaluate_model(calm, ds, "val", block_size=BLOCK, batch_size=2,
                           max_tokens=windows * BLOCK, seed=3)
    assert again == r  # the seed fixes every sample

    fn = brier_eval_fn(ds, block_size=BLOCK, batch_size=2, max_tokens=2 * BLOCK, seed=0)
    out = fn(calm)
    assert sorted(out) == ["brier_1", "brier_2", "brier_3", "brier_4", "brier_lm"]
    assert out == fn(calm)


def test_evaluate_model_bad_input(base_run, calm_run, dataset_dir):
    from calm.loading import load_model

    ds = TokenDataset(dataset_dir)
    calm, _, _ = load_model(calm_run)
    base, _, _ = load_model(base_run)
    with pytest.raises(CalmError, match="divisible"):
        evaluate_model(calm, ds, block_size=30, batch_size=2)
    with pytest.raises(CalmError, match="too short"):
        evaluate_model(calm, ds, block_size=4, batch_size=2)
    with pytest.raises(CalmError, match="unknown split"):
        evaluate_model(base, ds, "test", block_size=BLOCK, batch_size=2)
    with pytest.raises(CalmError, match="context"):
        evaluate_model(base, ds, block_size=100000, batch_size=2)


def test_split_too_short(base_run, dataset_dir, tmp_path, capsys):
    """A dataset with the model's tokenizer whose validation split is shorter than a window."""
    from calm.dataset import prepare_dataset
    from calm.loading import load_model

    out = tmp_path / "short"
    docs = [("long", "the king and the queen ride to the castle at night. " * 20), ("v", "sea.")]
    prepare_dataset(None, out, tokenizer=str(dataset_dir), documents=docs, val_documents={"v"},
                    progress=False)
    ds = TokenDataset(out)
    assert ds.num_tokens("val") < BLOCK
    base, _, _ = load_model(base_run)
    with pytest.raises(CalmError, match="fewer than one window"):
        evaluate_model(base, ds, block_size=BLOCK, batch_size=2)
    rc = main(["eval", "--model", str(base_run), "--data", str(out), "--no-progress"])
    assert rc == 2
    assert "fewer than one window" in capsys.readouterr().err


def test_cli_eval(base_run, calm_run, dataset_dir, other_dataset_dir, capsys):
    rc = main(["eval", "--model", str(calm_run), "--data", str(dataset_dir), "--block-size",
               str(BLOCK), "--max-tokens", "96", "--json", "--no-progress"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert r["kind"] == "calm" and r["windows"] == 3 and "energy_loss" in r
    assert {f"brier_{n}" for n in range(1, 5)} <= set(r)

    rc = main(["eval", "--model", str(base_run), "--data", str(dataset_dir), "--split",
               "validation", "--max-tokens", "64", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("Brier-1", "Brier-4", "BrierLM", "perplexity", "cross-entropy"):
        assert word in out
    assert f"windows of {BLOCK}" in out  # the training block size by default

    rc = main(["eval", "--model", str(base_run), "--data", str(other_dataset_dir), "--no-progress"])
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err
    rc = main(["eval", "--model", str(base_run), "--data", str(dataset_dir), "--block-size",
               "100000", "--no-progress"])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_stats_are_sums_across_batches(token_toy):
    """Evaluating in two halves and merging equals evaluating at once (the same draws)."""
    model, x, _ = token_toy
    whole = brier_for_model(model, x[:4], generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    halves = BrierStats()
    brier_for_model(model, x[:2], generator=g, stats=halves)
    brier_for_model(model, x[2:4], generator=g, stats=halves)
    assert whole.summary()["count_3"] == halves.summary()["count_3"]
    assert whole.summary()["brier_1"] == pytest.approx(halves.summary()["brier_1"])


def test_sample_categorical_frequencies():
    from calm.brier import sample_categorical

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [2.0, 0.0, 1.0, 1.0, 0.0]])  # 2nd unnormalised
    draws = sample_categorical(probs[:, None].expand(-1, 40000, -1), g)  # (2, 40000)
    freq = F.one_hot(draws, 5).double().mean(1)  # (2, 5)
    want = probs.double() / probs.sum(-1, keepdim=True)
    assert (freq[want == 0] == 0).all()  # zero-probability entries never come out
    se = (want * (1 - want) / 40000).sqrt()
    assert ((freq - want).abs() <= 4 * se + 1e-12).all(), (freq, want)
