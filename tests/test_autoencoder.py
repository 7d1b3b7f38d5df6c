import math

import pytest
import torch

from calm.autoencoder import Autoencoder, clipped_kl, health
from calm.checkpoint import read_weights, save_checkpoint
from calm.config import AutoencoderConfig, preset, to_dict
from calm.loading import load_autoencoder


def tiny(**kw) -> AutoencoderConfig:
    return preset("autoencoder", "tiny", vocab_size=50, **kw)


def test_shapes_and_loss():
    torch.manual_seed(0)
    cfg = tiny()
    ae = Autoencoder(cfg)
    x = torch.randint(0, 50, (3, 16))
    mean, log_std = ae.encode(x.reshape(3, 4, 4))
    assert mean.shape == (3, 4, cfg.latent_size) and log_std.shape == mean.shape
    assert ae.decode(mean).shape == (3, 4, 4, 50)
    loss, m = ae(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # At init the decoder is near uniform: CE ≈ log V, and the KL floor is active.
    assert abs(float(m["ce"]) - math.log(50)) < 0.5
    assert loss.item() >= cfg.chunk_size * float(m["ce"])
    loss.backward()
    assert all(p.grad is not None for p in ae.parameters())


def test_kl_clipping_by_hand():
    mean = torch.tensor([[0.0, 1.0, 2.0]])
    log_std = torch.tensor([[0.0, math.log(0.5), math.log(2.0)]])
    # KL_j = ½(μ² + σ² − 1 − 2 log σ)
    kl = [0.0, 0.5 * (1 + 0.25 - 1 - 2 * math.log(0.5)), 0.5 * (4 + 4 - 1 - 2 * math.log(2.0))]
    want = sum(max(0.5, k) for k in kl)
    assert kl[0] < 0.5 < kl[1]  # the floor binds on the first dimension only
    assert clipped_kl(mean, log_std, 0.5).item() == pytest.approx(want, rel=1e-6)
    assert clipped_kl(mean, log_std, 0.0).item() == pytest.approx(sum(kl), rel=1e-6)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    ae = Autoencoder(tiny(dropout=0.5))
    x = torch.randint(1, 50, (2, 32))
    ae.eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    l1, _ = ae(x, generator=g())
    l2, _ = ae(x, generator=g())
    assert torch.equal(l1, l2)
    # With dropout disabled the eval loss is the same: eval mode ignores p.
    ae_nodrop = Autoencoder(tiny(dropout=0.0))
    ae_nodrop.load_state_dict(ae.state_dict())
    ae_nodrop.eval()
    assert torch.allclose(ae_nodrop(x, generator=g())[0], l1)
    ae.train()
    l3, _ = ae(x, generator=g())
    assert not torch.allclose(l3, l1)  # training mode drops tokens and latents


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny()
    ae = Autoencoder(cfg).eval()
    save_checkpoint(tmp_path / "ck", model_state=ae.state_dict(),
                    config={"kind": "autoencoder", "model": to_dict(cfg)})
    ae2, _, _ = load_autoencoder(tmp_path / "ck")
    x = torch.randint(0, 50, (5, 4))
    m1, s1 = ae.encode(x)
    m2, s2 = ae2.encode(x)
    assert torch.equal(m1, m2) and torch.equal(s1, s2)
    assert torch.equal(ae.decode(m1), ae2.decode(m2))
    assert set(read_weights(tmp_path / "ck")) == set(ae.state_dict())


def test_training_learns_to_reconstruct():
    torch.manual_seed(0)
    ae = Autoencoder(tiny(dropout=0.0))
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (8, 32))
    for _ in range(150):
        loss, m = ae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = health(ae, [x], generator=torch.Generator().manual_seed(0))
    assert h["acc_mean"] > 0.95
    assert 0 <= h["collapsed_dims"] <= ae.config.latent_size
    assert [r["noise"] for r in h["robustness"]][0] == 0.0
    # More noise never helps much: the curve ends below where it starts.
    assert h["robustness"][-1]["acc"] <= h["robustness"][0]["acc"]
