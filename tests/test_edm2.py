"""EDM2 (Karras et al. 2024): networks against the official manifests, the genuine pickles of
tests/data/edm2_fixtures (written by NVlabs/edm2's own code, with its outputs), the safe
loader, two-time f_ψ, EDM2's sampler and the power-function EMA."""
import io
import json
import math
import os
import os.path as osp
import pickle
import sys

import numpy as np
import pytest
import torch

import gdistill.distillers  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.distillers.base import ema_step
from gdistill.distillers.phema import (gamma_to_sigma_rel, posthoc_coefficients,
                                       posthoc_reconstruct, power_ema_beta,
                                       profile_inner_products, sigma_rel_to_gamma)
from gdistill.networks.edm2 import (EDM2Precond, EDM2TwoTimePrecond, MPConv, edm2_config,
                                    mp_cat, mp_silu, mp_sum, normalize, resample)
from gdistill.registry import MODELS, SAMPLERS, TEACHERS
from gdistill.samplers import EDM2Sampler, EDMHeunSampler, edm2_sigma_steps
from gdistill.teachers import EDM2Teacher, EDMTeacher, read_edm2_encoder
from gdistill.teachers.edm_pickle import EDMPickleError, UnsafePickleError, read_edm_pickle

DATA = osp.join(osp.dirname(osp.abspath(__file__)), 'data')
FIXTURES = osp.join(DATA, 'edm2_fixtures')
NAMES = ['edm2_latent_cond', 'edm2_latent_uncond', 'edm2_pixel_cond']
TOL = 1e-5  # fixture README: relative error <= 1e-5 of the output scale
with open(osp.join(DATA, 'edm2_state_dict_manifests.json')) as _f:
    MANIFESTS = json.load(_f)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def fixture(name):
    return osp.join(FIXTURES, name + '.pkl'), np.load(osp.join(FIXTURES, name + '.npz'))


def inputs(z):
    labels = torch.from_numpy(z['labels']) if 'labels' in z else None
    return torch.from_numpy(z['x']), torch.from_numpy(z['sigma']), labels


# --- every released network: keys, shapes, parameter counts -----------------------------------
@pytest.mark.parametrize('name', sorted(MANIFESTS))
def test_manifest_matches_key_for_key(name):
    entry = MANIFESTS[name]
    kwargs = {k: v for k, v in entry['constructor'].items() if k != 'precond'}
    assert entry['constructor']['precond'] == 'Precond'
    with torch.device('meta'):
        net = MODELS.build(dict(type='EDM2Precond', **kwargs))
    sd = net.state_dict()
    assert list(sd) == list(entry['state_dict'])  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == entry['state_dict']
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']


def test_edm2_config_sizes_are_the_released_ones():
    for size, name in (('s', 'edm2-img512-s'), ('m', 'edm2-img512-m'), ('l', 'edm2-img512-l')):
        with torch.device('meta'):
            net = MODELS.build(edm2_config(size))
        assert sum(p.numel() for p in net.parameters()) == MANIFESTS[name]['num_params']
    with pytest.raises(ValueError, match='unknown EDM2 size'):
        edm2_config('xxxl')


# --- magnitude-preserving primitives (closed forms) -------------------------------------------
def test_normalize_adds_eps_to_the_rms():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    rms = 5 / math.sqrt(2)
    expect = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) / torch.tensor([[rms + 0.5], [0.5]])
    torch.testing.assert_close(normalize(x, eps=0.5), expect)


def test_resample_is_box_filter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(resample(x, 'down'), x.reshape(1, 1, 2, 2, 2, 2).mean((3, 5)))
    up = resample(x, 'up')
    assert up.shape == (1, 1, 8, 8) and torch.equal(up[..., ::2, ::2], x) and torch.equal(up[..., 1::2, 1::2], x)


def test_mp_ops_preserve_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400_000, generator=g), torch.randn(400_000, generator=g)
    assert abs(mp_silu(a).square().mean().sqrt() - 1) < 0.01
    assert abs(mp_sum(a, b, 0.3).square().mean() - 1) < 0.01
    c = mp_cat(a.reshape(1, 2, -1), torch.randn(1, 6, 200_000, generator=g), t=0.3)
    assert c.shape[1] == 8 and abs(c.square().mean() - 1) < 0.01
    # the closed form of eq. 103: both halves weighted so the concatenation keeps unit RMS
    a2, b2 = torch.ones(1, 2, 1), torch.ones(1, 6, 1)
    out = mp_cat(a2, b2, t=0.3)
    C = math.sqrt(8 / (0.7 ** 2 + 0.3 ** 2))
    torch.testing.assert_close(out[0, :2, 0], torch.full((2,), C * 0.7 / math.sqrt(2)))
    torch.testing.assert_close(out[0, 2:, 0], torch.full((6,), C * 0.3 / math.sqrt(6)))


def test_mpconv_normalises_and_forces_weight_normalisation_in_training():
    torch.manual_seed(0)
    conv = MPConv(6, 3, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.5, 2.0, 7.0]).reshape(3, 1, 1, 1))
    stored = conv.weight.detach().clone()
    x = torch.randn(2, 6, 5, 5)
    w = stored / (1e-4 + stored.square().mean((1, 2, 3), keepdim=True).sqrt())
    expect = torch.nn.functional.conv2d(x, w * (2.0 / math.sqrt(54)), padding=1)
    conv.eval()
    torch.testing.assert_close(conv(x, gain=2.0), expect)
    assert torch.equal(conv.weight, stored)  # inference never writes the weight
    conv.train()
    # training overwrites the weight with normalize(w) first, then normalises that again
    w2 = w / (1e-4 + w.square().mean((1, 2, 3), keepdim=True).sqrt())
    expect2 = torch.nn.functional.conv2d(x, w2 * (2.0 / math.sqrt(54)), padding=1)
    torch.testing.assert_close(conv(x, gain=2.0), expect2)
    rms = conv.weight.detach().square().mean((1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(3), atol=1e-3, rtol=0)  # forced weight normalisation
    # a layer used twice before backward (one loss, two calls) still differentiates
    (conv(x).sum() + conv(x).square().sum()).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_forward_mode_derivative_runs_through_the_network():
    torch.manual_seed(0)
    net = EDM2Precond(8, 3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[4], channels_per_head=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # open the zero-initialised gains
    x, dx = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    _, tangent = torch.func.jvp(lambda v: net(v, sigma), (x,), (dx,))
    h = 1e-3
    with torch.no_grad():
        fd = (net(x + h * dx, sigma) - net(x - h * dx, sigma)) / (2 * h)
    assert rel(tangent.detach(), fd) < 2e-3


# --- the genuine pickles ------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', ['stored', 'float32'])
def test_fixture_matches_official_outputs(name, dtype):
    path, z = fixture(name)
    teacher = TEACHERS.build(dict(type='EDM2Teacher', path=path, dtype=dtype))
    suffix = '' if dtype == 'stored' else '_fp32'
    want = torch.float16 if dtype == 'stored' else torch.float32
    assert all(p.dtype == want for p in teacher.network.parameters())
    assert all(b.dtype == want for b in teacher.network.buffers())
    x, sigma, labels = inputs(z)
    with torch.no_grad():
        D, logvar = teacher.network(x, sigma, labels, return_logvar=True)
        samples = EDM2Sampler(num_steps=8)(teacher, torch.from_numpy(z['latents']), labels)
    assert rel(D, z['D' + suffix]) <= TOL
    assert rel(logvar, z['logvar' + suffix]) <= TOL
    assert rel(samples, z['heun8' + suffix]) <= TOL
    # the two references differ (MPConv's fp16 gain): the test tells the precisions apart
    other = z['D_fp32' if dtype == 'stored' else 'D']
    assert rel(D, other) > 5 * rel(D, z['D' + suffix])
    if dtype == 'float32':
        c_in = 1 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
        with torch.no_grad():
            F_x = teacher.network.unet(c_in * x, sigma.log() / 4, labels)
        assert rel(F_x, z['F_fp32']) <= TOL


@pytest.mark.parametrize('dtype', ['stored', 'float32'])
def test_guided_sampling_with_a_separate_guide_matches_official(dtype):
    path, z = fixture('edm2_latent_cond')
    guide = dict(type='EDM2Teacher', path=fixture('edm2_latent_uncond')[0], dtype=dtype)
    sampler = SAMPLERS.build(dict(type='EDM2Sampler', num_steps=8, guidance=float(z['guidance']),
                                  guide=guide))
    teacher = EDM2Teacher(path=path, dtype=dtype)
    with torch.no_grad():
        out = sampler(teacher, torch.from_numpy(z['latents']), torch.from_numpy(z['labels']))
    assert rel(out, z['guided8' + ('' if dtype == 'stored' else '_fp32')]) <= TOL
    assert sampler.nfe == sampler.guide_nfe == 15


def test_edm_teacher_config_reads_edm2_pickles_and_the_encoder():
    path, z = fixture('edm2_pixel_cond')
    teacher = TEACHERS.build(dict(type='EDMTeacher', path=path))  # as stored, like EDM pickles
    assert isinstance(teacher.network, EDM2Precond) and teacher.label_dim == 5
    assert teacher.data_shape == (3, 8, 8) and teacher.sigma_data == 0.5
    x, sigma, labels = inputs(z)
    with torch.no_grad():
        assert rel(teacher(x, sigma, labels.argmax(1)), z['D']) <= TOL  # integer labels too
    assert EDM2Teacher(path=path).encoder == {'class_name': 'StandardRGBEncoder'}
    enc = read_edm2_encoder(fixture('edm2_latent_cond')[0])
    assert enc['class_name'] == 'StabilityVAEEncoder' and enc['vae_name'] == 'stabilityai/sd-vae-ft-mse'
    assert type(enc['scale']) is np.ndarray and enc['scale'].dtype == np.float32
    np.testing.assert_allclose(enc['scale'], 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    np.testing.assert_allclose(enc['bias'], -np.array([5.81, 3.25, 0.12, -2.15]) * enc['scale'], rtol=1e-6)


def test_loading_runs_no_code_from_the_file():
    path, _ = fixture('edm2_latent_cond')
    before = set(sys.modules)
    data = read_edm_pickle(path)
    assert list(data) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert 'class Precond' in data['ema'].module_src  # kept as text
    new = set(sys.modules) - before
    assert not any(m.split('.')[0] in ('training', 'torch_utils', 'dnnlib') for m in new)


# --- files that try to run code, or smuggle objects through numpy ------------------------------
class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _as_numpy1(blob):
    """The same protocol-3 pickle (GLOBAL opcodes spell 'module\\nname\\n', no lengths) as
    numpy 1.x writes it (``numpy.core.multiarray``)."""
    out = blob.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
    assert out != blob
    return out


def test_unpickler_refuses_code_and_unsafe_numpy(tmp_path):
    marker = tmp_path / 'ran'
    evil = pickle.dumps(dict(encoder=_Call(os.system, f'touch {marker}'), ema=None), protocol=4)
    with pytest.raises(UnsafePickleError, match='system'):
        read_edm_pickle(io.BytesIO(evil))
    assert not marker.exists()
    # a genuine-looking encoder whose array holds Python objects
    objects = pickle.dumps(dict(scale=np.array([1, 'x'], dtype=object)), protocol=4)
    with pytest.raises(UnsafePickleError, match='object'):
        read_edm_pickle(io.BytesIO(objects))
    # numpy's _reconstruct asked to build something other than an ndarray
    import collections
    reco = pickle.dumps(_Call(np.ndarray.__reduce__(np.zeros(1))[0], collections.OrderedDict, (0,), b'b'), protocol=4)
    with pytest.raises(UnsafePickleError, match='only build numpy.ndarray'):
        read_edm_pickle(io.BytesIO(reco))
    # plain float arrays are read (both numpy spellings), as the img512 encoders store them
    ok = pickle.dumps(dict(scale=np.arange(4, dtype=np.float32)), protocol=3)
    for blob in (ok, _as_numpy1(ok)):
        arr = read_edm_pickle(io.BytesIO(blob))['scale']
        np.testing.assert_array_equal(arr, np.arange(4, dtype=np.float32))


def test_tampered_fixture_is_refused(tmp_path):
    path, _ = fixture('edm2_latent_uncond')
    blob = open(path, 'rb').read()
    # the class handed to numpy's _reconstruct becomes os.system (same length: frames stay valid)
    bad = blob.replace(b'numpy\x94\x8c\x07ndarray', b'posix\x94\x8c\x06system\x94', 1)
    assert bad != blob and len(bad) == len(blob)
    with pytest.raises(UnsafePickleError, match='posix.system'):
        read_edm_pickle(io.BytesIO(bad))
    # an unsupported network class is named, and not among the supported ones
    data = read_edm_pickle(path)
    data['ema'].class_name = 'Precond2'
    from gdistill.teachers.edm_pickle import network_from_record
    with pytest.raises(EDMPickleError, match="'Precond2'"):
        network_from_record(data['ema'])


# --- two-time f_ψ ----------------------------------------------------------------------------
def test_two_time_equals_teacher_at_init_and_learns_the_second_time():
    path, z = fixture('edm2_latent_cond')
    teacher = EDM2Teacher(path=path)
    f = teacher.network.with_condition_time()
    assert isinstance(f, EDM2TwoTimePrecond)
    cnoise, cemb = 32, 64
    assert f.num_added_params == cnoise * cemb + cemb * cemb + 1
    x, sigma, labels = inputs(z)
    f.eval()
    with torch.no_grad():
        ref, ref_lv = teacher.network(x, sigma, labels, return_logvar=True)
        for cs in (0.01, torch.tensor([0.3, 2.0, 50.0])):
            out, lv = f(x, sigma, labels, cond_sigma=cs, return_logvar=True)
            assert torch.equal(out, ref) and torch.equal(lv, ref_lv)
    # the gain opens the second path: output then depends on σ_cond, and gradients reach it
    f.train()
    loss = f(x, sigma, labels, cond_sigma=torch.tensor([0.3, 2.0, 50.0])).square().sum()
    loss.backward()
    assert f.cond_embedding.cond_gain.grad is not None and f.cond_embedding.cond_gain.grad != 0
    f.eval()
    with torch.no_grad():
        f.cond_embedding.cond_gain.fill_(1.0)
        a, b = f(x, sigma, labels, cond_sigma=0.1), f(x, sigma, labels, cond_sigma=10.0)
    assert (a - b).abs().max() > 1e-4
    assert teacher.network.unet.emb_noise.weight.grad is None  # the teacher is untouched
    assert sum(p.numel() for p in f.net.parameters()) == sum(p.numel() for p in teacher.network.parameters())


def test_two_time_parameter_increase_of_full_size_s():
    with torch.device('meta'):
        f = MODELS.build(edm2_config('s')).with_condition_time()
    assert f.num_added_params == 192 * 768 + 768 * 768 + 1 == 737_281
    assert f.state_dict().keys() >= {'net.unet.out_gain', 'cond_embedding.cond_gain',
                                     'cond_embedding.gate.weight', 'cond_embedding.emb_fourier.freqs'}


# --- EDM2's sampler ----------------------------------------------------------------------------
def test_edm2_grid_is_float32_without_clamping():
    s = edm2_sigma_steps(32)
    assert s.dtype == torch.float32 and len(s) == 33 and s[-1] == 0
    assert s[0].item() == pytest.approx(79.999985, abs=1e-6) and s[31].item() == pytest.approx(0.0019999996, rel=1e-7)
    sampler = EDM2Sampler()
    assert sampler.nfe == 63 and sampler.guide_nfe == 0


def test_sampler_solves_the_gaussian_ode():
    # data N(0, s²): D(x; σ) = x·s²/(s²+σ²), the ODE's solution x(0) = x(σ_max)·s/√(s²+σ_max²)
    s = 0.5
    noise = torch.randn(4, 3, dtype=torch.float64)
    def D(x, sig, lab):
        return x * s ** 2 / (s ** 2 + sig[:, None] ** 2)
    exact = noise * 80 * s / math.sqrt(s ** 2 + 80 ** 2)
    errors = [rel(EDM2Sampler(num_steps=n, dtype='float64')(D, noise), exact) for n in (64, 256)]
    assert errors[1] < 3e-4 and errors[0] / errors[1] > 12  # Heun: second order in the step
    # in float64 it is EDM's Heun sampler (no σ range or round_sigma on either side here)
    torch.testing.assert_close(EDM2Sampler(num_steps=7, dtype='float64')(D, noise),
                               EDMHeunSampler(num_steps=7)(D, noise), rtol=1e-12, atol=1e-12)


def test_guidance_is_the_lerp_of_the_two_denoisers():
    noise = torch.randn(3, 2)
    net = lambda x, sig, lab: 0.3 * x  # noqa: E731
    guide = lambda x, sig, lab: 0.1 * x  # noqa: E731
    w = 1.7
    guided = EDM2Sampler(num_steps=5, guidance=w, guide=guide)(net, noise)
    direct = EDM2Sampler(num_steps=5)(lambda x, sig, lab: 0.1 * x + w * (0.3 * x - 0.1 * x), noise)
    torch.testing.assert_close(guided, direct)

    def never(*args):
        raise AssertionError('w = 1 must not call the guide')
    EDM2Sampler(num_steps=3, guidance=1.0, guide=never)(net, noise)
    with pytest.raises(ValueError, match='needs a guide'):
        EDM2Sampler(guidance=2.0)


# --- the power-function EMA ---------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse():
    for s, g in ((0.05, 16.972), (0.10, 6.937), (0.13, 4.604), (0.015, 63.66)):
        assert sigma_rel_to_gamma(s) == pytest.approx(g, abs=2e-3)
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError, match='σ_rel'):
        sigma_rel_to_gamma(0.3)


def test_power_ema_is_the_discrete_power_profile():
    # batch 1 at steps k = 1..n gives weights (k/n)^{γ+1} − ((k−1)/n)^{γ+1} (telescoping product of β)
    torch.manual_seed(0)
    net, n, sigma_rel = torch.nn.Linear(3, 2), 25, 0.1
    ema = torch.nn.Linear(3, 2)
    thetas = []
    for k in range(1, n + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
        thetas.append([p.detach().clone() for p in net.parameters()])
        ema_step(ema, net, 1, None, float(k), sigma_rel=sigma_rel)
    g = sigma_rel_to_gamma(sigma_rel)
    w = [(k / n) ** (g + 1) - ((k - 1) / n) ** (g + 1) for k in range(1, n + 1)]
    for i, p in enumerate(ema.parameters()):
        torch.testing.assert_close(p.detach(), sum(wk * th[i] for wk, th in zip(w, thetas)))
    assert power_ema_beta(sigma_rel, 8, 8) == 0.0


def test_posthoc_inner_products_and_reconstruction():
    # ⟨p_a, p_b⟩ against quadrature of p(τ) = (γ+1)τ^γ / t^{γ+1} on [0, t]
    tau = np.linspace(0, 3, 600_001)
    def p(t, s):
        g = sigma_rel_to_gamma(s)
        return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0)
    for (ta, sa), (tb, sb) in (((1.0, 0.05), (2.0, 0.1)), ((3.0, 0.1), (1.5, 0.05)), ((2.0, 0.07), (2.0, 0.07))):
        quad = np.trapezoid(p(ta, sa) * p(tb, sb), tau)
        assert profile_inner_products(ta, sa, tb, sb) == pytest.approx(quad, rel=1e-4)
    x = posthoc_coefficients([1, 2, 3, 1, 2, 3], [.05] * 3 + [.1] * 3, 2, 0.1)
    np.testing.assert_allclose(x[:, 0], [0, 0, 0, 0, 1, 0], atol=1e-8)
    sds = [dict(w=torch.full((2,), float(i), dtype=torch.float16), n=torch.tensor(i)) for i in range(6)]
    out = posthoc_reconstruct(sds, [1, 2, 3, 1, 2, 3], [.05] * 3 + [.1] * 3, 0.1, out_t=2)
    assert out['w'].dtype == torch.float16 and torch.allclose(out['w'].float(), torch.full((2,), 4.0))
    assert out['n'] == 5


def test_distiller_takes_a_power_function_ema():
    teacher = dict(type='EDM2Teacher', network=dict(
        type='EDM2Precond', img_resolution=8, img_channels=4, label_dim=0, model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16))
    cfg = dict(type='SemiImplicitDistiller', teacher=teacher, kernel=dict(type='GaussianKernel'),
               divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2)),
               time_sampler=dict(type='CoSIMTimeSampler', R=4),
               sampler=dict(type='MultistepSampler', num_steps=2), ema_sigma_rel=0.05)
    model = MODELS.build(cfg)
    assert model.generator_ema is not None and isinstance(model.aux, EDM2TwoTimePrecond)
    with pytest.raises(ValueError, match='one EMA'):
        MODELS.build(dict(cfg, ema_half_life_images=1000))
    with pytest.raises(ValueError, match='σ_rel'):
        MODELS.build(dict(cfg, ema_sigma_rel=0.5))


def test_cosim_step_with_an_edm2_teacher_and_power_ema():
    from gdistill.engine.optim import MultiOptimWrapperConstructor
    path, _ = fixture('edm2_latent_cond')
    adam = dict(type='Adam', lr=1e-3, betas=(0.0, 0.99), eps=1e-12)
    model = MODELS.build(dict(
        type='SemiImplicitDistiller', teacher=dict(type='EDM2Teacher', path=path), student_dropout=0.1,
        kernel=dict(type='GaussianKernel'),
        divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                        generator_weight='sid', aux_weight='edm'),
        time_sampler=dict(type='CoSIMTimeSampler', R=4), sampler=dict(type='MultistepSampler', num_steps=2),
        ema_sigma_rel=0.05))
    wrappers = MultiOptimWrapperConstructor(dict(generator=dict(optimizer=adam), aux=dict(optimizer=adam)))(model)
    torch.manual_seed(0)
    g0 = [p.detach().clone() for p in model.generator.parameters()]
    labels = [torch.nn.functional.one_hot(torch.tensor(i % 5), 5).float() for i in range(4)]
    out = model.train_step(dict(idx=list(range(4)), label=labels), wrappers)
    assert set(out) == {'loss_aux', 'loss_generator'} and all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, p) for a, p in zip(g0, model.generator.parameters()))
    # first power-EMA step: β = 0, the EMA is the generator
    for a, p in zip(model.generator_ema.parameters(), model.generator.parameters()):
        assert torch.equal(a, p)
    with torch.no_grad():
        x = model.sample(torch.randn(2, 4, 8, 8), torch.stack(labels[:2]))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_the_tools_sample_an_edm2_teacher_with_edm2s_sampler(tmp_path):
    # a teacher's rows use its own paper's sampler: EDM2's for an EDM2 network however loaded
    path, _ = fixture('edm2_pixel_cond')
    for teacher in (EDM2Teacher(path=path), EDMTeacher(path=path)):
        assert teacher.reference_sampler() == dict(type='EDM2Sampler', num_steps=32)
        assert teacher.reference_sampler(8) == dict(type='EDM2Sampler', num_steps=8)
    edm = EDMTeacher(path=osp.join(DATA, 'edm_fixtures', 'edm_ddpmpp_uncond.pkl'))
    assert edm.reference_sampler() == dict(type='EDMHeunSampler', num_steps=18)


def test_edm_heun_sampler_runs_on_an_edm2_teacher():
    # EDM's sampler reads the network's σ range and round_sigma: EDM2 has neither (no clamping,
    # identity), so in float64 it is EDM2's sampler up to EDM2's float32 grid and state
    path, z = fixture('edm2_pixel_cond')
    teacher = EDMTeacher(path=path)
    lat, labels = torch.from_numpy(z['latents']), torch.from_numpy(z['labels'])
    with torch.no_grad():
        out = SAMPLERS.build(dict(type='EDMHeunSampler', num_steps=8))(teacher, lat, labels)
    assert rel(out, z['heun8']) < 1e-4
