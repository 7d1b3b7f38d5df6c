"""Masked input slots and what the continuous input reads at inference."""

from __future__ import annotations

import pytest
import torch

from calm.autoencoder import Autoencoder
from calm.config import AutoencoderConfig, CALMConfig, HeadConfig, preset
from calm.generate import generate
from calm.loading import autoencoder_fields
from calm.model import CALM


def _train_tiny_ae(token_mask: str, steps: int = 250, seed: int = 0) -> Autoencoder:
    """A tiny autoencoder on random chunks over 12 words, where id 0 (end-of-text) is common."""
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig(vocab_size=12, hidden_size=32, intermediate_size=64,
                                       latent_size=16, token_mask=token_mask))
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for _ in range(steps):
        x = torch.randint(0, 12, (16, 32), generator=g)
        loss, _ = ae(x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval()


def test_learned_mask_reconstructs_end_of_text():
    ae = _train_tiny_ae("learned")
    x = torch.randint(0, 12, (256, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ae.decode_tokens(ae.encode(x)[0])
    eot = x == 0
    assert eot.sum() > 50
    assert (out[eot] == 0).float().mean() > 0.95  # end-of-text comes back
    assert (out == x).float().mean() > 0.95


def test_mask_reads_the_mask_embedding_not_id0():
    ae = Autoencoder(AutoencoderConfig(vocab_size=12, hidden_size=32, intermediate_size=64,
                                       latent_size=16)).eval()
    x = torch.tensor([[0, 3, 4, 5]])
    known = torch.tensor([[False, True, True, True]])
    with torch.no_grad():
        masked, real0 = ae.encode(x, known)[0], ae.encode(x)[0]
    assert not torch.allclose(masked, real0)  # a masked slot is not end-of-text
    old = Autoencoder(AutoencoderConfig(vocab_size=12, hidden_size=32, intermediate_size=64,
                                        latent_size=16, token_mask="id0")).eval()
    with torch.no_grad():
        assert torch.equal(old.encode(x, known)[0], old.encode(x)[0])  # the reference's id 0
    assert not hasattr(old, "mask_embed")


def test_checkpoints_without_the_field_keep_id0():
    assert autoencoder_fields({"hidden_size": 8})["token_mask"] == "id0"
    assert autoencoder_fields({"token_mask": "learned"})["token_mask"] == "learned"


def test_generation_stops_on_a_decoded_end_of_text():
    ae = _train_tiny_ae("learned")
    cfg = CALMConfig(backbone=preset("transformer", "tiny", vocab_size=12), head=HeadConfig(),
                     chunk_size=4, latent_size=16)
    model = CALM(cfg, ae).eval()
    chunk = torch.tensor([[5, 0, 7, 7]])  # end-of-text in the second slot
    z = ae.encode(chunk)[0]

    def chooser(h):
        return ae.decode_tokens(z).expand(h.shape[0], 4), z.expand(h.shape[0], -1)

    out = generate(model, [[3, 4, 5]], max_new_tokens=40, eot_id=0, chooser=chooser,
                   precision="fp32")
    assert out.steps == 1 and out.tokens == [[5, 0]]


def _fed_and_trained(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents the continuous input reads in training and in teacher-forced generation."""
    K = model.config.chunk_size
    tokens = torch.randint(1, model.config.backbone.vocab_size, (1, 6 * K),
                           generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    inputs = model.inputs

    def record(chunks, latents=None, known=None):
        seen.append(latents.detach().clone())
        return inputs(chunks, latents, known)

    model.inputs = record
    with torch.no_grad():
        model(tokens, generator=torch.Generator().manual_seed(0))  # eval mode: no partial chunk
    trained = seen.pop()  # (1, C−1, l)
    chunks = tokens.view(1, -1, K)
    step = iter(range(2, chunks.shape[1]))

    def teacher(h):
        return chunks[:, next(step)], torch.zeros(1, model.config.latent_size)  # z is not fed back

    generate(model, [tokens[0, :2 * K].tolist()], max_new_tokens=3 * K, chooser=teacher,
             precision="fp32")
    fed = torch.cat(seen, dim=1)  # prompt chunks 0..1, then chunks 2..3
    return fed, trained[:, : fed.shape[1]]


@pytest.mark.parametrize("scheme", ["continuous", "both"])
def test_teacher_forced_inference_reads_what_training_read(make_calm, scheme):
    fed, trained = _fed_and_trained(make_calm(scheme, random_head=True))
    assert fed.shape[1] == 4  # the last chosen chunk is not fed: generation ends
    assert torch.allclose(fed, trained, atol=1e-6)
