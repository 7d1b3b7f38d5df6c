"""Likelihood-free temperature sampling from a black-box sampler (SPEC §4, paper §5).

Only a sampler of a discrete distribution P is available (for CALM: one call = one
K-token chunk decoded from one generative-head sample). The target is
P_T(x) ∝ P(x)^{1/T} for T in (0, 1]. An outcome is a row of L token ids; two outcomes
are equal iff all L ids are equal.

- ``exact_temperature_sample``: Algorithm 1, exact rejection sampling for any T, with
  a Bernoulli factory for the fractional part of 1/T. Rows of a batch run together,
  one round at a time; a row stops drawing as soon as it accepts.
- ``batch_temperature_sample``: Algorithm 2, the batch approximation for T = 1/n
  (biased for a finite batch of N draws, asymptotically unbiased as N → ∞).
- ``batch_select_from_groups`` / ``batch_selection_probs``: Algorithm 2 on group ids,
  for callers that already know which draws are identical.
- ``expected_calls`` / ``temperature_distribution``: closed forms for tests and plots.

Everything is a pure function of tensors with an explicit ``torch.Generator``; the
samplers work for any model that can draw (CALM, a softmax LM, a test distribution).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from calm.errors import CalmError

# A temperature within this distance of 1/n is treated as exactly 1/n (by both samplers).
TEMPERATURE_TOLERANCE = 1e-6

Draw = Callable[[Tensor, int], Tensor]  # (rows (R,), m) -> (R, m, L)
Fallback = Callable[[Tensor], Tensor]  # rows (R,) -> (R, L)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (0.0 < t <= 1.0) or math.isnan(t):
        raise CalmError(
            f"temperature must be in (0, 1] for likelihood-free sampling, got {temperature!r}"
        )
    return t


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + α with n = ⌊1/T⌋ ≥ 1 and α in [0, 1); T within 1e-6 of 1/k gives (k, 0)."""
    t = _check_temperature(temperature)
    k = round(1.0 / t)
    if k >= 1 and abs(t - 1.0 / k) <= TEMPERATURE_TOLERANCE:
        return k, 0.0
    n = math.floor(1.0 / t)
    return n, 1.0 / t - n


def _uniform(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device)


# ----------------------------------------------------------------------------------------
# Algorithm 1: exact sampling


def exact_temperature_sample(
    draw: Draw,
    temperature: float,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
    max_calls: int | None = None,
    fallback: Fallback | None = None,
    device: torch.device | str | None = None,
    with_payload: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Exact samples of P^{1/T} (Algorithm 1) for ``batch_size`` independent rows.

    ``draw(rows, m)`` gets a LongTensor of row indices (R,) on ``device`` and returns
    m fresh independent draws for each of those rows, a LongTensor (R, m, L). Rows that
    have accepted are never asked again. Each round, rows in stage 1 draw their n
    samples in one call and rows in stage 2 draw one x' each in a second call, so a
    batch costs rounds, not a Python loop per row.

    ``max_calls``: a row that would need more than this many draws raises CalmError,
    or, if ``fallback(rows) -> (R, L)`` is given, takes its output from the fallback.
    ``device`` (default: the generator's, else CPU) holds the per-row state.

    Returns ``(samples (B, L) long, calls (B,) long)``, calls[b] = draws row b consumed.

    ``with_payload``: ``draw`` returns ``(outcomes (R, m, L), payload (R, m, ...))``
    instead, the payload of each draw riding along uncompared (for CALM: the latent z
    an outcome was decoded from), and a third output (B, ...) holds the payload of the
    draw each row returned: the first of its n identical stage-1 draws (by
    exchangeability, a draw of P(payload | outcome)). Rows taken by ``fallback`` keep
    a zero payload.
    """
    n, alpha = split_inverse_temperature(temperature)
    if batch_size < 1:
        raise CalmError(f"batch_size must be at least 1, got {batch_size}")
    if max_calls is not None and max_calls < 1:
        raise CalmError(f"max_calls must be at least 1, got {max_calls}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    B = batch_size

    active = torch.ones(B, dtype=torch.bool, device=device)
    stage2 = torch.zeros(B, dtype=torch.bool, device=device)  # in the Bernoulli factory
    i = torch.zeros(B, dtype=torch.long, device=device)  # factory step, from 1
    calls = torch.zeros(B, dtype=torch.long, device=device)
    # (B, L) outputs and stage-1 candidates, allocated once the first outcome gives L;
    # likewise (B, ...) payloads of the outputs and of the candidates.
    samples = cand = torch.empty(0)
    payload = cand_payload = None

    def call(rows: Tensor, m: int) -> tuple[Tensor, Tensor | None]:
        nonlocal payload, cand_payload
        out = draw(rows, m)
        if not with_payload:
            return out.to(device), None
        x, p = out
        if payload is None:
            payload = torch.zeros(B, *p.shape[2:], dtype=p.dtype, device=device)
            cand_payload = torch.zeros_like(payload)
        return x.to(device), p.to(device)

    def finish(rows: Tensor, x: Tensor, p: Tensor | None = None) -> None:
        nonlocal samples, cand
        if samples.dim() != 2:
            samples = torch.zeros(B, x.shape[-1], dtype=torch.long, device=device)
            cand = torch.zeros_like(samples)
        samples[rows] = x.to(device=device, dtype=torch.long)
        if p is not None:
            payload[rows] = p
        active[rows] = False

    while True:
        rows = active.nonzero().squeeze(1)  # (R,) one host sync per round
        if rows.numel() == 0:
            break
        in2 = stage2[rows]  # (R,)
        if max_calls is not None:
            over = calls[rows] + torch.where(in2, 1, n) > max_calls
            if bool(over.any()):
                stuck = rows[over]
                if fallback is None:
                    raise CalmError(
                        f"exact temperature sampling at T={temperature:g} did not accept within "
                        f"max_calls={max_calls} sampler calls for {stuck.numel()} of {B} rows; "
                        f"use the batch sampler (T = 1/n) or raise max_calls"
                    )
                finish(stuck, fallback(stuck))
                rows, in2 = rows[~over], in2[~over]
        r1, r2 = rows[~in2], rows[in2]

        # Stage 1: n draws per row in one call; the trial survives iff all n are identical.
        if r1.numel() > 0:
            x, p = call(r1, n)  # (R1, n, L), (R1, n, ...) or None
            calls[r1] += n
            same = (x == x[:, :1]).all(dim=2).all(dim=1)  # (R1,)
            if alpha == 0.0:
                finish(r1[same], x[same, 0], None if p is None else p[same, 0])
            else:
                finish(r1[:0], x[:0, 0])  # only allocates the buffers on the first round
                ok = r1[same]
                cand[ok] = x[same, 0].long()
                if p is not None:
                    cand_payload[ok] = p[same, 0]
                stage2[ok] = True
                i[ok] = 1

        # Stage 2, a Bernoulli factory for P(x)^α: x' = x accepts; otherwise the trial
        # fails with probability α/i, else i += 1 and the row draws again next round.
        if r2.numel() > 0:
            x, _ = call(r2, 1)
            x = x[:, 0]  # (R2, L)
            calls[r2] += 1
            hit = (x == cand[r2]).all(dim=1)  # (R2,)
            won = r2[hit]
            finish(won, cand[won], None if payload is None else cand_payload[won])
            miss = r2[~hit]
            fail = _uniform((miss.numel(),), device, generator) < alpha / i[miss].double()
            stage2[miss[fail]] = False
            i[miss[~fail]] += 1

    if with_payload:
        return samples, calls, payload
    return samples, calls


# ----------------------------------------------------------------------------------------
# Algorithm 2: batch approximation


def batch_temperature_n(temperature: float) -> int:
    """The integer n of T = 1/n, or CalmError if T is not (within 1e-6) of that form."""
    n, alpha = split_inverse_temperature(temperature)
    if alpha != 0.0:
        raise CalmError(
            f"the batch sampler needs T = 1/n for an integer n (e.g. 1, 0.5, 0.333…), got "
            f"T={temperature:g}; the exact sampler accepts any T in (0, 1]"
        )
    return n


def _sorted_log_weights(group_ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Algorithm 2's log-weights of the draws in sorted order: (logw (B, N), perm (B, N)).

    Sorting each row puts identical draws in runs; a run's length is the count c of its
    outcome. m per row is the largest m ≤ n with a candidate, i.e. min(n, max c). A
    distinct outcome has weight C(c, m); spreading it over its c occurrences gives each
    draw C(c, m)/c ∝ Γ(c) / Γ(c − m + 1) (the row constant m! dropped), so we never
    need the distinct outcomes themselves. Non-candidates (c < m) get -inf.
    """
    if group_ids.dim() != 2 or group_ids.shape[1] < 1:
        raise CalmError(
            f"group ids must have shape (B, N) with N ≥ 1, got {tuple(group_ids.shape)}"
        )
    s, perm = group_ids.sort(dim=1)  # (B, N)
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    run = start.long().cumsum(dim=1) - 1  # (B, N) run index of each sorted draw
    per_run = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
    c = per_run.gather(1, run).double()  # (B, N) count of each draw's outcome
    m = per_run.amax(dim=1, keepdim=True).clamp(max=n).double()  # (B, 1)
    logw = torch.lgamma(c) - torch.lgamma((c - m).clamp(min=0) + 1)
    return logw.masked_fill_(c < m, -math.inf), perm


def batch_selection_probs(group_ids: Tensor, n: int) -> Tensor:
    """(B, N) probability that Algorithm 2 at T = 1/n returns each draw, given the batch."""
    logw, perm = _sorted_log_weights(group_ids, n)
    return torch.empty_like(logw).scatter_(1, perm, torch.softmax(logw, dim=1))


def batch_select_from_groups(
    group_ids: Tensor, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """Algorithm 2 on group ids (B, N) (equal id = identical draw): index (B,) of a chosen draw."""
    logw, perm = _sorted_log_weights(group_ids, n)  # (B, N)
    u = _uniform(tuple(logw.shape), logw.device, generator).clamp_min(1e-300)
    j = (logw - torch.log(-torch.log(u))).argmax(dim=1, keepdim=True)  # Gumbel-max, (B, 1)
    return perm.gather(1, j).squeeze(1)


def outcome_group_ids(samples: Tensor) -> Tensor:
    """(B, N, L) outcomes -> (B, N) long ids, equal iff the whole rows of L ids are equal."""
    B, N, L = samples.shape
    x = samples.long()
    lo, hi = int(x.min()), int(x.max())  # one sync per call, to pick an exact encoding
    base = hi - lo + 1
    if L * math.log2(base) < 62:
        # Mixed-radix packing into one int64: exact and cheaper than a lexicographic sort.
        powers = base ** torch.arange(L - 1, -1, -1, device=x.device, dtype=torch.long)
        return ((x - lo) * powers).sum(dim=2)
    _, inverse = torch.unique(x.reshape(B * N, L), dim=0, return_inverse=True)
    return inverse.view(B, N)


def batch_temperature_sample(
    samples: Tensor, temperature: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Algorithm 2: from N draws per row (B, N, L), one output per row (B, L) at T = 1/n."""
    n = batch_temperature_n(temperature)
    if samples.dim() != 3:
        raise CalmError(f"samples must have shape (B, N, L), got {tuple(samples.shape)}")
    idx = batch_select_from_groups(outcome_group_ids(samples), n, generator)  # (B,)
    return samples[torch.arange(samples.shape[0], device=samples.device), idx]


# ----------------------------------------------------------------------------------------
# Closed forms


def temperature_distribution(probs: Tensor, temperature: float) -> Tensor:
    """P^{1/T}, normalised, for a 1-D tensor of outcome probabilities."""
    t = _check_temperature(temperature)
    q = probs.double() ** (1.0 / t)
    return q / q.sum()


def expected_calls(probs: Tensor, temperature: float) -> float:
    """E[sampler calls per output] of Algorithm 1 (SPEC §4):
    (n + 1{α>0} Σ_x P(x)^{1/T-1}) / Σ_x P(x)^{1/T}."""
    n, alpha = split_inverse_temperature(temperature)
    p = probs.double()
    p = p / p.sum()
    inv = n + alpha
    num = float(n)
    if alpha > 0.0:
        num += float((p ** (inv - 1.0)).sum())
    return num / float((p**inv).sum())
