"""Tests of gdistill.time_samplers.semi_implicit: CoSIM's π(s), π(t|s) on EDM's ρ-ramp and
SiD's fixed-mixing-time sampler."""
import math

import numpy as np
import pytest
import torch

from gdistill.schedules import EDMSchedule, VPSchedule
from gdistill.time_samplers import CoSIMTimeSampler, FixedMixingTimeSampler, rho_ramp

N = 20000



def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp_ref(u, smin=0.002, smax=80.0, rho=7.0):
    """Karras et al. eq. 5 written out for one u."""
    return (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def test_rho_ramp_endpoints_and_formula():
    u = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    out = rho_ramp(u, 0.002, 80.0, 7.0)
    assert float(out[0]) == pytest.approx(80.0, rel=1e-13)
    assert float(out[-1]) == pytest.approx(0.002, rel=1e-12)
    for ui, oi in zip(u.tolist(), out.tolist()):
        assert oi == pytest.approx(ramp_ref(ui), rel=1e-13)
    s = CoSIMTimeSampler()
    torch.testing.assert_close(s.u_of_sigma(s.ramp(u)), u, rtol=0, atol=1e-12)


@pytest.mark.parametrize('kw', [dict(), dict(gamma=0.2, R=2), dict(gamma=0.0, R=1, u_lo=0.3),
                                dict(sigma_min=0.01, sigma_max=10.0, rho=3.0, gamma=0.7, R=8)])
def test_cosim_pairs_respect_ramp_and_window(kw):
    ts = CoSIMTimeSampler(**kw)
    p = ts.sample(N, EDMSchedule(), generator=gen(1))
    for key in ('s', 't', 'sigma_s', 'sigma_t', 'from_prior'):
        assert p[key].shape == (N,)
    assert p.sigma_s is p['sigma_s']  # attribute access
    eps = 1e-12
    assert bool((p.sigma_s >= ts.sigma_min * (1 - eps)).all())
    assert bool((p.sigma_s <= ts.sigma_max * (1 + eps)).all())
    # u_s ∈ [u_lo, 1]
    u_s = ts.u_of_sigma(p.sigma_s)
    assert float(u_s.min()) >= ts.u_lo - 1e-9
    # the prior pairs start at σ_max, the others within 1/R of the ramp above s
    prior = p.from_prior
    assert bool((p.sigma_t[prior] == ts.sigma_max).all())
    rest = ~prior
    u_t = ts.u_of_sigma(p.sigma_t[rest])
    assert bool((p.sigma_t[rest] >= p.sigma_s[rest] * (1 - 1e-12)).all())
    assert bool((u_t >= u_s[rest] - 1 / ts.R - 1e-9).all())
    assert bool((u_t >= -1e-9).all())
    # and the window is used to its end: some pair reaches near u_s − 1/R (or 0)
    lo = (u_s[rest] - 1 / ts.R).clamp(min=0)
    frac = (u_t - lo) / (u_s[rest] - lo)
    if rest.any():
        assert float(frac.min()) < 0.01 and float(frac.max()) > 0.99
        # u_t | u_s is uniform on the window: its relative position has mean ½
        assert abs(float(frac.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / int(rest.sum()))


@pytest.mark.parametrize('gamma', [0.0, 0.1, 0.5, 0.9])
def test_fraction_from_prior_is_gamma(gamma):
    p = CoSIMTimeSampler(gamma=gamma).sample(N, EDMSchedule(), generator=gen(2))
    k = int(p.from_prior.sum())
    sd = math.sqrt(N * gamma * (1 - gamma))
    assert abs(k - N * gamma) <= 5 * sd  # exact 0 when gamma = 0


def test_gamma_one_starts_every_pair_at_the_prior():
    ts = CoSIMTimeSampler(gamma=1.0)
    p = ts.sample(2000, EDMSchedule(), generator=gen(3))
    assert bool(p.from_prior.all())
    assert bool((p.sigma_t == 80.0).all())
    assert bool((p.t == 80.0).all())


def test_u_s_is_uniform_on_the_ramp():
    ts = CoSIMTimeSampler(u_lo=0.25)
    u = ts.u_of_sigma(ts.sample(N, EDMSchedule(), generator=gen(4)).sigma_s)
    assert abs(float(u.mean()) - 0.625) < 5 * 0.75 / math.sqrt(12 * N)
    assert float(u.min()) >= 0.25 - 1e-9 and float(u.max()) <= 1 + 1e-9


@pytest.mark.parametrize('schedule', [EDMSchedule(), VPSchedule(), VPSchedule(beta_d=0.0, beta_min=2.0,
                                                                              t_min=1e-4, t_max=6.0)])
def test_times_map_back_through_the_schedule(schedule):
    p = CoSIMTimeSampler(gamma=0.3).sample(5000, schedule, generator=gen(5))
    assert p.t.dtype == torch.float64
    torch.testing.assert_close(schedule.edm_sigma(p.t), p.sigma_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(schedule.edm_sigma(p.s), p.sigma_s, rtol=1e-9, atol=1e-12)
    # larger noise level ⇔ later time
    assert bool((p.t[~p.from_prior] >= p.s[~p.from_prior] - 1e-12).all())


def test_sampling_is_reproducible_with_a_generator():
    ts = CoSIMTimeSampler(gamma=0.4, R=3)
    a = ts.sample(500, VPSchedule(), generator=gen(7))
    b = ts.sample(500, VPSchedule(), generator=gen(7))
    c = ts.sample(500, VPSchedule(), generator=gen(8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a.sigma_s, c.sigma_s)
    assert not torch.equal(a.sigma_t, c.sigma_t)


def test_aux_lognormal_stage():
    ts = CoSIMTimeSampler(aux_lognormal=(-1.2, 1.2))
    p = ts.sample(N, EDMSchedule(), generator=gen(9), stage='aux')
    log_s = p.sigma_s.log()
    assert abs(float(log_s.mean()) + 1.2) < 5 * 1.2 / math.sqrt(N)
    assert abs(float(log_s.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * N)
    # the t-window is computed from the clamped σ_s: t stays on the ramp at or above it
    rest = ~p.from_prior
    clamped = p.sigma_s.clamp(ts.sigma_min, ts.sigma_max)[rest]
    assert bool((p.sigma_t[rest] >= clamped * (1 - 1e-12)).all())
    assert bool((p.sigma_t <= ts.sigma_max * (1 + 1e-12)).all())
    # the generator stage ignores aux_lognormal
    g = ts.sample(N, EDMSchedule(), generator=gen(9), stage='generator')
    assert float(g.sigma_s.min()) >= 0.002 * (1 - 1e-12) and float(g.sigma_s.max()) <= 80.0 * (1 + 1e-12)
    # without aux_lognormal the aux stage is the generator stage
    plain = CoSIMTimeSampler()
    a = plain.sample(100, EDMSchedule(), generator=gen(10), stage='aux')
    b = plain.sample(100, EDMSchedule(), generator=gen(10), stage='generator')
    assert torch.equal(a.sigma_s, b.sigma_s) and torch.equal(a.sigma_t, b.sigma_t)


# ----------------------------------------------------------------------------- SiD
def test_fixed_mixing_sampler():
    ts = FixedMixingTimeSampler()  # σ_init = 2.5, t_max = 800
    bound = ramp_ref(1 - 800 / 1000)
    assert bound == pytest.approx(24.4, abs=0.05)
    for sched in (EDMSchedule(), VPSchedule()):
        p = ts.sample(N, sched, generator=gen(11))
        assert bool((p.sigma_t == 2.5).all())
        torch.testing.assert_close(sched.edm_sigma(p.t), p.sigma_t, rtol=1e-9, atol=0)
        assert bool(p.from_prior.all())
        assert float(p.sigma_s.max()) <= bound * (1 + 1e-12)
        assert float(p.sigma_s.max()) > 0.95 * bound  # the whole restricted ramp is used
        assert float(p.sigma_s.min()) >= 0.002 * (1 - 1e-12)
        torch.testing.assert_close(sched.edm_sigma(p.s), p.sigma_s, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('t_max,sigma_init', [(1000, 1.0), (500, 4.0), (100, 0.3)])
def test_fixed_mixing_bound_follows_t_max(t_max, sigma_init):
    ts = FixedMixingTimeSampler(sigma_init=sigma_init, t_max=t_max)
    p = ts.sample(5000, EDMSchedule(), generator=gen(12))
    assert bool((p.sigma_t == sigma_init).all())
    assert float(p.sigma_s.max()) <= ramp_ref(1 - t_max / 1000) * (1 + 1e-12)


def test_fixed_mixing_aux_stage_is_edm_lognormal():
    p = FixedMixingTimeSampler().sample(N, EDMSchedule(), generator=gen(13), stage='aux')
    log_s = p.sigma_s.log()
    assert abs(float(log_s.mean()) + 1.2) < 5 * 1.2 / math.sqrt(N)
    assert abs(float(log_s.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * N)
    assert bool((p.sigma_t == 2.5).all())


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize('kw,match', [
    (dict(sigma_min=1.0, sigma_max=0.5), r'need 0 < sigma_min < sigma_max, got 1.0, 0.5'),
    (dict(sigma_min=0.0), r'need 0 < sigma_min < sigma_max'),
    (dict(rho=0.0), r'rho must be > 0, got 0.0'),
    (dict(gamma=1.5), r'CoSIMTimeSampler: gamma is a probability in \[0, 1\], got 1.5'),
    (dict(gamma=-0.1), r'gamma is a probability'),
    (dict(R=0.5), r'CoSIMTimeSampler: R must be >= 1, got 0.5'),
    (dict(u_lo=1.0), r'CoSIMTimeSampler: u_lo must lie in \[0, 1\), got 1.0'),
    (dict(u_lo=-0.1), r'u_lo must lie in'),
])
def test_cosim_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CoSIMTimeSampler(**kw)


@pytest.mark.parametrize('kw,match', [
    (dict(t_max=0), r'FixedMixingTimeSampler: t_max is out of 1000 steps, got 0'),
    (dict(t_max=1001), r't_max is out of 1000 steps, got 1001'),
    (dict(sigma_init=0.0), r'FixedMixingTimeSampler: sigma_init must be > 0, got 0.0'),
    (dict(sigma_min=5.0, sigma_max=1.0), r'need 0 < sigma_min < sigma_max'),
])
def test_fixed_mixing_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        FixedMixingTimeSampler(**kw)


# ----------------------------------------------------------------------------- App. A.1's window
def _paper_cdf(R, gamma):
    """The law of r_t (r = 1 − u: 0 at σ_min, 1 at σ_max) under CoSIM App. A.1 with r_s ~ U[0, 1],
    computed by numerical integration, independently of the sampler: Γ = U·(1/k) with
    k ~ U{1..R} has CDF F_Γ(y) = (1/R)·Σ_k min(k·y, 1); P(r_s + Γ ≤ x) = ∫_0^x F_Γ(y) dy for
    x < 1; everything else (B = 0, or r_s + Γ ≥ 1) is the atom r_t = 1."""
    from scipy.integrate import quad

    def f_gamma(y):
        return sum(min(k * y, 1.0) for k in range(1, R + 1)) / R
    breaks = [1.0 / k for k in range(1, R + 1)]

    # ∫ over a fine grid, segment by segment (each segment's integrand is smooth but at breaks)
    grid = np.linspace(0.0, 1.0, 4001)
    pieces = [quad(f_gamma, a, b, points=[c for c in breaks if a < c < b] or None)[0]
              for a, b in zip(grid[:-1], grid[1:])]
    values = (1 - gamma) * np.concatenate([[0.0], np.cumsum(pieces)])
    atom = 1 - values[-1]                          # P(r_t = 1)

    def cdf(x):                                    # P(r_t ≤ x | r_t < 1)
        return np.interp(np.minimum(x, 1.0), grid, values) / (1 - atom)
    return cdf, atom


@pytest.mark.parametrize('R', [1, 2, 4, 8])
def test_paper_window_follows_appendix_a1(R):
    """KS test on 10⁵ draws of r_t against App. A.1's law (its part below 1), and the atom at
    r_t = 1 (the pairs that start from the prior) against its probability; today's single window
    fails the same test."""
    from scipy.stats import kstest
    n, gamma = 100_000, 0.5
    cdf, atom = _paper_cdf(R, gamma)

    def draws(window, seed):
        ts = CoSIMTimeSampler(gamma=gamma, R=R, window=window)
        p = ts.sample(n, EDMSchedule(), generator=gen(seed))
        r_s = 1 - ts.u_of_sigma(p.sigma_s)
        r_t = 1 - ts.u_of_sigma(p.sigma_t)
        return p, r_s, r_t

    p, r_s, r_t = draws('paper', 40 + R)
    top = p.from_prior
    # the pairs at r_t = 1 are exactly the prior pairs, the others lie in [r_s, 1)
    assert bool((r_t[top] > 1 - 1e-9).all()) and bool((r_t[~top] < 1 - 1e-12).all())
    assert bool((r_t[~top] >= r_s[~top] - 1e-9).all())
    assert abs(float(top.double().mean()) - atom) < 5 * math.sqrt(atom * (1 - atom) / n)
    res = kstest(r_t[~top].numpy(), cdf)
    assert res.pvalue > 1e-3, (R, res)
    # the window sizes 1, 1/2, ..., 1/R all occur: some increments exceed 1/R (for R > 1)
    if R > 1:
        assert float((r_t[~top] - r_s[~top]).max()) > 1 / R + 0.1 * (1 - 1 / R)
    # today's 'fixed' window draws a different law
    p2, _, r_t2 = draws('fixed', 40 + R)
    res2 = kstest(r_t2[~p2.from_prior].numpy(), cdf)
    assert res2.pvalue < 1e-6, (R, res2)


def test_paper_window_bad_arguments():
    with pytest.raises(ValueError, match=r"window is 'fixed' .* 'paper' .* or 'sampler' .*got 'wide'"):
        CoSIMTimeSampler(window='wide')
    with pytest.raises(ValueError, match=r"window='paper' .* R must be an integer, got 2.5"):
        CoSIMTimeSampler(R=2.5, window='paper')


# ----------------------------------------------------------------------------- the sampler's levels
def test_sampler_window_trains_the_chains_own_jumps():
    """window='sampler': the non-prior pairs start at the sampler's levels σ_1..σ_{K−1}, each with
    probability (1 − γ)/(K − 1), and s | t is uniform in u on the stretch down to the next level
    (σ_min after the last; KS test); the prior pairs keep s ~ U over the ramp."""
    from scipy.stats import kstest
    n, gamma, levels = 60_000, 0.3, [80.0, 70.0, 20.0, 0.4]
    ts = CoSIMTimeSampler(gamma=gamma, window='sampler', sampler_sigmas=levels)
    p = ts.sample(n, EDMSchedule(), generator=gen(7))
    top = p.from_prior
    assert abs(float(top.double().mean()) - gamma) < 5 * math.sqrt(gamma * (1 - gamma) / n)
    assert bool((p.sigma_t[top] == 80.0).all())
    u_s, u_t = ts.u_of_sigma(p.sigma_s), ts.u_of_sigma(p.sigma_t)
    assert kstest(u_s[top].numpy(), 'uniform').pvalue > 1e-3
    bounds = levels[1:] + [0.002]
    for i, (hi, lo) in enumerate(zip(bounds[:-1], bounds[1:])):
        at = ~top & torch.isclose(p.sigma_t, torch.tensor(hi, dtype=torch.float64), rtol=1e-12)
        share = float(at.double().mean())
        q = (1 - gamma) / 3
        assert abs(share - q) < 5 * math.sqrt(q * (1 - q) / n), (hi, share)
        a, b = ts.u_of_sigma(torch.tensor([hi, lo], dtype=torch.float64)).tolist()
        rel = (u_s[at] - a) / (b - a)
        assert kstest(rel.numpy(), 'uniform').pvalue > 1e-3, hi
    assert int((~top).sum()) == sum(int((~top & torch.isclose(p.sigma_t, torch.tensor(
        h, dtype=torch.float64), rtol=1e-12)).sum()) for h in bounds[:-1])
    # the times are the schedule's: t and s map back to the σ drawn
    torch.testing.assert_close(EDMSchedule().sigma(p.t).double(), p.sigma_t, rtol=1e-9, atol=0)


@pytest.mark.parametrize('kw, match', [
    (dict(window='sampler'), r"needs sampler_sigmas .* got \[\]"),
    (dict(window='sampler', sampler_sigmas=[70, 20, 0.4]), r"σ_max=80, .* got \[70.0, 20.0, 0.4\]"),
    (dict(window='sampler', sampler_sigmas=[80, 20, 30]), r"strictly decreasing"),
    (dict(window='sampler', sampler_sigmas=[80, 0.001]), r"above sigma_min=0.002"),
    (dict(window='sampler', sampler_sigmas=[80, 20], aux_lognormal=(-1.2, 1.2)), r"aux_lognormal"),
])
def test_sampler_window_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CoSIMTimeSampler(**kw)


def test_other_windows_do_not_read_the_sampler_levels():
    """A grid can switch window='sampler' off and keep sampler_sigmas: the law is then the window's own."""
    a = CoSIMTimeSampler(window='fixed').sample(1000, EDMSchedule(), generator=gen(3))
    b = CoSIMTimeSampler(window='fixed', sampler_sigmas=[80, 20]).sample(1000, EDMSchedule(), generator=gen(3))
    for k in ('sigma_s', 'sigma_t', 'from_prior'):
        assert torch.equal(a[k], b[k])
