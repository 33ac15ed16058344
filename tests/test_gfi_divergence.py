"""CoSIM's two-stage GFI objective on Gaussians, where every score is closed form.

Setting (EDM variables, a = 1): data p = N(0, s_p² I); mixing x_t ~ N(0, v_t I); a linear
generator x̂₀ = g·x_t + b; the kernel x_s = x̂₀ + σ_s·ε. Then q(x_s) = N(b, (g²v_t + σ_s²) I),
the teacher's denoiser is f_φ(x) = s_p²/(s_p² + σ_s²)·x and every score is linear."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gdistill.divergences.gfi import GFIDivergence
from gdistill.registry import DIVERGENCES, UnknownTypeError

D = 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def draw(n, s_p, v_t, g, b, sigma_s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_t = math.sqrt(v_t) * torch.randn(n, D, generator=gen)
    x0 = g * x_t + b
    x_s = x0 + sigma_s * torch.randn(n, D, generator=gen)
    f_phi = s_p ** 2 / (s_p ** 2 + sigma_s ** 2) * x_s
    return x_s, x0, f_phi


def scores(x_s, s_p, v_t, g, b, sigma_s):
    """S = ∇log p_s and ∇log q(x_s), closed form."""
    S = -x_s / (s_p ** 2 + sigma_s ** 2)
    grad_log_q = -(x_s - b) / (g ** 2 * v_t + sigma_s ** 2)
    return S, grad_log_q


params = dict(
    s_p=st.floats(0.4, 2.0), v_t=st.floats(0.5, 4.0), g=st.floats(0.2, 1.5), b=st.floats(-0.5, 0.5),
    sigma_s=st.floats(0.2, 1.5), alpha=st.floats(0.6, 2.0), coef=st.floats(0.5, 2.0))


H_FUNCTIONS = [dict(type='QuadraticH'), dict(type='PseudoHuberH', delta=0.5), dict(type='PowerH', p=1.5, delta=0.5)]


@pytest.mark.parametrize('h', H_FUNCTIONS, ids=lambda h: h['type'])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(**params)
def test_psi_stage_optimum_is_eq16(h, s_p, v_t, g, b, sigma_s, alpha, coef):
    """Minimising the coded ψ-loss over linear f_ψ gives f* = β∇log q + (1−β)S, β = 1/(2α(1+λ)).

    For any strictly convex h the pointwise optimum of eq. 23–24 is the dual
    y* = ∇h(E[S − ∇log q(x_s|x_t) | x_s]/(1+λ)); with y = ∇h(2α·u) that is
    2α·u* = E[d | x_s]/(1+λ), so f_ψ* is the same mixture of scores whatever h is (only y*, the
    value of the sup, depends on h). On Gaussians E[d | x_s] is linear in x_s, so the linear
    family holds the optimum."""
    div = GFIDivergence(h=dict(h, alpha=alpha), coef=coef, aux_weight='none')
    x_s, x0, f_phi = draw(50_000, s_p, v_t, g, b, sigma_s)
    c = torch.zeros(2, requires_grad=True)  # f_ψ(x) = c0·x + c1
    opt = torch.optim.LBFGS([c], max_iter=100, line_search_fn='strong_wolfe', tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        f_psi = c[0] * x_s + c[1]
        loss = div.aux_loss(f_phi - x0, f_phi - f_psi, torch.ones(len(x_s))).mean()
        loss.backward()
        return loss
    opt.step(closure)
    probe = torch.linspace(-2, 2, 9)[:, None].expand(9, D)
    f_psi = c[0].detach() * probe + c[1].detach()
    score_psi = (f_psi - probe) / sigma_s ** 2        # Tweedie, a = 1
    S, grad_log_q = scores(probe, s_p, v_t, g, b, sigma_s)
    beta = 1 / (2 * alpha * (1 + div.lam))
    assert beta == pytest.approx(div.beta)
    expected = beta * grad_log_q + (1 - beta) * S
    # Monte-Carlo error: d − E[d | x_s] = E[x̂₀ | x_s] − x̂₀ has the posterior std below; its
    # regression on (x_s, 1) over n·D coordinates gives the coefficients' standard errors
    n = x_s.numel()
    sd_res = math.sqrt(g ** 2 * v_t * sigma_s ** 2 / (g ** 2 * v_t + sigma_s ** 2)) / (2 * div.coef)
    se_slope = sd_res / math.sqrt(n * (g ** 2 * v_t + sigma_s ** 2))
    se_icpt = sd_res / math.sqrt(n)
    tol = 6 * (se_icpt + (2 + abs(b)) * se_slope) / sigma_s ** 2
    assert (score_psi - expected).abs().max() < tol


@settings(max_examples=8, deadline=None)
@given(**params)
def test_phi_objective_at_optimum_is_scaled_fisher(s_p, v_t, g, b, sigma_s, alpha, coef):
    """At f*, E[φ-loss] = (1+2λ)/(4α(1+λ)²)·E‖S − ∇log q‖² (App. B.1), in x̂₀ units."""
    div = GFIDivergence(h=dict(type='QuadraticH', alpha=alpha), coef=coef, generator_weight='none')
    x_s, x0, f_phi = draw(150_000, s_p, v_t, g, b, sigma_s, seed=1)
    S, grad_log_q = scores(x_s, s_p, v_t, g, b, sigma_s)
    beta = div.beta
    f_star = beta * grad_log_q + (1 - beta) * S
    u = sigma_s ** 2 * (S - f_star)                   # S − f_ψ in x̂₀ units
    loss = div.generator_loss(f_phi - x0, u, torch.ones(len(x_s)))
    lam = div.lam
    fisher = (sigma_s ** 4 * (S - grad_log_q).pow(2).sum(1))
    expected = (1 + 2 * lam) / (4 * alpha * (1 + lam) ** 2) * fisher
    # same samples on both sides; the difference has mean zero by the score identity
    diff = loss - expected
    err = diff.std() / math.sqrt(len(diff))
    assert abs(diff.mean()) <= 5 * err + 1e-12
    assert abs(loss.mean() - expected.mean()) <= 0.05 * abs(expected.mean()) + 5 * err + 1e-12


@settings(max_examples=8, deadline=None)
@given(s_p=params['s_p'], v_t=params['v_t'], g=params['g'], b=params['b'], sigma_s=params['sigma_s'])
def test_score_identity_eq27(s_p, v_t, g, b, sigma_s):
    """E[f(x_s)ᵀ∇log q(x_s|x_t)] = E[f(x_s)ᵀ∇log q(x_s)] for test functions f (Monte Carlo, 5σ)."""
    x_s, x0, _ = draw(150_000, s_p, v_t, g, b, sigma_s, seed=2)
    cond = (x0 - x_s) / sigma_s ** 2
    _, marg = scores(x_s, s_p, v_t, g, b, sigma_s)
    for f in (lambda x: x, torch.sin, lambda x: torch.tanh(2 * x + 0.3)):
        diff = (f(x_s) * (cond - marg)).sum(1)
        assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(len(diff))


@settings(max_examples=8, deadline=None)
@given(**params)
def test_divergence_nonnegative_and_zero_iff_q_equals_p(s_p, v_t, g, b, sigma_s, alpha, coef):
    div = GFIDivergence(h=dict(type='QuadraticH', alpha=alpha), coef=coef, generator_weight='none')
    lam = div.lam
    factor = (1 + 2 * lam) / (4 * alpha * (1 + lam) ** 2)
    assert (factor >= 0) == (coef >= alpha / 2)
    assume(coef >= alpha / 2)  # the φ-objective is a divergence (≥ 0) exactly when 1 + 2λ ≥ 0
    # q = p: the gain that gives x_s the data's variance, no offset
    g_match = s_p / math.sqrt(v_t)
    for gain, off in ((g, b), (g_match, 0.0)):
        x_s, x0, f_phi = draw(200_000, s_p, v_t, gain, off, sigma_s, seed=3)
        S, grad_log_q = scores(x_s, s_p, v_t, gain, off, sigma_s)
        f_star = div.beta * grad_log_q + (1 - div.beta) * S
        per = div.generator_loss(f_phi - x0, sigma_s ** 2 * (S - f_star), torch.ones(len(x_s)))
        value, err = per.mean(), per.std() / math.sqrt(len(per))
        fisher = (sigma_s ** 4 * (S - grad_log_q).pow(2).sum(1)).mean()
        assert fisher >= 0
        if gain == g_match and off == 0.0:
            assert fisher < 1e-20
            assert abs(value) <= 5 * err + 1e-12
        else:
            assert value >= -5 * err


def test_sid_fused_loss_is_negative_at_its_inner_optimum_for_alpha_above_one():
    """SiD: f_ψ = ∇log q (plain score matching, α(1+λ) = ½) makes E[dᵀu − α‖u‖²] = (1 − α)E‖u‖²
    < 0 for α > 1; CoSIM's α(1+λ) = 1 keeps it ≥ 0."""
    s_p, v_t, g, b, sigma_s = 1.0, 2.0, 0.5, 0.3, 0.7
    x_s, x0, f_phi = draw(200_000, s_p, v_t, g, b, sigma_s, seed=4)
    S, grad_log_q = scores(x_s, s_p, v_t, g, b, sigma_s)
    for coef, sign in ((0.5, -1), (1.0, 1)):
        div = GFIDivergence(h=dict(type='QuadraticH', alpha=1.2), coef=coef, generator_weight='none')
        f_star = div.beta * grad_log_q + (1 - div.beta) * S
        value = div.generator_loss(f_phi - x0, sigma_s ** 2 * (S - f_star), torch.ones(len(x_s))).mean()
        assert sign * value > 0


def test_sid_and_cosim_share_the_phi_equilibrium():
    """Both φ-objectives, with f_ψ frozen at its own inner optimum (SiD: ∇log q; CoSIM: eq. 16),
    have zero expected φ-gradient exactly at q = p and push (g, b) the same way elsewhere."""
    s_p, v_t, sigma_s, n = 1.0, 2.0, 0.7, 400_000
    g_match = s_p / math.sqrt(v_t)
    gen = torch.Generator().manual_seed(5)
    x_t = math.sqrt(v_t) * torch.randn(n, D, generator=gen)
    eps = torch.randn(n, D, generator=gen)

    def phi_gradient(coef, g0, b0):
        div = GFIDivergence(h=dict(type='QuadraticH', alpha=1.2), coef=coef, generator_weight='none')
        g, b = torch.tensor(g0, requires_grad=True), torch.tensor(b0, requires_grad=True)
        x0 = g * x_t + b
        x_s = x0 + sigma_s * eps
        f_phi = s_p ** 2 / (s_p ** 2 + sigma_s ** 2) * x_s
        S, grad_log_q = scores(x_s, s_p, v_t, g.detach(), b.detach(), sigma_s)   # ψ frozen
        f_psi = x_s + sigma_s ** 2 * (div.beta * grad_log_q + (1 - div.beta) * S)
        loss = div.generator_loss(f_phi - x0, f_phi - f_psi, torch.ones(n)).mean()
        return torch.stack(torch.autograd.grad(loss, (g, b)))

    for coef in (0.5, 1.0):                           # SiD (α(1+λ) = ½) and CoSIM (α(1+λ) = 1)
        assert phi_gradient(coef, g_match, 0.0).abs().max() < 1e-8
    sid, cosim = phi_gradient(0.5, 0.4, 0.3), phi_gradient(1.0, 0.4, 0.3)
    assert sid.abs().min() > 0.02 and cosim.abs().min() > 0.02
    assert torch.equal(torch.sign(sid), torch.sign(cosim))
    assert sid[0] < 0 < sid[1]                          # descent raises g towards g_match, lowers b


def test_aux_loss_is_zero_exactly_at_its_pointwise_optimum_and_positive_elsewhere():
    div = GFIDivergence(h=dict(type='QuadraticH', alpha=1.2), coef=1.0)
    d = torch.randn(64, 5)
    u_star = d / (2 * div.coef)
    w = torch.ones(64)
    assert div.aux_loss(d, u_star, w).abs().max() < 1e-12
    assert (div.aux_loss(d, u_star + 0.1 * torch.randn(64, 5), w) > 0).all()


def test_coef_and_lambda_are_two_names_for_one_setting():
    a = GFIDivergence(coef=0.75)
    b = GFIDivergence(coef=None, lam=0.75 / 1.2 - 1)
    assert a.lam == pytest.approx(b.lam) and a.coef == pytest.approx(0.75)
    with pytest.raises(ValueError, match='1 \\+ λ > 0'):
        GFIDivergence(coef=-1.0)
    with pytest.raises(KeyError, match='known: edm, none, sid'):
        GFIDivergence(generator_weight='sdi')


def test_registry_names_known_divergences_on_a_typo():
    with pytest.raises(UnknownTypeError, match="Did you mean 'GFIDivergence'"):
        DIVERGENCES.build(dict(type='GFIDivergense'))
