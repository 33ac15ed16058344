"""EDM samplers checked against a Gaussian, whose denoiser and PF-ODE solution are exact.

For x₀ ~ N(μ, diag(s²)): D(x; σ) = μ + s²/(s²+σ²)·(x − μ), and along the probability-flow ODE
x(σ) − μ scales as √(s²+σ²). Starting from x(σ_max) = σ_max·z, the ODE reaches
x(σ_min) = μ + (σ_max z − μ)·√(s²+σ_min²)/√(s²+σ_max²); the samplers' last step (σ_min → 0,
no Heun correction) is exactly D(·; σ_min), so the reference final sample is
D(x(σ_min); σ_min) and any difference is the ODE solver's error scaled by s²/(s²+σ_min²).
"""
import math

import numpy as np
import pytest
import torch

from gdistill.registry import SAMPLERS
from gdistill.samplers import EDMHeunSampler, EulerSampler, edm_sigma_steps

MU = torch.tensor([0.7, -1.2], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)



def gaussian_denoiser(mu=MU, s=S):
    def denoise(x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        sig = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        m, v = mu.to(x.device), s.to(x.device) ** 2
        return (m + v / (v + sig ** 2) * (x.to(torch.float64) - m)).to(x.dtype)
    return denoise


def exact_final(z, sigma_min=0.002, sigma_max=80.0, mu=MU, s=S):
    """Exact PF-ODE from σ_max·z down to σ_min, then the samplers' final denoising step."""
    x_min = mu + (sigma_max * z - mu) * torch.sqrt(s ** 2 + sigma_min ** 2) / torch.sqrt(s ** 2 + sigma_max ** 2)
    return mu + s ** 2 / (s ** 2 + sigma_min ** 2) * (x_min - mu)


class CountingDenoiser:
    def __init__(self, fn):
        self.fn, self.calls, self.sigmas = fn, 0, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma, class_labels)


def _moments_check(out, mean_lo, mean_hi, std_expected, std_rel_tol=0.0, k=4.0):
    """Each coordinate's mean within k standard errors of the interval [mean_lo, mean_hi]; its
    std within k standard errors plus a relative allowance ``std_rel_tol`` of std_expected."""
    n = out.shape[0]
    se_mean = std_expected / math.sqrt(n)
    se_std = std_expected / math.sqrt(2 * n)
    mean, std = out.mean(0), out.std(0)
    lo, hi = torch.minimum(mean_lo, mean_hi), torch.maximum(mean_lo, mean_hi)
    dist = torch.clamp(lo - mean, min=0) + torch.clamp(mean - hi, min=0)
    assert torch.all(dist < k * se_mean), (mean, lo, hi, se_mean)
    assert torch.all((std - std_expected).abs() < k * se_std + std_rel_tol * std_expected), \
        (std, std_expected, se_std)


# --------------------------------------------------------------------------- (a) moments
def test_heun_18_steps_recovers_gaussian_moments():
    n = 40_000
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = EDMHeunSampler(num_steps=18)(gaussian_denoiser(), z)
    # Starting at σ_max·z rather than at x₀ + σ_max·n leaves the mean short by μ·s/√(s²+σ_max²)
    # (ODE prior mismatch, ≤ 2.3e-2 here). EDM's N = 18 grid itself inflates the std of a single
    # Gaussian by ≈ 5.5 % (s = 0.5) / 3.4 % (s = 1.5): measured, hence the 7 % allowance.
    mismatch = MU * S / torch.sqrt(S ** 2 + 80.0 ** 2)
    _moments_check(out, MU - 1.07 * mismatch, MU - mismatch, S, std_rel_tol=0.07)
    # With many steps the discretisation bias vanishes and the moments match to MC error.
    out = EDMHeunSampler(num_steps=256)(gaussian_denoiser(), z)
    _moments_check(out, MU - mismatch, MU - mismatch, S, std_rel_tol=0.002)


def test_heun_18_steps_samples_close_to_exact_flow_per_sample():
    z = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = EDMHeunSampler(18)(gaussian_denoiser(), z)
    ref = exact_final(z)
    rel = ((out - MU) / (ref - MU) - 1).abs().max()
    assert rel < 0.07  # measured 5.5 %


def test_stochastic_heun_recovers_gaussian_moments():
    n = 40_000
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 2, dtype=torch.float64, generator=g)
    # EDM's ImageNet-64 churn settings (with S_noise = 1); the std bias is ≈ 2 % at N = 64 and
    # ≤ 0.7 % at N = 128 (measured).
    sampler = EDMHeunSampler(num_steps=128, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0)
    assert sampler.stochastic
    out = sampler(gaussian_denoiser(), z, generator=g)
    # Churn re-noises with the exact score, which also removes part of the prior mismatch: the
    # mean is bracketed by the ODE's (μ − mismatch) and μ.
    mismatch = MU * S / torch.sqrt(S ** 2 + 80.0 ** 2)
    _moments_check(out, MU - mismatch, MU, S, std_rel_tol=0.015)


def test_moment_check_detects_excess_churn_noise():
    """The moment check can fail: churn noise larger than the ODE step removes (S_noise = 2)
    inflates the std far beyond its tolerance."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(20_000, 2, dtype=torch.float64, generator=g)
    out = EDMHeunSampler(64, S_churn=40, S_noise=2.0)(gaussian_denoiser(), z, generator=g)
    assert torch.all(out.std(0) / S > 1.1), out.std(0) / S
    with pytest.raises(AssertionError):
        mismatch = MU * S / torch.sqrt(S ** 2 + 80.0 ** 2)
        _moments_check(out, MU - mismatch, MU, S, std_rel_tol=0.015)


# --------------------------------------------------------------------------- (b) order
def _errors(cls, steps, z):
    ref = exact_final(z)
    return [float((cls(n)(gaussian_denoiser(), z) - ref).abs().max()) for n in steps]


def test_heun_is_second_order_and_euler_first_order():
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    steps = (32, 64, 128, 256)
    heun = _errors(EDMHeunSampler, steps, z)
    euler = _errors(EulerSampler, steps, z)
    heun_ratios = [a / b for a, b in zip(heun, heun[1:])]
    euler_ratios = [a / b for a, b in zip(euler, euler[1:])]
    # measured: Heun 4.28, 4.13, 4.07; Euler 1.99, 1.99, 2.00
    assert all(3.0 < r < 5.0 for r in heun_ratios), heun_ratios
    assert all(1.6 < r < 2.4 for r in euler_ratios), euler_ratios
    assert heun[-1] < 0.1 * euler[-1]  # Heun is far more accurate at equal N
    # The estimated order from a log-log fit.
    h = np.log(1.0 / np.array(steps))
    assert 1.8 < np.polyfit(h, np.log(heun), 1)[0] < 2.2
    assert 0.85 < np.polyfit(h, np.log(euler), 1)[0] < 1.15


def test_one_dimensional_data_and_float32_noise():
    mu, s = torch.tensor([0.3], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    z64 = torch.randn(500, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = exact_final(z64, mu=mu, s=s)
    seen = []

    def den(x, sigma, c=None):
        seen.append((x.dtype, sigma.dtype))
        return gaussian_denoiser(mu, s)(x, sigma, c)

    out = EDMHeunSampler(128)(den, z64.float())
    assert out.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.float32)}  # the network gets noise's dtype
    out64 = EDMHeunSampler(128)(gaussian_denoiser(mu, s), z64)
    assert out64.dtype == torch.float64
    # Heun at N = 128 is within 0.1 % of the exact flow (measured 0.06 % for s = 2) ...
    assert ((out64 - mu) / (ref - mu) - 1).abs().max() < 1e-3
    # ... and a float32 network only adds float32 rounding (the state stays float64).
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (c) NFE
@pytest.mark.parametrize('n', [1, 2, 3, 18, 40])
def test_nfe_counts_denoiser_calls(n):
    z = torch.randn(5, 2, dtype=torch.float64)
    for sampler, expected in ((EDMHeunSampler(n), 2 * n - 1),
                              (EDMHeunSampler(n, S_churn=30, S_min=0.01, S_max=10), 2 * n - 1),
                              (EulerSampler(n), n)):
        den = CountingDenoiser(gaussian_denoiser())
        sampler(den, z, generator=torch.Generator().manual_seed(0))
        assert den.calls == sampler.nfe == expected
        assert f'nfe={expected}' in repr(sampler)


def test_nfe_is_read_only_and_cifar_default_is_35():
    s = EDMHeunSampler()
    assert s.nfe == 35
    with pytest.raises(AttributeError):
        s.nfe = 3
    with pytest.raises(AttributeError):
        s.num_steps = 3


def test_denoiser_is_called_at_the_grid_levels_and_with_labels():
    labels = torch.eye(3)[[0, 2]]
    got = []

    def den(x, sigma, class_labels):
        got.append(class_labels)
        return gaussian_denoiser()(x, sigma, class_labels)

    counted = CountingDenoiser(den)
    EulerSampler(5)(counted, torch.randn(2, 2, dtype=torch.float64), class_labels=labels)
    assert np.allclose(counted.sigmas, edm_sigma_steps(5)[:-1].numpy())
    assert all(c is labels for c in got)


# --------------------------------------------------------------------------- (d) generator
def test_fixed_generator_gives_identical_stochastic_samples():
    sampler = EDMHeunSampler(10, S_churn=20, S_min=0.01, S_max=50)
    z = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    den = gaussian_denoiser()
    a = sampler(den, z, generator=torch.Generator().manual_seed(123))
    b = sampler(den, z, generator=torch.Generator().manual_seed(123))
    c = sampler(den, z, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_generator_isolates_global_rng_and_deterministic_ignores_it():
    z = torch.randn(8, 2, dtype=torch.float64)
    den = gaussian_denoiser()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    EDMHeunSampler(6, S_churn=10)(den, z, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # only the given generator was drawn from
    det = EDMHeunSampler(6)
    assert not det.stochastic
    assert torch.equal(det(den, z, generator=torch.Generator().manual_seed(1)),
                       det(den, z, generator=torch.Generator().manual_seed(2)))
    # churn restricted to [S_min, S_max] outside the grid adds no noise
    assert not EDMHeunSampler(6, S_churn=10, S_min=100, S_max=200).stochastic


def test_stochastic_step_matches_algorithm_2_by_hand():
    """Algorithm 2 written out step by step in numpy, fed the same churn draws (one standard
    normal of the state's shape per churned step, in order, from the generator)."""
    n, churn, s_min, s_max, s_noise = 4, 3.0, 0.01, 30.0, 1.003
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    den = gaussian_denoiser()
    out = EDMHeunSampler(n, S_churn=churn, S_min=s_min, S_max=s_max, S_noise=s_noise)(
        den, z, generator=torch.Generator().manual_seed(8))

    def d(x, sig):
        return den(torch.from_numpy(x), torch.full((x.shape[0],), sig, dtype=torch.float64)).numpy()

    g = torch.Generator().manual_seed(8)
    i = np.arange(n)
    t = list((80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7) + [0.0]
    x = 80.0 * z.numpy()
    for k in range(n):
        gam = min(churn / n, math.sqrt(2) - 1) if s_min <= t[k] <= s_max else 0.0
        th = t[k] * (1 + gam)
        if gam > 0:
            eps = torch.randn(x.shape, generator=g, dtype=torch.float64).numpy()
            x = x + s_noise * math.sqrt(th ** 2 - t[k] ** 2) * eps
        slope = (x - d(x, th)) / th
        euler = x + (t[k + 1] - th) * slope
        if k == n - 1:
            x = euler
        else:
            x = x + (t[k + 1] - th) * (slope + (euler - d(euler, t[k + 1])) / t[k + 1]) / 2
    assert np.allclose(out.numpy(), x, rtol=1e-12, atol=1e-12)


def test_churn_gamma_is_capped_and_restricted():
    s = EDMHeunSampler(10, S_churn=100, S_min=0.05, S_max=50)
    g = s._gammas()
    sig = s.sigmas[:-1]
    inside = (sig >= 0.05) & (sig <= 50)
    assert torch.allclose(g[inside], torch.full_like(g[inside], math.sqrt(2) - 1))
    assert torch.all(g[~inside] == 0)
    s = EDMHeunSampler(10, S_churn=2)
    assert torch.allclose(s._gammas(), torch.full((10,), 0.2, dtype=torch.float64))


# --------------------------------------------------------------------------- (e) grid
@pytest.mark.parametrize('n,smin,smax,rho', [(18, 0.002, 80.0, 7.0), (2, 0.01, 10.0, 3.0),
                                             (7, 0.5, 1.0, 1.0)])
def test_grid_follows_eq5(n, smin, smax, rho):
    sampler = EDMHeunSampler(n, smin, smax, rho)
    sig = sampler.sigmas
    assert sig.dtype == torch.float64 and sig.shape == (n + 1,)
    assert float(sig[0]) == pytest.approx(smax, rel=1e-14)
    assert float(sig[n - 1]) == pytest.approx(smin, rel=1e-12)
    assert float(sig[n]) == 0.0
    i = np.arange(n)
    eq5 = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert np.allclose(sig[:-1].numpy(), eq5, rtol=1e-12, atol=0)
    assert torch.all(sig[1:] < sig[:-1])
    assert torch.equal(EulerSampler(n, smin, smax, rho).sigmas, sig)


def test_single_step_grid_is_sigma_max_then_zero():
    assert EDMHeunSampler(1).sigmas.tolist() == [80.0, 0.0]
    z = torch.randn(4, 2, dtype=torch.float64)
    out = EDMHeunSampler(1)(gaussian_denoiser(), z)  # one Euler step to 0 = D(80 z; 80)
    assert torch.allclose(out, gaussian_denoiser()(80.0 * z, torch.full((4,), 80.0)))


# --------------------------------------------------------------------------- misc
@pytest.mark.parametrize('kwargs,match', [
    (dict(num_steps=0), 'num_steps'), (dict(num_steps=2.5), 'num_steps'),
    (dict(sigma_min=0.0), 'sigma_min'), (dict(sigma_min=5.0, sigma_max=1.0), 'sigma_min < sigma_max'),
    (dict(rho=0.0), 'rho'), (dict(rho=-1.0), 'rho'), (dict(sigma_max=float('inf')), 'sigma_max'),
])
def test_argument_validation(kwargs, match):
    for cls in (EDMHeunSampler, EulerSampler):
        with pytest.raises((ValueError, TypeError), match=match):
            cls(**kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(S_churn=-1.0), 'S_churn'), (dict(S_noise=-0.1), 'S_noise'),
    (dict(S_min=2.0, S_max=1.0), 'S_min'),
])
def test_churn_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDMHeunSampler(**kwargs)


def test_bad_noise_and_bad_denoiser_output():
    with pytest.raises(TypeError, match='floating-point'):
        EDMHeunSampler(3)(gaussian_denoiser(), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='input shape'):
        EDMHeunSampler(3)(lambda x, s, c: x[:, :1], torch.zeros(2, 2))


def test_registered_and_buildable():
    s = SAMPLERS.build(dict(type='EDMHeunSampler', num_steps=4, S_churn=1.0))
    assert isinstance(s, EDMHeunSampler) and s.nfe == 7 and s.S_churn == 1.0
    e = SAMPLERS.build(dict(type='EulerSampler', num_steps=4, rho=3.0))
    assert isinstance(e, EulerSampler) and e.nfe == 4 and e.rho == 3.0
    assert repr(e) == 'EulerSampler(num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=3.0, nfe=4)'


# --------------------------------------------------------------------------- (f) the network's range
class RangedDenoiser(CountingDenoiser):
    """A Gaussian denoiser that declares a σ range and discrete levels, as EDM's networks do
    (VEPrecond: 0.02–100; iDDPMPrecond: its table u with round_sigma = nearest level)."""

    def __init__(self, sigma_min=0.0, sigma_max=math.inf, levels=None):
        super().__init__(gaussian_denoiser())
        self.sigma_min, self.sigma_max, self.levels = sigma_min, sigma_max, levels

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        if self.levels is None:
            return sigma
        idx = (sigma.reshape(-1, 1) - self.levels.reshape(1, -1)).abs().argmin(1)
        return self.levels[idx].reshape(sigma.shape).to(sigma.dtype)


def test_grid_is_clamped_to_the_network_range_as_edm_sampler_does():
    """VE networks: edm_sampler uses max(σ_min, 0.02) and min(σ_max, 100) — the grid of
    EDMHeunSampler(18, 0.02, 80) — while a range wider than the sampler's changes nothing."""
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ve = RangedDenoiser(0.02, 100.0)
    out = EDMHeunSampler(18)(ve, z)
    assert np.allclose(ve.sigmas[::2], edm_sigma_steps(18, 0.02, 80.0)[:-1].numpy(), rtol=1e-13)
    assert min(ve.sigmas) == pytest.approx(0.02)
    ref = EDMHeunSampler(18, sigma_min=0.02)(gaussian_denoiser(), z)
    assert torch.equal(out, ref)
    wide = RangedDenoiser(0.0, math.inf)
    assert torch.equal(EDMHeunSampler(18)(wide, z), EDMHeunSampler(18)(gaussian_denoiser(), z))
    narrow = RangedDenoiser(0.1, 20.0)
    EulerSampler(6)(narrow, z)
    assert narrow.sigmas[0] == pytest.approx(20.0) and narrow.sigmas[-1] == pytest.approx(0.1)
    # the sampler's grid for this network, and switching the behaviour off
    assert torch.equal(EDMHeunSampler(18).sigmas_for(ve), edm_sigma_steps(18, 0.02, 80.0))
    off = RangedDenoiser(0.02, 100.0)
    EDMHeunSampler(18, follow_network=False)(off, z)
    assert min(off.sigmas) == pytest.approx(0.002)
    with pytest.raises(ValueError, match=r"clamped to the network's noise range \[100.0, 200.0\] is empty"):
        EDMHeunSampler(18)(RangedDenoiser(100.0, 200.0), z)


def test_every_level_is_snapped_with_round_sigma():
    """iDDPM-like networks: every σ_i, and σ̂ after churn, is one of the network's levels."""
    levels = torch.linspace(0.01, 90.0, 200, dtype=torch.float64)
    levels = torch.cat([levels[:1] / 2, levels])
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    net = RangedDenoiser(float(levels[0]), float(levels[-1]), levels)
    EDMHeunSampler(10)(net, z)
    grid = EDMHeunSampler(10).sigmas_for(net)
    assert all(bool((levels == s).any()) for s in grid[:-1])
    assert set(net.sigmas) <= set(levels.tolist())
    # the ramp between the clamped ends (σ_min raised to the lowest level), then snapped
    ramp = edm_sigma_steps(10, float(levels[0]), 80.0)[:-1]
    assert torch.equal(grid[:-1], net.round_sigma(ramp)) and not torch.equal(grid[:-1], ramp)
    churn = RangedDenoiser(float(levels[0]), float(levels[-1]), levels)
    EDMHeunSampler(10, S_churn=5.0)(churn, z, generator=torch.Generator().manual_seed(0))
    assert set(churn.sigmas) <= set(levels.tolist())
    assert not set(churn.sigmas) <= set(grid.tolist())      # σ̂ = (1 + γ)σ_i, snapped


def test_network_range_is_found_on_a_teacher_and_a_trainer():
    """A teacher (its ``network``) and DenoisingTrainer's network give their range to the
    sampler, so tools/sample.py --teacher, tools/eval.py and the trainer follow it."""
    from gdistill.distillers.denoising import DenoisingTrainer
    from gdistill.samplers.edm import noise_level_range
    from gdistill.teachers import EDMTeacher
    tiny = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                channel_mult=[1], num_blocks=1, attn_resolutions=[])
    teacher = EDMTeacher(network=dict(type='VEPrecond', **tiny))
    lo, hi, rnd = noise_level_range(teacher)
    assert (lo, hi) == (0.02, 100.0) and rnd is not None
    lo, hi, rnd = noise_level_range(teacher.edm_denoise)           # a bound method of it
    assert (lo, hi) == (0.02, 100.0)
    assert noise_level_range(gaussian_denoiser()) is None
    torch.manual_seed(0)
    trainer = DenoisingTrainer(network=dict(type='VEPrecond', **tiny),
                               sampler=dict(type='EDMHeunSampler', num_steps=4))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = trainer.sample(z)
    with torch.no_grad():
        ref = EDMHeunSampler(4, sigma_min=0.02, follow_network=False)(trainer.network, z)
        off = EDMHeunSampler(4, follow_network=False)(trainer.network, z)
    assert torch.equal(got, ref) and not torch.equal(got, off)


def test_follow_network_must_be_a_bool():
    with pytest.raises(TypeError, match='follow_network'):
        EDMHeunSampler(4, follow_network='yes')
    assert 'follow_network=False' in repr(EulerSampler(4, follow_network=False))
