"""BrierLM of real models on held-out data (SPEC §3, paper §4.2).

Model drivers that turn a CALM or a token-level baseline into per-position
Brier-n estimates (the pure estimators live in calm.brier), and the evaluation
loop over a dataset split.

- Baseline: the lower-variance token-level estimator. One teacher-forced pass
  fills a KV cache with the true block; then each rollout step feeds the next
  sampled token of *every* start position at once, as new cache slots whose
  attention mask (``rollout_layout``) shows each sample only its own prefix and
  its own earlier samples. Both sample streams share the cached prefix.
- CALM: n-grams start at chunk boundaries. One backbone pass over the block's
  chunk inputs; at every chunk position two head samples are decoded by the
  frozen autoencoder (argmax). When K < n the n-gram spans ⌈n/K⌉ chunks: each
  stream feeds its own sampled chunk back for the extra steps, all start
  positions batched the same way as the baseline's tokens.
- Anything else with ``sample_ngrams(tokens, n, generator=) → (s1, s2, targets)``
  goes through the plain two-sample estimator.

Totals are reduced as sums (``BrierStats``), so evaluation can be sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from calm.brier import (
    BrierStats,
    check_positions,
    generic_two_sample_brier,
    multi_sample_brier,
    rollout_layout,
    sample_categorical,
    token_level_brier,
)
from calm.errors import CalmError
from calm.transformer import KVCache

# Largest float tensor of logits (elements) built at once; larger work is cut in pieces.
LOGITS_BUDGET = 1 << 25
# Sampled chunks per start in the CALM scores the project reports (the quickstart, the
# benchmarks): with the paper's two, an undertrained CALM's Brier-4 (a few in 10⁵) is
# lost in the noise of a few thousand starts; 16 give the same expectation, less variance.
REPORT_SAMPLES = 16


def _unwrap(model):
    """The model inside a data-parallel wrapper (``.module``), or the model itself."""
    return getattr(model, "module", model)


def _device(model, default: torch.device | str = "cpu") -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device(default)


def _vocab_size(model) -> int:
    cfg = model.config
    return cfg.backbone.vocab_size if model.kind == "calm" else cfg.vocab_size


# ---------------------------------------------------------------------------
# Token-level baseline
# ---------------------------------------------------------------------------


@torch.no_grad()
def token_lm_estimates(
    model,
    tokens: torch.Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
    piece: int | None = None,
) -> torch.Tensor:
    """Per-position lower-variance Brier-1..max_n of a token LM: (B, T) → (B, P, max_n).

    The same estimator and the same draws as ``calm.brier.token_model_estimates``
    (identical samples for one generator when ``piece`` covers every position), but
    the true block runs once into a KV cache and each rollout step only feeds the P
    new sampled tokens. ``piece`` start positions are rolled out at a time (all by
    default), bounding the (2B, piece, V) logits.

    The model needs ``logits(tokens, positions=, cache=, attn_mask=, read=)`` and
    ``make_cache(rows, length)`` (``TokenLM``).
    """
    x = tokens
    B, T = x.shape
    positions = check_positions(T, max_n, positions, x.device)
    P = positions.numel()
    steps = max_n - 1
    piece = P if piece is None else max(1, min(piece, P))
    cache = model.make_cache(B, T + steps * piece)

    # Teacher forcing over the true block; read every slot that predicts a token of some n-gram.
    need = positions[:, None] + torch.arange(max_n, device=x.device)  # (P, n)
    read, inverse = torch.unique(need, return_inverse=True)  # (U,), (P, n)
    logp = F.log_softmax(model.logits(x, cache=cache, read=read).float(), -1)  # (B, U, V)
    lp_true = logp.gather(-1, x[:, read + 1, None]).squeeze(-1)  # (B, U)
    p_true = lp_true[:, inverse].cumsum(-1).exp()  # (B, P, n) P(true n-gram)
    probs0 = logp[:, inverse[:, 0]].exp()  # (B, P, V) after each true prefix
    del logp
    if steps == 0:
        agree = torch.ones(B, P, 1, dtype=torch.bool, device=x.device)
        return token_level_brier(p_true, agree, probs0.square().sum(-1, keepdim=True))

    # Stream a is rows [0, B), stream b rows [B, 2B); both start from the cached block.
    cache2 = cache.select(torch.arange(B, device=x.device).repeat(2))
    del cache
    out = []
    for lo in range(0, P, piece):
        pos = positions[lo : lo + piece]
        Pc = pos.numel()
        lay = rollout_layout(T, steps, pos)
        probs = probs0[:, lo : lo + Pc]  # (B, Pc, V)
        agree = [torch.ones(B, Pc, dtype=torch.bool, device=x.device)]
        collision = [probs.square().sum(-1)]
        probs = probs.repeat(2, 1, 1)  # (2B, Pc, V)
        same = agree[0]
        cache2.length = T  # forget the previous piece's samples
        for step in range(1, max_n):
            s = sample_categorical(probs, generator)  # (2B, Pc)
            same = same & (s[:B] == s[B:])  # (B, Pc) sampled prefixes agree so far
            new = slice(T + (step - 1) * Pc, T + step * Pc)  # this step's slots
            c = cache2
            if step == max_n - 1:  # the last collision needs stream a only: a view of its rows
                c, s = KVCache(cache2.keys[:, :B], cache2.values[:, :B], cache2.length), s[:B]
            logits = model.logits(
                s, positions=lay.position_ids[new], cache=c,
                attn_mask=lay.attn_mask[new, : new.stop],
            )  # (rows, Pc, V)
            probs = F.softmax(logits.float(), -1)
            agree.append(same)
            collision.append(probs[:B].square().sum(-1))
        out.append(
            token_level_brier(
                p_true[:, lo : lo + Pc], torch.stack(agree, -1), torch.stack(collision, -1)
            )
        )
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------
# CALM
# ---------------------------------------------------------------------------


def _decode(autoencoder, z: torch.Tensor, K: int, V: int) -> torch.Tensor:
    """Argmax tokens of latents z (..., l) → (..., K), decoded in pieces of bounded logits."""
    flat = z.reshape(-1, z.shape[-1])
    step = max(1, LOGITS_BUDGET // (K * V))
    out = [autoencoder.decode_tokens(flat[i : i + step]) for i in range(0, flat.shape[0], step)]
    return torch.cat(out).view(*z.shape[:-1], K)


@torch.no_grad()
def calm_samples(
    model,
    tokens: torch.Tensor,
    max_n: int = 4,
    *,
    num_samples: int = 2,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` independent sampled n-grams after every chunk boundary, and the true ones.

    tokens: (B, T), T divisible by K. The n-gram after chunk i (prefix: chunks
    0..i, true) spans m = ⌈max_n/K⌉ chunks. positions: (P,) chunk indices i, by
    default every i with room for m true chunks (0..C−1−m, C = T/K).
    Returns samples (S, B, P, max_n) and targets (B, P, max_n), long.

    The backbone runs once over the true chunk inputs (into a KV cache when m > 1)
    and the head draws all S first chunks at once; each extra chunk of a stream is
    that stream's own previous sample fed back, for all start positions in one call
    (``rollout_layout`` at chunk level), so rollouts cost S backbone passes of P slots.
    """
    K = model.config.chunk_size
    B, T = tokens.shape
    S = num_samples
    if S < 1:
        raise CalmError(f"num_samples must be at least 1, got {S}")
    if T % K:
        raise CalmError(f"block size {T} is not divisible by K={K}")
    C, m = T // K, -(-max_n // K)
    S0 = C - 1  # backbone slots: the inputs are chunks 0..C−2
    if S0 < m:
        raise CalmError(f"a block of {C} chunks has no room for a true {max_n}-gram after a chunk")
    if positions is None:
        positions = torch.arange(C - m, device=tokens.device)
    positions = positions.to(device=tokens.device, dtype=torch.long).reshape(-1)
    if positions.numel() == 0 or positions.min() < 0 or positions.max() > C - 1 - m:
        raise CalmError(f"chunk positions must lie in 0..{C - 1 - m} for {C} chunks and m={m}")
    P = positions.numel()
    V = _vocab_size(model)
    chunks = tokens.view(B, C, K)
    latents = model.input_latents(chunks[:, :-1])  # (B, S0, l) true chunks' means, or None

    cache = model.make_cache(B, S0 + (m - 1) * P) if m > 1 else None
    h = model.backbone(model.inputs(chunks[:, :-1], latents), cache=cache)  # (B, S0, d)
    z = model.head.sample_n(h[:, positions], S, generator=generator)  # (B, P, S, l)
    z = z.movedim(-2, 0).reshape(S * B, P, -1)  # (S·B, P, l): stream 0's rows, then stream 1's, ...
    sampled = [_decode(model.autoencoder, z, K, V)]  # per chunk: (S·B, P, K)

    if m > 1:
        lay = rollout_layout(S0, m - 1, positions)
        cache = cache.select(torch.arange(B, device=tokens.device).repeat(S))  # (S·B rows)
        for j in range(m - 1):
            new = slice(S0 + j * P, S0 + (j + 1) * P)  # slots of this step's sampled chunks
            x = model.inputs(sampled[-1], model.input_latents(sampled[-1]))  # (S·B, P, d)
            h = model.backbone(
                x, positions=lay.position_ids[new], cache=cache,
                attn_mask=lay.attn_mask[new, : new.stop],
            )
            z = model.head.sample(h, generator=generator)  # (S·B, P, l)
            sampled.append(_decode(model.autoencoder, z, K, V))

    s = torch.cat(sampled, -1)[..., :max_n].view(S, B, P, max_n)
    idx = (positions[:, None] + 1) * K + torch.arange(max_n, device=tokens.device)  # (P, n)
    return s, tokens[:, idx]


def calm_sample_ngrams(
    model,
    tokens: torch.Tensor,
    max_n: int = 4,
    *,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two independent sampled n-grams after every chunk boundary, and the true ones:
    ``calm_samples`` with two streams. Returns sample1, sample2, targets, each (B, P, max_n)."""
    s, targets = calm_samples(model, tokens, max_n, num_samples=2, generator=generator,
                              positions=positions)
    return s[0], s[1], targets


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def brier_for_model(
    model,
    tokens: torch.Tensor,
    *,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    stats: BrierStats | None = None,
    samples: int = 2,
) -> BrierStats:
    """Brier-1..max_n estimates of a model on true blocks tokens (B, T), added into ``stats``.

    ``model.kind`` picks the driver: "baseline" (token-level, every token position
    a start; exact probabilities), "calm" (every chunk boundary a start; ``samples``
    sampled n-grams per start, 2 being the paper's estimator and more the same
    expectation at a lower variance); otherwise ``model.sample_ngrams`` (two samples).
    Rows are processed in groups that keep the logits within ``LOGITS_BUDGET``.
    """
    if samples < 2:
        raise CalmError(f"the Brier estimator needs at least 2 samples per position, got {samples}")
    model = _unwrap(model)
    stats = BrierStats(max_n) if stats is None else stats
    if tokens.dim() == 1:
        tokens = tokens[None]
    kind = getattr(model, "kind", None)
    if kind == "baseline":
        B, T = tokens.shape
        V = _vocab_size(model)
        rows = max(1, LOGITS_BUDGET // (T * V))
        piece = max(1, LOGITS_BUDGET // (2 * min(rows, B) * V))
        for i in range(0, B, rows):
            est = token_lm_estimates(model, tokens[i : i + rows], max_n, generator, piece=piece)
            stats.update_all(est)
        return stats
    if kind == "calm":
        draws, targets = calm_samples(model, tokens, max_n, num_samples=samples, generator=generator)
        for m in range(1, max_n + 1):
            stats.update(m, multi_sample_brier(draws[..., :m], targets[..., :m]))
        return stats
    if hasattr(model, "sample_ngrams"):
        sample_fn = model.sample_ngrams
    else:
        raise CalmError(f"cannot evaluate a model of kind {kind!r}: no BrierLM driver for it")
    s1, s2, targets = sample_fn(tokens, max_n, generator=generator)
    return generic_two_sample_brier(lambda: (s1, s2), targets, stats)


# ---------------------------------------------------------------------------
# Evaluation over a dataset split
# ---------------------------------------------------------------------------


def _split(split: str) -> str:
    return "val" if split == "validation" else split


def _windows(dataset, split, model, block_size, batch_size, max_tokens, max_n=4):
    """Checks the request; returns the (B, T) batches, cut to at most max_tokens tokens."""
    from calm.data import SPLITS, eval_batches

    if split not in SPLITS:
        raise CalmError(f"unknown split {split!r}; choose from {', '.join(SPLITS)} (or validation)")
    if batch_size < 1:
        raise CalmError(f"batch size must be positive, got {batch_size}")
    vocab = _vocab_size(model)
    if dataset.vocab_size > vocab:
        raise CalmError(
            f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's ({vocab})"
        )
    if model.kind == "calm":
        K = model.config.chunk_size
        if block_size % K:
            raise CalmError(f"block size {block_size} is not divisible by K={K}")
        m = -(-max_n // K)
        if block_size // K < m + 1:
            raise CalmError(
                f"block size {block_size} is too short: Brier-{max_n} needs at least "
                f"{(m + 1) * K} tokens ({m + 1} chunks of K={K})"
            )
        context = model.config.backbone.max_seq_len * K
    else:
        if block_size < max_n + 1:
            raise CalmError(
                f"block size {block_size} is too short: Brier-{max_n} needs {max_n + 1} tokens"
            )
        context = model.config.max_seq_len
    if block_size > context:
        raise CalmError(f"block size {block_size} exceeds the model's context of {context} tokens")
    n = dataset.num_tokens(split)
    if n == 0:
        raise CalmError(f"the {split} split of {dataset.path} is empty")
    if n < block_size:
        raise CalmError(
            f"the {split} split of {dataset.path} has {n} tokens, fewer than one window of "
            f"{block_size}; use a smaller --block-size"
        )
    windows = n // block_size
    if max_tokens is not None:
        if max_tokens < 1:
            raise CalmError(f"max tokens must be positive, got {max_tokens}")
        windows = min(windows, max(1, max_tokens // block_size))
    num_batches = -(-windows // batch_size)
    batches = eval_batches(dataset, split, block_size, batch_size, max_batches=num_batches)
    return batches, windows


def _cut(batches, windows: int):
    """Yield the batches, the last one trimmed so that exactly ``windows`` rows come out."""
    left = windows
    for b in batches:
        if left <= 0:
            return
        yield b[:left]
        left -= b.shape[0]


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    split: str = "val",
    *,
    block_size: int,
    batch_size: int,
    max_tokens: int | None = None,
    seed: int = 0,
    max_n: int = 4,
    brier_only: bool = False,
    progress: bool = False,
    precision: str | None = None,
    samples: int = 2,
) -> dict:
    """Brier-1..max_n (± standard errors), BrierLM and the model's own loss on a split.

    Windows are consecutive blocks of ``block_size`` tokens from the split's start,
    at most ``max_tokens`` tokens (at least one window). Baseline: also the
    cross-entropy (nats per token) and perplexity; CALM: the energy loss on the same
    windows. ``samples``: CALM's sampled n-grams per chunk start (``brier_for_model``).
    ``seed`` fixes every sample drawn. The model is evaluated in eval mode
    and given back in the mode it came in. ``precision``: 'auto', 'fp32' or 'bf16'
    (calm.precision; probabilities and estimators stay fp32); None takes
    ``$CALM_PRECISION``, else 'auto'.
    """
    from calm.precision import autocast, default_precision, resolve_precision

    model = _unwrap(model)
    split = _split(split)
    batches, windows = _windows(dataset, split, model, block_size, batch_size, max_tokens, max_n)
    device = _device(model)
    g = torch.Generator(device=device).manual_seed(seed)
    stats = BrierStats(max_n)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = 0
    it = _cut(batches, windows)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=-(-windows // batch_size), desc="eval", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    precision = resolve_precision(precision or default_precision(), device)
    try:
        with autocast(device, precision):
            for batch in it:
                x = batch.to(device)
                brier_for_model(model, x, max_n=max_n, generator=g, stats=stats, samples=samples)
                if brier_only:
                    continue
                # The model's own loss is a mean over its predicted positions; weight it back to a sum.
                if model.kind == "calm":
                    loss, _ = model(x, generator=g)
                    count = x.shape[0] * (x.shape[1] // model.config.chunk_size - 1)
                else:
                    loss, _ = model(x)
                    count = x.shape[0] * (x.shape[1] - 1)
                loss_sum += loss.double() * count
                loss_count += count
    finally:
        model.train(was_training)

    out: dict = {
        "kind": model.kind,
        "split": split,
        "block_size": block_size,
        "windows": windows,
        "tokens": windows * block_size,
        "seed": seed,
        **({"samples": samples} if model.kind == "calm" else {}),
        **stats.summary(),
    }
    if not brier_only:
        mean = float(loss_sum) / max(loss_count, 1)
        if model.kind == "calm":
            out["energy_loss"] = mean
        else:
            out["cross_entropy"] = mean
            out["perplexity"] = math.exp(mean) if mean < 700 else math.inf
    return out


def brier_eval_fn(
    dataset,
    *,
    block_size: int,
    batch_size: int,
    max_tokens: int | None,
    seed: int = 0,
    split: str = "val",
    precision: str | None = None,
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A validation hook for the training loop: ``fn(model) → {brier_1..4, brier_lm}``.

    Each call evaluates the same windows with the same seed, so successive values
    differ by the model only.
    """
    keys = [f"brier_{n}" for n in range(1, 5)] + ["brier_lm"]

    def fn(model) -> dict[str, float]:
        r = evaluate_model(
            model, dataset, split, block_size=block_size, batch_size=batch_size,
            max_tokens=max_tokens, seed=seed, brier_only=True, precision=precision,
        )
        return {k: r[k] for k in keys}

    return fn
