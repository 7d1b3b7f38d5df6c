"""Likelihood-free temperature sampling (SPEC §4): exact distributions and costs.

References are independent of calm.sampling: target distributions P^{1/T} and expected
costs computed by hand, chi-square tests against them, and a row-by-row Python version
of Algorithm 2 evaluated on exact enumerations of every possible batch.
"""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from calm.errors import CalmError
from calm.sampling import (
    batch_select_from_groups,
    batch_selection_probs,
    batch_temperature_sample,
    exact_temperature_sample,
    expected_calls,
    outcome_group_ids,
    temperature_distribution,
)

DIGITS = torch.tensor([100, 10, 1])  # outcome k <-> row of L = 3 ids (its decimal digits)


def encode(k):
    return (k[..., None] // DIGITS) % 10  # (..., 3)


def decode(x):
    return (x * DIGITS).sum(-1)


def zipf(K=50):
    p = 1.0 / torch.arange(1, K + 1, dtype=torch.float64)
    return p / p.sum()


def peaked(K=10):
    p = torch.full((K,), 0.4 / (K - 1), dtype=torch.float64)
    p[0] = 0.6
    return p


def make_draw(p, seed):
    g = torch.Generator().manual_seed(seed)

    def draw(rows, m):
        k = torch.multinomial(p, rows.numel() * m, replacement=True, generator=g)
        return encode(k.view(rows.numel(), m))

    return draw


def chi2_pvalue(counts, expected):
    """Pearson chi-square p-value; bins with expected count < 5 are pooled."""
    counts, expected = counts.double(), expected.double()
    small = expected < 5
    c = torch.cat([counts[~small], counts[small].sum()[None]])
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    if e[-1] < 5:  # fold a still-small pool into the smallest big bin
        j = int(e[:-1].argmin())
        c[j] += c[-1]
        e[j] += e[-1]
        c, e = c[:-1], e[:-1]
    assert e.numel() >= 2, "too few samples for a chi-square test"
    x = ((c - e) ** 2 / e).sum()
    dof = torch.tensor((e.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, x / 2))


def target(p, T):
    q = p ** (1.0 / T)
    return q / q.sum()


# ---------------------------------------------------------------------------------------
# Closed forms against hand computations


def test_closed_forms_by_hand():
    p = torch.tensor([0.5, 0.5])
    assert expected_calls(p, 1.0) == pytest.approx(1.0)
    assert expected_calls(p, 0.5) == pytest.approx(2 / 0.5)  # n = 2: 2 / Σ p²
    # 1/T = 2.5: (2 + Σ p^1.5) / Σ p^2.5
    assert expected_calls(p, 0.4) == pytest.approx((2 + 2 * 0.5**1.5) / (2 * 0.5**2.5))
    p = torch.tensor([0.8, 0.2])
    # 1/T = 4/3: (1 + Σ p^(1/3)) / Σ p^(4/3)
    want = (1 + 0.8 ** (1 / 3) + 0.2 ** (1 / 3)) / (0.8 ** (4 / 3) + 0.2 ** (4 / 3))
    assert expected_calls(p, 0.75) == pytest.approx(want)
    torch.testing.assert_close(
        temperature_distribution(p, 0.5), torch.tensor([0.64, 0.04], dtype=torch.float64) / 0.68
    )


# ---------------------------------------------------------------------------------------
# Algorithm 1


@pytest.mark.parametrize("T", [1.0, 0.75, 0.5, 0.4, 1 / 3])
@pytest.mark.parametrize("dist", ["zipf", "peaked"])
def test_exact_sampler_distribution_and_cost(dist, T):
    p = zipf() if dist == "zipf" else peaked()
    B = 20000
    s, calls = exact_temperature_sample(
        make_draw(p, seed=1), T, batch_size=B, generator=torch.Generator().manual_seed(2)
    )
    assert s.shape == (B, 3) and calls.shape == (B,)
    counts = torch.bincount(decode(s), minlength=p.numel())
    assert counts.numel() == p.numel()  # every output is a valid outcome
    assert chi2_pvalue(counts, B * target(p, T)) > 1e-3
    assert calls.double().mean().item() == pytest.approx(expected_calls(p, T), rel=0.03)
    if T == 1.0:
        assert bool((calls == 1).all())


def test_exact_sampler_detects_whole_row_mismatch():
    # Outcomes 0..3 share their first two ids: a sampler comparing one id only would
    # accept mismatched stage-1 draws and return a near-uniform output.
    p = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    B = 20000
    s, _ = exact_temperature_sample(
        make_draw(p, seed=3), 0.5, batch_size=B, generator=torch.Generator().manual_seed(4)
    )
    counts = torch.bincount(decode(s), minlength=4)
    assert chi2_pvalue(counts, B * target(p, 0.5)) > 1e-3


@pytest.mark.parametrize("T,cost", [(1.0, 1), (0.5, 2), (0.4, 3), (0.75, 2), (0.3333333, 3)])
def test_exact_sampler_stops_rows_that_accepted(T, cost):
    # Even rows always draw their own outcome (accept after exactly n + 1{α>0} calls);
    # odd rows draw from a Zipf. The draws handed out must equal the reported calls.
    B, p = 64, zipf()
    g = torch.Generator().manual_seed(5)
    used = torch.zeros(B, dtype=torch.long)

    def draw(rows, m):
        assert rows.unique().numel() == rows.numel()
        used[rows] += m
        k = torch.multinomial(p, rows.numel() * m, replacement=True, generator=g)
        k = k.view(-1, m)
        det = rows % 2 == 0
        k[det] = (rows[det] % 50)[:, None]
        return encode(k)

    s, calls = exact_temperature_sample(draw, T, batch_size=B, generator=g)
    torch.testing.assert_close(calls, used)
    even = torch.arange(0, B, 2)
    assert bool((calls[even] == cost).all())
    torch.testing.assert_close(decode(s[even]), even % 50)


# ---------------------------------------------------------------------------------------
# Algorithm 2


def reference_batch_probs(ids, n):
    """Row-by-row Algorithm 2 in plain Python: exact probability of each distinct outcome."""
    counts = {}
    for x in ids:
        counts[x] = counts.get(x, 0) + 1
    for m in range(n, 0, -1):
        w = {x: math.comb(c, m) for x, c in counts.items() if c >= m}
        if w:
            total = sum(w.values())
            return {x: Fraction(v, total) for x, v in w.items()}
    raise AssertionError("unreachable: every outcome has count ≥ 1")


def per_outcome(probs_per_draw, ids):
    out = {}
    for x, q in zip(ids, probs_per_draw):
        out[x] = out.get(x, 0.0) + q
    return out


def test_selection_probs_match_rowwise_reference_on_random_batches():
    g = torch.Generator().manual_seed(6)
    for N in [1, 2, 3, 5, 8, 13]:
        ids = torch.randint(0, 4, (200, N), generator=g) * 1000 - 7  # arbitrary labels
        for n in [1, 2, 3, 4]:
            probs = batch_selection_probs(ids, n)
            assert probs.shape == (200, N)
            for row, q in zip(ids.tolist(), probs.tolist()):
                ref = reference_batch_probs(row, n)
                got = per_outcome(q, row)
                for x in got:
                    assert got[x] == pytest.approx(float(ref.get(x, 0)), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_batch_sampler_exact_distribution_by_enumeration(n):
    # P_N(x) = Σ over all K^N batches of P(batch) · P(pick x | batch), computed with the
    # row-wise reference; then the full sampler (whole-row outcomes) must follow it.
    p = [Fraction(1, 2), Fraction(3, 10), Fraction(1, 5)]
    N, K = 5, 3
    batches = list(itertools.product(range(K), repeat=N))
    exact = [Fraction(0)] * K
    for b in batches:
        pb = math.prod(p[i] for i in b)
        for x, q in reference_batch_probs(b, n).items():
            exact[x] += pb * q
    exact = torch.tensor([float(e) for e in exact], dtype=torch.float64)

    # The vectorised selection probabilities over the same enumeration.
    ids = torch.tensor(batches)  # (K^N, N)
    pb = torch.tensor([float(math.prod(p[i] for i in b)) for b in batches], dtype=torch.float64)
    q = batch_selection_probs(ids, n)  # (K^N, N)
    got = torch.zeros(len(batches), K, dtype=torch.float64).scatter_add_(1, ids, q)
    torch.testing.assert_close((pb[:, None] * got).sum(0), exact)

    # The sampler itself, on outcomes encoded as rows of 3 ids.
    B = 30000
    g = torch.Generator().manual_seed(7)
    pt = torch.tensor([float(x) for x in p], dtype=torch.float64)
    draws = torch.multinomial(pt, B * N, replacement=True, generator=g).view(B, N)
    out = batch_temperature_sample(encode(draws + 120), 1 / n, generator=g)  # (B, 3)
    counts = torch.bincount(decode(out) - 120, minlength=K)
    assert counts.numel() == K
    assert chi2_pvalue(counts, B * exact) > 1e-3


def _tv_at(p, T, N, B, g):
    """TV(P_N, P^{1/T}) estimated with low variance: average the exact per-batch selection
    probabilities (Rao-Blackwell), with the batch's empirical frequencies as control variates."""
    K, n = p.numel(), round(1 / T)
    ids = torch.multinomial(p, B * N, replacement=True, generator=g).view(B, N)
    q = torch.zeros(B, K, dtype=torch.float64).scatter_add_(1, ids, batch_selection_probs(ids, n))
    ones = torch.ones(B, N, dtype=torch.float64)
    freq = torch.zeros(B, K, dtype=torch.float64).scatter_add_(1, ids, ones) / N
    d = freq - p  # (B, K), mean zero
    beta = torch.linalg.lstsq(d - d.mean(0), q - q.mean(0)).solution  # (K, K)
    pn = q.mean(0) - d.mean(0) @ beta
    return 0.5 * (pn - target(p, T)).abs().sum().item()


@pytest.mark.parametrize("T", [1 / 3, 1 / 2])
def test_batch_sampler_bias_falls_with_batch_size(T):
    p, g = zipf(), torch.Generator().manual_seed(8)
    tv = [_tv_at(p, T, N, B, g) for N, B in [(10, 4000), (100, 2000), (1000, 2000), (10000, 400)]]
    assert all(a > 2 * b for a, b in itertools.pairwise(tv)), tv  # roughly 1/N
    assert tv[-1] < 0.002, tv


def test_batch_sampler_falls_back_to_smaller_m():
    # n = 3 but no outcome occurs 3 times: m = 2 picks among the pairs ∝ C(c, 2).
    ids = torch.tensor([[5, 5, 7, 7, 9], [1, 2, 3, 4, 5], [4, 4, 4, 0, 0]])
    want = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25, 0.0], [0.2] * 5, [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(batch_selection_probs(ids, 3), want)
    # Fewer draws than n, all distinct: uniform among draws.
    torch.testing.assert_close(
        batch_selection_probs(torch.tensor([[3, 8]]), 5),
        torch.tensor([[0.5, 0.5]], dtype=torch.float64),
    )
    B = 40000
    g = torch.Generator().manual_seed(9)
    idx = batch_select_from_groups(torch.tensor([[5, 5, 7, 7, 9]]).expand(B, 5), 3, g)
    counts = torch.bincount(idx, minlength=5)
    assert counts[4] == 0
    assert chi2_pvalue(counts[:4], torch.full((4,), B / 4)) > 1e-3


def test_batch_sampler_at_T1_picks_a_uniform_draw():
    # n = 1 weighs every draw equally, so a repeated outcome is picked ∝ its count.
    B = 40000
    g = torch.Generator().manual_seed(10)
    draws = encode(torch.tensor([3, 3, 3, 17, 42, 3]))  # (6, 3)
    out = batch_temperature_sample(draws.expand(B, 6, 3), 1.0, generator=g)
    k = decode(out)
    counts = torch.stack([(k == 3).sum(), (k == 17).sum(), (k == 42).sum()])
    assert counts.sum() == B
    assert chi2_pvalue(counts, torch.tensor([4, 1, 1]) * B / 6) > 1e-3
    idx = batch_select_from_groups(torch.tensor([[9, 9, 1, 2, 9, 9]]).expand(B, 6), 1, g)
    assert chi2_pvalue(torch.bincount(idx, minlength=6), torch.full((6,), B / 6)) > 1e-3


@pytest.mark.parametrize("big", [False, True])
def test_outcome_group_ids_equal_iff_rows_equal(big):
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 3, (4, 30, 3), generator=g)
    if big:  # ids too large to pack into one int64: the sorting path
        x = x * (1 << 40) + 12345
    ids = outcome_group_ids(x)  # (4, 30)
    same_ids = ids[:, :, None] == ids[:, None, :]
    same_rows = (x[:, :, None, :] == x[:, None, :, :]).all(-1)
    assert torch.equal(same_ids, same_rows)


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("T", [0.0, -0.5, 1.5, float("nan")])
def test_temperature_out_of_range(T):
    draw = make_draw(zipf(), seed=0)
    with pytest.raises(CalmError, match=r"\(0, 1\]"):
        exact_temperature_sample(draw, T, batch_size=2)
    with pytest.raises(CalmError):
        batch_temperature_sample(torch.zeros(2, 4, 3, dtype=torch.long), T)
    with pytest.raises(CalmError):
        expected_calls(zipf(), T)


def test_batch_sampler_needs_inverse_integer_temperature():
    x = torch.zeros(2, 4, 3, dtype=torch.long)
    with pytest.raises(CalmError, match="1/n.*exact sampler"):
        batch_temperature_sample(x, 0.4)
    batch_temperature_sample(x, 0.3333333)  # within 1e-6 of 1/3
    batch_temperature_sample(x, 0.25)


def test_max_calls_raises_or_uses_fallback():
    p = torch.full((50,), 1 / 50, dtype=torch.float64)  # E[calls] = 3 · 2500 at T = 1/3
    with pytest.raises(CalmError, match=r"T=0\.333333.*max_calls=30.*batch sampler"):
        exact_temperature_sample(make_draw(p, seed=12), 1 / 3, batch_size=8, max_calls=30)

    B = 200
    seen = []

    def fallback(rows):
        seen.append(rows.clone())
        return torch.full((rows.numel(), 3), -1, dtype=torch.long)

    s, calls = exact_temperature_sample(
        make_draw(p, seed=13),
        1 / 3,
        batch_size=B,
        max_calls=30,
        fallback=fallback,
        generator=torch.Generator().manual_seed(14),
    )
    assert bool((calls <= 30).all())
    fell = torch.cat(seen)
    assert fell.unique().numel() == fell.numel() > 150  # ~99 % of rows give up
    assert bool((s[fell] == -1).all()) and bool((calls[fell] == 30).all())
    kept = torch.ones(B, dtype=torch.bool)
    kept[fell] = False
    assert bool((s[kept] >= 0).all())
