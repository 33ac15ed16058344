"""Gaussian mixtures with exact denoisers and scores (gdistill.data.toy_mixtures).

The denoiser and score are checked against quantities computed independently here: an
explicitly written noised mixture density differentiated by autograd, a one-component closed
form, and a self-normalised Monte-Carlo posterior mean."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdistill.data.toy_mixtures import (TOY_MIXTURES, GaussianMixture, chi_coverage, grid25,
                                        make_mixture, random_mixture, ring8, weighted_ring)
from gdistill.metrics.toy import mode_tv, near_mode_fraction
from gdistill.schedules import EDMSchedule, TrigFlowSchedule, VESchedule, VPSchedule

F64 = torch.float64


def random_gm(seed, K, d, diagonal):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, d, dtype=F64, generator=g)
    shape = (K, d) if diagonal else (K,)
    stds = 0.1 + torch.rand(shape, dtype=F64, generator=g)
    weights = 0.2 + torch.rand(K, dtype=F64, generator=g)
    return GaussianMixture(means, stds, weights)


def noised_log_density(x, means, stds, weights, a, sig):
    """log Σ_k w_k N(x; a·μ_k, diag(a²s_k² + σ²)), written out without the class under test.
    x [B, d]; a, sig [B] or scalars; stds [K] or [K, d]."""
    a = torch.as_tensor(a, dtype=F64).reshape(-1, 1, 1)
    sig = torch.as_tensor(sig, dtype=F64).reshape(-1, 1, 1)
    s = stds if stds.ndim == 2 else stds[:, None].expand_as(means)
    var = a ** 2 * s ** 2 + sig ** 2                              # [B or 1, K, d]
    diff = x[:, None, :] - a * means                              # [B, K, d]
    comp = -0.5 * (diff ** 2 / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
    return torch.logsumexp(comp + torch.log(weights / weights.sum()), dim=1)


# --- construction ------------------------------------------------------------------------------
def test_construction_and_validation():
    gm = GaussianMixture([[0.0, 0.0], [1.0, 2.0]], [0.5, 1.0], [1.0, 3.0])
    assert gm.dim == 2 and gm.num_modes == 2 and gm.isotropic
    assert torch.allclose(gm.weights, torch.tensor([0.25, 0.75], dtype=F64))
    assert gm.means.dtype == F64 and gm.stds.dtype == F64
    assert torch.allclose(gm.std_matrix, torch.tensor([[0.5, 0.5], [1.0, 1.0]], dtype=F64))
    assert torch.allclose(gm.mean(), torch.tensor([0.75, 1.5], dtype=F64))
    diag = GaussianMixture([[0.0, 0.0]], [[0.5, 2.0]])
    assert not diag.isotropic and torch.allclose(diag.covariance(), torch.diag(torch.tensor([0.25, 4.0], dtype=F64)))
    with pytest.raises(ValueError, match='stds'):
        GaussianMixture([[0.0, 0.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match='stds'):
        GaussianMixture([[0.0, 0.0]], [0.0])
    with pytest.raises(ValueError, match='weights'):
        GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match='means'):
        GaussianMixture([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r'\[\.\.\., 2\]'):
        gm.log_prob(torch.zeros(4, 3))


# --- densities ------------------------------------------------------------------------------------
def test_log_prob_single_component_closed_form():
    mu = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    s = torch.tensor([[0.3, 1.2, 2.0]], dtype=F64)
    gm = GaussianMixture(mu, s)
    x = torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    want = torch.distributions.Normal(mu[0], s[0]).log_prob(x).sum(-1)
    assert torch.allclose(gm.log_prob(x), want, atol=1e-12)
    sig = 0.7
    want_noised = torch.distributions.Normal(mu[0], (s[0] ** 2 + sig ** 2).sqrt()).log_prob(x).sum(-1)
    assert torch.allclose(gm.log_prob(x, sigma=sig), want_noised, atol=1e-12)


def test_log_prob_integrates_to_one_1d_and_2d():
    gm1 = GaussianMixture([[-2.0], [0.5], [3.0]], [0.3, 0.8, 0.5], [0.2, 0.5, 0.3])
    grid = torch.linspace(-10, 12, 200001, dtype=F64)
    p = gm1.log_prob(grid[:, None]).exp()
    assert abs(float(torch.trapezoid(p, grid)) - 1.0) < 1e-8
    gm2 = random_gm(3, K=3, d=2, diagonal=True)
    g = torch.linspace(-12, 12, 1201, dtype=F64)
    X, Y = torch.meshgrid(g, g, indexing='ij')
    p2 = gm2.log_prob(torch.stack([X, Y], -1)).exp()             # leading dims [1201, 1201]
    assert p2.shape == (1201, 1201)
    mass = torch.trapezoid(torch.trapezoid(p2, g, dim=1), g)
    assert abs(float(mass) - 1.0) < 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 4), d=st.integers(1, 3), diagonal=st.booleans(),
       log_sigma=st.floats(math.log(0.01), math.log(20.0)))
def test_log_prob_noised_matches_independent_density(seed, K, d, diagonal, log_sigma):
    gm = random_gm(seed, K, d, diagonal)
    x = 3 * torch.randn(16, d, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    sig = math.exp(log_sigma)
    want = noised_log_density(x, gm.means, gm.stds, gm.weights, 1.0, sig)
    assert torch.allclose(gm.log_prob(x, sigma=sig), want, rtol=1e-10, atol=1e-10)


# --- EDM denoiser ---------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 4), d=st.integers(1, 3), diagonal=st.booleans(),
       log_sigma=st.floats(math.log(0.01), math.log(50.0)), per_point=st.booleans())
def test_edm_denoise_is_tweedie_of_autograd_score(seed, K, d, diagonal, log_sigma, per_point):
    """D(x; σ) = x + σ²∇log p_σ(x), the gradient taken by autograd of the density written above."""
    gm = random_gm(seed, K, d, diagonal)
    g = torch.Generator().manual_seed(seed + 7)
    B = 12
    sig = math.exp(log_sigma) * (torch.exp(torch.randn(B, dtype=F64, generator=g) * 0.5) if per_point
                                 else torch.ones((), dtype=F64))
    x0 = gm.sample(B, generator=g).to(F64)
    x = (x0 + torch.as_tensor(sig).reshape(-1, 1) * torch.randn(B, d, dtype=F64, generator=g)).requires_grad_(True)
    logp = noised_log_density(x, gm.means, gm.stds, gm.weights, 1.0, sig)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    want = x.detach() + torch.as_tensor(sig).reshape(-1, 1) ** 2 * grad
    got = gm.edm_denoise(x.detach(), sig)
    scale = 1.0 + x.detach().abs().max()
    assert torch.allclose(got, want, atol=1e-9 * scale, rtol=1e-9)
    assert torch.allclose(gm.edm_score(x.detach(), sig), grad, rtol=1e-7, atol=1e-7 * float(grad.abs().max() + 1))


def test_edm_denoise_one_component_closed_form():
    mu = torch.tensor([[1.0, -1.0]], dtype=F64)
    s = torch.tensor([[0.5, 2.0]], dtype=F64)
    gm = GaussianMixture(mu, s)
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 4
    sig = torch.linspace(0.002, 80, 20, dtype=F64)
    want = mu + s ** 2 / (s ** 2 + sig[:, None] ** 2) * (x - mu)
    assert torch.allclose(gm.edm_denoise(x, sig), want, atol=1e-12)


def test_edm_denoise_matches_monte_carlo_posterior_mean():
    """E[x₀|x] ≈ Σ_i x₀ⁱ N(x; x₀ⁱ, σ²) / Σ_i N(x; x₀ⁱ, σ²), x₀ⁱ exact samples (self-normalised IS)."""
    gm = ring8()
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(400_000, generator=g).to(F64)
    sigma = 1.5
    queries = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 2.5], [4.5, -4.5]], dtype=F64)
    logw = -((queries[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma ** 2)   # [4, N]
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    ess = 1.0 / (w ** 2).sum(1)
    assert bool((ess > 2000).all())
    got = gm.edm_denoise(queries, sigma)
    assert torch.allclose(got, mc, atol=0.05), (got, mc)
    # off the symmetry centre the posterior mean is neither the query nor the mixture mean (0)
    assert float((got - queries)[1:].norm(dim=1).min()) > 0.3
    assert float(got[1:].norm(dim=1).min()) > 0.3


def test_edm_denoise_limits():
    gm = ring8()
    g = torch.Generator().manual_seed(2)
    x = gm.sample(200, generator=g).to(F64)                      # points near modes
    d_small = gm.edm_denoise(x, 0.002)
    # D − x = −σ² Σ_k r_k (x − μ_k)/(s_k² + σ²): at most σ²/s² · 4s
    assert float((d_small - x).abs().max()) < 0.002 ** 2 / 0.15 ** 2 * 4 * 0.15 + 1e-12
    big = 1e4
    xb = x + big * torch.randn(200, 2, dtype=F64, generator=g)
    d_big = gm.edm_denoise(xb, big)
    assert torch.allclose(d_big, gm.mean().expand_as(d_big), atol=0.02)
    # per-point σ mixing both regimes
    sig = torch.tensor([0.002, big], dtype=F64)
    both = gm.edm_denoise(torch.stack([x[0], xb[0]]), sig)
    assert torch.allclose(both[0], d_small[0]) and torch.allclose(both[1], d_big[0])


@pytest.mark.parametrize('sigma', [0.002, 0.05, 1.0, 80.0])
@pytest.mark.parametrize('far', [1e2, 1e4, 1e6])
def test_edm_denoise_stable_far_out(sigma, far):
    gm = random_mixture(dim=16, num_modes=8, seed=1, diagonal=True)
    g = torch.Generator().manual_seed(0)
    x = far * torch.randn(32, 16, dtype=F64, generator=g)
    out = gm.edm_denoise(x, sigma)
    assert bool(torch.isfinite(out).all())
    # Tweedie with the autograd score of the independently written density
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(noised_log_density(xr, gm.means, gm.stds, gm.weights, 1.0, sigma).sum(), xr)
    assert torch.allclose(out, x + sigma ** 2 * grad, rtol=1e-9, atol=1e-9 * far)
    if sigma <= 1.0:
        # far from the modes and at low noise one component takes all: its one-component formula
        r = gm.responsibilities(x, sigma)
        k = r.argmax(1)
        var = gm.std_matrix[k] ** 2
        one = gm.means[k] + var / (var + sigma ** 2) * (x - gm.means[k])
        dominated = r.max(1).values > 1 - 1e-12
        assert bool(dominated.all())
        assert torch.allclose(out, one, rtol=1e-9, atol=1e-9)
    assert bool(torch.isfinite(gm.log_prob(x, sigma)).all())
    assert bool(torch.isfinite(gm.edm_score(x, sigma)).all())


def test_dtypes_and_sigma_shapes():
    gm = grid25()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 3
    s = torch.rand(6, generator=torch.Generator().manual_seed(1)) + 0.1
    out32 = gm.edm_denoise(x, s)
    assert out32.dtype == torch.float32
    out64 = gm.edm_denoise(x.double(), s)
    assert out64.dtype == F64
    assert torch.allclose(out32.double(), out64, atol=1e-5)
    assert torch.allclose(gm.edm_denoise(x, s[:, None]), out32)
    loop = torch.stack([gm.edm_denoise(x[i:i + 1], s[i]) [0] for i in range(6)])
    assert torch.allclose(loop, out32)
    # arbitrary leading dims
    xx = x.reshape(2, 3, 2)
    assert torch.allclose(gm.edm_denoise(xx, s.reshape(2, 3)).reshape(6, 2), out32)
    assert torch.allclose(gm.edm_denoise(xx, 0.5).reshape(6, 2), gm.edm_denoise(x, 0.5))


# --- any schedule --------------------------------------------------------------------------------
SCHEDULES = [EDMSchedule(), VPSchedule(), VPSchedule(beta_d=0.0, beta_min=2.0, t_min=1e-3, t_max=3.0),
             VESchedule(), TrigFlowSchedule()]


@pytest.mark.parametrize('schedule', SCHEDULES, ids=lambda s: repr(s)[:30])
@pytest.mark.parametrize('diagonal', [False, True])
def test_score_is_autograd_of_noised_density_any_schedule(schedule, diagonal):
    """score(x_t, t) = ∇ log p_t(x_t), p_t = Σ_k w_k N(a·μ_k, a²s_k² + σ²), via autograd."""
    gm = random_gm(5, K=4, d=2, diagonal=diagonal)
    g = torch.Generator().manual_seed(11)
    B = 40
    # times spread in log-SNR over EDM σ_e ∈ [0.01, 50]
    sig_e = torch.exp(torch.empty(B, dtype=F64).uniform_(math.log(0.01), math.log(50.0), generator=g))
    t = schedule.t_from_edm_sigma(sig_e)
    a, s = schedule.alpha(t), schedule.sigma(t)
    x0 = gm.sample(B, generator=g).to(F64)
    x_t = (a[:, None] * x0 + s[:, None] * torch.randn(B, 2, dtype=F64, generator=g)).requires_grad_(True)
    logp = noised_log_density(x_t, gm.means, gm.stds, gm.weights, a, s)
    (grad,) = torch.autograd.grad(logp.sum(), x_t)
    got = gm.score(x_t.detach(), t, schedule)
    assert got.dtype == F64
    assert torch.allclose(got, grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()))
    # denoise at t equals the EDM denoiser at x_t/a, σ_e
    den = gm.denoise(x_t.detach(), t, schedule)
    assert torch.allclose(den, gm.edm_denoise(x_t.detach() / a[:, None], sig_e), atol=1e-9)
    # float32 in → float32 out, close to the float64 answer
    got32 = gm.score(x_t.detach().float(), t.float(), schedule)
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()))


def test_score_scalar_time():
    gm = ring8()
    sch = VPSchedule()
    x = torch.randn(5, 2, dtype=F64)
    t = 0.3
    vec = gm.score(x, torch.full((5,), t, dtype=F64), sch)
    assert torch.allclose(gm.score(x, t, sch), vec)


# --- sampling ------------------------------------------------------------------------------------
def test_sampling_reproducible_and_shaped():
    gm = random_mixture(dim=16, num_modes=8, seed=3)
    a = gm.sample(500, generator=torch.Generator().manual_seed(4))
    b = gm.sample(500, generator=torch.Generator().manual_seed(4))
    c = gm.sample(500, generator=torch.Generator().manual_seed(5))
    assert a.shape == (500, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    x, comp = gm.sample(500, generator=torch.Generator().manual_seed(4), return_components=True)
    assert torch.equal(x, a) and comp.shape == (500,) and comp.dtype == torch.long
    assert gm.sample(0).shape == (0, 16)


def test_sample_statistics_match_mixture():
    gm = random_gm(9, K=3, d=2, diagonal=True)
    n = 200_000
    x, comp = gm.sample(n, generator=torch.Generator().manual_seed(0), return_components=True)
    x = x.double()
    freq = torch.bincount(comp, minlength=3).double() / n
    se = (gm.weights * (1 - gm.weights) / n).sqrt()
    assert bool(((freq - gm.weights).abs() < 5 * se).all())
    # per-component standardised residuals are N(0, 1)
    z = (x - gm.means[comp]) / gm.std_matrix[comp]
    assert float(z.mean(0).abs().max()) < 0.02
    assert float((z.std(0) - 1).abs().max()) < 0.02
    cov = torch.cov(x.T)
    assert torch.allclose(cov, gm.covariance(), rtol=0.03, atol=0.03)
    assert torch.allclose(x.mean(0), gm.mean(), atol=0.03)


# --- modes -----------------------------------------------------------------------------------------
def test_nearest_and_near_mode():
    gm = GaussianMixture([[0.0, 0.0], [10.0, 0.0]], [[1.0, 0.1], [0.5, 0.5]])
    x = torch.tensor([[2.9, 0.0], [3.1, 0.0], [0.0, 0.29], [0.0, 0.31], [4.9, 0.0],
                      [10.0, 1.49], [10.0, 1.51], [float('nan'), 0.0]], dtype=F64)
    assert gm.nearest_mode(x[:7]).tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert gm.near_mode_mask(x).tolist() == [True, False, True, False, False, True, False, False]
    assert gm.near_mode_mask(x, n_std=4).tolist() == [True, True, True, True, False, True, True, False]
    dist = gm.mode_distances(x[:1])
    assert torch.allclose(dist, torch.tensor([[2.9, math.hypot(7.1 / 0.5, 0.0)]], dtype=F64))


def test_chi_coverage_and_exact_samples():
    assert abs(chi_coverage(2, 3.0) - (1 - math.exp(-4.5))) < 1e-12
    assert abs(chi_coverage(1, 1.0) - math.erf(1 / math.sqrt(2))) < 1e-12
    gm = ring8()
    x = gm.sample(40_000, generator=torch.Generator().manual_seed(0))
    frac = float(gm.near_mode_mask(x).double().mean())
    p = chi_coverage(2, 3.0)
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / 40_000)


# --- named mixtures ------------------------------------------------------------------------------
def test_ring8_and_grid25_geometry():
    r = ring8()
    assert r.num_modes == 8 and r.dim == 2
    assert torch.allclose(r.means.norm(dim=1), torch.full((8,), 4.0, dtype=F64))
    assert torch.allclose(r.stds, torch.full((8,), 0.15, dtype=F64))
    assert torch.allclose(r.weights, torch.full((8,), 1 / 8, dtype=F64))
    nn = torch.cdist(r.means, r.means).fill_diagonal_(float('inf')).min(1).values
    assert torch.allclose(nn, torch.full((8,), 2 * 4 * math.sin(math.pi / 8), dtype=F64))
    g = grid25()
    assert g.num_modes == 25 and torch.allclose(g.mean(), torch.zeros(2, dtype=F64), atol=1e-12)
    assert sorted(set(g.means[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert torch.allclose(g.stds, torch.full((25,), 0.1, dtype=F64))
    assert ring8(radius=2.0, std=0.3).means.norm(dim=1).max() == pytest.approx(2.0)


def test_random_mixture_reproducible_and_spread():
    a = random_mixture(dim=16, num_modes=8, seed=0)
    b = random_mixture(dim=16, num_modes=8, seed=0)
    c = random_mixture(dim=16, num_modes=8, seed=1)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.means, c.means)
    assert a.dim == 16 and a.num_modes == 8 and a.isotropic
    w = a.weights.sort().values
    assert float((w[1:] - w[:-1]).min()) > 1e-3                  # distinct weights
    assert float(w[-1] / w[0]) == pytest.approx(4.0)
    dist = torch.cdist(a.means, a.means).fill_diagonal_(float('inf'))
    assert float(dist.min()) >= 4.0
    assert float(dist.min()) > 6 * float(a.stds.max())           # modes well separated
    d = random_mixture(dim=32, num_modes=12, seed=2, diagonal=True)
    assert d.stds.shape == (12, 32) and not d.isotropic
    with pytest.raises(ValueError, match='min_separation'):
        random_mixture(dim=2, num_modes=8, seed=0, max_tries=20)
    # exact samples are all assigned to their own component by nearest mean
    x, comp = a.sample(2000, generator=torch.Generator().manual_seed(0), return_components=True)
    assert torch.equal(a.nearest_mode(x), comp)


def test_make_mixture_registry():
    assert set(TOY_MIXTURES) >= {'ring8', 'grid25', 'random_mixture'}
    m = make_mixture('ring8', radius=3.0)
    assert torch.allclose(m.means.norm(dim=1), torch.full((8,), 3.0, dtype=F64))
    m2 = make_mixture(dict(name='random_mixture', dim=20, seed=4))
    assert m2.dim == 20 and torch.equal(m2.means, random_mixture(dim=20, seed=4).means)
    assert make_mixture(m) is m
    with pytest.raises(KeyError, match=r"Did you mean 'ring8'.*Known: grid25, random_mixture, ring8"):
        make_mixture('ring9')
    with pytest.raises(KeyError, match='"name"'):
        make_mixture(dict(radius=2.0))


def test_repr_identifies_parameters():
    """Caches (e.g. a fitted network teacher) key on repr: equal mixtures share it, others not."""
    assert repr(ring8()) == repr(make_mixture('ring8'))
    assert repr(ring8()) != repr(ring8(radius=3.0)) and repr(ring8()) != repr(ring8(std=0.2))
    assert repr(random_mixture(seed=0)) != repr(random_mixture(seed=1))
    assert 'num_modes=8' in repr(ring8())


def test_weighted_ring_weights_and_geometry():
    wr = weighted_ring()
    assert torch.equal(wr.means, ring8().means) and torch.equal(wr.stds, ring8().stds)
    q = 4.0 ** (1 / 7)
    want = torch.tensor([q ** r for r in (0, 7, 1, 6, 2, 5, 3, 4)], dtype=torch.float64)
    assert torch.allclose(wr.weights, want / want.sum(), atol=1e-15)
    assert float(wr.weights.max() / wr.weights.min()) == pytest.approx(4.0, abs=1e-12)
    # heavy next to light: every neighbour pair differs by at least the geometric step
    w = wr.weights
    assert all(float(max(w[k], w[(k + 1) % 8]) / min(w[k], w[(k + 1) % 8])) >= q - 1e-12 for k in range(8))
    four = make_mixture(dict(name='weighted_ring', num_modes=4, weight_ratio=9.0))
    assert four.num_modes == 4
    assert torch.allclose(four.weights * (1 + 9 + 9 ** (1 / 3) + 9 ** (2 / 3)),
                          torch.tensor([1.0, 9.0, 9 ** (1 / 3), 9 ** (2 / 3)], dtype=torch.float64))
    # sampling frequencies follow the weights
    _, comp = wr.sample(80000, generator=torch.Generator().manual_seed(0), return_components=True)
    share = torch.bincount(comp, minlength=8).to(torch.float64) / 80000
    assert float((share - wr.weights).abs().max()) < 0.006
    with pytest.raises(ValueError, match='weight_ratio'):
        weighted_ring(weight_ratio=0.5)
    with pytest.raises(ValueError, match='num_modes'):
        weighted_ring(num_modes=1)


def _figure_script(name):
    import importlib.util
    import os.path as osp
    path = osp.join(osp.dirname(__file__), '..', 'docs', 'figures', f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name', ['ring8', 'grid25', 'weighted_ring', 'random_mixture'])
def test_fisher_visibility_weight_shift_has_the_asked_tv(name):
    """The Fisher-visibility figure perturbs the weights by exactly the asked TV, for equal weights
    too (roll(w, 1) − w vanishes there: the shift was 0/0 = NaN on ring8 and grid25)."""
    w = make_mixture(dict(name=name)).weights
    q = _figure_script('cosim_weights').shifted_weights(w, 0.1)
    assert torch.isfinite(q).all() and float(q.min()) >= 0
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-9)
    assert 0.5 * float((q - w).abs().sum()) == pytest.approx(0.1, abs=1e-9)


def test_grid25_capacity_transport_pushes_the_gaussian_onto_grid25():
    """The regression target of docs/figures/grid25_capacity.py is an exact solution: applied to
    each coordinate of N(0, I) it gives grid25's law (equal mode weights, 3-std coverage
    P(χ²₂ ≤ 9) = 0.9889), and it is monotone in each coordinate."""
    transport = _figure_script('grid25_capacity').coordinate_transport()
    z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = transport(z)
    mix = grid25()
    assert near_mode_fraction(x, mix) == pytest.approx(chi_coverage(2), abs=0.002)
    assert mode_tv(x, mix) < 0.01
    line = torch.linspace(-6, 6, 10_001, dtype=torch.float64)
    assert bool((transport(line).diff() >= 0).all())
    # the quantiles of one coordinate: Φ(z) = 0.2·k + 0.1 lands on the k-th mode's centre
    mid = torch.special.ndtri(torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    assert torch.allclose(transport(mid), torch.tensor([-4., -2., 0., 2., 4.], dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize('spec', ['default', 'hi=', 'hi=80,x', '=80,0.5'])
def test_cosim_weights_refuses_a_sampler_spec_it_cannot_read(spec):
    with pytest.raises(SystemExit, match='is not NAME=S0,S1'):
        _figure_script('cosim_weights').main(['no_such_run', '--samplers', spec])
