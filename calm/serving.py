"""Serving many completion requests at once: a batching engine over one model.

Requests that arrive together share one forward per step. The engine thread takes
the first waiting request, waits up to ``wait_ms`` for more (up to ``max_batch``
rows in all), reads their prompts in one batched prefill and decodes them step by
step; a row that finishes (end-of-text, a stop sequence, its token budget) or
whose client went away is dropped from the batch, so later steps compute only
the rows still wanted. Requests arriving meanwhile wait in a bounded queue and
form the next batch; a full queue refuses new requests (:class:`QueueFull`).

Randomness is per row: row ``i`` of a request with seed ``s`` draws from its own
generator, so a request's text depends on its prompt, parameters and seed alone,
never on what it was batched with. Choice 0 with seed ``s`` is what
``calm generate --seed s`` prints for the same prompt and temperature.

How each row samples (:func:`row_sampler`): CALM at temperature 1 takes one
head sample per step; CALM below 1 uses the likelihood-free samplers, the batch
sampler (Algorithm 2) where T = 1/n and the exact one (Algorithm 1, with a cap
on draws) otherwise; the baseline samples its softmax at the temperature.

This module needs nothing beyond the library; ``calm.server`` puts HTTP in front.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from calm.errors import CalmError

Emit = Callable[[tuple], None]  # thread-safe sink of a job's events

_GOLDEN = 0x9E3779B97F4A7C15


def row_seed(seed: int, index: int) -> int:
    """The generator seed of choice ``index`` of a request seeded ``seed``."""
    return seed if index == 0 else (seed + index * _GOLDEN) % 2**63


@dataclass
class Sampler:
    """How rows pick their next unit: ``choose(out (R, d|V), generators) -> (R, unit)``,
    each row drawing only from its own generator. Rows of samplers with equal ``key``
    are chosen together (the parts without randomness batched)."""

    name: str  # 'head', 'batch', 'exact' or 'softmax'
    choose: Callable
    key: tuple
    num_candidates: int | None = None
    batched: bool = True  # False: called row by row (it may raise CalmError for a row)


def _batch_n(temperature: float) -> int | None:
    """n where temperature = 1/n (within 1e-6), else None."""
    n = round(1 / temperature)
    return n if n >= 1 and abs(1 / n - temperature) <= 1e-6 else None


def row_sampler(model, temperature: float, *, sampler: str = "auto", num_candidates: int = 200,
                max_calls: int = 100_000) -> Sampler:
    """The sampler of a request's rows. ``sampler``: 'auto' (batch where T = 1/n, else
    exact), 'batch' or 'exact'; CALM below temperature 1 only. CalmError on a bad choice."""
    if not 0 < temperature <= 1:
        raise CalmError(f"temperature must be in (0, 1], got {temperature}")
    if sampler not in ("auto", "batch", "exact"):
        raise CalmError(f"sampler must be auto, batch or exact, got {sampler!r}")
    if getattr(model, "kind", None) != "calm":
        from calm.generate import sample_logits

        def softmax(out, generators):
            return torch.cat([sample_logits(out[i : i + 1], temperature, g)[:, None]
                              for i, g in enumerate(generators)])

        return Sampler("softmax", softmax, ("softmax", temperature))
    if temperature == 1.0:
        def head(out, generators):
            z = torch.cat([model.head.sample(out[i : i + 1], generator=g)
                           for i, g in enumerate(generators)])
            return model.autoencoder.decode_tokens(z)  # one batched decode

        return Sampler("head", head, ("head",))
    if sampler == "auto":
        sampler = "batch" if _batch_n(temperature) is not None else "exact"
    if num_candidates < 1:
        raise CalmError(f"num_candidates must be at least 1, got {num_candidates}")
    if max_calls < 1:
        raise CalmError(f"max_calls must be at least 1, got {max_calls}")
    from calm.temperature_sampling import temperature_chooser

    # Built once here so that a temperature the sampler cannot take fails before queueing.
    temperature_chooser(model, temperature, sampler=sampler, num_candidates=num_candidates,
                        max_calls=max_calls)

    def tempered(out, generators):  # one row (the candidates of each row are batched)
        (g,) = generators
        return temperature_chooser(model, temperature, sampler=sampler,
                                   num_candidates=num_candidates, max_calls=max_calls,
                                   generator=g)(out)[0]

    key = (sampler, temperature, num_candidates, max_calls)
    return Sampler(sampler, tempered, key, num_candidates if sampler == "batch" else None,
                   batched=False)


@dataclass
class Job:
    """One request: its rows' prompts (token ids, one per choice), budget and sampler.

    The engine reports through ``emit`` (called from its thread):
    ``("text", index, piece)``, ``("finish", index, reason, n_tokens)`` with reason
    'stop' or 'length', ``("error", message)`` (the job ends), ``("done",)`` after
    every row finished. Set ``cancelled`` to drop the job's rows.
    """

    prompts: list[list[int]]
    max_tokens: int
    sampler: Sampler
    seed: int
    emit: Emit
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens through end-of-text (for benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts)


class QueueFull(Exception):
    """The engine's queue holds as many waiting requests as it may."""


class _Row:
    def __init__(self, job: Job, index: int, device: torch.device):
        self.job = job
        self.index = index
        # on the model's device: CUDA sampling takes a CUDA generator only
        self.generator = torch.Generator(device=device).manual_seed(row_seed(job.seed, index))
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already emitted

    @property
    def wanted(self) -> bool:
        return not self.job.cancelled.is_set()


class Engine:
    """A thread that batches and decodes :class:`Job`s on ``model``.

    ``tokenizer`` turns new tokens into text (stop sequences are matched on text).
    ``precision``: 'fp32' or 'bf16' (resolved). Use ``start()``, ``submit(job)``,
    ``close()``.
    """

    def __init__(self, model, tokenizer, *, precision: str = "fp32", max_batch: int = 16,
                 wait_ms: float = 10.0, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or wait_ms < 0:
            raise CalmError("max_batch and max_queue must be at least 1, wait_ms at least 0")
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        self.max_batch = max_batch
        self.wait = wait_ms / 1000
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: Job | None = None  # taken from the queue but left for the next batch
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="calm-engine", daemon=True)
        self.batches = 0  # batches run so far (for tests and logs)
        self.largest_batch = 0
        self.dropped = 0  # rows dropped because their client went away

    # ------------------------------------------------------------------ limits

    @property
    def kind(self) -> str:
        return "calm" if getattr(self.model, "kind", None) == "calm" else "baseline"

    @property
    def unit(self) -> int:
        return self.model.config.chunk_size if self.kind == "calm" else 1

    @property
    def context_tokens(self) -> int:
        """The model's context in tokens."""
        if self.kind == "calm":
            return self.model.config.backbone.max_seq_len * self.unit
        return self.model.config.max_seq_len

    def _positions(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
        """(prompt positions, new positions) of a row in the backbone's context."""
        return math.ceil(prompt_len / self.unit), math.ceil(max_tokens / self.unit)

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """CalmError if a row of this size cannot fit the model's context."""
        p, n = self._positions(prompt_len, max_tokens)
        limit = self.context_tokens // self.unit
        if p + n > limit:
            raise CalmError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.context_tokens} tokens"
            )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; waiting jobs get an error event."""
        self._closing.set()
        self._thread.join(timeout)
        pending = [self._held] if self._held is not None else []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            job.emit(("error", "the server is shutting down"))

    def submit(self, job: Job) -> None:
        """Queue a job (QueueFull when the queue is full; CalmError when it can never run)."""
        if self._closing.is_set():
            raise CalmError("the server is shutting down")
        if job.rows > self.max_batch:
            raise CalmError(
                f"the request asks for {job.rows} completions; this server batches at most "
                f"{self.max_batch}"
            )
        for p in job.prompts:
            self.check(len(p), job.max_tokens)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    # ------------------------------------------------------------------ the loop

    def _take(self, timeout: float) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _next_batch(self) -> list[Job]:
        first = self._take(0.05)
        if first is None:
            return []
        jobs, rows = [first], first.rows
        prompt_pos, new_pos = self._fit([first])
        deadline = time.monotonic() + self.wait
        while rows < self.max_batch:
            job = self._take(max(deadline - time.monotonic(), 0.0))
            if job is None:
                break
            p, n = self._fit([job])
            limit = self.context_tokens // self.unit
            if rows + job.rows > self.max_batch or max(p, prompt_pos) + max(n, new_pos) > limit:
                self._held = job  # first in the next batch
                break
            jobs.append(job)
            rows += job.rows
            prompt_pos, new_pos = max(p, prompt_pos), max(n, new_pos)
        return jobs

    def _fit(self, jobs: list[Job]) -> tuple[int, int]:
        p = max(self._positions(len(q), j.max_tokens)[0] for j in jobs for q in j.prompts)
        n = max(self._positions(0, j.max_tokens)[1] for j in jobs)
        return p, n

    def _loop(self) -> None:
        while not self._closing.is_set():
            jobs = [j for j in self._next_batch() if not j.cancelled.is_set()]
            if not jobs:
                continue
            try:
                self._run(jobs)
            except Exception as e:  # a fault in one batch must not stop the server
                message = str(e) if isinstance(e, CalmError) else f"internal error: {e!r}"
                for job in jobs:
                    job.emit(("error", message))

    def _run(self, jobs: list[Job]) -> None:
        from calm.generate import decoder
        from calm.layers import decoding_layout
        from calm.precision import autocast

        device = next(self.model.parameters()).device
        rows = [_Row(job, i, device) for job in jobs for i in range(job.rows)]
        prompts = [job.prompts[i] for job in jobs for i in range(job.rows)]
        budget = max(job.max_tokens for job in jobs)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        with torch.no_grad(), decoding_layout(self.model, bf16=self.precision == "bf16"), \
                autocast(device, self.precision):
            dec = decoder(self.model, prompts, budget)
            while rows:
                picked: dict[int, torch.Tensor] = {}  # row → this step's unit, if it goes on
                groups: dict[tuple, list[int]] = {}
                for i, row in enumerate(rows):
                    if row.wanted:
                        groups.setdefault(row.job.sampler.key, []).append(i)
                    else:
                        self.dropped += 1
                chosen: dict[int, torch.Tensor] = {}
                for group in groups.values():
                    sampler = rows[group[0]].job.sampler
                    if sampler.batched:
                        units = sampler.choose(dec.out[group], [rows[i].generator for i in group])
                        chosen.update({i: units[k : k + 1] for k, i in enumerate(group)})
                        continue
                    for i in group:
                        try:
                            chosen[i] = sampler.choose(dec.out[i : i + 1], [rows[i].generator])
                        except CalmError as e:  # e.g. the exact sampler's cap on draws
                            if not rows[i].job.cancelled.is_set():
                                rows[i].job.cancelled.set()
                                rows[i].job.emit(("error", str(e)))
                for i in sorted(chosen):
                    if self._advance(rows[i], chosen[i][0].tolist()):
                        picked[i] = chosen[i]
                keep = [i for i in picked if rows[i].wanted]
                self.dropped += len(picked) - len(keep)
                going_on = {id(rows[i].job) for i in keep}
                for job in {id(r.job): r.job for r in rows}.values():
                    if id(job) not in going_on and not job.cancelled.is_set():
                        job.emit(("done",))
                if not keep:
                    break
                if len(keep) < len(rows):
                    dec.keep(torch.tensor(keep, dtype=torch.long))
                    rows = [rows[i] for i in keep]
                dec.feed(torch.cat([picked[i] for i in keep], 0).to(device))

    def _advance(self, row: _Row, new: list[int]) -> bool:
        """Add a step's tokens to a row and emit its new text; False once it is finished."""
        if not row.wanted:
            return False
        job, eot = row.job, self.tokenizer.eot_id
        new = new[: job.max_tokens - len(row.tokens)]
        reason = None
        if eot is not None and eot in new and not job.ignore_eos:
            new = new[: new.index(eot) + 1]
            reason = "stop"
        row.tokens.extend(new)
        if reason is None and len(row.tokens) >= job.max_tokens:
            reason = "length"
        text = self.tokenizer.decode([t for t in row.tokens if t != eot])
        for s in job.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None:
            # Hold back what may be half a character or the start of a stop sequence.
            end = len(text.rstrip("\ufffd"))
            if job.stop:
                end = min(end, len(text) - max(len(s) for s in job.stop) + 1)
            text = text[: max(end, row.sent)]
        if len(text) > row.sent:
            job.emit(("text", row.index, text[row.sent :]))
            row.sent = len(text)
        if reason is not None:
            job.emit(("finish", row.index, reason, len(row.tokens)))
            return False
        return True
