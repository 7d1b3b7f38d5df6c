"""Likelihood-free temperature sampling in CALM generation (SPEC §4, paper §5 and §7.5).

One *draw* is one generative-head sample z decoded by the frozen autoencoder into
K tokens (argmax at each position). ``temperature_chooser`` turns the samplers of
``calm.sampling`` into a chooser for ``calm.generate``: h (B, d) → (tokens (B, K),
z (B, l)), the z being the chosen draw's own latent (the continuous input scheme
feeds it back).

- ``sampler="batch"``: Algorithm 2 at T = 1/n over N draws per step. The N head
  samples run as one batched forward; the decoding is pruned (below).
- ``sampler="exact"``: Algorithm 1, any T in (0, 1]; a draw decodes a position only
  while a row's n stage-1 draws still agree.

Pruned decoding (``batch_choose_pruned``). Decoding every candidate costs the
vocabulary projection at K positions × N candidates, most of a step's work. The
output distribution of Algorithm 2 given the batch is P(draw i) ∝ C(c_i, m)/c_i for
c_i ≥ m (c_i: the count of draw i's outcome, m = min(n, max c)), zero otherwise.
Two exact devices compute a draw from that distribution with less decoding:

1. Rejection on subsets. Draw a uniform n-subset of the N draws; if its n draws
   decode to the same outcome x (probability C(c_x, n)/C(N, n)), return one of
   them at random. Conditioned on acceptance this is outcome x with probability
   ∝ C(c_x, n) and a uniform draw of x, i.e. Algorithm 2 (an acceptance proves some
   c_x ≥ n, so m = n). Two rounds of i.i.d. tries run first (12, then 36 per
   row); a round decodes position 1 of its tries, then the other positions of the
   tries that still agree. Rows that accept nothing fall through to (2) with fresh
   randomness, so the mixture is still exact. It pays when one outcome is common
   (a confident step) and costs nearly nothing otherwise (the work is reused).
2. Position-wise resolution. Decode position 1 for every candidate, group by
   prefix, and decode the next position only for candidates whose prefix group
   is still open: a singleton prefix is final (count 1); a prefix group whose
   count is below a proven lower bound of m (a fully decoded outcome seen k times
   proves m ≥ min(n, k)) can never be chosen nor set m, so it is dropped. The
   final group ids give exactly Algorithm 2's weights (see ``resolve_groups``).

Decoded (candidate, position) pairs are memoised, so (1) never repeats work that
(2) would do, and the chosen draw's missing positions are decoded at the end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from calm.errors import CalmError
from calm.sampling import (
    _uniform,
    batch_select_from_groups,
    batch_temperature_n,
    exact_temperature_sample,
    outcome_group_ids,
    split_inverse_temperature,
)

# Largest logits tensor (elements) built at once; larger projections run in pieces.
LOGITS_BUDGET = 1 << 24
# Rounds of subset tries before the position-wise resolution: tries per row per round.
DEFAULT_TRIES = (12, 36)


class ChunkDecoder:
    """The frozen decoder, split so that single positions can be decoded on their own.

    ``trunk(z (P, l)) → (P, K, e)`` runs the per-chunk part once per candidate;
    ``logits(u (P, e)) → (P, V)`` the position-wise rest and the tied vocabulary
    projection. For ``calm.autoencoder.Autoencoder`` the trunk ends at the expand
    layer and the rest (its position-wise residual MLPs and norm) runs per position;
    any other module with ``decode_hidden`` and ``embed.weight`` decodes whole
    chunks in the trunk. Either way ``logits(trunk(z)[:, j])`` equals
    ``decode(z)[:, j]``.
    """

    def __init__(self, autoencoder):
        self.ae = autoencoder
        self.weight = autoencoder.embed.weight  # (V, d), tied to the output projection
        self.K = autoencoder.config.chunk_size
        self.V = self.weight.shape[0]
        self.split = all(
            hasattr(autoencoder, a)
            for a in ("from_latent", "dec_pre", "expand", "dec_post", "dec_norm")
        )

    @torch.no_grad()
    def trunk(self, z: Tensor) -> Tensor:
        if not self.split:
            return self.ae.decode_hidden(z)
        ae = self.ae
        h = ae.from_latent(z)
        for layer in ae.dec_pre:
            h = layer(h)
        return ae.expand(h).reshape(*z.shape[:-1], self.K, -1)  # (..., K, d)

    @torch.no_grad()
    def logits(self, u: Tensor) -> Tensor:
        if self.split:
            for layer in self.ae.dec_post:
                u = layer(u)
            u = self.ae.dec_norm(u)
        return u @ self.weight.t()

    @torch.no_grad()
    def argmax(self, u: Tensor) -> Tensor:
        """Argmax tokens of the rows u (P, e) → (P,), in pieces of bounded logits."""
        step = max(1, LOGITS_BUDGET // self.V)
        return torch.cat([self.logits(u[i : i + step]).argmax(-1) for i in range(0, len(u), step)])

    @torch.no_grad()
    def tokens(self, z: Tensor) -> Tensor:
        """Full decode (the reference path): z (..., l) → argmax tokens (..., K)."""
        flat = z.reshape(-1, z.shape[-1])
        step = max(1, LOGITS_BUDGET // (self.K * self.V))
        out = [
            self.ae.decode(flat[i : i + step]).argmax(-1) for i in range(0, flat.shape[0], step)
        ]
        return torch.cat(out).view(*z.shape[:-1], self.K)


class LazyTokens:
    """Argmax tokens of N candidates per row, decoded on demand and memoised.

    ``tokens`` (B, N, K) long holds −1 where a position is not decoded yet;
    ``projections`` counts (candidate, position) vocabulary projections done and
    ``trunks`` the candidates whose trunk ran.
    """

    def __init__(self, z: Tensor, decoder: ChunkDecoder):
        B, N, _ = z.shape
        self.z, self.dec = z, decoder
        self.B, self.N, self.K = B, N, decoder.K
        self.tokens = torch.full((B, N, self.K), -1, dtype=torch.long, device=z.device)
        self.has_trunk = torch.zeros(B * N, dtype=torch.bool, device=z.device)
        self.trunk: Tensor | None = None  # (B·N, K, e), allocated on first use
        self.projections = 0
        self.trunks = 0
        self.calls = 0  # batched decoder calls (each one pass over the vocabulary matrix)

    def need(self, b: Tensor, i: Tensor, j: Tensor | int) -> None:
        """Make tokens[b, i, j] known for the pairs given (P,) each (j: tensor or int)."""
        N, K = self.N, self.K
        j = torch.as_tensor(j, device=b.device).expand_as(b)
        flat = self.tokens.view(-1)
        # Unknown pairs, each once: mark them in a flag per (candidate, position), no sort.
        want = torch.zeros_like(flat, dtype=torch.bool)
        want[(b * N + i) * K + j] = True
        key = (want & (flat < 0)).nonzero().squeeze(1)  # (P,) flat (candidate, position)
        if key.numel() == 0:
            return
        c, j = key // K, key % K  # flat candidate b·N + i, position
        miss = torch.zeros_like(self.has_trunk)
        miss[c] = True
        todo = (miss & ~self.has_trunk).nonzero().squeeze(1)
        if todo.numel() > 0:
            t = self.dec.trunk(self.z.reshape(self.B * N, -1)[todo])  # (M, K, e)
            if self.trunk is None:
                self.trunk = torch.empty(self.B * N, *t.shape[1:], dtype=t.dtype, device=t.device)
            self.trunk[todo] = t
            self.has_trunk[todo] = True
            self.trunks += todo.numel()
        self.tokens.view(-1)[key] = self.dec.argmax(self.trunk[c, j])
        self.projections += key.numel()
        self.calls += 1


def _regroup(key: Tensor) -> tuple[Tensor, Tensor]:
    """Equal keys within a row form a group: key (B, N) → (ids (B, N) in [0, N), counts (B, N)).

    One sort per row (as ``calm.sampling``'s weights): runs of equal sorted keys are groups.
    """
    s, perm = key.sort(dim=1)
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    run = start.long().cumsum(dim=1) - 1  # (B, N) group of each sorted entry
    per_run = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
    ids = torch.empty_like(run).scatter_(1, perm, run)
    counts = torch.empty_like(run).scatter_(1, perm, per_run.gather(1, run))
    return ids, counts


def _full_outcome_lower_bound(tokens: Tensor, n: int, base: int) -> Tensor:
    """(B,) a proven lower bound of m = min(n, max_x c_x): the largest number of fully
    decoded candidates of a row sharing one outcome (at least 1), capped at n."""
    B, N, K = tokens.shape
    known = (tokens >= 0).all(-1)  # (B, N)
    if K * math.log2(base) < 62:
        # Mixed-radix packing of whole outcomes (unknown ones: key −1, their counts unused).
        powers = base ** torch.arange(K - 1, -1, -1, device=tokens.device)
        _, counts = _regroup(torch.where(known, (tokens * powers).sum(-1), -1))
    else:
        rows = torch.arange(B, device=tokens.device)[:, None, None].expand(B, N, 1)
        flat = torch.cat([rows, tokens], -1).view(B * N, K + 1)  # (row, outcome)
        _, inv, cnt = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
        counts = cnt[inv].view(B, N)
    return counts.masked_fill(~known, 1).amax(1).clamp(max=n)


def resolve_groups(lazy: LazyTokens, n: int, rows: Tensor) -> Tensor:
    """Group ids (B, N) on which Algorithm 2 picks exactly as on the full outcomes.

    Only rows where ``rows`` (B,) is True are resolved. Position by position, the
    open candidates are decoded and their prefix groups split; a candidate closes
    when its prefix group is a singleton (its count is final: 1) or its count is
    below a proven lower bound L of m. A closed candidate keeps its group (a
    sentinel token stands for the positions it skips). Then every open group ends
    fully decoded with its exact count; a dropped group's count (its prefix count
    at closing, ≥ its outcome's true count) stays below L ≤ m, so it neither sets
    m = min(n, max count) nor gets weight: the weights are Algorithm 2's.
    """
    B, N, K = lazy.tokens.shape
    V = lazy.dec.V
    dev = lazy.tokens.device
    bb = torch.arange(B, device=dev)[:, None].expand(B, N)
    ii = torch.arange(N, device=dev)[None, :].expand(B, N)
    gid = torch.zeros(B, N, dtype=torch.long, device=dev)  # per row: the empty prefix
    open_ = rows[:, None].expand(B, N).clone()  # (B, N)
    for j in range(K):
        lazy.need(bb[open_], ii[open_], j)
        tok = torch.where(open_, lazy.tokens[:, :, j], V)  # (B, N), V = sentinel
        gid, count = _regroup(gid * (V + 1) + tok)  # prefix groups and their counts
        open_ &= count >= 2
        if j < K - 1 and bool(open_.any()):
            low = _full_outcome_lower_bound(lazy.tokens, n, V)  # (B,)
            open_ &= count >= low[:, None]
    return gid


@torch.no_grad()
def batch_choose_pruned(
    z: Tensor,
    decoder,
    n: int,
    generator: torch.Generator | None = None,
    *,
    tries: tuple[int, ...] = DEFAULT_TRIES,
) -> tuple[Tensor, Tensor, dict]:
    """Algorithm 2 at T = 1/n on N latents per row, decoding only what the choice needs.

    z: (B, N, l) head samples; ``decoder``: a ``ChunkDecoder`` or an autoencoder.
    ``tries``: subset tries per row in each rejection round before the position-wise
    resolution (``()`` skips the rejection phase). The output has Algorithm 2's
    distribution exactly (module docstring), but uses the random stream otherwise.
    Returns ``(tokens (B, K) long, index (B,) long, stats)``: the chosen draw's tokens
    and index into N; stats counts the vocabulary projections done against the
    B·N·K of a full decode (``skipped_fraction``) and the rows the rejection phase
    settled.
    """
    dec = decoder if isinstance(decoder, ChunkDecoder) else ChunkDecoder(decoder)
    if z.dim() != 3 or z.shape[1] < 1:
        raise CalmError(f"latents must have shape (B, N, l) with N ≥ 1, got {tuple(z.shape)}")
    if n < 1:
        raise CalmError(f"n must be at least 1, got {n}")
    B, N, _ = z.shape
    K = dec.K
    dev = z.device
    lazy = LazyTokens(z, dec)
    rows = torch.arange(B, device=dev)
    index = torch.zeros(B, dtype=torch.long, device=dev)
    accepted = torch.zeros(B, dtype=torch.bool, device=dev)

    # (1) Rejection on uniform n-subsets (n = 1: the first try always accepts).
    m = min(n, N)  # with N < n no n-subset exists; only the resolution can decide
    for R in ((1,) if n == 1 else tries if m == n else ()):
        if bool(accepted.all()):
            break
        keys = _uniform((B, R, N), dev, generator)
        sub = keys.topk(n, dim=-1, largest=False).indices  # (B, R, n), uniform order too
        alive = (~accepted)[:, None].expand(B, R).clone()  # (B, R)
        bb = rows[:, None, None, None].expand(B, R, n, K)
        ss = sub[..., None].expand(B, R, n, K)
        jj = torch.arange(K, device=dev).expand(B, R, n, K)
        # Position 1 first (most tries of a diverse step end there), then the other
        # positions of the surviving tries together: two projection calls per round.
        for pos in (slice(0, 1), slice(1, K)):
            a = alive[..., None, None].expand(B, R, n, K).clone()
            a[..., : pos.start] = False
            a[..., pos.stop :] = False
            lazy.need(bb[a], ss[a], jj[a])
            t = lazy.tokens[bb[..., pos], ss[..., pos], jj[..., pos]]  # (B, R, n, k)
            alive &= (t == t[:, :, :1]).all(-1).all(-1)
            if not bool(alive.any()):
                break
        hit = alive.any(1)  # (B,)
        first = alive.long().argmax(1)  # the first accepting try of each row
        index = torch.where(hit, sub[rows, first, 0], index)
        accepted |= hit

    # (2) Position-wise resolution for the rest, with fresh randomness.
    rest = ~accepted
    if bool(rest.any()):
        gid = resolve_groups(lazy, n, rest)
        index = torch.where(rest, batch_select_from_groups(gid, n, generator), index)

    # The chosen draws' remaining positions.
    lazy.need(rows.repeat_interleave(K), index.repeat_interleave(K), torch.arange(K, device=dev).repeat(B))
    tokens = lazy.tokens[rows, index]  # (B, K)
    full = B * N * K
    stats = {
        "rows": B,
        "candidates": N,
        "projections": lazy.projections,
        "full_projections": full,
        "skipped_fraction": 1.0 - lazy.projections / full,
        "trunks": lazy.trunks,
        "calls": lazy.calls,
        "accepted_by_rejection": int(accepted.sum()),
    }
    return tokens, index, stats


@torch.no_grad()
def batch_choose_full(
    z: Tensor, decoder, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The unpruned reference: decode all N draws, then Algorithm 2. → (tokens (B, K), index (B,))."""
    dec = decoder if isinstance(decoder, ChunkDecoder) else ChunkDecoder(decoder)
    x = dec.tokens(z)  # (B, N, K)
    index = batch_select_from_groups(outcome_group_ids(x), n, generator)
    return x[torch.arange(x.shape[0], device=x.device), index], index


@torch.no_grad()
def decode_agreeing(z: Tensor, decoder) -> Tensor:
    """Tokens (R, m, K) of z (R, m, l), each row decoded only while its m draws agree.

    Positions after a row's first disagreement stay −1: that row's draws are not all
    identical whatever they hold, which is all that Algorithm 1's stage 1 asks.
    With m = 1 every row is decoded in full.
    """
    dec = decoder if isinstance(decoder, ChunkDecoder) else ChunkDecoder(decoder)
    R, m, _ = z.shape
    lazy = LazyTokens(z, dec)
    alive = torch.ones(R, dtype=torch.bool, device=z.device)
    bb = torch.arange(R, device=z.device)[:, None].expand(R, m)
    ii = torch.arange(m, device=z.device)[None, :].expand(R, m)
    for j in range(dec.K):
        a = alive[:, None].expand(R, m)
        lazy.need(bb[a], ii[a], j)
        t = lazy.tokens[:, :, j]
        alive &= (t == t[:, :1]).all(-1)
        if not bool(alive.any()):
            break
    return lazy.tokens


class TemperatureChooser:
    """Chooser h (B, d) → (tokens (B, K), z (B, l)) at a temperature (see the module docstring).

    ``stats`` accumulates over calls: steps, rows, head samples drawn, vocabulary
    projections done and those a full decode would have done.
    """

    def __init__(
        self,
        model,
        temperature: float,
        *,
        sampler: str = "batch",
        num_candidates: int = 200,
        max_calls: int = 100000,
        generator: torch.Generator | None = None,
        prune: bool = True,
        tries: tuple[int, ...] = DEFAULT_TRIES,
    ):
        if sampler not in ("batch", "exact"):
            raise CalmError(f"unknown sampler {sampler!r}; choose batch or exact")
        if sampler == "batch":
            self.n = batch_temperature_n(temperature)
            if num_candidates < 1:
                raise CalmError(f"the number of candidates must be at least 1, got {num_candidates}")
        else:
            split_inverse_temperature(temperature)  # checks T in (0, 1]
            if max_calls < 1:
                raise CalmError(f"max calls must be at least 1, got {max_calls}")
        self.model, self.temperature, self.sampler = model, float(temperature), sampler
        self.num_candidates, self.max_calls = num_candidates, max_calls
        self.generator, self.prune, self.tries = generator, prune, tries
        self.decoder = ChunkDecoder(model.autoencoder)
        self.stats = {"steps": 0, "rows": 0, "head_samples": 0, "projections": 0,
                      "full_projections": 0}

    def skipped_fraction(self) -> float:
        full = self.stats["full_projections"]
        return 1.0 - self.stats["projections"] / full if full else math.nan

    @torch.no_grad()
    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor]:
        B = h.shape[0]
        s = self.stats
        s["steps"] += 1
        s["rows"] += B
        if self.sampler == "exact":
            return self._exact(h)
        N, K = self.num_candidates, self.decoder.K
        z = self.model.head.sample_n(h, N, generator=self.generator)  # (B, N, l)
        s["head_samples"] += B * N
        s["full_projections"] += B * N * K
        if self.prune:
            tokens, index, st = batch_choose_pruned(
                z, self.decoder, self.n, self.generator, tries=self.tries
            )
            s["projections"] += st["projections"]
        else:
            tokens, index = batch_choose_full(z, self.decoder, self.n, self.generator)
            s["projections"] += B * N * K
        return tokens, z[torch.arange(B, device=z.device), index]

    def _exact(self, h: Tensor) -> tuple[Tensor, Tensor]:
        s = self.stats
        K = self.decoder.K

        def draw(rows: Tensor, m: int) -> tuple[Tensor, Tensor]:
            z = self.model.head.sample_n(h[rows], m, generator=self.generator)  # (R, m, l)
            x = decode_agreeing(z, self.decoder)  # (R, m, K)
            s["projections"] += int((x >= 0).sum())
            s["full_projections"] += z.shape[0] * m * K
            return x, z

        tokens, calls, z = exact_temperature_sample(
            draw, self.temperature, batch_size=h.shape[0], generator=self.generator,
            max_calls=self.max_calls, device=h.device, with_payload=True,
        )
        s["head_samples"] += int(calls.sum())
        return tokens, z


def temperature_chooser(
    model,
    temperature: float,
    *,
    sampler: str = "batch",
    num_candidates: int = 200,
    max_calls: int = 100000,
    generator: torch.Generator | None = None,
    prune: bool = True,
) -> TemperatureChooser:
    """A chooser for ``calm.generate.generate`` sampling CALM at ``temperature``.

    ``sampler="batch"``: Algorithm 2 over ``num_candidates`` head samples per step
    (T must be 1/n); ``"exact"``: Algorithm 1, any T in (0, 1], giving up with a
    CalmError after ``max_calls`` draws in a step. ``prune=False`` decodes every
    candidate in full (same distribution, more work).
    """
    return TemperatureChooser(
        model, temperature, sampler=sampler, num_candidates=num_candidates,
        max_calls=max_calls, generator=generator, prune=prune,
    )
