"""Temperature sampling inside CALM generation (SPEC §4, paper §5, §7.5).

The pruned batch selection is checked against the full decode on the same draws:
its group ids give exactly the selection probabilities of the full outcomes
(``batch_selection_probs``), and the whole pruned sampler (rejection rounds
included) reproduces those probabilities in a chi-square test over many
independent rows of the same batch. Decoders are tiny random autoencoders in
float64 with 3-4 vocabulary entries, so identical outcomes are common.
"""

import json
import math

import pytest
import torch

from calm.autoencoder import Autoencoder
from calm.config import AutoencoderConfig
from calm.errors import CalmError
from calm.generate import generate
from calm.sampling import batch_selection_probs, outcome_group_ids
from calm.temperature_sampling import (
    ChunkDecoder,
    LazyTokens,
    batch_choose_full,
    batch_choose_pruned,
    decode_agreeing,
    resolve_groups,
    temperature_chooser,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def random_decoder(seed, V=4, K=3, l=4):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(vocab_size=V, chunk_size=K, hidden_size=8, intermediate_size=16,
                            latent_size=l, num_decoder_layers=2)
    ae = Autoencoder(cfg).double().eval()
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0.0, 1.0)
    return ChunkDecoder(ae)


def clustered_latents(B, N, l, seed, clusters=3, spread=0.3):
    """Latents near a few centres: many draws share an outcome, some differ."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, clusters, l, generator=g, dtype=torch.float64) * 2
    pick = torch.randint(clusters, (B, N), generator=g)
    z = centres.gather(1, pick[..., None].expand(B, N, l))
    return z + spread * torch.randn(B, N, l, generator=g, dtype=torch.float64)


def chi2_pvalue(counts, expected):
    """Pearson chi-square p-value over bins with expected count ≥ 5 (the rest pooled)."""
    counts, expected = counts.double(), expected.double()
    small = expected < 5
    c = torch.cat([counts[~small], counts[small].sum()[None]])
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    if e[-1] < 1e-9:
        assert c[-1] == 0, "a draw of probability 0 was chosen"
        c, e = c[:-1], e[:-1]
    if e.numel() < 2:
        return 1.0
    x = ((c - e) ** 2 / e).sum()
    dof = torch.tensor((e.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, x / 2))


# ----------------------------------------------------------------------------- decoding


def test_chunk_decoder_split_matches_decode():
    dec = random_decoder(0, V=7)
    z = torch.randn(5, 6, 4, dtype=torch.float64)
    u = dec.trunk(z)  # (5, 6, K, e)
    per_pos = torch.stack([dec.logits(u[..., j, :]) for j in range(dec.K)], -2)
    torch.testing.assert_close(per_pos, dec.ae.decode(z))
    assert torch.equal(dec.tokens(z), dec.ae.decode_tokens(z))


def test_lazy_tokens_decode_only_what_is_asked_and_once():
    dec = random_decoder(1)
    z = torch.randn(3, 5, 4, dtype=torch.float64)
    full = dec.tokens(z)
    lazy = LazyTokens(z, dec)
    b, i = torch.tensor([0, 0, 2, 2]), torch.tensor([1, 1, 4, 0])
    lazy.need(b, i, 1)  # a repeated pair counts once
    assert lazy.projections == 3 and lazy.trunks == 3
    lazy.need(b, i, torch.tensor([1, 2, 1, 1]))  # only (0, 1, 2) is new
    assert lazy.projections == 4
    known = lazy.tokens >= 0
    assert int(known.sum()) == 4
    assert torch.equal(lazy.tokens[known], full[known])


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_resolved_groups_give_the_full_selection_probabilities(n):
    for seed in range(12):
        dec = random_decoder(seed, V=3 + seed % 2)
        z = clustered_latents(6, 4 + 3 * seed, 4, seed, clusters=1 + seed % 4, spread=0.5)
        full = dec.tokens(z)
        lazy = LazyTokens(z, dec)
        gid = resolve_groups(lazy, n, torch.ones(6, dtype=torch.bool))
        ref = batch_selection_probs(outcome_group_ids(full), n)
        torch.testing.assert_close(batch_selection_probs(gid, n), ref, rtol=0, atol=1e-12)
        known = lazy.tokens >= 0
        assert torch.equal(lazy.tokens[known], full[known])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_resolution_with_known_outcomes_drops_only_hopeless_groups(n):
    """Some draws fully decoded beforehand (as the rejection rounds leave them): their
    outcome counts bound m from below and prune groups, yet the probabilities stay."""
    dropped = 0
    for seed in range(30):
        dec = random_decoder(40 + seed, V=3, K=4)
        B, N = 8, 12
        z = clustered_latents(B, N, 4, seed, clusters=2 + seed % 3, spread=0.3 + 0.1 * (seed % 4))
        full = dec.tokens(z)
        lazy = LazyTokens(z, dec)
        g = torch.Generator().manual_seed(seed)
        pre = torch.rand(B, N, generator=g) < 0.4  # (B, N) draws decoded in full first
        b, i = pre.nonzero().unbind(1)
        for j in range(dec.K):
            lazy.need(b, i, j)
        before = lazy.projections
        gid = resolve_groups(lazy, n, torch.ones(B, dtype=torch.bool))
        ref = batch_selection_probs(outcome_group_ids(full), n)
        torch.testing.assert_close(batch_selection_probs(gid, n), ref, rtol=0, atol=1e-12)
        # what the resolution alone would decode (no lower bound from known outcomes)
        plain = LazyTokens(z, dec)
        resolve_groups(plain, n, torch.ones(B, dtype=torch.bool))
        undecoded = (lazy.tokens < 0) & (plain.tokens >= 0)
        dropped += int(undecoded.sum())
        assert lazy.projections - before <= plain.projections
    assert dropped > 0 or n == 2  # the bound prunes beyond singletons (L ≤ n = 2: never)


def test_resolution_skips_singletons_and_hopeless_groups():
    # Position 1 splits the draws into a group of 3 and 3 singletons: only the group
    # is decoded further; at n = 3 nothing else can matter.
    dec = random_decoder(3, V=4)
    z = torch.randn(1, 40, 4, dtype=torch.float64)
    full = dec.tokens(z)
    lazy = LazyTokens(z, dec)
    resolve_groups(lazy, 3, torch.ones(1, dtype=torch.bool))
    first = full[0, :, 0]
    prefix_count = (first[:, None] == first[None, :]).sum(1)
    # never more than: all at position 1, then only draws in non-singleton prefix groups
    assert lazy.projections <= 40 + (prefix_count >= 2).sum() * 2
    assert bool((lazy.tokens[0, prefix_count == 1, 1:] < 0).all())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pruned_sampler_has_the_batch_sampler_distribution(n):
    """One batch of draws, 6000 independent choices of it: chi-square against the exact
    Algorithm-2 probabilities from the full decode; chosen tokens = the full decode's."""
    rows = 6000
    pvals = []
    for seed in range(5):
        dec = random_decoder(10 + seed, V=3)
        N = 6 + 2 * seed
        z1 = clustered_latents(1, N, 4, seed, clusters=2 + seed % 2, spread=0.4)
        full = dec.tokens(z1)[0]  # (N, K)
        ref = batch_selection_probs(outcome_group_ids(full[None]), n)[0]  # (N,)
        g = torch.Generator().manual_seed(100 + seed)
        tokens, index, stats = batch_choose_pruned(z1.expand(rows, N, 4), dec, n, g)
        assert torch.equal(tokens, full[index])
        assert stats["projections"] <= rows * N * dec.K
        pvals.append(chi2_pvalue(torch.bincount(index, minlength=N), ref * rows))
    assert min(pvals) > 1e-4, pvals


def test_pruned_sampler_without_rejection_and_small_batches():
    # tries=() goes straight to the resolution; N < n never forms an n-subset.
    dec = random_decoder(20, V=3)
    for N, n in [(8, 3), (2, 3), (1, 4)]:
        z1 = clustered_latents(1, N, 4, N, clusters=2)
        full = dec.tokens(z1)[0]
        ref = batch_selection_probs(outcome_group_ids(full[None]), n)[0]
        g = torch.Generator().manual_seed(N)
        tokens, index, _ = batch_choose_pruned(z1.expand(4000, N, 4), dec, n, g, tries=())
        assert torch.equal(tokens, full[index])
        assert chi2_pvalue(torch.bincount(index, minlength=N), ref * 4000) > 1e-4


def test_full_reference_matches_batch_sampler():
    dec = random_decoder(5, V=3)
    z = clustered_latents(3, 9, 4, 5)
    tokens, index = batch_choose_full(z, dec, 2, torch.Generator().manual_seed(0))
    full = dec.tokens(z)
    assert torch.equal(tokens, full[torch.arange(3), index])


def test_decode_agreeing_stops_at_the_first_disagreement():
    dec = random_decoder(6, V=4)
    z = clustered_latents(30, 3, 4, 6, clusters=2, spread=0.3)
    full = dec.tokens(z)  # (30, 3, K)
    x = decode_agreeing(z, dec)
    same = (full == full[:, :1]).all(-1).all(-1)  # rows whose 3 draws are identical
    assert torch.equal(x[same], full[same])
    assert not bool((x[~same] == x[~same][:, :1]).all(-1).all(-1).any())
    # a row's decoded prefix is the full decode's
    known = x >= 0
    assert torch.equal(x[known], full[known])
    x1 = decode_agreeing(z[:, :1], dec)  # one draw per row: always in full
    assert torch.equal(x1, full[:, :1])


# ----------------------------------------------------------------------------- in generation


@pytest.mark.parametrize("scheme", ["discrete", "continuous"])
@pytest.mark.parametrize("sampler,T", [("batch", 1 / 3), ("exact", 0.7), ("exact", 0.5)])
def test_chooser_in_generation(make_calm, scheme, sampler, T):
    model = make_calm(scheme, random_head=True, seed=1)
    g = torch.Generator().manual_seed(0)
    ch = temperature_chooser(model, T, sampler=sampler, num_candidates=16, generator=g)
    out = generate(model, [[1, 2, 3, 4, 5], [7, 8]], max_new_tokens=9, chooser=ch, generator=g)
    assert [len(t) for t in out.tokens] == [9, 9] and out.steps == 3
    assert ch.stats["steps"] == 3 and ch.stats["rows"] == 6
    V = model.config.backbone.vocab_size
    assert all(0 <= t < V for row in out.tokens for t in row)
    if sampler == "exact":
        assert ch.stats["head_samples"] >= 6 * math.floor(1 / T)


def test_chooser_returns_the_chosen_draws_latent(make_calm):
    model = make_calm(random_head=True, seed=2)
    with torch.no_grad():  # fewer distinct outcomes, so that the exact sampler accepts soon
        model.head.final_out.weight.mul_(0.05)
    h = torch.randn(5, model.config.backbone.hidden_size)
    for sampler, T in [("batch", 0.5), ("exact", 0.5), ("exact", 0.8)]:
        ch = temperature_chooser(model, T, sampler=sampler, num_candidates=12,
                                 generator=torch.Generator().manual_seed(3))
        tokens, z = ch(h)
        assert tokens.shape == (5, model.config.chunk_size) and z.shape == (5, model.config.latent_size)
        assert torch.equal(model.autoencoder.decode_tokens(z), tokens)


def test_generate_uses_the_batch_sampler_below_temperature_one(make_calm):
    model = make_calm(random_head=True, seed=3)
    out = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.5,
                   generator=torch.Generator().manual_seed(0))
    assert len(out.tokens[0]) == 8
    with pytest.raises(CalmError, match="1/n.*exact sampler"):
        generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.4)


def test_pruned_and_full_chooser_agree_in_distribution(make_calm):
    """Same head draws (same generator state), one step: the chosen chunk's distribution
    with and without pruning, against the exact probabilities of the full decode."""
    model = make_calm(random_head=True, seed=4)
    h = torch.randn(1, model.config.backbone.hidden_size).expand(3000, -1)
    z = model.head.sample_n(h[:1], 10, generator=torch.Generator().manual_seed(5))  # (1, 10, l)
    full = model.autoencoder.decode_tokens(z)[0]
    ref = batch_selection_probs(outcome_group_ids(full[None]), 2)[0]
    for prune in (True, False):
        chooser = temperature_chooser(model, 0.5, num_candidates=10, prune=prune,
                                      generator=torch.Generator().manual_seed(6))
        chooser.model = _FixedDraws(model, z)
        tokens, zc = chooser(h)
        idx = (zc[:, None, :] == z[0][None]).all(-1).float().argmax(1)
        assert torch.equal(tokens, full[idx])
        assert chi2_pvalue(torch.bincount(idx, minlength=10), ref * 3000) > 1e-4


class _FixedDraws:
    """A model whose head always returns the same N draws (to compare samplers on them)."""

    def __init__(self, model, z):
        self.autoencoder, self.z = model.autoencoder, z

        class Head:
            @staticmethod
            def sample_n(h, n, generator=None):
                return z.expand(h.shape[0], n, z.shape[-1])

        self.head = Head()


def test_chooser_errors(make_calm):
    model = make_calm()
    with pytest.raises(CalmError, match="1/n.*exact sampler"):
        temperature_chooser(model, 0.4)
    with pytest.raises(CalmError, match="unknown sampler"):
        temperature_chooser(model, 0.5, sampler="nucleus")
    with pytest.raises(CalmError, match=r"\(0, 1\]"):
        temperature_chooser(model, 1.5, sampler="exact")
    with pytest.raises(CalmError, match="at least 1"):
        temperature_chooser(model, 0.5, num_candidates=0)


def test_exact_chooser_max_calls(make_calm):
    model = make_calm(random_head=True, seed=5)
    with torch.no_grad():  # a head whose samples spread far: stage 1 nearly never agrees
        model.head.final_out.weight.mul_(100.0)
    ch = temperature_chooser(model, 0.25, sampler="exact", max_calls=8,
                             generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalmError, match="max_calls=8.*batch sampler"):
        ch(torch.randn(64, model.config.backbone.hidden_size))


# ----------------------------------------------------------------------------- calm tradeoff


def test_tradeoff_command_writes_json_and_plot(calm_run, base_run, dataset_dir, tmp_path):
    from calm.cli import main

    out, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = main(["tradeoff", "--model", str(calm_run), "--baseline", str(base_run),
               "--data", str(dataset_dir), "--positions", "24", "--n-grid", "1,4,16",
               "--inverse-temperatures", "1,2,4", "--num-candidates", "16",
               "--baseline-temperatures", "1,0.5", "--out", str(out), "--plot", str(png),
               "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["positions"] == 24 and r["max_n"] == 4
    n_pts = r["calm"]["batch_size_sweep"]["points"]
    t_pts = r["calm"]["temperature_sweep"]["points"]
    b_pts = r["baseline"]["points"]
    assert [p["N"] for p in n_pts] == [1, 4, 16]
    assert [round(1 / p["temperature"]) for p in t_pts] == [1, 2, 4]
    assert [p["temperature"] for p in b_pts] == [1.0, 0.5]
    for p in n_pts + t_pts + b_pts:
        for key in ("accuracy", "collision"):
            assert 0.0 <= p[key] <= 1.0
        assert len(p["accuracy_n"]) == 4
        # matching n tokens implies matching fewer: the rates fall with n
        assert all(a >= b - 1e-12 for a, b in zip(p["accuracy_n"], p["accuracy_n"][1:]))
        assert all(a >= b - 1e-12 for a, b in zip(p["collision_n"], p["collision_n"][1:]))
        g = math.exp(sum(math.log(x) for x in p["accuracy_n"]) / 4) if min(p["accuracy_n"]) > 0 else 0
        assert p["accuracy"] == pytest.approx(g)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_point_matches_exact_first_token_figures(base_run, dataset_dir):
    """n = 1: accuracy = P_T(true token), collision = Σ_v P_T(v)², computed here directly."""
    from calm.data import TokenDataset
    from calm.loading import load_model
    from calm.tradeoff import baseline_point

    model, _, _ = load_model(base_run)
    ds = TokenDataset(dataset_dir)
    tokens = torch.from_numpy(ds.windows("val", torch.tensor([0, 32]).numpy(), 32))
    pos = torch.tensor([3, 7, 11])
    p = baseline_point(model, tokens, pos, 1, 0.5, seed=0, count=6)
    with torch.no_grad():
        probs = torch.softmax(model.logits(tokens).double() / 0.5, -1)[:, pos]  # (2, 3, V)
    acc = probs.gather(-1, tokens[:, pos + 1, None]).squeeze(-1).mean()
    coll = probs.square().sum(-1).mean()
    assert p["accuracy_n"][0] == pytest.approx(float(acc), rel=1e-4)
    assert p["collision_n"][0] == pytest.approx(float(coll), rel=1e-4)


def test_tradeoff_rejects_bad_grids(calm_run, dataset_dir):
    from calm.cli import main

    base = ["tradeoff", "--model", str(calm_run), "--data", str(dataset_dir), "--positions", "4"]
    assert main(base + ["--temperature", "0.4"]) == 2
    assert main(base + ["--n-grid", "2,x"]) == 2
    assert main(base + ["--plot", "x.png", "--baseline-temperatures", "1.5"]) == 2


def test_tradeoff_point_labels_never_overlap():
    """Coincident points share one label ("N=1, 2, 5"); no two labels of a plot overlap."""
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from calm.tradeoff import _draw_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0.0, 0.0, 0.0, 0.001, 0.2, 0.5]
    ax.plot(xs, [0.0] * 6, "o")
    _draw_labels(fig, [(ax, x, 0.0, f"N={n}", False) for x, n in zip(xs, (1, 2, 5, 10, 50, 100))])
    texts = [t.get_text() for t in ax.texts]
    assert texts[0].startswith("N=1, 2, 5, 10") and "N=100" in texts
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
