"""Energy head and energy loss (SPEC §2): shapes, the spec's forward, the loss against
a direct double loop, gradient safety at coincident samples, and a toy fit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads import EnergyHead, GenerativeHead, build_head, energy_loss, energy_terms


def _randomise(head: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (the zero-initialised output layer included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _loop_energy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Direct double loops of SPEC §2 with explicit differences: x (P, N, l), y (P, M, l) → (P,)."""
    out = []
    for p in range(x.shape[0]):
        xs, ys = x[p], y[p]
        n, m = len(xs), len(ys)
        fid = sum(torch.linalg.norm(xs[i] - ys[j]) ** alpha for i in range(n) for j in range(m))
        div = sum(
            torch.linalg.norm(xs[i] - xs[k]) ** alpha
            for i, k in itertools.product(range(n), repeat=2)
            if i != k
        )
        out.append(2 * fid / (n * m) - div / (n * (n - 1)))
    return torch.stack(out)


def _spec_forward(head: EnergyHead, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SPEC §2 literally: the head run on N copies of h, Linear(2w → w) on the concatenation."""
    hn = h.unsqueeze(-2).expand(*u.shape[:-1], h.shape[-1])  # (..., N, d)
    c = head.cond_norm(head.cond_proj(hn))
    n = head.noise_norm(head.noise_proj(u))
    for b in head.blocks:
        a = b.fuse(torch.cat([b.norm(n), c], dim=-1))
        a = F.silu(b.mid(F.silu(a)))
        gate, up = b.gate_up(a).chunk(2, dim=-1)
        n = n + b.out(F.silu(gate) * up)
    return head.final_out(F.silu(head.final_hidden(head.final_norm(n))))


def test_shapes_and_zero_init():
    head = EnergyHead(16, 4, noise_size=8, width=32, num_blocks=2, num_samples=3, num_targets=5)
    assert isinstance(head, GenerativeHead)
    h = torch.randn(2, 3, 16)
    g = torch.Generator().manual_seed(0)
    z = head.sample(h, generator=g)
    zs = head.sample_n(h, 7, generator=g)
    assert z.shape == (2, 3, 4) and zs.shape == (2, 3, 7, 4)
    # the output layer starts at zero, so every sample is exactly 0
    assert torch.equal(z, torch.zeros_like(z)) and torch.equal(zs, torch.zeros_like(zs))
    loss, metrics = head.loss(h, torch.randn(2, 3, 4), torch.zeros(2, 3, 4), generator=g)
    assert loss.shape == ()
    assert set(metrics) == {"energy/loss", "energy/fidelity", "energy/diversity"}
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    assert metrics["energy/diversity"] == 0  # all samples coincide at init


def test_forward_matches_spec_concat_on_copies():
    torch.manual_seed(0)
    head = EnergyHead(12, 5, noise_size=6, width=20, num_blocks=3).double()
    _randomise(head)
    h = torch.randn(2, 3, 12, dtype=torch.float64)
    u = torch.rand(2, 3, 4, 6, dtype=torch.float64) - 0.5
    out = head(h, u)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, _spec_forward(head, h, u), rtol=1e-12, atol=1e-12)


def test_sampling_is_reproducible_with_a_generator():
    head = EnergyHead(8, 3, noise_size=4, width=16)
    _randomise(head)
    h = torch.randn(5, 8)
    a = head.sample_n(h, 4, generator=torch.Generator().manual_seed(1))
    b = head.sample_n(h, 4, generator=torch.Generator().manual_seed(1))
    c = head.sample_n(h, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    u = torch.rand((5, 4, 4), generator=torch.Generator().manual_seed(1)) - 0.5
    assert torch.equal(a, head(h, u))  # noise is Uniform[-0.5, 0.5] drawn with the generator
    assert torch.all(a[:, 0] != a[:, 1])  # fresh noise per sample


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_energy_loss_matches_double_loop(alpha):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) + 2.0).requires_grad_()
    y = torch.randn(3, 6, 5, generator=g, dtype=torch.float64).requires_grad_()
    got = energy_loss(x, y, alpha)
    want = _loop_energy(x, y, alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w = torch.randn(3, generator=g, dtype=torch.float64)  # a weighted sum tests each row's gradient
    gx, gy = torch.autograd.grad((got * w).sum(), (x, y))
    wx, wy = torch.autograd.grad((want * w).sum(), (x, y))
    torch.testing.assert_close(gx, wx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gy, wy, rtol=1e-8, atol=1e-10)
    # the two terms separately, with leading dims kept
    fid, div = energy_terms(x.view(3, 1, 4, 5), y.view(3, 1, 6, 5), alpha)
    assert fid.shape == (3, 1)
    d_xy = torch.linalg.norm(x[:, :, None] - y[:, None], dim=-1) ** alpha  # (3, 4, 6)
    torch.testing.assert_close(fid.view(3), d_xy.mean((1, 2)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(2 * fid - div, got.view(3, 1).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_energy_loss_gradient_through_head_params(alpha):
    head = EnergyHead(6, 3, noise_size=4, width=10, num_blocks=2).double()
    _randomise(head, seed=4)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, generator=g, dtype=torch.float64)
    u = torch.rand(2, 4, 4, generator=g, dtype=torch.float64) - 0.5
    y = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    params = list(head.parameters())
    got = torch.autograd.grad(energy_loss(head(h, u), y, alpha).mean(), params)
    want = torch.autograd.grad(_loop_energy(head(h, u), y, alpha).mean(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_matmul_form_is_accurate_in_float32_far_from_origin():
    # nearly collapsed samples far from the origin: the naive expansion would lose
    # every digit of ‖x_n − x_k‖² here; centring keeps it accurate
    g = torch.Generator().manual_seed(6)
    x = 100.0 + 1e-2 * torch.randn(4, 8, 16, generator=g, dtype=torch.float64)
    y = 100.0 + 1e-2 * torch.randn(4, 10, 16, generator=g, dtype=torch.float64)
    fid, div = energy_terms(x.float(), y.float(), 1.0)
    d_xx = torch.linalg.norm(x[:, :, None] - x[:, None], dim=-1)  # direct, float64
    d_xy = torch.linalg.norm(x[:, :, None] - y[:, None], dim=-1)
    torch.testing.assert_close(fid.double(), d_xy.mean((1, 2)), rtol=1e-3, atol=0)
    torch.testing.assert_close(div.double(), d_xx.sum((1, 2)) / 56, rtol=1e-3, atol=0)


def test_loss_is_invariant_to_permuting_samples_and_targets():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, 8, generator=g)
    y = torch.randn(5, 9, 8, generator=g)
    base = energy_loss(x, y, 1.0)
    px = x[:, torch.randperm(6, generator=g)]
    py = y[:, torch.randperm(9, generator=g)]
    torch.testing.assert_close(energy_loss(px, py, 1.0), base, rtol=1e-5, atol=1e-6)
    # ...but not to mixing positions
    assert not torch.allclose(energy_loss(x, y[torch.tensor([1, 0, 2, 3, 4])], 1.0), base)


def test_no_nan_gradient_when_samples_coincide():
    # two samples exactly equal, and all samples equal
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 5, generator=g)
    x[:, 1] = x[:, 0]
    for xs in (x, x[:, :1].expand(3, 4, 5).clone()):
        for alpha in (1.0, 1.5):
            xs = xs.clone().requires_grad_()
            (gx,) = torch.autograd.grad(energy_loss(xs, torch.randn(3, 6, 5), alpha).sum(), xs)
            assert torch.isfinite(gx).all()
    # the zero-initialised head: all N samples are exactly 0 at the first step
    head = EnergyHead(8, 4, noise_size=4, width=16, num_samples=4, num_targets=6)
    loss, _ = head.loss(torch.randn(2, 3, 8), torch.randn(2, 3, 4), torch.zeros(2, 3, 4))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert head.final_out.weight.grad.abs().sum() > 0  # and the output layer does learn


def test_head_loss_wiring_matches_manual_draws():
    head = EnergyHead(8, 3, noise_size=4, width=16, num_samples=4, num_targets=11, alpha=1.5)
    _randomise(head, seed=9)
    h = torch.randn(2, 5, 8)
    mean, log_std = torch.randn(2, 5, 3), 0.5 * torch.randn(2, 5, 3)
    loss, metrics = head.loss(h, mean, log_std, generator=torch.Generator().manual_seed(10))
    # the same draws by hand: N noise vectors, then M targets y = mean + exp(log_std)·ε
    g = torch.Generator().manual_seed(10)
    x = head(h, torch.rand((2, 5, 4, 4), generator=g) - 0.5)
    y = mean[:, :, None] + log_std.exp()[:, :, None] * torch.randn((2, 5, 11, 3), generator=g)
    fid, div = energy_terms(x, y, 1.5)
    torch.testing.assert_close(loss, (2 * fid - div).mean())
    torch.testing.assert_close(metrics["energy/fidelity"], fid.mean())
    torch.testing.assert_close(metrics["energy/diversity"], div.mean())
    torch.testing.assert_close(metrics["energy/loss"], loss.detach())


def test_toy_conditional_fit():
    # condition h is one of two one-hot vectors; the target per condition is a fixed
    # diagonal Gaussian. A loss without its diversity term collapses the std to ~0.
    torch.manual_seed(0)
    means = torch.tensor([[1.0, -1.0], [-0.5, 0.8]])
    stds = torch.tensor([[0.5, 0.2], [0.3, 0.6]])
    head = EnergyHead(2, 2, noise_size=8, width=64, num_blocks=1, num_samples=8, num_targets=32)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    cond = torch.arange(64) % 2  # (P,)
    h = F.one_hot(cond, 2).float()  # (P, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
    try:
        for _ in range(300):
            loss, _ = head.loss(h, means[cond], stds[cond].log(), generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        z = head.sample_n(torch.eye(2), 4000, generator=g)  # (2, 4000, 2)
    assert (z.mean(1) - means).abs().max() < 0.15
    ratio = z.std(1) / stds
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio


def test_build_head_defaults_and_errors():
    head = build_head(HeadConfig(), hidden_size=32, latent_size=8, num_backbone_layers=12)
    assert isinstance(head, EnergyHead)
    assert head.width == 32 and len(head.blocks) == 3 and head.noise_size == 64
    assert head.num_samples == 8 and head.num_targets == 100 and head.alpha == 1.0
    assert len(build_head(HeadConfig(), 32, 8, 2).blocks) == 1  # max(1, 2 // 4)
    cfg = HeadConfig(width=24, num_blocks=2, noise_size=16, num_samples=4, alpha=1.5)
    head = build_head(cfg, 32, 8, 12)
    assert head.width == 24 and len(head.blocks) == 2
    assert head.blocks[0].fuse.weight.shape == (24, 48)
    assert head.final_out.weight.shape == (8, 24) and head.cond_proj.weight.shape == (24, 32)
    with pytest.raises(CalmError, match="energy"):
        build_head(HeadConfig(kind="nope"), 32, 8, 12)
    for bad in (HeadConfig(num_samples=1), HeadConfig(alpha=0.0), HeadConfig(alpha=2.5)):
        with pytest.raises(CalmError):
            build_head(bad, 32, 8, 12)


def test_flops_per_sample_counts_every_linear_once():
    head = EnergyHead(24, 8, noise_size=16, width=40, num_blocks=3)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert head.flops_per_sample() == 2 * sum(m.weight.numel() for m in linears)
    assert head.sampling_steps == 1


def test_final_init_decides_whether_the_first_step_reaches_the_condition_path():
    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    mean, log_std = torch.randn(5, 3), torch.full((5, 3), -1.0)
    grads = {}
    for init in ("zero", "default"):
        torch.manual_seed(0)
        head = EnergyHead(8, 3, noise_size=4, width=16, final_init=init)
        loss, _ = head.loss(h, mean, log_std, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads[init] = head.cond_proj.weight.grad.abs().max().item()
    assert grads["zero"] == 0.0  # the reference's zero last layer: nothing reaches below it
    assert grads["default"] > 0.0


def test_final_init_is_validated():
    with pytest.raises(CalmError, match="final_init"):
        EnergyHead(8, 3, final_init="ones")
