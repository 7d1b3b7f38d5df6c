"""Flow-matching and diffusion heads (SPEC §2 "Alternative heads"): the samplers against
closed-form references (ODE order, oracle velocity / noise for Gaussian data), the cosine
schedule against its formula, the losses against a literal N-fold replication, shapes,
determinism, checkpoints, and every head fitting a known conditional 2-D mixture."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from calm.config import HeadConfig
from calm.errors import CalmError
from calm.heads import HEADS, DiffusionHead, FlowHead, GenerativeHead, build_head
from calm.heads.diffusion import cosine_alpha_bar, ddpm_sample, respace
from calm.heads.flow import integrate, time_shift


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and thread hand-offs dominate on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(head: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter, the zero-initialised layers included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _small(kind: str, **kw) -> GenerativeHead:
    cfg = HeadConfig(kind=kind, width=32, num_blocks=2, num_samples=3, **kw)
    return build_head(cfg, 16, 4, 8)


# ----------------------------------------------------------------------------- ODE solver


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2)])
def test_integrate_order_on_linear_ode(solver, order):
    # dx/dt = a·x, x(0) = x0  →  x(1) = x0·e^a; halving the step divides the error by 2^order.
    a = -1.3
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(a)
    errs = [
        (integrate(lambda x, t: a * x, x0, n, solver) - exact).abs().max().item()
        for n in (8, 16, 32, 64)
    ]
    for coarse, fine in itertools.pairwise(errs):
        assert coarse / fine == pytest.approx(2**order, rel=0.1)


def test_integrate_time_dependent_and_interval():
    # dx/dt = 2t on [0.5, 2]: midpoint is exact for a velocity linear in t, Euler is not.
    x0 = torch.zeros(1, dtype=torch.float64)
    exact = 2.0**2 - 0.5**2
    mid = integrate(lambda x, t: torch.full_like(x, 2 * t), x0, 3, "midpoint", t0=0.5, t1=2.0)
    eul = integrate(lambda x, t: torch.full_like(x, 2 * t), x0, 3, "euler", t0=0.5, t1=2.0)
    assert mid.item() == pytest.approx(exact, abs=1e-12)
    # Euler with left end points: Σ 2·t_i·Δt, t_i = 0.5, 1.0, 1.5, Δt = 0.5
    assert eul.item() == pytest.approx(2 * (0.5 + 1.0 + 1.5) * 0.5, abs=1e-12)
    with pytest.raises(CalmError):
        integrate(lambda x, t: x, x0, 0, "euler")
    with pytest.raises(CalmError):
        integrate(lambda x, t: x, x0, 2, "rk4")


def test_time_shift_map_and_shifted_steps():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(time_shift(u, 1.0), u)
    t = time_shift(u, 3.0)
    assert t[0] == 0 and t[-1] == 1 and (t[1:] > t[:-1]).all()
    assert t[5].item() == pytest.approx(0.5 / (3 - 2 * 0.5))  # u = 1/2 → t = 1/4
    # dx/dt = 2t on [0, 1]: the midpoint rule is exact on any grid; Euler with left end
    # points on the shifted grid t_i = (i/3) / (3 − 2·i/3) = i / (9 − 2i): 0, 1/7, 2/5, 1.
    x0 = torch.zeros(1, dtype=torch.float64)
    mid = integrate(lambda x, t: torch.full_like(x, 2 * t), x0, 3, "midpoint", shift=3.0)
    assert mid.item() == pytest.approx(1.0, abs=1e-12)
    grid = [0.0, 1 / 7, 2 / 5, 1.0]
    assert [time_shift(i / 3, 3.0) for i in range(4)] == pytest.approx(grid)
    eul = integrate(lambda x, t: torch.full_like(x, 2 * t), x0, 3, "euler", shift=3.0)
    want = sum(2 * grid[i] * (grid[i + 1] - grid[i]) for i in range(3))
    assert eul.item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(CalmError):
        FlowHead(8, 2, time_shift=0.0)


def test_flow_ode_with_exact_velocity_reaches_target():
    # y ~ N(μ, s²) per dimension: x_t = (1−t)x0 + t·y is Gaussian with mean tμ and variance
    # V = (1−t)² + t²s², and E[y − x0 | x_t] = μ + (t·s² − (1 − t))/V · (x_t − tμ).
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    s = torch.tensor([0.5, 0.2], dtype=torch.float64)

    def v(x, t):
        return mu + (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2) * (x - t * mu)

    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for shift in (1.0, 3.0):
        z = integrate(v, x0, 10, "midpoint", shift=shift)
        torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
        torch.testing.assert_close(z.std(0), s, atol=0, rtol=0.03)
    # The same velocity run backwards in time (t: 1 → 0) lands on N(0, I), not the target.
    zb = integrate(v, x0, 10, "midpoint", t0=1.0, t1=0.0)
    assert (zb.mean(0) - mu).abs().min() > 0.3


# ----------------------------------------------------------------------------- diffusion schedule


def test_cosine_schedule_formula_and_end_points():
    T, s = 1000, 0.008
    ab = cosine_alpha_bar(T)
    assert ab.shape == (T,) and ab.dtype == torch.float64
    assert (ab[1:] < ab[:-1]).all()  # strictly decreasing
    assert 1 - 1e-4 < ab[0] < 1  # ᾱ_0 = 1 − β_0 ≈ 0.99996: almost clean
    assert ab[-1] < 1e-8  # ᾱ_{T−1} ≈ 2.4e-9: pure noise

    # Unclipped region: ᾱ_i = f((i+1)/T)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2), by hand.
    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    for i in (0, 1, 99, 499, 899, 989):
        assert ab[i].item() == pytest.approx(f((i + 1) / T) / f(0), rel=1e-9)
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    assert betas.max().item() == pytest.approx(0.999, abs=1e-12)  # only the last step is clipped
    assert (betas[:-1] < 0.999).all()


def test_respace_keeps_alpha_bar_at_kept_steps():
    ab = cosine_alpha_bar(1000)
    ts, betas = respace(ab, 1000)  # no respacing: the original chain
    assert torch.equal(ts, torch.arange(1000))
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), ab, rtol=1e-12, atol=0)
    ts, betas = respace(ab, 100)
    assert ts.shape == (100,) and ts[0] == 0 and ts[-1] == 999 and (ts.diff() > 0).all()
    assert ts[1] == 10  # stride (T − 1)/(steps − 1) ≈ 10.09, rounded
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), ab[ts], rtol=1e-10, atol=0)
    assert respace(ab, 1)[0].tolist() == [999]
    with pytest.raises(CalmError):
        respace(ab, 1001)
    with pytest.raises(CalmError):
        respace(ab, 0)


@pytest.mark.parametrize("steps, rtol", [(1000, 0.03), (100, 0.08)])
def test_ddpm_with_exact_noise_reaches_target(steps, rtol):
    # y ~ N(μ, s²): x_i = √ᾱ y + √(1−ᾱ) ε gives E[ε | x_i] = √(1−ᾱ)(x_i − √ᾱ μ)/(ᾱ s² + 1 − ᾱ).
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    s = torch.tensor([0.5, 0.2], dtype=torch.float64)
    _, betas = respace(cosine_alpha_bar(1000), steps)
    abk = torch.cumprod(1 - betas, 0)

    def eps_fn(x, k):
        a = abk[k]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, 2, generator=g, dtype=torch.float64)
    z = ddpm_sample(eps_fn, x, betas, generator=g)
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), s, atol=0, rtol=rtol)
    # Clamping x̂_0 far outside the data changes nothing.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, 2, generator=g, dtype=torch.float64)
    zc = ddpm_sample(eps_fn, x, betas, clip_denoised=10.0, generator=g)
    torch.testing.assert_close(zc, z)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_loss_matches_literal_replication(shift):
    head = _small("flow", flow_time_shift=shift)
    _randomise(head)
    h, mean, log_std = torch.randn(2, 5, 16), torch.randn(2, 5, 4), torch.randn(2, 5, 4) * 0.3
    loss, metrics = head.loss(h, mean, log_std, generator=torch.Generator().manual_seed(3))
    # Same draws in the documented order: t (..., N), x0 (..., N, l), posterior noise.
    g, N = torch.Generator().manual_seed(3), head.num_samples
    u = torch.rand(2, 5, N, generator=g)
    t = u / (shift - (shift - 1) * u)
    x0 = torch.randn(2, 5, N, 4, generator=g)
    y = mean[:, :, None] + log_std[:, :, None].exp() * torch.randn(2, 5, N, 4, generator=g)
    xt = (1 - t[..., None]) * x0 + t[..., None] * y
    # The network run on N explicit copies of h, one position and replica at a time.
    want = torch.stack(
        [
            (head(xt[b, p, r][None, None], t[b, p, r], h[b, p][None]).squeeze() - (y - x0)[b, p, r])
            .pow(2)
            .mean()
            for b in range(2)
            for p in range(5)
            for r in range(N)
        ]
    ).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"flow/loss"}
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in head.parameters())


def test_diffusion_loss_matches_literal_replication():
    head = _small("diffusion")
    _randomise(head)
    h, mean, log_std = torch.randn(3, 16), torch.randn(3, 4), torch.randn(3, 4) * 0.3
    loss, metrics = head.loss(h, mean, log_std, generator=torch.Generator().manual_seed(4))
    g, N, T, s = torch.Generator().manual_seed(4), head.num_samples, 1000, 0.008
    i = torch.randint(0, T, (3, N), generator=g)
    eps = torch.randn(3, N, 4, generator=g)
    y = mean[:, None] + log_std[:, None].exp() * torch.randn(3, N, 4, generator=g)
    total = 0.0
    for b in range(3):
        for r in range(N):
            # ᾱ_i from the closed form (i < 990: no clipping)
            u = (i[b, r].item() + 1) / T
            a = (
                math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
                / math.cos(s / (1 + s) * math.pi / 2) ** 2
            )
            xt = math.sqrt(a) * y[b, r] + math.sqrt(1 - a) * eps[b, r]
            pred = head(xt[None, None], i[b, r].item() / T, h[b][None]).squeeze()
            total += (pred - eps[b, r]).pow(2).mean()
    assert (i < 990).all()
    torch.testing.assert_close(loss, total / (3 * N), rtol=1e-4, atol=1e-6)
    assert set(metrics) == {"diffusion/loss"}


def test_loss_rejects_mismatched_targets():
    for kind in ("flow", "diffusion"):
        head = _small(kind)
        with pytest.raises(ValueError):
            head.loss(torch.randn(2, 16), torch.randn(2, 5), torch.randn(2, 5))


# ----------------------------------------------------------------------------- heads


def test_registry_config_and_errors():
    assert {"energy", "flow", "diffusion"} <= set(HEADS)
    flow = build_head(HeadConfig(kind="flow", flow_steps=3, flow_solver="euler"), 24, 6, 12)
    assert isinstance(flow, FlowHead) and flow.width == 24 and len(flow.net.blocks) == 3
    assert (flow.steps, flow.solver, flow.sampling_steps) == (3, "euler", 3)
    mid = build_head(HeadConfig(kind="flow", flow_steps=3, num_blocks=2, width=8), 24, 6, 12)
    assert mid.sampling_steps == 6 and mid.width == 8 and len(mid.net.blocks) == 2
    diff = build_head(HeadConfig(kind="diffusion", diffusion_steps=50), 24, 6, 4)
    assert isinstance(diff, DiffusionHead) and diff.sampling_steps == 50
    assert len(diff.net.blocks) == 1  # max(1, 4 // 4)
    with pytest.raises(CalmError):
        build_head(HeadConfig(kind="flow", flow_solver="rk4"), 24, 6, 12)
    with pytest.raises(CalmError):
        build_head(HeadConfig(kind="flow", flow_steps=0), 24, 6, 12)
    with pytest.raises(CalmError):
        build_head(HeadConfig(kind="diffusion", diffusion_steps=1001), 24, 6, 12)
    with pytest.raises(CalmError):
        build_head(HeadConfig(kind="diffusion", num_samples=0), 24, 6, 12)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_shapes_determinism_and_zero_init(kind):
    head = _small(kind, flow_steps=2, diffusion_steps=5)
    h = torch.randn(2, 3, 16)
    # Zero-initialised output: the untrained network predicts exactly 0.
    assert torch.equal(head(torch.randn(2, 3, 7, 4), 0.3, h), torch.zeros(2, 3, 7, 4))
    _randomise(head)
    z = head.sample(h, generator=torch.Generator().manual_seed(0))
    zs = head.sample_n(h, 7, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 3, 4) and zs.shape == (2, 3, 7, 4)
    again = head.sample_n(h, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(zs, again)
    other = head.sample_n(h, 7, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(zs, other)
    # The network of one row does not depend on the other rows of the batch.
    v1 = head(zs[:1, :1], 0.4, h[:1, :1])
    torch.testing.assert_close(v1, head(zs, 0.4, h)[:1, :1], rtol=1e-4, atol=1e-4)


def test_untrained_flow_head_samples_the_prior():
    head = FlowHead(8, 2, width=16, num_blocks=1, steps=4)
    h = torch.randn(3, 8)
    z = head.sample_n(h, 4000, generator=torch.Generator().manual_seed(0))  # (3, 4000, 2)
    # v = 0 everywhere, so the ODE leaves x_0 where it is: exactly the prior draws.
    x0 = torch.randn(3, 4000, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, x0)
    z = z.reshape(-1, 2)
    assert z.mean(0).abs().max() < 0.05
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    "kind, solver", [("flow", "euler"), ("flow", "midpoint"), ("diffusion", None)]
)
def test_flops_and_sampling_steps(kind, solver):
    kw = {"flow_solver": solver, "flow_steps": 3} if solver else {"diffusion_steps": 7}
    head = _small(kind, **kw)
    # FLOPs of one evaluation for one row, counted by torch's own flop counter.
    with FlopCounterMode(display=False) as counter:
        head(torch.randn(1, 1, 4), torch.tensor(0.5), torch.randn(1, 16))
    assert head.flops_per_sample() == counter.get_total_flops()
    # Network evaluations per sample, counted.
    calls = []
    head.net.register_forward_hook(lambda *_: calls.append(1))
    head.sample_n(torch.randn(2, 16), 5)
    assert len(calls) == head.sampling_steps == {"euler": 3, "midpoint": 6, None: 7}[solver]


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_checkpoint_round_trip(kind, tmp_path):
    head = _small(kind, flow_steps=3, diffusion_steps=10)
    _randomise(head, seed=1)
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), str(path))
    # The diffusion schedule is not a weight: a head with other sampling steps loads the file.
    other = _small(kind, flow_steps=3, diffusion_steps=20)
    other.load_state_dict(load_file(str(path)))
    other.steps = head.steps  # sampling steps are a plain attribute, changeable at will
    h = torch.randn(4, 16)
    a = head.sample_n(h, 3, generator=torch.Generator().manual_seed(5))
    b = other.sample_n(h, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_cuda(kind):
    head = _small(kind, diffusion_steps=10).cuda()
    _randomise(head)
    h = torch.randn(2, 3, 16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    loss, _ = head.loss(
        h, torch.randn(2, 3, 4, device="cuda"), torch.zeros(2, 3, 4, device="cuda"), generator=g
    )
    loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = head.sample_n(h, 5, generator=g)
    assert z.shape == (2, 3, 5, 4) and z.device.type == "cuda" and z.isfinite().all()


# ----------------------------------------------------------------------------- toy fit

CENTRES = torch.tensor([[2.0, 0.0], [-2.0, 1.5], [-2.0, -1.5]])
SIGMA = 0.3


def _toy_batch(n: int, g: torch.Generator):
    """Condition 0 → N((2, 0), 0.3²I); condition 1 → 0.7·N((−2, 1.5), 0.3²I) + 0.3·N((−2, −1.5), 0.3²I).

    h is the one-hot condition (d = 3); the target posterior handed to the head is the
    drawn component, so the head must learn the mixture over components by itself.
    """
    cond = torch.randint(0, 2, (n,), generator=g)
    up = torch.rand(n, generator=g) < 0.7
    comp = torch.where(cond == 0, 0, torch.where(up, 1, 2))
    return torch.eye(3)[cond], CENTRES[comp], torch.full((n, 2), math.log(SIGMA))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["energy", "flow", "diffusion"])
def test_head_learns_conditional_mixture(kind):
    torch.manual_seed(0)
    cfg = HeadConfig(
        kind=kind,
        width=64,
        num_blocks=2,
        num_samples=4,
        noise_size=8,
        num_targets=16,
        flow_steps=8,
        diffusion_steps=100,
    )
    head = build_head(cfg, 3, 2, 8)
    steps = 800
    opt = torch.optim.Adam(head.parameters(), lr=4e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss, _ = head.loss(*_toy_batch(128, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        z = head.sample_n(torch.eye(3)[:2], 2000, generator=g)  # (2, 2000, 2)

    # Condition 0: one Gaussian.
    m0, c0 = CENTRES[0], SIGMA**2 * torch.eye(2)
    # Condition 1: the mixture's mean and covariance, by hand.
    w = torch.tensor([0.7, 0.3])
    m1 = w @ CENTRES[1:]
    d = CENTRES[1:] - m1
    c1 = SIGMA**2 * torch.eye(2) + (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    for zc, m, c in ((z[0], m0, c0), (z[1], m1, c1)):
        torch.testing.assert_close(zc.mean(0), m, atol=0.15, rtol=0)
        assert ((torch.cov(zc.T) - c).abs() <= 0.05 + 0.2 * c.abs()).all(), torch.cov(zc.T)
    # Mode weights and no mass between the modes (P(‖N(0, 0.3²I)‖ < 1) ≈ 0.996).
    dist = torch.cdist(z[1], CENTRES[1:])  # (2000, 2)
    assert (dist.argmin(1) == 0).float().mean().item() == pytest.approx(0.7, abs=0.07)
    assert (dist.min(1).values < 1).float().mean() > 0.85
    assert (torch.cdist(z[0], CENTRES[:1]) < 1).float().mean() > 0.85
