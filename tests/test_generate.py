"""Generation (SPEC §2 "Inference"): KV cache vs full recomputation, batching, stopping, errors."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import pytest
import torch

import calm.generate as gen
from calm.baseline import TokenLM
from calm.config import preset
from calm.errors import CalmError
from calm.generate import generate, head_sample_chooser

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4  # the tiny autoencoder's chunk size


@pytest.fixture(scope="module")
def calm_models(make_calm):
    return {s: make_calm(s, seed=3, random_head=True) for s in ("discrete", "continuous", "both")}


@pytest.fixture(scope="module")
def token_lm():
    torch.manual_seed(0)
    model = TokenLM(preset("transformer", "tiny", vocab_size=300)).eval()
    with torch.no_grad():  # sharper logits than the small init: argmax depends on the input
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


def fixed_noise_chooser(model, record: list | None = None):
    """Deterministic per row: the head's output at noise u = 0, decoded by the autoencoder."""

    def choose(h):
        if record is not None:
            record.append(h.clone())
        u = torch.zeros(*h.shape[:-1], 1, model.head.noise_size)
        z = model.head(h, u)[..., 0, :]  # (B, l)
        return model.autoencoder.decode_tokens(z), z

    return choose


def recording(chooser, record: list):
    def choose(h):
        record.append(h.clone())
        return chooser(h)

    return choose


def reference_calm(model, prompt, steps, generator):
    """No cache: recompute the backbone over the whole chunk sequence at every step.

    The prompt is right-aligned in its chunks; leading absent slots read the pad
    embedding (and, for the continuous input, the encoder's mask). Draws the same head
    noise as the default chooser (one per step). The continuous input reads the
    encoder's μ of each chunk's tokens, as in training.
    """
    pad = (-len(prompt)) % K
    chunks = torch.tensor([[0] * pad + list(prompt)]).view(1, -1, K)  # (1, C, K)
    known = torch.tensor([[False] * pad + [True] * len(prompt)]).view(1, -1, K)
    latents = None
    if model.config.input_scheme != "discrete":
        latents = model.autoencoder.encode(chunks, known)[0]  # (1, C, l)
    out, hs = [], []
    with torch.no_grad():
        for _ in range(steps):
            h = model.backbone(model.inputs(chunks, latents, known))[:, -1]  # (1, d)
            hs.append(h)
            z = model.head.sample(h, generator=generator)  # (1, l)
            tok = model.autoencoder.decode_tokens(z)  # (1, K)
            out += tok[0].tolist()
            chunks = torch.cat([chunks, tok[:, None]], 1)
            known = torch.cat([known, torch.ones(1, 1, K, dtype=torch.bool)], 1)
            if latents is not None:
                latents = torch.cat([latents, model.autoencoder.encode(tok[:, None])[0]], 1)
    return out, hs


# ---------------------------------------------------------------------- CALM


@pytest.mark.parametrize("scheme", ["discrete", "continuous", "both"])
@pytest.mark.parametrize("prompt_len", [8, 5, 1])
def test_calm_cache_equals_full_recompute(calm_models, scheme, prompt_len):
    model = calm_models[scheme]
    prompt = [(7 * i + 3) % 290 + 1 for i in range(prompt_len)]
    steps = 6
    want, want_h = reference_calm(model, prompt, steps, torch.Generator().manual_seed(4))
    hs: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(4)
    out = generate(model, [prompt], max_new_tokens=steps * K, generator=g,
                   chooser=recording(head_sample_chooser(model, g), hs))
    assert out.steps == steps and len(hs) == steps
    for a, b in zip(hs, want_h):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert out.tokens == [want]
    assert len(set(want)) > 2  # the random head makes a non-trivial continuation


@pytest.mark.parametrize("scheme", ["discrete", "continuous", "both"])
def test_calm_batch_equals_single_prompts(calm_models, scheme):
    model = calm_models[scheme]
    prompts = [[5, 9, 11], list(range(20, 30)), [42], [1, 2, 3, 4, 5, 6, 7, 8], [17, 18, 19, 20]]
    batch_h: list[torch.Tensor] = []
    batch = generate(model, prompts, max_new_tokens=10,
                     chooser=fixed_noise_chooser(model, batch_h))
    for b, p in enumerate(prompts):
        hs: list[torch.Tensor] = []
        single = generate(model, [p], max_new_tokens=10, chooser=fixed_noise_chooser(model, hs))
        assert batch.tokens[b] == single.tokens[0], b
        for step, h in enumerate(hs):
            torch.testing.assert_close(batch_h[step][b], h[0], rtol=1e-4, atol=1e-5)
    assert len({tuple(t) for t in batch.tokens}) > 1


def test_calm_seeded_sampling_is_reproducible(calm_models):
    model = calm_models["discrete"]
    def run(seed):
        return generate(model, [[3, 4, 5]], max_new_tokens=16,
                        generator=torch.Generator().manual_seed(seed)).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)  # the noise matters: the head is not deterministic


def eot_chooser(model, eot, at_step, row_steps=None):
    """Emit ``eot`` at slot 2 of step ``at_step`` (per row: ``row_steps[b]``; None = never)."""
    base = fixed_noise_chooser(model)
    step = [0]

    def choose(h):
        tokens, z = base(h)
        tokens = tokens.clone()
        for b in range(tokens.shape[0]):
            s = at_step if row_steps is None else row_steps[b]
            if s == step[0]:
                tokens[b, 2] = eot
        step[0] += 1
        return tokens, z

    return choose


def test_calm_stops_at_end_of_text(calm_models):
    model = calm_models["discrete"]
    free = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=40,
                    chooser=fixed_noise_chooser(model))
    eot = max(set(range(300)) - {t for row in free.tokens for t in row})  # never emitted here
    out = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=40, eot_id=eot,
                   chooser=eot_chooser(model, eot, at_step=None, row_steps=[1, None]))
    # Row 0: one whole chunk, then 3 tokens of the second, the last being end-of-text.
    assert out.tokens[0] == free.tokens[0][: K + 2] + [eot]
    # Row 1 is unaffected and runs to the budget; the loop stops when every row is done.
    assert out.tokens[1] == free.tokens[1]
    assert out.steps == math.ceil(40 / K)
    both = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=40, eot_id=eot,
                    chooser=eot_chooser(model, eot, at_step=2))
    assert both.steps == 3 and [len(t) for t in both.tokens] == [2 * K + 3, 2 * K + 3]
    assert all(t[-1] == eot for t in both.tokens)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 13])
def test_calm_max_new_tokens_exact(calm_models, n):
    model = calm_models["discrete"]
    streamed: list[list[int]] = [[], []]

    def on_step(added):
        for b, a in enumerate(added):
            streamed[b].extend(a)

    out = generate(model, [[1, 2], [3, 4, 5, 6, 7]], max_new_tokens=n,
                   generator=torch.Generator().manual_seed(0), on_step=on_step)
    assert [len(t) for t in out.tokens] == [n, n]
    assert out.steps == math.ceil(n / K)
    assert streamed == out.tokens


def test_calm_input_errors(calm_models):
    model = calm_models["discrete"]
    limit = model.config.backbone.max_seq_len * K  # tokens
    with pytest.raises(CalmError, match="context"):
        generate(model, [[1] * (limit + 1)], max_new_tokens=1)
    with pytest.raises(CalmError, match="context"):
        generate(model, [[1] * (limit - K)], max_new_tokens=2 * K)  # prompt + new too long
    generate(model, [[1] * (limit - K)], max_new_tokens=K)  # exactly fits
    with pytest.raises(CalmError, match="empty prompt"):
        generate(model, [[1, 2], []])
    with pytest.raises(CalmError, match="no prompt"):
        generate(model, [])
    for t in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(CalmError, match="temperature"):
            generate(model, [[1, 2]], temperature=t)
    with pytest.raises(CalmError, match="max new tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)


# ---------------------------------------------------------------------- baseline


@pytest.fixture
def greedy(monkeypatch):
    monkeypatch.setattr(gen, "sample_logits", lambda logits, t, g=None: logits.argmax(-1))


def reference_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model.logits(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_baseline_cache_and_batch_equal_full_recompute(token_lm, greedy):
    prompts = [[5, 9, 11], list(range(20, 30)), [42], [100, 101, 102, 103, 104]]
    out = generate(token_lm, prompts, max_new_tokens=9)
    for b, p in enumerate(prompts):
        want = reference_greedy(token_lm, p, 9)
        assert out.tokens[b] == want, b
        assert generate(token_lm, [p], max_new_tokens=9).tokens[0] == want
    assert len({t for row in out.tokens for t in row}) > 3


def test_baseline_stops_at_eot_and_budget(token_lm, greedy):
    prompts = [[5, 9, 11], list(range(20, 30))]
    free = generate(token_lm, prompts, max_new_tokens=12)
    assert [len(t) for t in free.tokens] == [12, 12] and free.steps == 12
    eot = free.tokens[0][4]
    k = free.tokens[0].index(eot)
    out = generate(token_lm, prompts, max_new_tokens=12, eot_id=eot)
    assert out.tokens[0] == free.tokens[0][: k + 1]
    row1 = free.tokens[1]
    assert out.tokens[1] == (row1[: row1.index(eot) + 1] if eot in row1 else row1)


def test_baseline_temperature_sampling_reproducible(token_lm):
    def run(seed, t=1.0):
        return generate(token_lm, [[1, 2, 3]], max_new_tokens=20, temperature=t,
                        generator=torch.Generator().manual_seed(seed)).tokens

    assert run(0) == run(0)
    assert run(0) != run(1)
    # A tiny temperature is greedy decoding.
    assert run(0, 1e-4)[0] == reference_greedy(token_lm, [1, 2, 3], 20)


def test_baseline_input_errors(token_lm):
    limit = token_lm.config.max_seq_len
    with pytest.raises(CalmError, match="context"):
        generate(token_lm, [[1] * (limit + 1)], max_new_tokens=1)
    with pytest.raises(CalmError, match="context"):
        generate(token_lm, [[1] * limit], max_new_tokens=1)
    with pytest.raises(CalmError, match="empty prompt"):
        generate(token_lm, [[]])
    for t in (0.0, 2.0, -1.0):
        with pytest.raises(CalmError, match="temperature"):
            generate(token_lm, [[1]], temperature=t)


# ----------------------------------------------------------------------------- compile

needs_cxx = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("kind", ["energy", "flow"])
def test_compiled_sampler_generates_the_same_tokens(make_calm, kind):
    from calm.config import HeadConfig
    from calm.model import CALM

    model = make_calm(seed=5, random_head=True)
    if kind == "flow":
        torch.manual_seed(6)
        model = CALM(replace(model.config, head=HeadConfig(kind="flow", flow_steps=2)),
                     model.autoencoder).eval()
        with torch.no_grad():
            for p in model.head.parameters():
                p.normal_(0.0, 0.3)
    # Prompts of different lengths; rows stop at different steps, so the compiled sampler
    # also meets a smaller batch after its first compilation.
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]

    def run(compile, eot=None):
        g = torch.Generator().manual_seed(11)
        return generate(model, prompts, max_new_tokens=24, eot_id=eot, generator=g,
                        precision="fp32", compile=compile)

    # A token of row 0's second chunk as end of text: that row stops early.
    eot = run(False).tokens[0][K]
    eager, compiled = run(False, eot), run(True, eot)
    assert len({len(t) for t in eager.tokens}) > 1  # the rows did stop at different steps
    assert compiled.tokens == eager.tokens
    assert compiled.steps == eager.steps
    assert run(True, eot).tokens == eager.tokens  # the cached compilation, again


def test_compile_refuses_what_it_does_not_cover(make_calm, token_lm):
    from calm.config import HeadConfig
    from calm.model import CALM

    model = make_calm(seed=5)
    with pytest.raises(CalmError, match="compile applies to CALM"):
        generate(token_lm, [[1, 2]], max_new_tokens=2, compile=True)
    with pytest.raises(CalmError, match="compile applies to CALM"):
        generate(model, [[1, 2]], max_new_tokens=4, temperature=0.5, compile=True)
    diffusion = CALM(replace(model.config, head=HeadConfig(kind="diffusion")),
                     model.autoencoder).eval()
    with pytest.raises(CalmError, match="draws noise at every sampling step"):
        generate(diffusion, [[1, 2]], max_new_tokens=4, compile=True)


def test_sample_logits_draws_the_tempered_softmax():
    from calm.generate import sample_logits

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")],
                           [0.5, 0.5, 0.5, 3.0, -2.0]])
    n = 40000
    for T, dtype in ((0.5, torch.float32), (1.0, torch.bfloat16)):
        rows = logits.to(dtype).repeat_interleave(n, 0)
        draws = sample_logits(rows, T, torch.Generator().manual_seed(0)).view(2, n)
        want = torch.softmax(logits.to(dtype).float() / T, -1)
        for b in range(2):
            freq = torch.bincount(draws[b], minlength=5).double() / n
            se = (want[b].double() * (1 - want[b].double()) / n).sqrt()
            assert ((freq - want[b].double()).abs() <= 4 * se + 1e-12).all(), (T, b, freq, want[b])
        assert not (draws[0] == 4).any()  # a zero-probability word is never drawn


def test_decode_tokens_takes_the_first_of_tied_maxima(calm_models):
    ae = next(iter(calm_models.values())).autoencoder
    logits = torch.zeros(3, 4, 9)
    logits[0, :, 2] = logits[0, :, 7] = 1.0  # ties: the first index wins, as argmax
    logits[1, :, 8] = 2.0
    logits[2, 1, 0] = logits[2, 1, 5] = 3.0
    ae.decode = lambda z: logits
    try:
        torch.testing.assert_close(ae.decode_tokens(torch.zeros(3, 1)), logits.argmax(-1))
    finally:
        del ae.decode
