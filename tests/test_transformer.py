"""The backbone (SPEC §2) against `transformers`' LLaMA, and its cache, padding and causality."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from calm.config import TransformerConfig, preset
from calm.errors import CalmError
from calm.transformer import Transformer

TINY = TransformerConfig(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=128,
)


def _model(cfg: TransformerConfig = TINY, seed: int = 0) -> Transformer:
    model = Transformer(cfg, generator=torch.Generator().manual_seed(seed)).eval()
    # Perturb the norm scales so a wrong norm placement cannot hide behind weight 1.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _inputs(B: int, S: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, S, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_matches_transformers_llama(kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = TransformerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        max_seq_len=128,
    )
    ours = _model(cfg)
    ref_cfg = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=128,
        attention_bias=False,
        mlp_bias=False,
    )
    ref_cfg._attn_implementation = "eager"
    ref = transformers.LlamaModel(ref_cfg).eval()

    q, kv, inter = 4 * 16, kv_heads * 16, 128
    with torch.no_grad():
        for a, b in zip(ours.blocks, ref.layers, strict=True):
            wq, wk, wv = a.attn.qkv.weight.split([q, kv, kv])
            b.self_attn.q_proj.weight.copy_(wq)
            b.self_attn.k_proj.weight.copy_(wk)
            b.self_attn.v_proj.weight.copy_(wv)
            b.self_attn.o_proj.weight.copy_(a.attn.proj.weight)
            gate, up = a.mlp.gate_up.weight.split([inter, inter])
            b.mlp.gate_proj.weight.copy_(gate)
            b.mlp.up_proj.weight.copy_(up)
            b.mlp.down_proj.weight.copy_(a.mlp.down.weight)
            b.input_layernorm.weight.copy_(a.attn_norm.weight)
            b.post_attention_layernorm.weight.copy_(a.mlp_norm.weight)
        ref.norm.weight.copy_(ours.norm.weight)

        x = _inputs(2, 40)
        expected = ref(inputs_embeds=x).last_hidden_state
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)

        # Explicit (B, S) positions take the on-the-fly rotary path.
        pos = torch.arange(7, 47).expand(2, 40)
        expected = ref(inputs_embeds=x, position_ids=pos).last_hidden_state
        torch.testing.assert_close(ours(x, positions=pos), expected, atol=1e-4, rtol=1e-4)


def test_cached_decoding_matches_full_forward():
    model = _model()
    x = _inputs(3, 20)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(3, 24)
        parts = [model(x[:, :6], cache=cache)]  # prefill
        parts.append(model(x[:, 6:9], cache=cache))  # a chunk after a non-empty cache
        for t in range(9, 20):
            parts.append(model(x[:, t : t + 1], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)

    # Expanding a cache row-wise continues each row as the original would.
    with torch.no_grad():
        cache = model.make_cache(3, 24)
        model(x[:, :10], cache=cache)
        big = cache.expand(2)
        y = model(x[:, 10:11].repeat_interleave(2, 0), cache=big)
        rev = cache.select(torch.tensor([2, 1, 0]))
        y_rev = model(x[[2, 1, 0], 10:11], cache=rev)
    torch.testing.assert_close(y, full[:, 10:11].repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_rev, full[[2, 1, 0], 10:11], atol=1e-5, rtol=1e-5)


def test_positions_beyond_the_rotary_tables():
    cfg = TransformerConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_seq_len=8
    )
    short = _model(cfg)
    long = _model(replace(cfg, max_seq_len=64))
    long.load_state_dict(short.state_dict())
    x = _inputs(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(short(x), long(x), atol=1e-6, rtol=1e-6)
        cache = short.make_cache(2, 20)
        steps = [short(x[:, t : t + 1], cache=cache) for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1), long(x), atol=1e-5, rtol=1e-5)
    # The fp32 tables follow the device they are asked for (meta stands in for CUDA).
    cos, _ = short.rotary(0, 4, None, torch.device("meta"))
    assert cos.device.type == "meta" and cos.dtype == torch.float32


def test_left_padding_matches_unpadded_rows():
    model = _model()
    lengths, S = [11, 6], 11
    seqs = [_inputs(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    pad = [S - n for n in lengths]
    # Left-pad with garbage so any leak through the mask shows.
    x = 100 * _inputs(2, S, seed=99)
    for i, s in enumerate(seqs):
        x[i, pad[i] :] = s[0]
    key_mask = torch.arange(S)[None, :] >= torch.tensor(pad)[:, None]  # (B, S)
    positions = (torch.arange(S)[None, :] - torch.tensor(pad)[:, None]).clamp(min=0)  # (B, S)
    with torch.no_grad():
        alone = [model(s)[0] for s in seqs]
        out = model(x, positions=positions, key_mask=key_mask)
        assert torch.isfinite(out).all()
        for i in range(2):
            torch.testing.assert_close(out[i, pad[i] :], alone[i], atol=1e-5, rtol=1e-5)
        # A pad query has no real key before it: it attends to itself alone, at position 0.
        pads = x[1, : pad[1]].unsqueeze(1)  # (pad, 1, d): each pad slot as its own sequence
        torch.testing.assert_close(out[1, : pad[1]], model(pads)[:, 0], atol=1e-5, rtol=1e-5)

        # Same through the cache: prefill 4 slots, then one slot at a time,
        # continuing both rows with 3 more real inputs.
        extra = _inputs(2, 3, seed=7)
        full_mask = torch.cat([key_mask, torch.ones(2, 3, dtype=torch.bool)], 1)
        full_pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, 4)], 1)
        xs = torch.cat([x, extra], 1)
        cache = model.make_cache(2, S + 3)
        steps = [
            model(xs[:, :4], positions=full_pos[:, :4], cache=cache, key_mask=full_mask[:, :4])
        ]
        for t in range(4, S + 3):
            steps.append(
                model(
                    xs[:, t : t + 1],
                    positions=full_pos[:, t : t + 1],
                    cache=cache,
                    key_mask=full_mask[:, : t + 1],
                )
            )
        stepped = torch.cat(steps, 1)
        assert torch.isfinite(stepped).all()
        for i in range(2):
            row = torch.cat([seqs[i], extra[i : i + 1]], 1)
            torch.testing.assert_close(stepped[i, pad[i] :], model(row)[0], atol=1e-5, rtol=1e-5)


def test_causality():
    model = _model()
    x = _inputs(2, 16)
    y = x.clone()
    y[:, 9:] += 5 * _inputs(2, 7, seed=3)
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-2  # later outputs do see the change


def test_init_and_errors():
    model = Transformer(TINY, generator=torch.Generator().manual_seed(0))
    attn = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    outs = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert abs(attn.std().item() - 0.02) < 0.002
    assert abs(outs.std().item() - 0.02 / 2) < 0.001  # 1 / sqrt(2 · 2 layers)
    assert (model.norm.weight == 1).all()
    assert model.num_parameters() == 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    with pytest.raises(CalmError):
        Transformer(TransformerConfig(hidden_size=64, num_heads=6))
    with pytest.raises(CalmError):
        Transformer(TransformerConfig(hidden_size=64, num_heads=4, num_kv_heads=3))
    cache = model.make_cache(1, 4)
    with pytest.raises(CalmError):
        model(_inputs(1, 5), cache=cache)


@pytest.mark.slow
def test_bench_speed_report():
    """Reports (does not assert) one forward+backward of the 'bench' backbone on 2 threads."""
    cfg = preset("transformer", "bench")
    model = Transformer(cfg)
    x = torch.randn(8, 128, cfg.hidden_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model(x).float().square().mean().backward()  # warm-up
        t0 = time.perf_counter()
        model(x).float().square().mean().backward()
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    tokens, S = 8 * 128, 128
    matmul = 6 * tokens * (model.num_parameters())  # 2 fwd + 4 bwd flops per weight per token
    attn = 3 * cfg.num_layers * 4 * 8 * S * S * cfg.hidden_size  # QK^T and AV, fwd+bwd (not halved)
    ideal = (matmul + attn) / 175e9
    print(
        f"\nbench backbone fwd+bwd (8,128,512), 2 threads: {dt:.3f}s; ideal at 175 GFLOP/s {ideal:.3f}s"
    )
    assert dt > 0


def test_cache_under_bf16_autocast_holds_bf16_and_matches_the_full_forward():
    model = _model()
    x = _inputs(2, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = model.make_cache(2, 12)
        parts = [model(x[:, :5], cache=cache)] + [
            model(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert cache.keys.dtype == cache.values.dtype == torch.bfloat16
    assert model.make_cache(2, 12).keys.dtype == torch.float32  # outside autocast
    got = torch.cat(parts, 1)
    assert (got.float() - full.float()).abs().max() < 0.05 * full.float().abs().max()
