"""BrierLM: likelihood-free evaluation by the Brier score of n-grams (SPEC §3, paper §4.2).

For a predictive distribution P and outcome y, Brier(P, y) = 2 P(y) − Σ_x P(x)²
(higher is better, at most 1). Brier-n takes the next n tokens as one outcome;
BrierLM = 100 · (Brier-1 · Brier-2 · Brier-3 · Brier-4)^(1/4), and 0 as soon as
any Brier-n ≤ 0.

Everything here is a pure function of tensors, so model drivers only call it:

- ``two_sample_brier``: the unbiased estimator from two samples,
  1{x1 = y} + 1{x2 = y} − 1{x1 = x2}, for any model that can draw samples (CALM);
  ``multi_sample_brier``: the same from S ≥ 2 samples (lower variance).
- ``token_level_brier``: the lower-variance form for token-level softmax models,
  2 · P(true n-gram) − 1{two sampled (n−1)-prefixes agree} · Σ_v P(v | prefix)².
- ``token_model_brier``: a batched driver for any causal token model that accepts
  an attention mask and position ids (layout from ``rollout_layout``).
- ``generic_two_sample_brier``: a driver for any sampler of n-grams.
- ``sample_categorical``: one draw per row of a (..., V) distribution by its CDF.
- ``BrierStats``: sums, sums of squares and counts per n, so evaluation can be
  sharded and reduced by summation (one all_reduce of ``to_tensor()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from calm.errors import CalmError

# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def brier_lm(briers: Sequence[float]) -> float:
    """100 · geometric mean of Brier-1..n; 0 if any Brier-n ≤ 0, NaN if any is NaN.

    The reference takes max(Π Brier-n, 0)^(1/4), which scores two or four
    negative factors as a positive BrierLM; here any non-positive factor gives 0.
    """
    b = [float(x) for x in briers]
    if not b:
        raise CalmError("brier_lm needs at least one Brier-n score")
    if any(math.isnan(x) for x in b):
        return math.nan
    if any(x <= 0 for x in b):
        return 0.0
    # Geometric mean in log space: products of many small scores underflow less.
    return 100.0 * math.exp(sum(math.log(x) for x in b) / len(b))


class BrierStats:
    """Running sums of per-position Brier-n estimates for n = 1..max_n.

    ``total`` is one (3, max_n) float64 tensor: rows are the sum of estimates,
    the sum of their squares and the count. Shards combine by adding it
    (``merge``, or ``all_reduce`` of ``to_tensor()`` then ``from_tensor``).
    The tensor lives on the device of the first ``update`` (no host sync there).
    """

    def __init__(self, max_n: int = 4, total: torch.Tensor | None = None):
        if max_n < 1:
            raise CalmError(f"max_n must be at least 1, got {max_n}")
        self.max_n = max_n
        self.total = torch.zeros(3, max_n, dtype=torch.float64) if total is None else total
        if self.total.shape != (3, max_n):
            raise CalmError(
                f"Brier totals must have shape (3, {max_n}), got {tuple(self.total.shape)}"
            )

    def update(self, n: int, estimates: torch.Tensor) -> BrierStats:
        """Add per-position Brier-n estimates (any shape, one value per position)."""
        if not 1 <= n <= self.max_n:
            raise CalmError(f"n must be in 1..{self.max_n}, got {n}")
        e = estimates.detach().reshape(-1).to(torch.float64)
        if self.total.device != e.device:
            self.total = self.total.to(e.device)
        self.total[0, n - 1] += e.sum()
        self.total[1, n - 1] += e.square().sum()
        self.total[2, n - 1] += e.numel()
        return self

    def update_all(self, estimates: torch.Tensor) -> BrierStats:
        """Add estimates of shape (..., m), column n−1 holding Brier-n, for n = 1..m."""
        for n in range(1, estimates.shape[-1] + 1):
            self.update(n, estimates[..., n - 1])
        return self

    def merge(self, other: BrierStats) -> BrierStats:
        """Add another accumulator's sums into this one (in place) and return self."""
        if other.max_n != self.max_n:
            raise CalmError(f"cannot merge Brier stats with max_n {other.max_n} into {self.max_n}")
        self.total = self.total + other.total.to(self.total.device)
        return self

    def to_tensor(self) -> torch.Tensor:
        """(3, max_n) float64 [sum; sum of squares; count], for one all_reduce(SUM)."""
        return self.total.clone()

    @classmethod
    def from_tensor(cls, total: torch.Tensor) -> BrierStats:
        """Inverse of ``to_tensor`` (for instance after all_reduce)."""
        return cls(max_n=total.shape[-1], total=total.detach().to(torch.float64).clone())

    def summary(self) -> dict[str, float]:
        """Means and standard errors of every Brier-n, BrierLM and its standard error.

        Keys: ``brier_{n}``, ``brier_{n}_se``, ``count_{n}`` for n = 1..max_n,
        ``brier_lm`` and ``brier_lm_se``. Standard errors are sqrt(s² / count) with
        the sample variance s² (NaN below two estimates); they treat positions as
        independent draws.

        ``brier_lm_se`` is the delta-method standard error of L = 100 (Π b_n)^(1/max_n)
        at its largest: dL/db_n = L / (max_n · b_n), and the Brier-n estimates of one
        position are correlated (they share samples), a covariance these sums do not
        hold. By Cauchy-Schwarz, |Cov(b_n, b_m)| ≤ se_n · se_m, so
        SE(L) ≤ L / max_n · Σ_n se_n / b_n, reached when the estimates are perfectly
        correlated. NaN when BrierLM is 0 (not differentiable there) or undefined.
        """
        s, sq, c = self.total.cpu().tolist()
        out: dict[str, float] = {}
        means, ses = [], []
        for i in range(self.max_n):
            mean = s[i] / c[i] if c[i] > 0 else math.nan
            if c[i] > 1:
                var = max(sq[i] - s[i] * s[i] / c[i], 0.0) / (c[i] - 1)
                se = math.sqrt(var / c[i])
            else:
                se = math.nan
            means.append(mean)
            ses.append(se)
            out[f"brier_{i + 1}"] = mean
            out[f"brier_{i + 1}_se"] = se
            out[f"count_{i + 1}"] = int(c[i])
        lm = brier_lm(means)
        out["brier_lm"] = lm
        out["brier_lm_se"] = (
            lm / self.max_n * sum(se / b for se, b in zip(ses, means)) if lm > 0 else math.nan
        )
        return out


# ---------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------


def two_sample_brier(
    sample1: torch.Tensor, sample2: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Unbiased Brier-n from two independent samples: 1{x1 = y} + 1{x2 = y} − 1{x1 = x2}.

    sample1, sample2, target: (..., n) integer n-grams, compared as whole units.
    Returns (...) float32. Two identical samples score exactly 1 when they equal
    the target and −1 when they do not.
    """
    if not (sample1.shape == sample2.shape == target.shape):
        raise CalmError(
            f"samples and target must have one shape, got {tuple(sample1.shape)}, "
            f"{tuple(sample2.shape)} and {tuple(target.shape)}"
        )
    return multi_sample_brier(torch.stack([sample1, sample2]), target)


def multi_sample_brier(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unbiased Brier-n from S ≥ 2 independent samples, the U-statistic of the two-sample form:

    (2/S) Σ_i 1{x_i = y} − (2 / (S (S−1))) Σ_{i<j} 1{x_i = x_j}.

    samples: (S, ..., n), target: (..., n) integer n-grams, compared as whole units.
    Returns (...) float32. Its expectation is 2 P(y) − Σ_x P(x)² for every S (S = 2 is
    ``two_sample_brier``); its variance falls about as 1/S, for the price of drawing S
    samples.
    """
    if samples.dim() < 2 or samples.shape[1:] != target.shape:
        raise CalmError(
            f"samples must be (S, *target shape), got {tuple(samples.shape)} for a target of "
            f"shape {tuple(target.shape)}"
        )
    S = samples.shape[0]
    if S < 2:
        raise CalmError(f"the Brier estimator needs at least 2 samples, got {S}")
    hits = (samples == target).all(-1).float().sum(0)  # (...)
    same = torch.zeros_like(hits)
    for i in range(S - 1):  # each sample against every later one: S (S−1) / 2 pairs
        same += (samples[i : i + 1] == samples[i + 1 :]).all(-1).float().sum(0)
    return 2.0 * hits / S - 2.0 * same / (S * (S - 1))


def token_level_brier(
    p_true: torch.Tensor, prefixes_agree: torch.Tensor, last_collision: torch.Tensor
) -> torch.Tensor:
    """Lower-variance Brier-n for token-level models: 2 · p_true − agree · collision.

    p_true: (...) the exact teacher-forced probability of the true n-gram,
        Π_j P(y_j | true prefix, y_<j).
    prefixes_agree: (...) bool, whether two (n−1)-token continuations sampled
        independently from the model after the true prefix are equal (all True for n = 1).
    last_collision: (...) Σ_v P(v | prefix, x_{1:n−1})², the exact collision
        probability of the n-th token after the (common, when agreeing) sampled prefix.
    The product is an unbiased estimate of Σ_x P(x)² over n-grams, since
    P(x1 = x2) = Σ_{u} P(u)² · Σ_v P(v | u)².
    """
    return 2.0 * p_true - prefixes_agree.to(p_true.dtype) * last_collision


# ---------------------------------------------------------------------------
# Token-level driver: every position's rollout in one masked forward per step
# ---------------------------------------------------------------------------


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw from each row of probs (..., V) → (...,) long, by inverting the CDF.

    One uniform number per row (``torch.multinomial`` draws one exponential per
    vocabulary entry, most of a rollout step's time at V = 32k). The uniform is
    scaled by the row's total, so rows need not sum to exactly 1; a zero-probability
    entry is never drawn (the first entry whose CDF exceeds u is taken).
    """
    cdf = probs.cumsum(-1)  # (..., V)
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=cdf.dtype)
    u = (u * cdf[..., -1]).unsqueeze(-1)  # (..., 1)
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)



class RolloutLayout(NamedTuple):
    """One sequence holding the true tokens and every position's own samples.

    position_ids: (S,) rotary position of each slot, S = T + steps · P.
    attn_mask: (S, S) bool, True where query slot (row) may attend key slot (column).
    slots: (steps, P) slot of the j-th sampled token of position p (j from 0).
    read: (P,) slot whose output is the next-token distribution after the true
        prefix tokens[:t+1] and the ``steps`` samples of position p.
    """

    position_ids: torch.Tensor
    attn_mask: torch.Tensor
    slots: torch.Tensor
    read: torch.Tensor


def rollout_layout(T: int, steps: int, positions: torch.Tensor) -> RolloutLayout:
    """Lay out T true tokens followed by ``steps`` blocks of P sampled tokens.

    Slots 0..T−1 hold the true sequence (causal among themselves, position i).
    Block j (j = 0..steps−1) holds the (j+1)-th sample after each start position
    t = positions[p], at rotary position t + 1 + j; it sees the true tokens at
    0..t and the samples of its own position from blocks 0..j, nothing else.
    So one forward of a causal model under this mask gives, at every slot, the
    output it would give on the plain sequence tokens[:t+1] + own samples.
    """
    device = positions.device
    P = positions.numel()
    S = T + steps * P
    # one entry per sample slot, (steps·P,): its block j and its start position index p
    j = torch.arange(steps, device=device).repeat_interleave(P)
    p = torch.arange(P, device=device).repeat(steps)
    t = positions[p]  # (steps·P,)
    position_ids = torch.cat([torch.arange(T, device=device), t + 1 + j])  # (S,)

    mask = torch.zeros(S, S, dtype=torch.bool, device=device)
    mask[:T, :T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    # samples -> true tokens of their own prefix
    mask[T:, :T] = torch.arange(T, device=device)[None, :] <= t[:, None]  # (steps·P, T)
    # samples -> earlier (and own) samples of the same start position
    mask[T:, T:] = (p[:, None] == p[None, :]) & (j[None, :] <= j[:, None])
    slots = T + torch.arange(steps * P, device=device).view(steps, P)
    read = slots[-1] if steps > 0 else positions.clone()
    return RolloutLayout(position_ids, mask, slots, read)


# logits_fn(tokens (B, S) long, position_ids (S,) long, attn_mask (S, S) bool, read (R,) long)
#   -> (B, R, V) next-token logits at the slots ``read`` of a causal model run with that
#   mask (True = may attend) and those rotary positions. Reading only some slots keeps
#   the (B, S, V) logits of the long rollout sequence out of memory.
MaskedLogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_positions(T: int, max_n: int, positions: torch.Tensor | None, device) -> torch.Tensor:
    """Start positions t (prefix tokens[:t+1]) with room for a true max_n-gram: (P,) long.

    Default: every one, 0..T−1−max_n. Given positions are checked to lie in that range.
    """
    if max_n < 1:
        raise CalmError(f"max_n must be at least 1, got {max_n}")
    if T < max_n + 1:
        raise CalmError(f"a sequence of {T} tokens has no room for a true {max_n}-gram")
    if positions is None:
        return torch.arange(T - max_n, device=device)
    positions = positions.to(device=device, dtype=torch.long).reshape(-1)
    if positions.numel() == 0 or positions.min() < 0 or positions.max() > T - 1 - max_n:
        raise CalmError(
            f"evaluation positions must lie in 0..{T - 1 - max_n} for {T} tokens "
            f"and n up to {max_n}"
        )
    return positions


@torch.no_grad()
def token_model_estimates(
    logits_fn: MaskedLogitsFn,
    tokens: torch.Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position lower-variance Brier-1..max_n estimates of a causal token model.

    tokens: (T,) or (B, T) true sequences. positions: (P,) start positions t, the
    prefix being tokens[:t+1] and the outcome tokens[t+1 : t+1+n]; by default every
    t with room for a max_n-gram (0..T−1−max_n), so all n share the same positions.
    Returns (P, max_n) or (B, P, max_n) float32; column n−1 is Brier-n.

    Forwards: one teacher-forced (accuracy term and the first token's collision),
    then one per rollout step j = 1..max_n−1 over ``rollout_layout(T, j, positions)``,
    with both sample streams stacked on the batch (2B rows; the last step only
    needs the first stream). Sequence length at step j is T + j·P, so cost grows
    with max_n; pass chunks of ``positions`` to bound memory.
    ``generator`` must live on the tokens' device.
    """
    squeeze = tokens.dim() == 1
    x = tokens.view(1, -1) if squeeze else tokens  # (B, T)
    B, T = x.shape
    positions = check_positions(T, max_n, positions, x.device)
    P = positions.numel()

    # Teacher forcing: read every slot that predicts a true token of some n-gram.
    need = positions[:, None] + torch.arange(max_n, device=x.device)  # (P, n) predicting slots
    read, inverse = torch.unique(need, return_inverse=True)  # (U,), (P, n)
    layout = rollout_layout(T, 0, positions)
    logp = F.log_softmax(logits_fn(x, layout.position_ids, layout.attn_mask, read).float(), -1)
    lp_true = logp.gather(-1, x[:, read + 1, None]).squeeze(-1)  # (B, U) log P(true next token)
    p_true = lp_true[:, inverse].cumsum(-1).exp()  # (B, P, n): P(true n-gram) for n = 1..max_n

    probs = logp[:, inverse[:, 0]].exp()  # (B, P, V) distribution after the true prefix
    collision = [probs.square().sum(-1)]  # per n: (B, P)
    agree = [torch.ones(B, P, dtype=torch.bool, device=x.device)]

    # Rollout: stream a is rows [0, B), stream b rows [B, 2B).
    probs = probs.repeat(2, 1, 1)  # (2B, P, V)
    same = agree[0]
    samples: list[torch.Tensor] = []
    for step in range(1, max_n):
        s = sample_categorical(probs, generator)  # (2B, P)
        samples.append(s)
        same = same & (s[:B] == s[B:])  # (B, P) the two sampled prefixes agree so far
        layout = rollout_layout(T, step, positions)
        rows = B if step == max_n - 1 else 2 * B  # the last collision needs stream a only
        seq = torch.cat([x.repeat(2, 1)] + samples, dim=1)[:rows]  # (rows, T + step·P)
        logits = logits_fn(seq, layout.position_ids, layout.attn_mask, layout.read)  # (rows, P, V)
        probs = F.softmax(logits.float(), -1)
        agree.append(same)
        collision.append(probs[:B].square().sum(-1))

    est = token_level_brier(p_true, torch.stack(agree, -1), torch.stack(collision, -1))
    return est[0] if squeeze else est


def token_model_brier(
    logits_fn: MaskedLogitsFn,
    tokens: torch.Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
    stats: BrierStats | None = None,
) -> BrierStats:
    """``token_model_estimates`` added into ``stats`` (a new one by default)."""
    stats = BrierStats(max_n) if stats is None else stats
    return stats.update_all(token_model_estimates(logits_fn, tokens, max_n, generator, positions))


# ---------------------------------------------------------------------------
# Sample-only driver
# ---------------------------------------------------------------------------


@torch.no_grad()
def generic_two_sample_brier(
    sample_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    targets: torch.Tensor,
    stats: BrierStats | None = None,
) -> BrierStats:
    """Brier-1..n of any model that can sample, by the two-sample estimator.

    targets: (..., n) true next n-grams at each position. ``sample_fn()`` returns
    two independent samples of shape (..., n), each drawn from the model given the
    true prefix at that position (it owns its generator). The first m tokens of
    a sampled n-gram are a sample of the m-gram, so one draw scores every m ≤ n.
    """
    stats = BrierStats(max(4, targets.shape[-1])) if stats is None else stats
    if targets.shape[-1] > stats.max_n:
        raise CalmError(
            f"targets are {targets.shape[-1]}-grams but the stats hold n up to {stats.max_n}"
        )
    s1, s2 = sample_fn()
    for m in range(1, targets.shape[-1] + 1):
        stats.update(m, two_sample_brier(s1[..., :m], s2[..., :m], targets[..., :m]))
    return stats
