"""HSIVI (Yu et al. 2023): the DDIM-η layer kernel against closed forms and autograd, the layer
draw and its weights β(k), the distiller's losses against an independent SIVI-SM computation
written as HSIVI's public code writes it, the std scales' gradients, and the K-step sampler."""
import json
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope

from gdistill.kernels import HierarchicalGaussianKernel
from gdistill.registry import MODELS, SAMPLERS
from gdistill.samplers import HierarchicalSampler
from gdistill.schedules import EDMSchedule, VPSchedule
from gdistill.time_samplers import LayerTimeSampler, layer_sigmas, rho_ramp
from gdistill.utils import append_dims

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

F64 = torch.float64
CONFIG = 'configs/hsivi/toy2d.py'
TINY_TEACHER = {'teacher.network.hidden': 16, 'teacher.network.depth': 1, 'teacher.fit.iters': 5,
                'teacher.fit.batch_size': 32}


def build(tmp_path, **options):
    cfg = load_config(osp.join(ROOT, CONFIG), cfg_options=dict(
        TINY_TEACHER, **{'teacher.fit.cache_dir': str(tmp_path)}, **options))
    DefaultScope.get_instance(f'test_hsivi_{id(cfg)}', scope_name='gdistill')
    model = MODELS.build(cfg.model)
    with torch.no_grad():    # away from γ = 1 and from f_ψ = teacher, so every term is non-trivial
        model.generator.log_std_scale.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        for p in model.aux.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return model


# ------------------------------------------------------------------------------ the layer kernel
def layer_case(schedule, g, n=5, dim=3):
    lo, hi = schedule.t_min + 0.05 * (schedule.t_max - schedule.t_min), schedule.t_max
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    s = schedule.t_min + (t - schedule.t_min) * torch.rand(n, generator=g, dtype=F64) * 0.9
    x_t = torch.randn(n, dim, generator=g, dtype=F64) * 2
    x0 = torch.randn(n, dim, generator=g, dtype=F64)
    log_scale = 0.5 * torch.randn(n, generator=g, dtype=F64)
    return s, t, x_t, x0, log_scale


@pytest.mark.parametrize('schedule', [EDMSchedule(), VPSchedule()], ids=['edm', 'vp'])
@pytest.mark.parametrize('eta', [0.2, 1.0])
def test_layer_is_the_ddim_eta_step_and_its_score_is_the_autograd_gradient(schedule, eta):
    g = torch.Generator().manual_seed(0)
    kernel = HierarchicalGaussianKernel(eta=eta)
    s, t, x_t, x0, log_scale = layer_case(schedule, g)
    mean, std = kernel.mean_std(x_t, x0, s, t, schedule, log_scale)
    # DDIM eq. 12 written out: ε̂ = (x_t − a_t x̂₀)/σ_t, c₁ = η√((σ_s²/σ_t²)(σ_t² − (a_t/a_s)²σ_s²)) ...
    a_s, a_t, sg_s, sg_t = (v[:, None] for v in (schedule.alpha(s), schedule.alpha(t), schedule.sigma(s), schedule.sigma(t)))
    var_ts = sg_t ** 2 - (a_t / a_s) ** 2 * sg_s ** 2               # the forward step's variance σ²_{t|s}
    c1 = eta * torch.sqrt(var_ts * sg_s ** 2 / sg_t ** 2)            # η × the posterior std
    eps = (x_t - a_t * x0) / sg_t
    torch.testing.assert_close(mean, a_s * x0 + torch.sqrt(sg_s ** 2 - c1 ** 2) * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, log_scale.exp()[:, None] * c1, rtol=1e-12, atol=0)
    if eta == 1.0:      # η = 1, γ = 1: the forward process's posterior q(x_s | x_t, x₀ = x̂₀)
        m1, s1 = kernel.mean_std(x_t, x0, s, t, schedule, torch.zeros_like(log_scale))
        post_mean = (a_s * var_ts / sg_t ** 2) * x0 + (a_t / a_s) * sg_s ** 2 / sg_t ** 2 * x_t
        torch.testing.assert_close(m1, post_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s1 ** 2, (var_ts * sg_s ** 2 / sg_t ** 2).expand_as(s1), rtol=1e-10, atol=0)

    x_s = (mean + std * torch.randn(mean.shape, generator=g, dtype=F64)).requires_grad_(True)
    logq = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_s).sum()
    (grad,) = torch.autograd.grad(logq, x_s)
    score = kernel.conditional_score(x_s.detach(), mean, std)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
    # the denoiser-unit form inverts Tweedie's identity: score_from_x0(x_s, x̃, s) = ∇log q
    x_tilde = kernel.conditional_x0(x_s.detach(), mean, std, s, schedule)
    torch.testing.assert_close(schedule.score_from_x0(x_s.detach(), x_tilde, s), score, rtol=1e-9, atol=1e-9)


def test_layer_is_schedule_free_in_scaled_variables():
    """A VP layer and the EDM layer at the same noise levels agree after x ↦ x/a (what lets the
    EDM-variable sampler run layers trained in VP variables)."""
    g = torch.Generator().manual_seed(1)
    vp, edm, kernel = VPSchedule(), EDMSchedule(), HierarchicalGaussianKernel(eta=0.3)
    s, t, x_t, x0, log_scale = layer_case(vp, g)
    mean, std = kernel.mean_std(x_t, x0, s, t, vp, log_scale)
    se, te = vp.edm_sigma(s), vp.edm_sigma(t)
    mean_e, std_e = kernel.mean_std(x_t / vp.alpha(t)[:, None], x0, se, te, edm, log_scale)
    torch.testing.assert_close(mean / vp.alpha(s)[:, None], mean_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(std / vp.alpha(s)[:, None], std_e, rtol=1e-10, atol=0)


def test_layer_kernel_refuses_bad_input():
    with pytest.raises(ValueError, match=r'eta must be a number in \(0, 1\]'):
        HierarchicalGaussianKernel(eta=0.0)
    with pytest.raises(ValueError, match='must go down in noise'):
        HierarchicalGaussianKernel().coefficients(torch.tensor([2.0]), torch.tensor([1.0]), EDMSchedule())


# -------------------------------------------------------------------------- the layer draw
def test_layer_grid_weights_and_stratified_draw():
    ts = LayerTimeSampler(num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sig = ts.sigmas()
    torch.testing.assert_close(sig, rho_ramp(torch.linspace(0, 1, 5, dtype=F64), 0.002, 80.0, 7.0))
    torch.testing.assert_close(ts.layer_weights(), 1 / sig[1:] ** 2)          # β(k) = 1/σ_{k+1}²
    pairs = ts.sample(103, EDMSchedule(), generator=torch.Generator().manual_seed(0))
    k = pairs['layer']
    assert sorted(torch.bincount(k, minlength=4).tolist()) == [25, 26, 26, 26]
    torch.testing.assert_close(pairs['sigma_t'], sig[k])
    torch.testing.assert_close(pairs['sigma_s'], sig[k + 1])
    torch.testing.assert_close(pairs['weight'], 1 / sig[k + 1] ** 2)
    assert torch.equal(pairs['from_prior'], k == 0)
    vp = VPSchedule()                                  # other schedules: the times of equal SNR
    p = ts.sample(9, vp, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vp.edm_sigma(p['s']), p['sigma_s'], rtol=1e-9, atol=0)
    torch.testing.assert_close(vp.edm_sigma(ts.layer_times(vp)), sig, rtol=1e-9, atol=0)
    iid = LayerTimeSampler(num_steps=3, stratified=False, weighting=[1, 0, 2])
    w = iid.sample(4000, EDMSchedule(), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(w['layer'], minlength=3).double() / 4000
    assert float((counts - 1 / 3).abs().max()) < 0.03
    torch.testing.assert_close(w['weight'], torch.tensor([1.0, 0.0, 2.0], dtype=F64)[w['layer']])


def test_layer_draw_refuses_bad_input():
    with pytest.raises(ValueError, match='strictly decreasing'):
        layer_sigmas(sigmas=[1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match='integer >= 1'):
        layer_sigmas(num_steps=0)
    with pytest.raises(ValueError, match='needs 4 finite weights'):
        LayerTimeSampler(num_steps=4, weighting=[1, 2])
    with pytest.raises(ValueError, match="'snr', 'uniform'"):
        LayerTimeSampler(weighting='edm')
    assert LayerTimeSampler(sigmas=[10, 1, 0.1]).num_steps == 2


# --------------------------------------------------------------------------- the distiller
def test_losses_equal_sivi_sm_as_hsivis_code_writes_it(tmp_path):
    """φ-loss = mean_i ½·(2⟨g, −ε_φ + σ_s·z/std⟩ − ‖g‖²), g = ε_ψ − ε_φ in ε units (HSIVI's
    public loss with its weight σ(t)², halved: GFI[h] with α = ½); ψ-loss = mean_i ½·‖ε_ψ − σ_s·z/std‖²
    (denoising score matching of the conditional score)."""
    model = build(tmp_path)
    n, eta = 256, model.kernel.eta
    torch.manual_seed(3)
    loss = model.generator_losses(n, None, {})['loss_generator']
    torch.manual_seed(4)
    loss_aux = model.aux_losses(n, None, {})['loss_aux']

    def independent(seed):
        torch.manual_seed(seed)
        pairs, x_t = model._draw(n, None, 'generator')
        z = torch.randn(n, 2)
        sig_t, sig_s = pairs['sigma_t'][:, None], pairs['sigma_s'][:, None]
        x0 = model.generator(x_t, pairs['sigma_t'])                         # EDM: a = 1, t = σ
        c1 = eta * sig_s * torch.sqrt(1 - sig_s ** 2 / sig_t ** 2)
        std = model.generator.log_std_scale[pairs['layer']].exp()[:, None] * c1
        x_s = x0 + torch.sqrt(sig_s ** 2 - c1 ** 2) * (x_t - x0) / sig_t + std * z
        eps_phi = (x_s - model.teacher.network(x_s, pairs['sigma_s'])) / sig_s
        eps_psi = (x_s - model.aux(x_s, pairs['sigma_s'], cond_sigma=pairs['sigma_t'])) / sig_s
        return eps_phi, eps_psi, sig_s * z / std

    eps_phi, eps_psi, eps_q = independent(3)
    g = eps_psi - eps_phi
    expected = (0.5 * (2 * (g * (eps_q - eps_phi)).sum(1) - (g ** 2).sum(1))).mean()
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-5)
    _, eps_psi, eps_q = independent(4)
    torch.testing.assert_close(loss_aux, (0.5 * ((eps_psi - eps_q) ** 2).sum(1)).mean(), rtol=2e-4, atol=1e-5)


def test_chain_input_is_the_models_own_simulation(tmp_path):
    """x_t of a layer-k sample is the prior run through layers 0..k−1 (the sampler's first k steps)."""
    model = build(tmp_path)
    n = 64
    layer = torch.arange(n) % 4
    sig = model.time_sampler.sigmas().float()
    pairs = dict(layer=layer, t=sig[layer])
    torch.manual_seed(5)
    x = model.mixing_samples(pairs, None)
    torch.manual_seed(5)
    expect = torch.randn(n, 2) * 80.0
    for j in range(3):
        go = layer > j
        m = int(go.sum())
        x0 = model.generator(expect[go], torch.full((m,), float(sig[j])))
        mean, std = model.kernel.mean_std(expect[go], x0, torch.full((m,), float(sig[j + 1])),
                                          torch.full((m,), float(sig[j])), model.schedule,
                                          model.generator.log_std_scale[j].expand(m))
        expect[go] = mean + std * torch.randn(m, 2)
    torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-6)
    assert float(x[layer == 0].std()) > 40                      # layer 0 starts from the prior σ = 80


def test_per_layer_weights_enter_both_stages_linearly(tmp_path):
    """β(k) one-hot on each layer in turn: the four losses add up to the unweighted loss, and
    each is the layer's own share (zero weight ⇒ the layer's samples do not count)."""
    model = build(tmp_path)
    kw = dict(num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    losses = {}
    for name, weighting in [('all', 'uniform')] + [(k, [float(k == j) for j in range(4)]) for k in range(4)]:
        model.time_sampler = LayerTimeSampler(weighting=weighting, **kw)
        torch.manual_seed(9)
        gen = model.generator_losses(128, None, {})['loss_generator']
        torch.manual_seed(9)
        aux = model.aux_losses(128, None, {})['loss_aux']
        losses[name] = (gen.detach(), aux.detach())
    for i in range(2):
        torch.testing.assert_close(sum(losses[k][i] for k in range(4)), losses['all'][i], rtol=1e-5, atol=1e-6)
        assert all(abs(float(losses[k][i])) > 0 for k in range(4))
    # the snr weighting is the uniform one times 1/σ_{k+1}² per sample
    model.time_sampler = LayerTimeSampler(weighting='snr', **kw)
    torch.manual_seed(9)
    snr = model.generator_losses(128, None, {})['loss_generator']
    beta = 1 / model.time_sampler.sigmas()[1:] ** 2
    torch.testing.assert_close(snr.detach(), sum(float(beta[k]) * losses[k][0] for k in range(4)),
                               rtol=1e-4, atol=1e-5)


def test_std_scales_are_trained_parameters_of_the_generator(tmp_path):
    model = build(tmp_path)
    from gdistill.engine.optim import MultiOptimWrapperConstructor
    cfg = load_config(osp.join(ROOT, CONFIG))
    ow = dict(cfg.optim_wrapper)
    ow.pop('constructor')
    wrappers = MultiOptimWrapperConstructor(ow)(model)
    in_generator = [p for group in wrappers['generator'].optimizer.param_groups for p in group['params']]
    assert any(p is model.generator.log_std_scale for p in in_generator)
    assert not any(p is model.generator.log_std_scale for group in wrappers['aux'].optimizer.param_groups
                   for p in group['params'])
    assert model.generator_ema.log_std_scale.shape == (4,)          # the EMA copy carries them too

    torch.manual_seed(2)
    loss = model.generator_losses(512, None, {})['loss_generator']
    (grad,) = torch.autograd.grad(loss, model.generator.log_std_scale)
    assert torch.isfinite(grad).all() and bool((grad != 0).all())
    # finite differences on the last layer's scale (the chain feeding layers never runs the last one,
    # so the stop-gradient on the simulation does not enter)
    h, p = 1e-2, model.generator.log_std_scale

    def at(v):
        with torch.no_grad():
            old = p[3].item()
            p[3] = v
            torch.manual_seed(2)
            out = float(model.generator_losses(512, None, {})['loss_generator'])
            p[3] = old
            return out
    fd = (at(p[3].item() + h) - at(p[3].item() - h)) / (2 * h)
    assert fd == pytest.approx(float(grad[3]), rel=2e-2, abs=1e-4)


def test_distiller_refuses_mismatched_parts(tmp_path):
    with pytest.raises(ValueError, match='differ from the trained layers'):
        build(tmp_path, **{'model.sampler.num_steps': 3})
    with pytest.raises(ValueError, match='same eta'):
        build(tmp_path, **{'model.sampler.kernel.eta': 0.5})
    with pytest.raises(TypeError, match='layer kernel'):
        build(tmp_path, **{'model.kernel': dict(_delete_=True, type='GaussianKernel')})


# ------------------------------------------------------------------------------ the sampler
def test_sampler_has_k_nfe_and_runs_the_trained_chain(tmp_path):
    model = build(tmp_path)
    sampler = model.sampler
    assert sampler.nfe == 4 and isinstance(sampler, HierarchicalSampler)
    calls = []
    net = model.generator

    def counted(x, sigma, labels=None):
        calls.append(float(sigma[0]))
        return net(x, sigma, labels)
    counted.log_std_scale = net.log_std_scale

    n = 32
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(n, 2, generator=gen)
    out = sampler(counted, z, generator=gen)
    assert calls == pytest.approx(sampler.sigmas()[:-1].tolist())      # one call per layer, σ_0..σ_{K−1}
    # the same chain from the distiller's mixing samples (same random numbers) and the last layer's mean
    torch.manual_seed(6)
    with torch.no_grad():
        x3 = model.mixing_samples(dict(layer=torch.full((n,), 3), t=torch.full((n,), 0.17)), None)
        sig = sampler.sigmas()
        _, mean, _ = model.layer_step(net, x3, torch.full((n,), float(sig[4])), torch.full((n,), float(sig[3])),
                                      torch.full((n,), 3), None, torch.zeros(n, 2))
    torch.testing.assert_close(out, mean, rtol=1e-5, atol=1e-5)
    # without std scales (the teacher) it is DDIM-η with γ = 1; a wrong-sized scale is refused
    x = sampler(model.teacher, z)
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    counted.log_std_scale = torch.zeros(3)
    with pytest.raises(ValueError, match=r'log_std_scale must have shape \(4,\)'):
        sampler(counted, z)


def test_sampler_is_registered_and_its_noise_is_reproducible():
    s = SAMPLERS.build(dict(type='HierarchicalSampler', sigmas=[5.0, 1.0, 0.1], final_noise=True))
    assert s.nfe == 2

    def den(x, sigma, labels=None):
        return 0.5 * x / (1 + append_dims(sigma, x.ndim) ** 2)
    z = torch.randn(10, 3)
    a = s(den, z, generator=torch.Generator().manual_seed(1))
    b = s(den, z, generator=torch.Generator().manual_seed(1))
    c = s(den, z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------ through the train tool
def train(args, timeout=300):
    import subprocess
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py')] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def trained_state(work_dir, it):
    return torch.load(osp.join(str(work_dir), f'iter_{it}.pth'), map_location='cpu', weights_only=False)['state_dict']


@pytest.mark.slow
def test_toy_config_trains_and_records_the_mmd_history(tmp_path):
    """configs/hsivi/toy2d.py end to end (tiny teacher, 3 iterations): the std scales move, and
    eval_details.json holds the student's metrics at every `interval` iteration plus the table."""
    opts = ['--cfg-options', 'train_cfg.max_iters=3', 'torch_threads=1', 'train_dataloader.batch_size=64',
            f'model.teacher.fit.cache_dir={tmp_path / "cache"}', 'default_hooks.checkpoint.interval=3',
            'teacher.network.hidden=16', 'teacher.network.depth=1', 'teacher.fit.iters=5', 'teacher.fit.batch_size=32',
            'custom_hooks.3.interval=1', 'custom_hooks.3.num_samples=500', 'custom_hooks.3.interval_samples=300',
            'custom_hooks.2.interval=100']
    train([osp.join(ROOT, CONFIG), '--work-dir', str(tmp_path / 'run')] + opts)
    details = json.load(open(tmp_path / 'run' / 'eval_details.json'))
    assert [h['iter'] for h in details['history']] == [1, 2, 3]
    assert all(np.isfinite(h['mmd']) for h in details['history'])
    rows = {(r['name'], r['nfe']) for r in details['rows']}
    assert {('HSIVI', 4), ('teacher DDIM η=0.2', 4), ('teacher Heun', 35), ('exact floor', 0)} <= rows
    state = trained_state(tmp_path / 'run', 3)
    assert state['generator.log_std_scale'].shape == (4,) and bool((state['generator.log_std_scale'] != 0).all())
    assert 'generator_ema.log_std_scale' in state


@pytest.mark.slow
def test_tiny_image_hsivi_through_train_tool(tmp_path):
    config = osp.join(ROOT, 'tests', 'configs', 'hsivi_tiny_images.py')
    train([config, '--work-dir', str(tmp_path)])
    state = trained_state(tmp_path, 4)
    assert float(state['images_seen']) == 8
    assert bool((state['generator.log_std_scale'] != 0).all())          # every layer's scale was trained
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert sorted(os.listdir(tmp_path / 'samples')) == ['iter_0000002.png', 'iter_0000004.png']
    cfg = load_config(config)
    DefaultScope.get_instance('test_hsivi_tiny_images', scope_name='gdistill')
    model = MODELS.build(cfg.model)
    model.load_state_dict(state)
    x = model.sample(torch.randn(4, 3, 8, 8))
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all() and model.sampler.nfe == 3
