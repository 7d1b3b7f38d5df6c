"""BrierLM estimators against exact answers (SPEC §3).

The toy model is a trigram chain over 6 tokens. Its ``logits_fn`` finds the
previous token through the attention mask and the position ids, so a wrong
rollout layout gives wrong distributions. Exact Brier-n at a position enumerates
all 6^n n-grams: 2 P(y) − Σ_x P(x)².
"""

import math

import pytest
import torch

from calm.brier import (
    BrierStats,
    brier_lm,
    generic_two_sample_brier,
    multi_sample_brier,
    rollout_layout,
    token_level_brier,
    token_model_brier,
    token_model_estimates,
    two_sample_brier,
)
from calm.errors import CalmError

V = 6
BOS = V  # context index used before the first token


def trigram_table(seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """(V+1, V, V) probabilities P(next | prev2, prev1); prev2 = BOS at the start."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(V + 1, V, V, generator=g), -1)


def sample_chain(table: torch.Tensor, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = [int(torch.randint(V, (1,), generator=g))]
    for _ in range(T - 1):
        prev2 = x[-2] if len(x) > 1 else BOS
        x.append(int(torch.multinomial(table[prev2, x[-1]], 1, generator=g)))
    return torch.tensor(x)


def trigram_logits_fn(table: torch.Tensor):
    """A causal 'model' whose output at a slot is log P(· | token one position back, own token).

    The token one position back is the visible key whose position id is one less
    than the query's; the layout must show exactly one such key (none at position 0).
    """
    logw = table.log()

    def logits_fn(x, position_ids, attn_mask, read):
        S = x.shape[1]
        assert attn_mask.shape == (S, S) and position_ids.shape == (S,)
        assert attn_mask.diagonal().all()
        back = attn_mask & (position_ids[None, :] == position_ids[:, None] - 1)  # (S, S)
        assert torch.equal(back.sum(1), (position_ids > 0).long())
        prev_slot = back.float().argmax(1)  # (S,)
        prev = torch.where(position_ids > 0, x[:, prev_slot], BOS)  # (B, S)
        return logw[prev, x][:, read]  # (B, R, V)

    return logits_fn


def exact_brier(table: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, n: int):
    """(P,) exact Brier-n at each start position by enumerating all V^n n-grams."""
    grams = torch.cartesian_prod(*[torch.arange(V)] * n).view(-1, n)  # (G, n), first token slowest
    prev2 = torch.where(positions > 0, tokens[(positions - 1).clamp(min=0)], BOS)
    ctx = torch.stack([prev2, tokens[positions]], -1)  # (P, 2)
    seq = torch.cat(
        [ctx[:, None].expand(-1, len(grams), -1), grams[None].expand(len(ctx), -1, -1)], -1
    )
    p = table[seq[..., :-2], seq[..., 1:-1], seq[..., 2:]].prod(-1)  # (P, G)
    target = tokens[positions[:, None] + 1 + torch.arange(n)]  # (P, n)
    code = (target * V ** torch.arange(n - 1, -1, -1)).sum(-1)  # row of the target in grams
    return 2 * p.gather(1, code[:, None]).squeeze(1) - p.square().sum(-1)


@pytest.fixture(scope="module")
def chain():
    table = trigram_table()
    tokens = sample_chain(table, 300)
    positions = torch.arange(len(tokens) - 4)
    exact = torch.stack(
        [exact_brier(table, tokens, positions, n) for n in range(1, 5)], -1
    )  # (P, 4)
    return table, tokens, positions, exact


def test_exact_reference_sanity(chain):
    table, tokens, positions, exact = chain
    # Brier ≤ 1, and Brier-1 by its direct formula.
    assert (exact <= 1).all()
    prev2 = torch.where(positions > 0, tokens[(positions - 1).clamp(min=0)], BOS)
    p = table[prev2, tokens[positions]]
    direct = 2 * p.gather(1, tokens[positions + 1, None]).squeeze(1) - p.square().sum(-1)
    torch.testing.assert_close(exact[:, 0], direct)


def test_token_model_unbiased(chain):
    table, tokens, positions, exact = chain
    R = 40  # replicates of the same sequence as batch rows, each with its own samples
    g = torch.Generator().manual_seed(123)
    est = token_model_estimates(trigram_logits_fn(table), tokens.repeat(R, 1), 4, g)  # (R, P, 4)
    assert est.shape == (R, len(positions), 4)
    # Brier-1 has no sampling at all; every replicate equals the exact value.
    torch.testing.assert_close(est[..., 0], exact[None, :, 0].expand(R, -1))
    d = (est - exact[None]).reshape(-1, 4).double()  # residuals, mean zero if unbiased
    for n in range(1, 4):
        mean, se = d[:, n].mean(), d[:, n].std() / math.sqrt(len(d))
        assert se > 0
        assert abs(mean) < 3 * se, (n + 1, mean.item(), se.item())
    # The estimates also reach the accumulator unchanged.
    stats = token_model_brier(trigram_logits_fn(table), tokens, 4, torch.Generator().manual_seed(5))
    s = stats.summary()
    assert s["count_4"] == len(positions)
    assert s["brier_1"] == pytest.approx(exact[:, 0].mean().item(), abs=1e-6)


def test_token_model_accuracy_term_is_exact(chain):
    # A model that puts all mass on one token has collision 1 at every step and
    # the two samples always agree, so Brier-n = 2 · P(true n-gram) − 1 exactly.
    _, tokens, positions, _ = chain
    logw = torch.full((V,), -1e4)
    logw[2] = 0.0

    def constant_fn(x, position_ids, attn_mask, read):
        return logw.expand(x.shape[0], len(read), V)

    est = token_model_estimates(constant_fn, tokens, 4, torch.Generator().manual_seed(0))
    hit = tokens[positions[:, None] + 1 + torch.arange(4)] == 2  # (P, 4)
    expected = torch.where(hit.cumprod(-1).bool(), 1.0, -1.0)
    assert torch.equal(est, expected)
    assert (expected == -1).any() and (expected == 1).any()


def test_generic_two_sample_unbiased(chain):
    table, tokens, positions, exact = chain
    g = torch.Generator().manual_seed(7)
    prev2 = torch.where(positions > 0, tokens[(positions - 1).clamp(min=0)], BOS)
    ctx = torch.stack([prev2, tokens[positions]], -1)  # (P, 2)
    targets = tokens[positions[:, None] + 1 + torch.arange(4)]  # (P, 4)
    R = 40

    def draw():
        c = ctx.repeat(R, 1)  # (R·P, 2)
        for _ in range(4):
            nxt = torch.multinomial(table[c[:, -2], c[:, -1]], 1, generator=g)
            c = torch.cat([c, nxt], 1)
        return c[:, 2:]

    stats = generic_two_sample_brier(lambda: (draw(), draw()), targets.repeat(R, 1))
    s = stats.summary()
    for n in range(1, 5):
        assert s[f"count_{n}"] == R * len(positions)
        assert abs(s[f"brier_{n}"] - exact[:, n - 1].mean().item()) < 3 * s[f"brier_{n}_se"], n


def test_deterministic_pairs_and_formulae():
    y = torch.tensor([[1, 2, 3], [1, 2, 3]])
    right = y.clone()
    wrong = torch.tensor([[1, 2, 4], [0, 2, 3]])  # wrong in one token of the n-gram
    assert torch.equal(two_sample_brier(right, right.clone(), y), torch.ones(2))
    assert torch.equal(two_sample_brier(wrong, wrong.clone(), y), -torch.ones(2))
    assert torch.equal(two_sample_brier(right, wrong, y), torch.ones(2))
    assert torch.equal(two_sample_brier(wrong, wrong.flip(0), y), torch.zeros(2))
    with pytest.raises(CalmError):
        two_sample_brier(right[:, :2], right, y)

    p = torch.tensor([0.5, 0.0, 0.2])
    agree = torch.tensor([True, True, False])
    coll = torch.tensor([0.3, 1.0, 0.9])
    torch.testing.assert_close(token_level_brier(p, agree, coll), torch.tensor([0.7, -1.0, 0.4]))


def test_brier_lm_rule():
    assert brier_lm([0.4, 0.2, 0.1, 0.05]) == pytest.approx(100 * (0.4 * 0.2 * 0.1 * 0.05) ** 0.25)
    assert brier_lm([-0.4, -0.2, 0.1, 0.05]) == 0.0  # positive product, still 0
    assert brier_lm([-0.4, -0.2, -0.1, -0.05]) == 0.0
    assert brier_lm([0.4, 0.0, 0.1, 0.05]) == 0.0
    assert brier_lm([0.4, 0.3, 0.1, -0.05]) == 0.0
    assert math.isnan(brier_lm([0.4, math.nan, 0.1, 0.05]))


def test_summary_by_hand():
    est = {1: [0.5, 0.25, 1.0], 2: [0.2, 0.1, 0.4, 0.3], 3: [0.1, 0.05], 4: [0.02, 0.04, 0.09]}
    stats = BrierStats()
    for n, e in est.items():
        stats.update(n, torch.tensor(e))
    s = stats.summary()
    means, ses = [], []
    for n, e in est.items():
        m = sum(e) / len(e)
        var = sum((v - m) ** 2 for v in e) / (len(e) - 1)
        means.append(m)
        ses.append(math.sqrt(var / len(e)))
        assert s[f"count_{n}"] == len(e)
        assert s[f"brier_{n}"] == pytest.approx(m)
        assert s[f"brier_{n}_se"] == pytest.approx(ses[-1])
    lm = 100 * math.prod(means) ** 0.25
    assert s["brier_lm"] == pytest.approx(lm)
    assert s["brier_lm_se"] == pytest.approx(lm / 4 * sum(se / m for se, m in zip(ses, means)))

    neg = BrierStats()
    for n in range(1, 5):
        neg.update(n, torch.tensor([-0.1, -0.3]))
    assert neg.summary()["brier_lm"] == 0.0
    assert math.isnan(neg.summary()["brier_lm_se"])


def test_merge_and_tensor_roundtrip():
    g = torch.Generator().manual_seed(0)
    est = torch.rand(50, 4, generator=g) * 2 - 0.5
    full = BrierStats().update_all(est)
    a = BrierStats().update_all(est[:20])
    b = BrierStats().update_all(est[20:])
    merged = a.merge(b)
    torch.testing.assert_close(merged.to_tensor(), full.to_tensor())
    # The reduction path: sum the tensors of the shards, rebuild.
    c = BrierStats.from_tensor(BrierStats().update_all(est[:20]).to_tensor() + b.to_tensor())
    assert c.summary() == pytest.approx(full.summary())
    assert full.summary()["count_3"] == 50


def toy_relative_model(seed: int = 0):
    """Causal 'model' whose output depends on every visible token and the positions.

    logits[s] = Σ_{k visible from s} A[x_k] · cos(0.3 (pos_s − pos_k)) + C[pos_s].
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, V, generator=g, dtype=torch.float64)
    C = torch.randn(64, V, generator=g, dtype=torch.float64)

    def logits_fn(x, position_ids, attn_mask, read):
        rel = (position_ids[:, None] - position_ids[None, :]).double()  # (S, S)
        w = attn_mask.double() * torch.cos(0.3 * rel)
        out = torch.einsum("sk,bkv->bsv", w, A[x]) + C[position_ids]  # (B, S, V)
        return out[:, read]

    return logits_fn


def test_rollout_layout_matches_separate_prefixes():
    T, steps = 9, 3
    positions = torch.tensor([0, 2, 3, 5])
    P = len(positions)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(V, (T,), generator=g)
    samples = torch.randint(V, (steps, P), generator=g)
    fn = toy_relative_model()

    lay = rollout_layout(T, steps, positions)
    S = T + steps * P
    assert lay.attn_mask.shape == (S, S) and lay.position_ids.shape == (S,)
    assert torch.equal(lay.attn_mask[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())
    assert not lay.attn_mask[:T, T:].any()
    assert torch.equal(lay.read, lay.slots[-1])
    assert torch.equal(
        lay.position_ids[lay.slots], positions[None] + 1 + torch.arange(steps)[:, None]
    )
    # Each sample slot sees its prefix plus its own earlier samples, nothing else.
    assert torch.equal(
        lay.attn_mask.sum(1)[lay.slots], positions[None] + 1 + torch.arange(1, steps + 1)[:, None]
    )

    seq = torch.cat([tokens, samples.flatten()])[None]  # (1, S)
    all_slots = torch.arange(S)
    out = fn(seq, lay.position_ids, lay.attn_mask, all_slots)[0]  # (S, V)
    for p, t in enumerate(positions.tolist()):
        for j in range(steps + 1):
            # the plain causal sequence tokens[:t+1] + the first j samples of position p
            plain = torch.cat([tokens[: t + 1], samples[:j, p]])[None]
            L = plain.shape[1]
            ref = fn(
                plain,
                torch.arange(L),
                torch.ones(L, L, dtype=torch.bool).tril(),
                torch.tensor([L - 1]),
            )[0, 0]
            slot = t if j == 0 else lay.slots[j - 1, p]
            torch.testing.assert_close(out[slot], ref)

    # steps = 0 is the plain teacher-forced sequence, read at the start positions.
    lay0 = rollout_layout(T, 0, positions)
    assert torch.equal(lay0.read, positions) and lay0.attn_mask.shape == (T, T)


def test_position_checks():
    fn = toy_relative_model()
    with pytest.raises(CalmError):
        token_model_estimates(fn, torch.zeros(10, dtype=torch.long), 4, positions=torch.tensor([6]))
    with pytest.raises(CalmError):
        token_model_estimates(fn, torch.zeros(4, dtype=torch.long), 4)
    est = token_model_estimates(
        fn, torch.zeros(10, dtype=torch.long), 4, positions=torch.tensor([5])
    )
    assert est.shape == (1, 4)


def test_multi_sample_brier_is_unbiased_by_enumeration():
    """E over every S-tuple of draws equals 2 P(y) − Σ P(x)², for S = 2, 3, 4."""
    import itertools

    outcomes = torch.tensor([[0, 1], [1, 1], [2, 0]])  # three bigrams
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for y in range(3):
        exact = 2 * p[y] - p.square().sum()
        for S in (2, 3, 4):
            expected = torch.zeros((), dtype=torch.float64)
            for draw in itertools.product(range(3), repeat=S):
                est = multi_sample_brier(outcomes[list(draw)][:, None], outcomes[y][None])
                expected += p[list(draw)].prod() * est.double()[0]
            assert abs(expected.item() - exact.item()) < 1e-6, (y, S)


def test_multi_sample_brier_two_samples_and_bad_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 50, 3), generator=g)
    y = torch.randint(0, 3, (50, 3), generator=g)
    assert torch.equal(multi_sample_brier(x, y), two_sample_brier(x[0], x[1], y))
    # Every sample right: hits score 2, and every pair agrees (−1): 1, as for two samples.
    same = y[None].repeat(5, 1, 1)
    assert torch.equal(multi_sample_brier(same, y), torch.ones(50))
    with pytest.raises(CalmError):
        multi_sample_brier(x[:1], y)
    with pytest.raises(CalmError):
        multi_sample_brier(x, y[:, :2])
