"""Tests of gdistill.time_samplers.semi_implicit: CoSIM's π(s), π(t|s) on EDM's ρ-ramp and
SiD's fixed-mixing-time sampler."""
import math

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
