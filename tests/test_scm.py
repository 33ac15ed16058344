"""sCM (Lu & Song 2024): TrigFlow's F from EDM-form denoisers, the tangent and loss, JVP through
attention, the time sampler, consistency sampling, and the sCD/sCT distiller with its configs.

The four checks of issue 5: (i) the JVP tangent equals float64 finite differences on a small UNet
with attention and GroupNorm; (ii) ∇E[Fᵀy] = ½∇E‖F − sg(F) + y‖²; (iii) the discrete
consistency-distillation loss over Δt² tends to the continuous one; (iv) for Gaussian data the
tangent of the exact consistency function vanishes."""
import math
import os.path as osp
import subprocess
import sys

import pytest
import torch

import gdistill.data  # noqa: F401
import gdistill.distillers  # noqa: F401
import gdistill.divergences  # noqa: F401
import gdistill.engine  # noqa: F401
import gdistill.networks  # noqa: F401
import gdistill.samplers  # noqa: F401
import gdistill.teachers  # noqa: F401
import gdistill.time_samplers  # noqa: F401
from gdistill.data.toy_mixtures import GaussianMixture
from gdistill.distillers.consistency import finite_difference_tangent, jvp_tangent, same_randomness, tangent_terms
from gdistill.divergences.scm import (SCMDivergence, clip_tangent, consistency_derivative, jvp_tangents,
                                      normalize_tangent, scm_loss, scm_tangent)
from gdistill.engine.optim import MultiOptimWrapperConstructor
from gdistill.networks.edm import EDMPrecond, SongUNet
from gdistill.networks.edm.layers import attention
from gdistill.networks.mlp import MLPDenoiser
from gdistill.networks.trigflow import LogVarianceHead, TrigFlowF, TrigFlowStudent, trigflow_F
from gdistill.registry import MODELS, SAMPLERS
from gdistill.samplers.consistency import ConsistencySampler
from gdistill.schedules import EDMSchedule, TrigFlowSchedule
from gdistill.teachers import MixtureTeacher
from gdistill.time_samplers.trigflow import TrigFlowLogNormalTimeSampler

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

F64 = torch.float64
SD = 0.5


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --- closed forms for Gaussian data x₀ ~ N(μ, s²I) ---------------------------------------------
MU, S = torch.tensor([0.3, -0.2, 0.1], dtype=F64), 0.7


class GaussianDenoiser(torch.nn.Module):
    """E[x₀ | x₀ + σn = x] from the package's own mixture code (one component)."""

    def __init__(self):
        super().__init__()
        self.gm = GaussianMixture(MU[None], torch.tensor([S], dtype=F64))

    def forward(self, x, sigma, class_labels=None):
        return self.gm.edm_denoise(x, sigma).to(x.dtype)


class GaussianConsistency(torch.nn.Module):
    """The exact PF-ODE map to σ = 0 for Gaussian data, in EDM form: μ + s·(x − μ)/√(s² + σ²)
    (the ODE transports N(μ, s² + σ²) affinely onto N(μ, s²)). Through TrigFlow this is
    f*(x_t, t) = μ + s·(x_t − cos t·μ)/√(cos²t·s² + sin²t·σ_d²)."""

    def __init__(self, s=S):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, class_labels=None):
        sig = sigma.reshape(-1, 1).to(x.dtype)
        return MU.to(x.dtype) + self.s * (x - MU.to(x.dtype)) / (self.s ** 2 + sig ** 2).sqrt()


def gaussian_pairs(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 3, generator=g, dtype=F64)
    z = SD * torch.randn(n, 3, generator=g, dtype=F64)
    return x0, z, t.cos()[:, None] * x0 + t.sin()[:, None] * z


# === (i) JVP through attention and GroupNorm equals float64 finite differences ================
def tiny_unet(dropout=0.0):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=dropout)
    with torch.no_grad():      # EDM zero-initialises some layers (the attention output among them)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_unet_jvp_equals_float64_finite_differences():
    net = tiny_unet().double().eval()
    assert any(m.num_heads for m in net.modules() if hasattr(m, 'num_heads'))  # attention is on
    assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == 'GroupNorm' for m in net.modules())
    g = torch.Generator().manual_seed(1)
    x, vx = torch.randn(2, 3, 8, 8, generator=g, dtype=F64), torch.randn(2, 3, 8, 8, generator=g, dtype=F64)
    c, vc = torch.tensor([0.3, -0.7], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64)

    def f(x, c):
        return net(x, c)
    _, tangent = torch.func.jvp(f, (x, c), (vx, vc))
    h = 1e-5
    fd = (f(x + h * vx, c + h * vc) - f(x - h * vx, c - h * vc)) / (2 * h)
    assert rel(tangent, fd) < 1e-8
    # float32 JVP against the float64 reference: float32 rounding only
    net32 = tiny_unet().eval()
    _, t32 = torch.func.jvp(lambda x, c: net32(x, c), (x.float(), c.float()), (vx.float(), vc.float()))
    assert rel(t32.double(), fd) < 1e-4


def test_attention_function_matches_the_math_path():
    """Forward, JVP and gradient of the attention op against softmax(qᵀk/√C)·v written out."""
    def math_attention(q, k, v):
        w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / q.shape[1] ** 0.5, dim=2)
        return torch.einsum('nqk,nck->ncq', w, v)
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(3, 8, 10, generator=g, dtype=F64) for _ in range(6))
    out, tan = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    out_m, tan_m = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    assert out.dtype == F64                                     # float64 is not rounded to float32
    torch.testing.assert_close(out, out_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, tan_m, rtol=1e-12, atol=1e-12)
    # a tangent on v alone (the others None inside the custom jvp)
    _, tv = torch.func.jvp(lambda v: attention(q, k, v), (v,), (dv,))
    torch.testing.assert_close(tv, math_attention(q, k, dv), rtol=1e-12, atol=1e-12)
    qs = [a.clone().requires_grad_() for a in (q, k, v)]
    w = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((attention(*qs) * w).sum(), qs)
    want = torch.autograd.grad((math_attention(*qs) * w).sum(), qs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def tiny_student(dropout=0.0):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return TrigFlowStudent(net, sigma_data=SD)


def test_distiller_jvp_and_finite_difference_tangents_agree_with_dropout():
    """The distiller's two tangent paths on a UNet student with dropout 0.3, in train mode: under
    one seed both see the same masks and agree; under different seeds they do not."""
    student = tiny_student(dropout=0.3).train()
    g = torch.Generator().manual_seed(2)
    x_in = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.8, 1.3])
    dxdt = torch.randn(3, 3, 8, 8, generator=g)
    F_jvp, term_jvp = tangent_terms(student, x_in, t, dxdt, SD, seed=5, method='jvp')
    F_fd, term_fd = tangent_terms(student, x_in, t, dxdt, SD, seed=5, method='finite_difference', fd_step=1e-3)
    torch.testing.assert_close(F_jvp, F_fd, rtol=0, atol=0)  # the same forward pass and masks
    assert rel(term_fd, term_jvp) < 2e-3                      # EDMPrecond computes in float32
    _, term_other = tangent_terms(student, x_in, t, dxdt, SD, seed=6, method='finite_difference')
    assert rel(term_other, term_jvp) > 0.05                  # other masks, another tangent
    # and the trained forward pass under the seed reproduces F⁻ exactly
    with same_randomness(5, 'cpu'):
        F_again = student.F(x_in, t)
    torch.testing.assert_close(F_again, F_jvp, rtol=0, atol=0)


# === (ii) the gradient identity behind the MSE form ===========================================
def test_gradient_identity_of_the_stop_gradient_mse():
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=32, depth=2).double()
    student = TrigFlowStudent(net, sigma_data=SD)
    x = torch.randn(64, 2, dtype=F64)
    t = torch.rand(64, dtype=F64) * 1.4 + 0.1
    y = torch.randn(64, 2, dtype=F64)
    params = list(net.parameters())
    F = student.F(x, t)
    lhs = torch.autograd.grad((F * y).sum(1).mean(), params)
    F = student.F(x, t)
    rhs = torch.autograd.grad(0.5 * ((F - F.detach() + y) ** 2).sum(1).mean(), params)
    for a, b in zip(lhs, rhs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # scm_loss (per coordinate mean, w ≡ 0) with target g: ∇ = −(2/D)·∇E[Fᵀg]
    F = student.F(x, t)
    got = torch.autograd.grad(scm_loss(F, F.detach(), y).mean(), params)
    for a, b in zip(got, lhs):
        torch.testing.assert_close(a, -b, rtol=1e-13, atol=1e-15)   # D = 2: −(2/2)·∇E[Fᵀy]
    # with a log-variance w the θ-gradient is scaled by e^{−w} and w gets 1 − e^{−w}·MSE
    w = torch.full((64,), 0.3, dtype=F64, requires_grad=True)
    F = student.F(x, t)
    loss = scm_loss(F, F.detach(), y, w).mean()
    got = torch.autograd.grad(loss, params + [w])
    for a, b in zip(got[:-1], lhs):
        torch.testing.assert_close(a, -math.exp(-0.3) * b, rtol=1e-12, atol=1e-15)
    mse = (y ** 2).mean(1)
    torch.testing.assert_close(got[-1], (1 - math.exp(-0.3) * mse) / 64, rtol=1e-12, atol=1e-15)


# === (iii) discrete consistency distillation → the continuous loss ==========================
def test_discrete_cd_loss_over_dt_squared_tends_to_the_continuous_loss():
    """Discrete CD: ‖f(x_t, t) − f(x_{t−Δt}, t − Δt)‖² with x_{t−Δt} one Euler step of the
    teacher's PF-ODE. Weighted by cos²t/D and divided by Δt² it tends to the sCM loss at θ = θ⁻
    (‖g‖²/D with g = cos t·df/dt); weighted by cos t/(σ_d sin t·D) its gradient over Δt tends
    to the sCM gradient. Both errors shrink like Δt."""
    torch.manual_seed(0)
    student = TrigFlowStudent(MLPDenoiser(dim=2, hidden=64, depth=2).double(), sigma_data=SD)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = TrigFlowF(MODELS.build(dict(type='MLPDenoiser', dim=2, hidden=32, depth=2)).double(), SD)
    n, D = 256, 2
    g = torch.Generator().manual_seed(1)
    x0 = 4 * torch.randn(n, D, generator=g, dtype=F64)
    t = 0.1 + 1.3 * torch.rand(n, generator=g, dtype=F64)
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * SD * torch.randn(n, D, generator=g, dtype=F64)
    with torch.no_grad():
        dxdt = teacher.velocity(x_t, t)
    params = [p for p in student.network.parameters()]

    # the continuous objective through the package's own code
    with torch.no_grad():
        F_minus, term = jvp_tangent(lambda x, tt: student.F(x, tt), x_t / SD, t, dxdt, SD)
    gt = scm_tangent(F_minus, term, x_t, dxdt, t, SD, r=1.0)
    cont = scm_loss(F_minus, F_minus, gt).mean()
    F = student.F(x_t / SD, t)
    cont_grad = torch.cat([p.flatten() for p in torch.autograd.grad(scm_loss(F, F.detach(), gt).mean(), params)])

    value_err, grad_err = [], []
    for dt in (1e-2, 1e-3, 1e-4, 1e-5):
        x_prev = x_t - dt * dxdt
        with torch.no_grad():
            f_prev = student.consistency(x_prev, t - dt)
        f_now = student.consistency(x_t, t)
        sq = ((f_now - f_prev) ** 2).sum(1)
        value = ((t.cos() ** 2 / D) * sq.detach()).mean() / dt ** 2
        value_err.append(abs(float(value / cont) - 1))
        w = t.cos() / (SD * t.sin() * D)
        grad = torch.autograd.grad((w * sq).mean(), params)
        grad = torch.cat([p.flatten() for p in grad]) / dt
        grad_err.append(rel(grad, cont_grad))
    assert all(a > b for a, b in zip(value_err, value_err[1:])), value_err
    assert all(a > b for a, b in zip(grad_err, grad_err[1:])), grad_err
    assert value_err[-1] < 1e-3 and grad_err[-1] < 1e-3
    assert value_err[0] > 10 * value_err[-1]       # the limit is approached, not met from the start


# === (iv) Gaussian data: the exact consistency function has zero tangent ======================
@pytest.mark.parametrize('path', ['jvp', 'finite_difference'])
def test_tangent_vanishes_for_the_exact_gaussian_consistency_function(path):
    t = torch.linspace(0.02, 1.55, 12, dtype=F64)
    _, _, x_t = gaussian_pairs(12, t)
    teacher = TrigFlowF(GaussianDenoiser(), SD)
    dxdt = teacher.velocity(x_t, t)

    def tangent(student):
        F = lambda x, tt: student.F(x, tt)       # noqa: E731
        if path == 'jvp':
            F_minus, term = jvp_tangent(F, x_t / SD, t, dxdt, SD)
        else:
            F_minus, term = F(x_t / SD, t), finite_difference_tangent(F, x_t / SD, t, dxdt, SD, step=1e-6)
        return scm_tangent(F_minus, term, x_t, dxdt, t, SD, r=1.0)

    exact = tangent(TrigFlowStudent(GaussianConsistency(), sigma_data=SD))
    assert float(exact.abs().max()) < (1e-12 if path == 'jvp' else 1e-6)
    # not a consistency function (the denoiser itself, or the map of a wrong variance): g ≠ 0
    assert float(tangent(TrigFlowStudent(GaussianDenoiser(), sigma_data=SD)).abs().max()) > 1e-2
    assert float(tangent(TrigFlowStudent(GaussianConsistency(s=0.6), sigma_data=SD)).abs().max()) > 1e-2


# === TrigFlow's F ==============================================================================
def test_F_of_an_edm_network_is_minus_its_raw_network():
    """With EDM preconditioning F = −F_EDM(x_t/σ_d, ¼ ln σ) exactly (module docstring)."""
    student = tiny_student()
    net = student.network.eval()
    g = torch.Generator().manual_seed(0)
    x_in = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.004, 0.05, 0.7, 1.56])
    with torch.no_grad():
        F = student.F(x_in, t)
        sigma = (SD * t.double().tan()).float().reshape(-1, 1, 1, 1)
        _, _, c_in, c_noise = net.precondition(sigma)
        raw = net.model(c_in * x_in * SD / t.cos().reshape(-1, 1, 1, 1), c_noise.flatten())
    for i in range(4):
        assert rel(F[i], -raw[i]) < (2e-3 if t[i] < 0.01 else 1e-4), (float(t[i]), rel(F[i], -raw[i]))
    # and f = cos t·x_t − sin t·σ_d·F is the network's denoiser at σ_d tan t
    x_t = SD * x_in
    with torch.no_grad():
        f = student.consistency(x_t, t)
        D = student(x_t / t.cos().reshape(-1, 1, 1, 1), SD * t.tan())
    torch.testing.assert_close(f[1:], D[1:], rtol=1e-4, atol=1e-4)


def test_teacher_velocity_is_the_gaussian_pf_ode():
    """σ_d·F_teacher(x_t/σ_d, t) equals the PF-ODE velocity of Gaussian data, d/dt of
    x_t = cos t·μ + √v(t)·ξ with v = cos²t·s² + sin²t·σ_d² (ξ fixed along the path)."""
    t = torch.linspace(0.01, 1.56, 9, dtype=F64)
    _, _, x_t = gaussian_pairs(9, t)
    v = t.cos() ** 2 * S ** 2 + t.sin() ** 2 * SD ** 2
    dv = 2 * t.sin() * t.cos() * (SD ** 2 - S ** 2)
    xi = (x_t - t.cos()[:, None] * MU) / v.sqrt()[:, None]
    want = -t.sin()[:, None] * MU + (dv / (2 * v.sqrt()))[:, None] * xi
    # the teacher in EDM form, and the same teacher in a registered Teacher wrapper
    got = TrigFlowF(GaussianDenoiser(), SD).velocity(x_t, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    teacher = MixtureTeacher(mixture=dict(name='random_mixture', dim=3, num_modes=2))
    # equal SNR: F through TrigFlow equals the teacher's denoiser served by the TrigFlow schedule
    sched = TrigFlowSchedule(SD)
    x0_hat = teacher.denoise(x_t, t, sched)
    F = TrigFlowF(teacher, SD)(x_t / SD, t)
    torch.testing.assert_close(t.cos()[:, None] * x_t - t.sin()[:, None] * SD * F, x0_hat, rtol=1e-10, atol=1e-10)


def test_student_parts_and_checks():
    student = TrigFlowStudent(MLPDenoiser(dim=2, hidden=16, depth=1), sigma_data=SD)
    t = torch.tensor([0.1, 1.0])
    assert torch.equal(student.log_variance(t), torch.zeros(2))      # zero-initialised head
    out, w = student(torch.randn(2, 2), SD * t.tan(), None, with_logvar=True)
    assert out.shape == (2, 2) and w.shape == (2,)
    assert student.dim == 2 and 'logvar.linear.weight' in dict(student.named_parameters())
    with pytest.raises(ValueError, match='even number'):
        LogVarianceHead(7)
    with pytest.raises(TypeError, match='MODELS config or an nn.Module'):
        TrigFlowStudent(lambda x: x, sigma_data=SD)
    with pytest.raises(ValueError, match='sigma_data'):
        TrigFlowF(GaussianDenoiser(), 0.0)


# === divergence pieces ==========================================================================
def test_tangent_formula_warmup_normalisation_and_clipping():
    g = torch.Generator().manual_seed(0)
    n = 5
    F, dF, x_t, v = (torch.randn(n, 4, generator=g, dtype=F64) for _ in range(4))
    t = torch.rand(n, generator=g, dtype=F64) + 0.2
    term = (t.cos() * t.sin() * SD)[:, None] * dF      # what the JVP returns
    full = scm_tangent(F, term, x_t, v, t, SD, r=1.0)
    torch.testing.assert_close(full, t.cos()[:, None] * consistency_derivative(F, dF, x_t, v, t, SD))
    # r = 0 keeps only −cos²t·(σ_d F − dx/dt); g is affine in r
    zero = scm_tangent(F, term, x_t, v, t, SD, r=0.0)
    torch.testing.assert_close(zero, -(t.cos() ** 2)[:, None] * (SD * F - v))
    torch.testing.assert_close(scm_tangent(F, term, x_t, v, t, SD, r=0.25), 0.75 * zero + 0.25 * full)
    # the rearranged JVP tangents
    tx, tt = jvp_tangents(t, v, SD)
    torch.testing.assert_close(tx, (t.cos() * t.sin())[:, None] * v)
    torch.testing.assert_close(tt, t.cos() * t.sin() * SD)
    # normalisation: direction kept, norm ‖g‖/(‖g‖ + c) < 1
    gn = normalize_tangent(full, 0.1)
    norm = full.norm(dim=1)
    torch.testing.assert_close(gn.norm(dim=1), norm / (norm + 0.1))
    torch.testing.assert_close(gn / gn.norm(dim=1, keepdim=True), full / norm[:, None])
    assert float(clip_tangent(10 * full, 0.5).abs().max()) == 0.5
    with pytest.raises(ValueError, match='warm-up factor r'):
        scm_tangent(F, term, x_t, v, t, SD, r=1.5)
    with pytest.raises(ValueError, match='shape'):
        scm_tangent(F, term[:, :2], x_t, v, t, SD)


def test_adaptive_weight_balances_the_loss_and_divergence_options():
    # min over w of e^{−w}·m + w is at w = ln m, value 1 + ln m
    m = torch.tensor([0.01, 1.0, 30.0], dtype=F64)
    diff = torch.sqrt(m)[:, None] * torch.ones(3, 1, dtype=F64)
    w = m.log().clone().requires_grad_()
    loss = scm_loss(diff, torch.zeros_like(diff), torch.zeros_like(diff), w)
    torch.testing.assert_close(loss.detach(), 1 + m.log())
    (grad,) = torch.autograd.grad(loss.sum(), w)
    torch.testing.assert_close(grad, torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match='stop-gradient'):
        scm_loss(diff, diff.clone().requires_grad_(), diff)
    div = SCMDivergence(tangent_norm=0.1, tangent_clip=None, warmup_iters=100)
    assert [div.warmup_ratio(s) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert SCMDivergence(warmup_iters=0).warmup_ratio(0) == 1.0
    for bad in (dict(tangent_norm=0), dict(tangent_clip=-1), dict(warmup_iters=-1)):
        with pytest.raises(ValueError):
            SCMDivergence(**bad)


# === time sampler and sampler ===================================================================
def test_lognormal_time_sampler_on_tan_t():
    sampler = TrigFlowLogNormalTimeSampler(P_mean=-1.0, P_std=1.4)
    sched = TrigFlowSchedule(SD)
    out = sampler.sample(200_000, sched, generator=torch.Generator().manual_seed(0))
    log_sigma = (SD * out['t'].tan()).log()
    assert abs(float(log_sigma.mean()) + 1.0) < 0.01 and abs(float(log_sigma.std()) - 1.4) < 0.01
    torch.testing.assert_close(SD * out['t'].tan(), out['sigma'])
    assert float(out['t'].min()) >= sched.t_min and float(out['t'].max()) <= sched.t_max
    # far tails are clamped to the schedule's range; another schedule gets its own times
    wide = TrigFlowLogNormalTimeSampler(P_mean=0.0, P_std=10.0).sample(10_000, sched)
    assert float(wide['t'].max()) == pytest.approx(sched.t_max) and float(wide['t'].min()) == pytest.approx(sched.t_min)
    edm = sampler.sample(10, EDMSchedule(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(edm['t'], edm['sigma'])
    with pytest.raises(ValueError, match='P_std'):
        TrigFlowLogNormalTimeSampler(P_std=0)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.fn(x, sigma)


def test_consistency_sampler_times_calls_and_exact_gaussian_samples():
    assert SAMPLERS.build(dict(type='ConsistencySampler', num_steps=2)).nfe == 2
    one, two = ConsistencySampler(num_steps=1), ConsistencySampler(num_steps=2)
    t0 = math.atan(80 / SD)
    assert one.times().tolist() == [t0] and two.times().tolist() == [t0, 1.1]
    assert ConsistencySampler(num_steps=4).times().shape == (4,)
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    rec = Recorder(lambda x, sigma: 0 * x)
    two(rec, z, generator=torch.Generator().manual_seed(1))
    (x1, s1), (x2, s2) = rec.calls
    torch.testing.assert_close(x1, SD * z / math.cos(t0))            # σ_d·z at t_0 in EDM's variable
    torch.testing.assert_close(s1, torch.full((5,), 80.0, dtype=F64))
    torch.testing.assert_close(s2, torch.full((5,), SD * math.tan(1.1), dtype=F64))
    eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(x2, SD * math.tan(1.1) * eps)          # x̂₀ = 0 re-noised to t = 1.1
    # with the exact consistency function, 1 and 2 steps give N(μ, s²) samples
    noise = torch.randn(40_000, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    for sampler in (one, two):
        x = sampler(GaussianConsistency(), noise, generator=torch.Generator().manual_seed(3))
        assert float((x.mean(0) - MU).abs().max()) < 0.015
        assert float((x.std(0) - S).abs().max()) < 0.015
    for bad in (dict(num_steps=0), dict(times=[1.0, 1.2]), dict(times=[2.0]), dict(sigma_data=0)):
        with pytest.raises(ValueError):
            ConsistencySampler(**bad)


# === the distiller ==============================================================================
def toy_teacher(tmp_path):
    net = dict(type='MLPDenoiser', dim=2, hidden=32, depth=2, sigma_data=SD)
    return dict(type='NetworkTeacher', network=net,
                fit=dict(target=dict(type='MixtureTeacher', mixture=dict(name='ring8')), iters=30, batch_size=128,
                         cache_dir=str(tmp_path / 'cache')))


def optim(model, lr=1e-3):
    return MultiOptimWrapperConstructor(dict(generator=dict(optimizer=dict(type='Adam', lr=lr))))(model)


@pytest.mark.parametrize('mode', ['scd', 'sct'])
def test_distiller_trains_with_finite_loss(tmp_path, mode):
    torch.manual_seed(0)
    model = MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path), mode=mode,
                              divergence=dict(type='SCMDivergence', warmup_iters=4), ema_half_life_images=1000))
    assert model.trained == ('generator',) and isinstance(model.generator, TrigFlowStudent)
    wrappers = optim(model)
    before = [p.detach().clone() for p in model.generator.parameters()]
    data = dict(idx=list(range(64)))
    logs = [model.train_step(data, wrappers) for _ in range(3)]
    assert all(torch.isfinite(v).all() for row in logs for v in row.values())
    assert [float(r['warmup']) for r in logs] == [0.0, 0.25, 0.5]
    if mode == 'scd':     # the student starts as the teacher and r = 0: the first tangent is zero
        assert float(logs[0]['tangent_norm']) < 1e-3
    else:                 # sCT's single-sample velocity differs from the student's own
        assert float(logs[0]['tangent_norm']) > 1e-2
    assert any(not torch.equal(b, p) for b, p in zip(before, model.generator.parameters()))
    assert model.generator.logvar.linear.weight.abs().sum() > 0   # the adaptive weight is trained too
    x = model.sample(torch.randn(16, 2))
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_distiller_velocity_and_checks(tmp_path):
    torch.manual_seed(0)
    model = MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path), mode='sct'))
    x0, z = torch.randn(4, 2), SD * torch.randn(4, 2)
    t = torch.tensor([0.1, 0.5, 1.0, 1.5])
    torch.testing.assert_close(model.velocity(None, t, x0, z, None),
                               t.cos()[:, None] * z - t.sin()[:, None] * x0)
    model.mode = 'scd'
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * z
    torch.testing.assert_close(model.velocity(x_t, t, x0, z, None),
                               TrigFlowF(model.teacher, SD).velocity(x_t, t))
    with pytest.raises(ValueError, match="mode is 'scd'"):
        MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path), mode='cd'))
    with pytest.raises(TypeError, match='TrigFlowSchedule'):
        MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path), schedule=dict(type='EDMSchedule')))
    with pytest.raises(ValueError, match='sigma_data'):
        MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path),
                          schedule=dict(type='TrigFlowSchedule', sigma_data=1.0)))
    with pytest.raises(ValueError, match='tangent is one of'):
        MODELS.build(dict(type='ConsistencyDistiller', teacher=toy_teacher(tmp_path), tangent='fd'))
    model.teacher.mixture = None            # no data and no exact distribution to draw from
    with pytest.raises(ValueError, match='trains on data samples'):
        model.train_step(dict(idx=[0, 1]), optim(model))


# === configs ====================================================================================
def test_toy_configs_share_cosims_teacher_fit_and_evaluation_rows():
    cosim = load_config(osp.join(ROOT, 'projects', 'cosim', 'toy2d.py'))
    for name, mode in (('toy2d.py', 'scd'), ('toy2d_sct.py', 'sct')):
        cfg = load_config(osp.join(ROOT, 'configs', 'scm', name))
        assert cfg.model.mode == mode
        # the same MLP fitted the same way, with a smooth time embedding (sCM differentiates in t)
        # and TrigFlow's σ_d at the data's scale
        assert cfg.model.teacher.network == dict(cosim.model.teacher.network, time_scale=0.5, sigma_data=2.0)
        assert cfg.model.schedule.sigma_data == cfg.model.sampler.sigma_data == 2.0
        assert cfg.model.teacher.fit == cosim.model.teacher.fit
        hook = [h for h in cfg.custom_hooks if h['type'] == 'ToyEvaluationHook'][0]
        students = [e for e in hook['evaluations'] if e['source'] == 'student']
        assert sorted(e['sampler']['num_steps'] for e in students) == [1, 2]
        assert all(e['sampler']['type'] == 'ConsistencySampler' for e in students)
        cosim_hook = [h for h in cosim.custom_hooks if h['type'] == 'ToyEvaluationHook'][0]
        teacher_rows = [e for e in cosim_hook['evaluations'] if e['source'] == 'teacher']
        assert [e for e in hook['evaluations'] if e['source'] == 'teacher'] == teacher_rows


@pytest.mark.slow
def test_toy_config_through_the_train_tool(tmp_path):
    out = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'train.py'), osp.join(ROOT, 'configs', 'scm', 'toy2d.py'),
         '--work-dir', str(tmp_path / 'run'), '--cfg-options', 'train_cfg.max_iters=4', 'torch_threads=1',
         'teacher.network.hidden=16', 'teacher.network.depth=1', 'teacher.fit.iters=5',
         f'teacher.fit.cache_dir={tmp_path / "cache"}', 'train_dataloader.batch_size=32',
         'custom_hooks=[]', 'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=4'],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(__import__('os').environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / 'run' / 'iter_4.pth').is_file()
    assert 'loss_scm' in out.stdout + out.stderr


def tiny_images(cfg_path, label_dim):
    net = dict(type='EDMPrecond', img_resolution=8, img_channels=3, label_dim=label_dim, model_type='SongUNet',
               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    cfg = load_config(cfg_path, cfg_options={'teacher.network': net, 'optim_wrapper.generator.accumulative_counts': 1})
    return cfg


@pytest.mark.parametrize('name,label_dim', [('cifar10_scd.py', 0), ('imagenet64_scd.py', 10)])
def test_image_configs_train_with_finite_loss(name, label_dim):
    cfg = tiny_images(osp.join(ROOT, 'configs', 'scm', name), label_dim)
    assert cfg.model.type == 'ConsistencyDistiller' and cfg.model.mode == 'scd'
    assert cfg.model.divergence.tangent_norm == 0.1 and cfg.model.divergence.warmup_iters == 10_000
    assert cfg.train_dataloader.dataset.type == 'EDMImageDataset'     # sCD trains on data x₀
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    wrappers = optim(model, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = dict(img=list(torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)))
    if label_dim:
        data['label'] = list(torch.nn.functional.one_hot(torch.tensor([1, 3, 5, 7]), label_dim).float())
    before = [p.detach().clone() for p in model.generator.parameters()]
    model.divergence.warmup_iters = 1          # a non-zero tangent from the second step
    for _ in range(2):
        logs = model.train_step(data, wrappers)
        assert all(torch.isfinite(v).all() for v in logs.values()), logs
    assert any(not torch.equal(b, p) for b, p in zip(before, model.generator.parameters()))
    x = model.sample(torch.randn(2, 3, 8, 8), torch.nn.functional.one_hot(torch.tensor([0, 1]), label_dim).float()
                     if label_dim else None)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
