"""Tests of gdistill.schedules: closed forms of (a, σ), their derivatives, SNR-preserving time
conversion between schedules, Tweedie's identity and EDM's ρ-ramp time grid."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdistill.schedules import EDMSchedule, TrigFlowSchedule, VESchedule, VPSchedule

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
F64 = torch.float64



SCHEDULES = {
    'edm': EDMSchedule(),
    'edm_narrow': EDMSchedule(sigma_min=0.01, sigma_max=5.0),
    've': VESchedule(),
    've_small': VESchedule(sigma_min=0.01, sigma_max=50.0),
    'vp': VPSchedule(),
    'vp_ou': VPSchedule(beta_d=0.0, beta_min=2.0, t_min=1e-3, t_max=3.0),
    'trig': TrigFlowSchedule(),
    'trig_sd1': TrigFlowSchedule(sigma_data=1.0, sigma_min=0.01, sigma_max=20.0),
}
NAMES = sorted(SCHEDULES)


def times(schedule, min_size=1, max_size=8):
    """Lists of float64 times in [t_min, t_max]."""
    return st.lists(st.floats(min_value=schedule.t_min, max_value=schedule.t_max,
                              allow_nan=False, allow_infinity=False),
                    min_size=min_size, max_size=max_size)


def ref_alpha_sigma(schedule, t):
    """(a(t), σ(t), σ_e(t)) from the closed forms, computed with Python's math (float64)."""
    if isinstance(schedule, EDMSchedule):
        return 1.0, t, t
    if isinstance(schedule, VESchedule):
        s = schedule.sigma_min * (schedule.sigma_max / schedule.sigma_min) ** t
        return 1.0, s, s
    if isinstance(schedule, VPSchedule):
        e = 0.5 * schedule.beta_d * t ** 2 + schedule.beta_min * t
        a = math.exp(-0.25 * schedule.beta_d * t ** 2 - 0.5 * schedule.beta_min * t)
        return a, math.sqrt(1 - a * a), math.sqrt(math.exp(e) - 1)
    if isinstance(schedule, TrigFlowSchedule):
        sd = schedule.sigma_data
        return math.cos(t), sd * math.sin(t), sd * math.sin(t) / math.cos(t)
    raise AssertionError(type(schedule))


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize('name', NAMES)
def test_alpha_sigma_closed_forms(name):
    sched = SCHEDULES[name]

    @SETTINGS
    @given(ts=times(sched))
    def check(ts):
        t = torch.tensor(ts, dtype=F64)
        a, s, se = sched.alpha(t), sched.sigma(t), sched.edm_sigma(t)
        for i, ti in enumerate(ts):
            ra, rs, rse = ref_alpha_sigma(sched, ti)
            # the naive √(1 − a²) and √(e^x − 1) lose ~1e-10 relative at VP's t_min
            assert float(a[i]) == pytest.approx(ra, rel=1e-12, abs=0)
            assert float(s[i]) == pytest.approx(rs, rel=1e-8, abs=0)
            assert float(se[i]) == pytest.approx(rse, rel=1e-8, abs=0)
        # the derived quantities agree with their definitions
        torch.testing.assert_close(se, s / a, rtol=1e-12, atol=0)
        torch.testing.assert_close(sched.log_snr(t), torch.log(a ** 2 / s ** 2), rtol=0, atol=1e-10)

    check()


def test_schedule_ranges():
    assert (SCHEDULES['edm'].t_min, SCHEDULES['edm'].t_max) == (0.002, 80.0)
    assert (SCHEDULES['ve'].t_min, SCHEDULES['ve'].t_max) == (0.0, 1.0)
    ve = SCHEDULES['ve']
    assert float(ve.sigma(torch.tensor(0.0, dtype=F64))) == pytest.approx(0.002, rel=1e-14)
    assert float(ve.sigma(torch.tensor(1.0, dtype=F64))) == pytest.approx(80.0, rel=1e-13)
    # TrigFlow's default range is the EDM range σ_e ∈ [0.002, 80]
    tr = SCHEDULES['trig']
    assert float(tr.edm_sigma(torch.tensor(tr.t_min, dtype=F64))) == pytest.approx(0.002, rel=1e-12)
    assert float(tr.edm_sigma(torch.tensor(tr.t_max, dtype=F64))) == pytest.approx(80.0, rel=1e-12)
    assert 0 < tr.t_min < tr.t_max < math.pi / 2
    # the OU form a = e^{−t}
    ou = SCHEDULES['vp_ou']
    t = torch.linspace(ou.t_min, ou.t_max, 7, dtype=F64)
    torch.testing.assert_close(ou.alpha(t), torch.exp(-t), rtol=1e-14, atol=0)


def test_vp_is_variance_preserving():
    vp = SCHEDULES['vp']
    t = torch.linspace(vp.t_min, vp.t_max, 50, dtype=F64)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    assert float(vp.prior_std(sigma_data=1.0)) == pytest.approx(1.0, rel=1e-14)


def test_prior_std():
    assert SCHEDULES['edm'].prior_std(0.5) == pytest.approx(math.sqrt(80.0 ** 2 + 0.25), rel=1e-14)
    tr = SCHEDULES['trig']
    # TrigFlow with σ_d equal to the data std: cos²·σ_d² + σ_d²·sin² = σ_d²
    assert tr.prior_std(0.5) == pytest.approx(0.5, rel=1e-12)


# ----------------------------------------------------------------------------- derivatives
def _autograd_derivative(fn, t):
    t = t.clone().requires_grad_(True)
    y = fn(t)
    if not y.requires_grad:  # a constant (EDM's and VE's a(t) = 1)
        return torch.zeros_like(t.detach())
    (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
    return torch.zeros_like(t.detach()) if g is None else g


@pytest.mark.parametrize('name', NAMES)
def test_derivatives_match_autograd(name):
    sched = SCHEDULES[name]

    @SETTINGS
    @given(ts=times(sched))
    def check(ts):
        t = torch.tensor(ts, dtype=F64)
        torch.testing.assert_close(sched.d_alpha(t), _autograd_derivative(sched.alpha, t),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sched.d_sigma(t), _autograd_derivative(sched.sigma, t),
                                   rtol=1e-8, atol=1e-12)

    check()


@pytest.mark.parametrize('name', ['vp', 've', 'trig'])
def test_derivatives_match_finite_differences(name):
    """An autograd-independent check: central differences of the closed forms."""
    sched = SCHEDULES[name]
    t = torch.linspace(sched.t_min, sched.t_max, 9, dtype=F64)[1:-1]
    h = 1e-6
    fd_a = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    fd_s = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(sched.d_alpha(t), fd_a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sched.d_sigma(t), fd_s, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize('name', NAMES)
def test_t_from_edm_sigma_round_trip(name):
    sched = SCHEDULES[name]

    @SETTINGS
    @given(ts=times(sched))
    def check(ts):
        t = torch.tensor(ts, dtype=F64)
        back = sched.t_from_edm_sigma(sched.edm_sigma(t))
        torch.testing.assert_close(back, t, rtol=1e-9, atol=1e-15)
        # and t_from_log_snr inverts log_snr
        torch.testing.assert_close(sched.t_from_log_snr(sched.log_snr(t)), t, rtol=1e-9, atol=1e-15)

    check()


PAIRS = [(a, b) for a in NAMES for b in NAMES if a != b]


@pytest.mark.parametrize('src,dst', PAIRS)
def test_convert_time_preserves_log_snr_and_round_trips(src, dst):
    A, B = SCHEDULES[src], SCHEDULES[dst]

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ts=times(A))
    def check(ts):
        t = torch.tensor(ts, dtype=F64)
        t_b = A.convert_time(t, B)
        assert t_b.dtype == F64
        torch.testing.assert_close(B.log_snr(t_b), A.log_snr(t), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(B.convert_time(t_b, A), t, rtol=1e-9, atol=1e-12)

    check()


def test_convert_time_keeps_dtype():
    edm, vp = SCHEDULES['edm'], SCHEDULES['vp']
    t32 = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float32)
    out = edm.convert_time(t32, vp)
    assert out.dtype == torch.float32
    ref = vp.t_from_edm_sigma(t32.to(F64)).to(torch.float32)
    assert torch.equal(out, ref)
    # EDM → EDM is the identity
    torch.testing.assert_close(edm.convert_time(t32, SCHEDULES['edm']), t32, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Tweedie & noise
@pytest.mark.parametrize('name', NAMES)
def test_score_and_x0_invert_each_other(name):
    sched = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    t = sched.t_min + (sched.t_max - sched.t_min) * torch.rand(6, generator=g, dtype=F64)
    x_t = torch.randn(6, 3, 4, generator=g, dtype=F64)
    x0 = torch.randn(6, 3, 4, generator=g, dtype=F64)
    score = sched.score_from_x0(x_t, x0, t)
    torch.testing.assert_close(sched.x0_from_score(x_t, score, t), x0, rtol=1e-8, atol=1e-8)
    score2 = torch.randn(6, 3, 4, generator=g, dtype=F64)
    x0_2 = sched.x0_from_score(x_t, score2, t)
    torch.testing.assert_close(sched.score_from_x0(x_t, x0_2, t), score2, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize('name', NAMES)
def test_score_of_gaussian_data(name):
    """For x₀ ~ N(0, d²): E[x₀|x_t] = a d² x_t/(a²d² + σ²) and ∇log p_t(x_t) = −x_t/(a²d² + σ²)."""
    sched, d = SCHEDULES[name], 0.7
    g = torch.Generator().manual_seed(1)
    t = sched.t_min + (sched.t_max - sched.t_min) * torch.rand(5, generator=g, dtype=F64)
    x_t = torch.randn(5, 2, generator=g, dtype=F64)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    var = a ** 2 * d ** 2 + s ** 2
    x0_post = a * d ** 2 * x_t / var
    torch.testing.assert_close(sched.score_from_x0(x_t, x0_post, t), -x_t / var, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', NAMES)
def test_add_noise(name):
    sched = SCHEDULES[name]
    g = torch.Generator().manual_seed(2)
    t = sched.t_min + (sched.t_max - sched.t_min) * torch.rand(4, generator=g, dtype=F64)
    x0 = torch.randn(4, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(4, 2, 3, generator=g, dtype=F64)
    x_t = sched.add_noise(x0, t, eps)
    for i in range(4):
        ra, rs, _ = ref_alpha_sigma(sched, float(t[i]))
        torch.testing.assert_close(x_t[i], ra * x0[i] + rs * eps[i], rtol=1e-8, atol=1e-10)
    # a scalar time broadcasts over the batch
    t0 = torch.tensor(float(t[0]), dtype=F64)
    torch.testing.assert_close(sched.add_noise(x0, t0, eps)[0], x_t[0], rtol=1e-14, atol=0)
    # Tweedie at the true x₀ recovers −ε/σ
    torch.testing.assert_close(sched.score_from_x0(x_t, x0, t), -eps / sched.sigma(t)[:, None, None],
                               rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- time grid
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('n,rho', [(2, 7.0), (5, 7.0), (18, 7.0), (10, 3.0)])
def test_edm_time_grid(name, n, rho):
    sched = SCHEDULES[name]
    grid = sched.edm_time_grid(n, rho=rho)
    assert grid.shape == (n,) and grid.dtype == F64
    assert float(grid[0]) == pytest.approx(sched.t_max, rel=1e-9, abs=1e-12)
    assert float(grid[-1]) == pytest.approx(sched.t_min, rel=1e-9, abs=1e-12)
    assert bool((grid[1:] < grid[:-1]).all())  # strictly decreasing
    smax = sched.edm_sigma(torch.tensor(sched.t_max, dtype=F64)).item()
    smin = sched.edm_sigma(torch.tensor(sched.t_min, dtype=F64)).item()
    for i in range(n):  # Karras et al. eq. 5
        ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert float(sched.edm_sigma(grid[i])) == pytest.approx(ref, rel=1e-9)
    # σ_e^{1/ρ} is affine in the index
    root = sched.edm_sigma(grid) ** (1 / rho)
    diffs = root[1:] - root[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-7, atol=1e-10)


def test_edm_time_grid_options():
    vp = SCHEDULES['vp']
    grid = vp.edm_time_grid(6, sigma_min=0.1, sigma_max=10.0, dtype=torch.float32)
    assert grid.dtype == torch.float32
    sig = vp.edm_sigma(grid.to(F64))
    assert float(sig[0]) == pytest.approx(10.0, rel=1e-5)
    assert float(sig[-1]) == pytest.approx(0.1, rel=1e-5)
    one = SCHEDULES['edm'].edm_time_grid(1)
    assert one.tolist() == [80.0]


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize('build,match', [
    (lambda: EDMSchedule(sigma_min=1.0, sigma_max=0.5), 'EDMSchedule'),
    (lambda: EDMSchedule(sigma_max=float('inf')), 'EDMSchedule: need 0 < sigma_min < sigma_max'),
    (lambda: EDMSchedule(sigma_min=float('nan')), 'EDMSchedule'),
    (lambda: VESchedule(sigma_min=0.0), r'VESchedule: need 0 < sigma_min < sigma_max'),
    (lambda: VESchedule(sigma_min=5.0, sigma_max=1.0), r'sigma_min < sigma_max, got 5.0, 1.0'),
    (lambda: VPSchedule(beta_d=-1.0), r'VPSchedule: need beta_d, beta_min >= 0'),
    (lambda: VPSchedule(beta_min=-0.1), r'beta_d, beta_min >= 0'),
    (lambda: VPSchedule(beta_d=0.0, beta_min=0.0), r'not both 0, got 0.0, 0.0'),
    (lambda: VPSchedule(t_min=0.5, t_max=0.5), r'VPSchedule: need finite t_min < t_max'),
    (lambda: TrigFlowSchedule(sigma_data=0.0), r'TrigFlowSchedule: need sigma_data > 0'),
    (lambda: TrigFlowSchedule(sigma_min=0.0), r'0 < sigma_min < sigma_max'),
    (lambda: TrigFlowSchedule(sigma_min=2.0, sigma_max=1.0), r'0 < sigma_min < sigma_max'),
])
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize('sigma_min', [0.0, -1.0])
def test_edm_rejects_nonpositive_sigma_min(sigma_min):
    with pytest.raises(ValueError, match='sigma_min'):
        EDMSchedule(sigma_min=sigma_min)


@pytest.mark.parametrize('beta_d,beta_min', [(0.0, 2.0), (19.9, 0.1)])
def test_vp_rejects_negative_t_min(beta_d, beta_min):
    with pytest.raises(ValueError, match='t_min'):
        VPSchedule(beta_d=beta_d, beta_min=beta_min, t_min=-0.5)

