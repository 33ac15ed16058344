"""SIDDM (Xu et al. 2023): the cosine schedule against Nichol & Dhariwal's eq. 17, the posterior
kernel against Bayes' rule, DDPM's coefficients and a simulation of the forward chain, the AFD term
against the closed-form Gaussian KL, the trained discriminator against D* = p/(p + q), the
discriminators' shared auxiliary head, the distiller's alternation and losses against an
independent computation, the T-step sampler's chain, and the toy and CIFAR-10 configs."""
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

import gdistill.data  # noqa: F401
import gdistill.distillers  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.data.toy_dataset import MixtureSampleDataset
from gdistill.data.toy_mixtures import make_mixture
from gdistill.distillers.base import BaseDistiller
from gdistill.divergences.gan_afd import (GANAFDDivergence, afd_term, denoising_regulariser,
                                          discriminator_loss, generator_loss)
from gdistill.engine.optim import MultiOptimWrapperConstructor
from gdistill.kernels import PosteriorKernel
from gdistill.networks.discriminators import ConvDiscriminator, MLPDiscriminator
from gdistill.registry import DATASETS, DIVERGENCES, KERNELS, MODELS, SAMPLERS, SCHEDULES
from gdistill.samplers import PosteriorSampler
from gdistill.schedules import CosineSchedule, EDMSchedule, VESchedule, VPSchedule

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

F64 = torch.float64
TOY = osp.join(ROOT, 'configs', 'siddm', 'toy2d.py')
CIFAR = osp.join(ROOT, 'configs', 'siddm', 'cifar10.py')


# ------------------------------------------------------------------------- the cosine schedule
def test_cosine_schedule_is_nichol_dhariwal_eq17():
    sched = CosineSchedule()
    s = 0.008
    f = [math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 for t in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999)]
    t = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 0.999], dtype=F64)
    abar = torch.tensor([fi / f[0] for fi in f], dtype=F64)
    torch.testing.assert_close(sched.alpha(t) ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigma(t) ** 2, 1 - abar, rtol=1e-10, atol=1e-15)
    assert float(sched.alpha(torch.tensor(0.0, dtype=F64))) == 1.0
    # DDPM's discrete β_t = 1 − ᾱ_t/ᾱ_{t−1} on T = 1000 steps: in (0, 0.999) and increasing at the end
    grid = torch.linspace(0, 0.999, 1001, dtype=F64)
    beta = 1 - sched.alpha(grid[1:]) ** 2 / sched.alpha(grid[:-1]) ** 2
    assert bool((beta > 0).all()) and float(beta.max()) < 0.999 and float(beta[-1]) > float(beta[500])


def test_cosine_schedule_derivatives_and_inverse():
    sched = CosineSchedule()
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=F64)
    h = 1e-6
    torch.testing.assert_close(sched.d_alpha(t), (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sched.d_sigma(t), (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sched.t_from_edm_sigma(sched.edm_sigma(t)), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sched.edm_sigma(t), sched.sigma(t) / sched.alpha(t), rtol=1e-12, atol=0)
    # converting to VP by equal SNR and back is the identity
    vp = VPSchedule()
    torch.testing.assert_close(vp.convert_time(sched.convert_time(t, vp), sched), t, rtol=1e-8, atol=1e-10)
    assert isinstance(SCHEDULES.build(dict(type='CosineSchedule')), CosineSchedule)


def test_cosine_schedule_refuses_bad_ranges():
    with pytest.raises(ValueError, match='t_max < 1'):
        CosineSchedule(t_max=1.0)
    with pytest.raises(ValueError, match='s must be'):
        CosineSchedule(s=0.0)
    with pytest.raises(ValueError, match='t_min < t_max'):
        CosineSchedule(t_min=0.5, t_max=0.4)


# ----------------------------------------------------------------------- the posterior kernel
KERNEL_SCHEDULES = {'cosine': CosineSchedule(), 'vp': VPSchedule(), 'edm': EDMSchedule(), 've': VESchedule()}


def random_pairs(schedule, n, g):
    lo, hi = schedule.t_min, schedule.t_max
    t = lo + (hi - lo) * (0.05 + 0.95 * torch.rand(n, generator=g, dtype=F64))
    s = lo + (t - lo) * torch.rand(n, generator=g, dtype=F64) * 0.95
    return s, t


@pytest.mark.parametrize('name', sorted(KERNEL_SCHEDULES))
def test_posterior_is_bayes_rule(name):
    """Mean and variance of q(x_s | x_t, x₀) against Bayes' rule in precision form, from the
    marginal q(x_s | x₀) = N(a_s x₀, σ_s²) and the forward step built from the marginals."""
    sched, g = KERNEL_SCHEDULES[name], torch.Generator().manual_seed(0)
    kernel = PosteriorKernel()
    s, t = random_pairs(sched, 64, g)
    x_t, x0 = torch.randn(64, 3, generator=g, dtype=F64) * 3, torch.randn(64, 3, generator=g, dtype=F64)
    mean, var = kernel.posterior(x_t, x0, s, t, sched)
    a_s, sig_s, a_t, sig_t = sched.alpha(s), sched.sigma(s), sched.alpha(t), sched.sigma(t)
    a_ts = a_t / a_s                          # x_t = a_ts·x_s + noise of variance σ_t² − a_ts²σ_s²
    v_ts = sig_t ** 2 - a_ts ** 2 * sig_s ** 2
    precision = 1 / sig_s ** 2 + a_ts ** 2 / v_ts
    want_var = 1 / precision
    want_mean = want_var[:, None] * (a_s[:, None] * x0 / sig_s[:, None] ** 2 + a_ts[:, None] * x_t / v_ts[:, None])
    torch.testing.assert_close(var, want_var, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-12)
    a_fw, v_fw = kernel.forward_coefficients(s, t, sched)
    torch.testing.assert_close(a_fw, a_ts, rtol=1e-12, atol=0)
    torch.testing.assert_close(v_fw, v_ts, rtol=1e-9, atol=1e-14)


def test_posterior_is_ddpm_eq7_on_the_cosine_grid():
    """For VP and s = t − 1: μ̃ = β_t√ᾱ_{t−1}/(1 − ᾱ_t)·x₀ + √α_t(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t and
    β̃ = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t (Ho et al. 2020, eq. 7)."""
    sched, kernel = CosineSchedule(), PosteriorKernel(num_steps=4)
    grid = kernel.times(sched)
    abar = sched.alpha(grid) ** 2
    for k in range(1, 5):
        alpha_k = abar[k] / abar[k - 1]
        beta_k = 1 - alpha_k
        c_t, c_0, var = kernel.posterior_coefficients(grid[k - 1], grid[k], sched)
        assert float(c_0) == pytest.approx(float(beta_k * abar[k - 1].sqrt() / (1 - abar[k])), rel=1e-10, abs=1e-15)
        assert float(c_t) == pytest.approx(float(alpha_k.sqrt() * (1 - abar[k - 1]) / (1 - abar[k])), rel=1e-10, abs=1e-15)
        assert float(var) == pytest.approx(float((1 - abar[k - 1]) / (1 - abar[k]) * beta_k), rel=1e-10, abs=1e-15)
    # the last step lands on t_0 = 0, where σ = 0: the posterior is the point x̂₀
    c_t, c_0, var = kernel.posterior_coefficients(grid[0], grid[1], sched)
    assert (float(c_t), float(c_0), float(var)) == pytest.approx((0.0, 1.0, 0.0), abs=1e-12)


def test_posterior_matches_a_simulated_forward_chain():
    """Simulate x_s ~ q(x_s | x₀), x_t ~ q(x_t | x_s) with the kernel's forward step: x_t has the
    schedule's marginal, and the linear regression of x_s on x_t recovers the posterior's
    coefficients and variance."""
    sched, kernel, g = CosineSchedule(), PosteriorKernel(), torch.Generator().manual_seed(1)
    s, t, x0, n = torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64), 1.3, 400_000
    a_ts, v_ts = kernel.forward_coefficients(s, t, sched)
    x_s = sched.alpha(s) * x0 + sched.sigma(s) * torch.randn(n, generator=g, dtype=F64)
    x_t = a_ts * x_s + v_ts.sqrt() * torch.randn(n, generator=g, dtype=F64)
    assert float(x_t.mean()) == pytest.approx(float(sched.alpha(t)) * x0, abs=5e-3)
    assert float(x_t.std()) == pytest.approx(float(sched.sigma(t)), rel=5e-3)
    c_t, c_0, var = kernel.posterior_coefficients(s, t, sched)
    cov = ((x_s - x_s.mean()) * (x_t - x_t.mean())).mean()
    slope = cov / x_t.var()
    intercept = x_s.mean() - slope * x_t.mean()
    resid = (x_s - intercept - slope * x_t).var()
    assert float(slope) == pytest.approx(float(c_t), rel=1e-2)
    assert float(intercept) == pytest.approx(float(c_0) * x0, rel=2e-2)
    assert float(resid) == pytest.approx(float(var), rel=1e-2)


def test_posterior_sample_is_reparameterised_in_x0():
    sched, kernel = CosineSchedule(), PosteriorKernel()
    s, t = torch.tensor([0.2, 0.5]), torch.tensor([0.45, 0.9])
    x0 = torch.randn(2, 3, requires_grad=True)
    x_t, eps = torch.randn(2, 3), torch.randn(2, 3)
    x_s = kernel.sample(x_t, x0, s, t, sched, eps)
    x_s.sum().backward()
    c_t, c_0, var = kernel.posterior_coefficients(s, t, sched)
    torch.testing.assert_close(x0.grad, c_0.float()[:, None].expand(2, 3), rtol=1e-6, atol=0)
    want = c_t.float()[:, None] * x_t + c_0.float()[:, None] * x0.detach() + var.sqrt().float()[:, None] * eps
    torch.testing.assert_close(x_s.detach(), want, rtol=1e-5, atol=1e-6)
    # the conditional score is ∇ log N(μ, σ̃²) = (μ − x_s)/σ̃²
    mean = want - var.sqrt().float()[:, None] * eps
    torch.testing.assert_close(kernel.conditional_score(x_s.detach(), x_t, x0.detach(), s, t, sched),
                               (mean - x_s.detach()) / var.float()[:, None], rtol=1e-4, atol=1e-4)


def test_kernel_grids_and_bad_input():
    cos, edm = CosineSchedule(), EDMSchedule()
    torch.testing.assert_close(PosteriorKernel(num_steps=4).times(cos), torch.tensor([0, 0.24975, 0.4995, 0.74925, 0.999], dtype=F64))
    rho = PosteriorKernel(num_steps=3, spacing='rho').times(edm)
    assert bool((rho[1:] > rho[:-1]).all()) and (float(rho[0]), float(rho[-1])) == (0.002, 80.0)
    # EDM's ρ-ramp: σ_i^{1/ρ} evenly spaced
    r = rho ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(3), rtol=1e-9, atol=0)
    assert bool((PosteriorKernel(num_steps=5, spacing='rho').times(cos).diff() > 0).all())
    with pytest.raises(ValueError, match="outside the schedule's range"):
        PosteriorKernel(t_max=1.5).times(cos)
    with pytest.raises(ValueError, match='num_steps'):
        PosteriorKernel(num_steps=0)
    with pytest.raises(ValueError, match='spacing'):
        PosteriorKernel(spacing='log')
    with pytest.raises(ValueError, match='1..4'):
        PosteriorKernel().step_times(torch.tensor([0, 2]), cos)
    with pytest.raises(ValueError, match='s < t'):
        PosteriorKernel.posterior_coefficients(torch.tensor([0.5]), torch.tensor([0.5]), cos)
    assert isinstance(KERNELS.build(dict(type='PosteriorKernel')), PosteriorKernel)


# ------------------------------------------------------------------------------ the AFD term
def gaussian_kl(m_p, v_p, m_q, v_q):
    """KL(N(m_p, v_p I) ‖ N(m_q, v_q I)) per row, closed form."""
    d = m_p.shape[-1]
    return 0.5 * (d * (v_p / v_q - 1 - math.log(v_p / v_q)) + ((m_p - m_q) ** 2).sum(-1) / v_q)


@pytest.mark.parametrize('v_p', [0.3, 0.55, 1.4])
def test_afd_term_is_the_gaussian_kl_up_to_its_constant(v_p):
    """For p(x_t | x_{t−1}) = N(m, v_p I) and the forward step N(a·x_{t−1}, v I):
    E_p[afd] = KL(p ‖ q) + d/2·(1 + log(v_p/v)) for every mean m. The expectation is exact: the
    2d sigma points m ± √(d·v_p)·e_j reproduce N(m, v_p I)'s first two moments, and afd is quadratic."""
    g = torch.Generator().manual_seed(0)
    d, a, v = 3, 0.83, 0.55
    x_prev = torch.randn(d, generator=g, dtype=F64)
    const = d / 2 * (1 + math.log(v_p / v))
    for shift in (0.0, 0.4, 2.5):
        m = a * x_prev + shift * torch.randn(d, generator=g, dtype=F64)
        offsets = math.sqrt(d * v_p) * torch.cat([torch.eye(d, dtype=F64), -torch.eye(d, dtype=F64)])
        x_t = m + offsets                                    # [2d, d]
        afd = afd_term(x_t, x_prev.expand(2 * d, d), a, v).mean()
        kl = gaussian_kl(m, v_p, a * x_prev, v)
        assert float(afd - kl) == pytest.approx(const, abs=1e-10)
    # Monte Carlo agrees, and re-diffusing with noise (the re-diffused *sample*) adds d/2
    n = 200_000
    m = a * x_prev + 0.7
    x_t = m + math.sqrt(v_p) * torch.randn(n, d, generator=g, dtype=F64)
    kl = float(gaussian_kl(m, v_p, a * x_prev, v))
    assert float(afd_term(x_t, x_prev.expand(n, d), a, v).mean()) == pytest.approx(kl + const, abs=0.03)
    noisy = afd_term(x_t, x_prev.expand(n, d), a, v, noise=torch.randn(n, d, generator=g, dtype=F64))
    assert float(noisy.mean()) == pytest.approx(kl + const + d / 2, abs=0.04)


def test_afd_term_gradient_and_bad_input():
    x_t, x_prev = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64, requires_grad=True)
    a, v = torch.tensor([0.9, 0.8, 0.7, 0.95], dtype=F64), torch.tensor([0.2, 0.3, 0.5, 0.1], dtype=F64)
    afd_term(x_t, x_prev, a, v).sum().backward()
    want = -a[:, None] * (x_t - a[:, None] * x_prev.detach()) / v[:, None]
    torch.testing.assert_close(x_prev.grad, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='variance must be > 0'):
        afd_term(x_t, x_prev, a, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match='one shape'):
        afd_term(x_t, x_prev[:2], a, v)


def test_gan_losses_are_the_value_function():
    r, f = torch.tensor([-3.0, 0.0, 2.0, 40.0]), torch.tensor([1.0, -2.0, 0.5, -40.0])
    D = torch.sigmoid
    torch.testing.assert_close(discriminator_loss(r, f)[:3], (-torch.log(D(r)) - torch.log(1 - D(f)))[:3])
    torch.testing.assert_close(generator_loss(f)[:3], -torch.log(D(f))[:3])
    assert bool(torch.isfinite(discriminator_loss(r, f)).all())       # large logits stay finite
    div = GANAFDDivergence(afd_weight=0.0, reg_weight=0.0)
    assert set(div.discriminator_losses(r, f)) == {'loss_disc'}
    assert set(div.generator_losses(f, torch.zeros(4, 2), torch.zeros(4, 2), 1.0, 1.0)) == {'loss_gan'}
    with pytest.raises(ValueError, match='afd_weight'):
        GANAFDDivergence(afd_weight=-1)
    with pytest.raises(ValueError, match='afd_reduction'):
        GANAFDDivergence(afd_reduction='max')
    assert isinstance(DIVERGENCES.build(dict(type='GANAFDDivergence')), GANAFDDivergence)


def test_trained_discriminator_approaches_the_optimal_one():
    """Minimising the discriminator's GAN loss between samples of p = N(0, 1) (real) and
    q = N(1.5, 0.6²) (fake) gives D ≈ D* = p/(p + q) (Goodfellow et al. 2014, Prop. 1)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    disc = MLPDiscriminator(dim=1, hidden=32, depth=2, emb_dim=16)
    div = GANAFDDivergence(reg_weight=0.0)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    sigma = torch.zeros(1024)
    for _ in range(400):
        real = torch.randn(512, 1, generator=g)
        fake = 1.5 + 0.6 * torch.randn(512, 1, generator=g)
        logits, _ = disc(torch.cat([real, fake]), sigma, aux=False)
        loss = div.discriminator_losses(logits[:512], logits[512:])['loss_disc']
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.linspace(-2.0, 3.0, 201)[:, None]
    with torch.no_grad():
        d = torch.sigmoid(disc(x, torch.zeros(201), aux=False)[0])
    p = torch.exp(-0.5 * x[:, 0] ** 2)
    q = torch.exp(-0.5 * ((x[:, 0] - 1.5) / 0.6) ** 2) / 0.6
    d_star = p / (p + q)
    assert float((d - d_star).abs().max()) < 0.05
    assert float((d - d_star).abs().mean()) < 0.02
    # an untrained discriminator is far from it (the test can fail)
    fresh = MLPDiscriminator(dim=1, hidden=32, depth=2, emb_dim=16)
    with torch.no_grad():
        d0 = torch.sigmoid(fresh(x, torch.zeros(201), aux=False)[0])
    assert float((d0 - d_star).abs().max()) > 0.3


# ---------------------------------------------------------------------------- discriminators
def test_discriminators_share_layers_with_their_denoising_head():
    torch.manual_seed(0)
    for disc, x in ((MLPDiscriminator(dim=2, hidden=32, depth=2), torch.randn(5, 2)),
                    (ConvDiscriminator(img_resolution=8, img_channels=3, model_channels=8, channel_mult=(1, 2)),
                     torch.randn(5, 3, 8, 8))):
        sigma = torch.tensor([0.0, 0.1, 1.0, 5.0, 80.0])
        logits, x0 = disc(x, sigma)
        assert logits.shape == (5,) and x0.shape == x.shape
        # preconditioned head: exact at σ = 0 (x̂₀ = x), a network output elsewhere
        torch.testing.assert_close(x0[0], x[0])
        assert not torch.allclose(x0[2], x[2])
        # the regulariser's gradient reaches the shared trunk, not the logit head
        disc.zero_grad()
        denoising_regulariser(x0, torch.zeros_like(x)).mean().backward()
        trunk = disc.blocks[0].weight if isinstance(disc, MLPDiscriminator) else disc.enc[0].conv0.weight
        assert trunk.grad is not None and float(trunk.grad.abs().sum()) > 0
        assert disc.logit.weight.grad is None or float(disc.logit.weight.grad.abs().sum()) == 0
        assert disc(x, sigma, aux=False)[1] is None
        torch.testing.assert_close(disc(x, sigma, aux=False)[0], logits)


def test_discriminators_refuse_bad_input_and_use_labels():
    with pytest.raises(ValueError, match=r'expected points \[N, 2\]'):
        MLPDiscriminator(dim=2)(torch.randn(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match='expected images'):
        ConvDiscriminator(img_resolution=8, model_channels=8, channel_mult=(1, 2))(torch.randn(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match='divisible'):
        ConvDiscriminator(img_resolution=12, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match='>= 0'):
        MLPDiscriminator(dim=2)(torch.randn(3, 2), -torch.ones(3))
    disc = MLPDiscriminator(dim=2, hidden=16, depth=1, label_dim=3)
    with pytest.raises(ValueError, match='class_labels'):
        disc(torch.randn(2, 2), torch.ones(2))
    x, eye = torch.randn(2, 2), torch.eye(3)[:2]
    assert not torch.allclose(disc(x, torch.ones(2), eye)[0], disc(x, torch.ones(2), eye.flip(0))[0])


# ------------------------------------------------------------------------------- the distiller
def toy_model(**options):
    cfg = load_config(TOY, cfg_options=dict({'model.generator.hidden': 32, 'model.discriminator.hidden': 32}, **options))
    DefaultScope.get_instance(f'test_siddm_{id(cfg)}', scope_name='gdistill')
    model = MODELS.build(cfg.model)
    ow = dict(cfg.optim_wrapper)
    ow.pop('constructor')
    return model, MultiOptimWrapperConstructor(ow)(model)


def toy_batch(n=64):
    ds = MixtureSampleDataset(length=n)
    return dict(img=[ds[i]['img'] for i in range(n)], idx=list(range(n)))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(before, module):
    return all(torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_alternating_updates_touch_only_their_network():
    torch.manual_seed(0)
    model, wrappers = toy_model()
    assert model.phases() == ('discriminator', 'generator') and model.teacher is model
    data = model.data_preprocessor(toy_batch(), True)
    g0, d0 = params(model.generator), params(model.discriminator)
    logs = model.update_network('discriminator', wrappers['discriminator'], 64, None, data)
    assert set(logs) == {'loss_disc', 'loss_reg'}
    assert same(g0, model.generator) and not same(d0, model.discriminator)
    d1 = params(model.discriminator)
    logs = model.update_network('generator', wrappers['generator'], 64, None, data)
    assert set(logs) == {'loss_gan', 'loss_afd'}
    assert same(d1, model.discriminator) and not same(g0, model.generator)
    out = model.train_step(toy_batch(), wrappers)
    assert set(out) == {'loss_disc', 'loss_reg', 'loss_gan', 'loss_afd'}
    assert all(torch.isfinite(v) for v in out.values())
    assert float(model.images_seen) == 64 and model.generator_ema is not None
    model2, _ = toy_model(**{'model.discriminator_steps': 3})
    assert model2.phases() == ('discriminator',) * 3 + ('generator',)


def test_generator_losses_against_an_independent_computation():
    """loss_gan and loss_afd from the distiller = the non-saturating loss and λ·KL-per-dimension
    recomputed here from DDPM's posterior coefficients on the cosine grid, with the same draws."""
    torch.manual_seed(0)
    model, _ = toy_model(**{'model.divergence.afd_weight': 0.7})
    with torch.no_grad():
        for p in model.discriminator.parameters():   # make the logit depend on the input
            p.add_(0.1 * torch.randn_like(p))
    x0 = model.data_preprocessor(toy_batch(32), True)['inputs']
    torch.manual_seed(5)
    got = model.generator_losses(32, None, dict(inputs=x0))
    torch.manual_seed(5)
    sched = CosineSchedule()
    grid = torch.linspace(0, 0.999, 5, dtype=F64)
    abar = sched.alpha(grid) ** 2
    k = torch.randint(1, 5, (32,))
    x_t = abar[k].sqrt().float()[:, None] * x0 + (1 - abar[k]).sqrt().float()[:, None] * torch.randn_like(x0)
    eps = torch.randn_like(x0)
    alpha_k, ab_prev = abar[k] / abar[k - 1], abar[k - 1]
    beta_k = 1 - alpha_k
    with torch.no_grad():
        x0_hat = model.generator(x_t / abar[k].sqrt().float()[:, None], ((1 - abar[k]) / abar[k]).sqrt().float())
        mean = (beta_k * ab_prev.sqrt() / (1 - abar[k])).float()[:, None] * x0_hat \
            + (alpha_k.sqrt() * (1 - ab_prev) / (1 - abar[k])).float()[:, None] * x_t
        std = ((1 - ab_prev) / (1 - abar[k]) * beta_k).sqrt().float()[:, None]
        x_prev = mean + std * eps
        logits = model.discriminator(x_prev / ab_prev.sqrt().float()[:, None],
                                     ((1 - ab_prev) / ab_prev).sqrt().float(), aux=False)[0]
    want_gan = torch.nn.functional.softplus(-logits).mean()
    afd = ((x_t - alpha_k.sqrt().float()[:, None] * x_prev) ** 2).sum(1) / (2 * beta_k.float())
    want_afd = 0.7 * (afd / 2).mean()
    torch.testing.assert_close(got['loss_gan'].detach(), want_gan, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got['loss_afd'].detach(), want_afd, rtol=1e-4, atol=1e-5)


def test_ablation_switches_and_refusals():
    model, wrappers = toy_model(**{'model.divergence.afd_weight': 0.0, 'model.divergence.reg_weight': 0.0})
    out = model.train_step(toy_batch(), wrappers)
    assert set(out) == {'loss_disc', 'loss_gan'}
    r1, w1 = toy_model(**{'model.divergence.r1_weight': 0.5})
    assert 'loss_r1' in r1.train_step(toy_batch(), w1)
    with pytest.raises(ValueError, match="need an 'img'"):
        model.train_step(dict(idx=list(range(8))), wrappers)
    with pytest.raises(ValueError, match='does not fit'):
        model.train_step(dict(img=[torch.zeros(3)] * 4), wrappers)
    with pytest.raises(ValueError, match='label_dim=0 but the discriminator 3'):
        toy_model(**{'model.discriminator.label_dim': 3})
    with pytest.raises(ValueError, match='needs a teacher'):
        BaseDistiller(None)


# --------------------------------------------------------------------------------- the sampler
def test_sampler_runs_the_posterior_chain():
    """With a generator that returns the data's one point μ, the input at step k is distributed as
    q(x_{t_k}) = N(a_k μ, σ_k²), i.e. x/a_k ~ N(μ, σ_e(t_k)²); T calls at t_T, …, t_1; output μ."""
    sched, kernel = CosineSchedule(), PosteriorKernel(num_steps=4)
    sampler = SAMPLERS.build(dict(type='PosteriorSampler', kernel=kernel, schedule=sched))
    assert isinstance(sampler, PosteriorSampler) and sampler.nfe == 4
    mu, seen = torch.tensor([1.5, -2.0], dtype=F64), []

    def point(x, sigma, labels=None):
        seen.append((x.clone(), sigma.clone()))
        return mu.expand_as(x).to(x.dtype)
    out = sampler(point, torch.randn(100_000, 2, dtype=F64, generator=torch.Generator().manual_seed(0)),
                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, mu.expand_as(out))
    grid = kernel.times(sched)
    assert len(seen) == 4
    for (x, sigma), k in zip(seen, (4, 3, 2, 1)):
        se = float(sched.edm_sigma(grid[k]))
        assert float(sigma[0]) == pytest.approx(se, rel=1e-6)
        m = mu * (0 if k == 4 else 1)            # the start σ(t_T)·z drops a(t_T)·μ
        assert torch.allclose(x.mean(0), m, atol=0.02 * se + 0.01)
        assert torch.allclose(x.std(0), torch.full((2,), se, dtype=F64), rtol=0.02)
    with pytest.raises(TypeError, match='posterior kernel'):
        PosteriorSampler(kernel=dict(type='GaussianKernel'))


# ------------------------------------------------------------------------------ data and configs
def test_mixture_sample_dataset_is_exact_and_repeatable():
    ds = MixtureSampleDataset(mixture=dict(name='grid25'), length=50_000, seed=3)
    again = DATASETS.build(dict(type='MixtureSampleDataset', mixture=dict(name='grid25'), length=50_000, seed=3))
    assert torch.equal(ds.samples, again.samples) and len(ds) == 50_000 and ds[7]['img'].shape == (2,)
    mix = make_mixture('grid25')
    near = mix.near_mode_mask(ds.samples).double().mean()
    assert float(near) == pytest.approx(0.9889, abs=0.003)             # P(χ²₂ ≤ 9)
    counts = torch.bincount(mix.nearest_mode(ds.samples), minlength=25).double() / 50_000
    assert float((counts - 0.04).abs().max()) < 0.006
    with pytest.raises(ValueError, match='length'):
        MixtureSampleDataset(length=0)


def train(args, timeout=300):
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py')] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_toy_config_writes_metrics_with_student_and_floor(tmp_path):
    train([TOY, '--work-dir', str(tmp_path), '--cfg-options', 'train_cfg.max_iters=3', 'torch_threads=1',
           'train_dataloader.batch_size=64', 'train_dataloader.dataset.length=1000', 'model.generator.hidden=32',
           'model.discriminator.hidden=32', 'custom_hooks.3.interval=2', 'custom_hooks.3.num_samples=500',
           'custom_hooks.3.interval_samples=300', 'custom_hooks.2.interval=100', 'default_hooks.checkpoint.interval=3'])
    rows = json.load(open(tmp_path / 'metrics.json'))
    assert [(r['name'], r['nfe']) for r in rows] == [('SIDDM', 4), ('exact floor', 0)]
    assert all(np.isfinite(r['mmd']) for r in rows)
    assert [h['iter'] for h in json.load(open(tmp_path / 'eval_details.json'))['history']] == [2]


def tiny_image_folder(root, n=4, res=8):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(osp.join(root, f'img{i:04d}.png'))
    return root


def test_cifar10_config_settings():
    cfg = load_config(CIFAR)
    assert cfg.model.type == 'SIDDM' and cfg.model.kernel.num_steps == 4
    assert cfg.model.schedule.type == 'CosineSchedule'
    assert cfg.model.generator.img_resolution == 32 == cfg.model.discriminator.img_resolution
    assert cfg.train_dataloader.dataset.type == 'EDMImageDataset'
    assert set(cfg.optim_wrapper) == {'constructor', 'generator', 'discriminator'}


@pytest.mark.slow
def test_cifar10_config_runs_a_few_iterations(tmp_path):
    """configs/siddm/cifar10.py with a tiny generator and discriminator on four random 8×8 images."""
    folder = tiny_image_folder(str(tmp_path / 'images'))
    train([CIFAR, '--work-dir', str(tmp_path / 'run'), '--cfg-options', f'train_dataloader.dataset.path={folder}',
           'train_dataloader.dataset.resolution=8', 'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
           'train_dataloader.persistent_workers=False', 'torch_threads=1', 'train_cfg.max_iters=3',
           'model.generator.img_resolution=8', 'model.generator.model_channels=16', 'model.generator.channel_mult=[1,2]',
           'model.generator.attn_resolutions=[4]', 'model.generator.num_blocks=1',
           'model.discriminator.img_resolution=8', 'model.discriminator.model_channels=8',
           'model.discriminator.channel_mult=[1,2]', 'custom_hooks.2.interval=3', 'custom_hooks.2.num_samples=4',
           'default_hooks.checkpoint.interval=3', 'default_hooks.logger.interval=1'])
    state = torch.load(tmp_path / 'run' / 'iter_3.pth', map_location='cpu', weights_only=False)['state_dict']
    assert float(state['images_seen']) == 6
    assert any(k.startswith('discriminator.') for k in state) and any(k.startswith('generator_ema.') for k in state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert os.listdir(tmp_path / 'run' / 'samples') == ['iter_0000003.png']
