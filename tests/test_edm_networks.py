"""EDM networks: module tree vs the official checkpoints, preconditioning formulas (EDM paper
Table 1 / FACTS.md), forward-mode AD, and two-time conditioning."""
import json
import math
import os.path as osp

import pytest
import torch
from torch import nn

from gdistill.networks.edm import (DhariwalUNet, EDMPrecond, SongUNet, TwoTimePrecond,
                                   VEPrecond, VPPrecond, iddpm_u_table, iDDPMPrecond)
from gdistill.registry import MODELS

MANIFESTS = json.load(open(osp.join(osp.dirname(__file__), 'data',
                                    'edm_state_dict_manifests.json')))

# Tiny variants of the three official architectures (16×16, two levels, attention at 8×8).
TINY = {
    'ddpmpp': dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], dropout=0.0),
    'ncsnpp': dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], dropout=0.0, embedding_type='fourier',
                   encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    'songskip': dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[8], dropout=0.0, encoder_type='skip',
                     decoder_type='skip'),
    # ADM gives out_channels // 64 heads: 32·[1, 2] channels puts one head at 8×8
    'adm': dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], dropout=0.0),
}
PRECONDS = [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond]



def randomize_(net, seed=0, scale=0.1):
    """Perturb every parameter so zero-initialised layers (ADM's output conv, the two-time
    gate) do not make outputs trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def tiny(precond=EDMPrecond, arch='ddpmpp', label_dim=0, **kw):
    torch.manual_seed(0)
    return randomize_(precond(16, 3, label_dim=label_dim, **{**TINY[arch], **kw})).eval()


# --- the official module trees ---------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(MANIFESTS))
def test_state_dict_matches_official_manifest(name):
    manifest = MANIFESTS[name]
    cfg = dict(manifest['constructor'])
    precond = cfg.pop('precond')
    with torch.device('meta'):  # shapes only: no memory, no init time
        net = MODELS.build(dict(type=precond, **cfg))
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    expected = list(manifest['state_dict'].items())
    missing = sorted(set(dict(expected)) - set(dict(got)))
    unexpected = sorted(set(dict(got)) - set(dict(expected)))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert got == expected  # same keys, same shapes, same order
    assert sum(p.numel() for p in net.parameters()) == manifest['num_params']



# --- forward -------------------------------------------------------------------------------
FORWARD_CASES = [(EDMPrecond, arch) for arch in sorted(TINY)] + [
    (VPPrecond, 'ddpmpp'), (VEPrecond, 'ncsnpp'), (iDDPMPrecond, 'adm'), (iDDPMPrecond, 'songskip')]


@pytest.mark.parametrize('precond,arch', FORWARD_CASES,
                         ids=[f'{p.__name__}-{a}' for p, a in FORWARD_CASES])
def test_forward_shape_and_finite(precond, arch):
    net = tiny(precond, arch, label_dim=5, augment_dim=9)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.01, 1.0, 60.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 4]), 5).float()
    out = net(x, sigma, labels, augment_labels=torch.randn(3, 9))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # unconditional call of a conditional net uses zero labels, as EDM does
    assert torch.equal(net(x, sigma), net(x, sigma, torch.zeros(3, 5)))


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_augment_labels_absent_means_zeros(arch):
    net = tiny(EDMPrecond, arch, augment_dim=9)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 2.0])
    assert torch.equal(net(x, sigma), net(x, sigma, augment_labels=torch.zeros(2, 9)))
    assert not torch.allclose(net(x, sigma), net(x, sigma, augment_labels=torch.ones(2, 9)))


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_label_dropout_and_dropout(arch):
    net = tiny(EDMPrecond, arch, label_dim=4, label_dropout=1.0)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 2.0])
    a, b = torch.eye(4)[[0, 1]], torch.eye(4)[[2, 3]]
    assert not torch.allclose(net(x, sigma, a), net(x, sigma, b))  # eval: labels matter
    net.train()
    assert torch.equal(net(x, sigma, a), net(x, sigma, b))  # every label dropped

    net = tiny(EDMPrecond, arch, dropout=0.5).train()
    assert not torch.equal(net(x, sigma), net(x, sigma))
    net.eval()
    assert torch.equal(net(x, sigma), net(x, sigma))


def test_clear_errors_for_bad_settings():
    with pytest.raises(ValueError, match="model_type='UNet'.*DhariwalUNet.*SongUNet"):
        EDMPrecond(16, 3, model_type='UNet')
    with pytest.raises(ValueError, match="embedding_type='learned'.*positional"):
        SongUNet(16, 3, 3, embedding_type='learned')
    net = SongUNet(16, 3, 3, label_dim=4, model_channels=16, channel_mult=[1], num_blocks=1)
    with pytest.raises(ValueError, match=r'class_labels of shape \[N, 4\]'):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1))


# --- preconditioning against the closed forms --------------------------------------------------
class ProbeF(nn.Module):
    """A known F: records its inputs and returns tanh(x_in) + c_noise (2× channels for
    iDDPM, the extra half filled with a constant that must not reach D)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.x_in, self.noise_labels = x, noise_labels
        out = torch.tanh(x) + noise_labels.reshape(-1, 1, 1, 1)
        extra = torch.full_like(out, 1e6)
        return torch.cat([out, extra][:self.channels // x.shape[1]], dim=1)


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return math.sqrt(math.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def _closed_form(name, s, net):
    """(c_skip, c_out, c_in, c_noise) from FACTS.md / EDM Table 1, in float64."""
    if name == 'EDMPrecond':
        sd = 0.5
        return (sd ** 2 / (s ** 2 + sd ** 2), s * sd / math.sqrt(s ** 2 + sd ** 2),
                1 / math.sqrt(s ** 2 + sd ** 2), math.log(s) / 4)
    if name == 'VPPrecond':  # t(σ) by bisection on σ(t), independent of the implementation
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _vp_sigma(mid) < s else (lo, mid)
        return 1.0, -s, 1 / math.sqrt(s ** 2 + 1), 999 * lo
    if name == 'VEPrecond':
        return 1.0, s, 1.0, math.log(s / 2)
    if name == 'iDDPMPrecond':
        u = net.u.double()
        return 1.0, -s, 1 / math.sqrt(s ** 2 + 1), 999 - int((u - s).abs().argmin())
    raise KeyError(name)


@pytest.mark.parametrize('precond', PRECONDS, ids=lambda c: c.__name__)
def test_preconditioning_matches_closed_forms(precond):
    net = precond(16, 3, **TINY['adm' if precond is iDDPMPrecond else 'ddpmpp'])
    net.model = ProbeF(6 if precond is iDDPMPrecond else 3)
    sigmas = [0.002, 0.05, 0.5, 1.0, 7.0, 80.0]
    x = torch.randn(len(sigmas), 3, 4, 4, dtype=torch.float64)
    out = net(x, torch.tensor(sigmas)).double()
    for i, s in enumerate(sigmas):
        c_skip, c_out, c_in, c_noise = _closed_form(precond.__name__, s, net)
        assert net.model.noise_labels[i].item() == pytest.approx(c_noise, rel=1e-5, abs=1e-4)
        torch.testing.assert_close(net.model.x_in[i].double(), c_in * x[i], rtol=1e-5, atol=1e-6)
        f = torch.tanh(torch.as_tensor(c_in * x[i]).float()).double() + c_noise
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * f, rtol=1e-4, atol=1e-4)


def test_iddpm_u_table_recursion_and_range():
    M, C_1, C_2 = 1000, 0.001, 0.008
    u = iddpm_u_table(M, C_1, C_2).double()

    def abar(j):
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

    assert u[M] == 0 and bool((u[:-1] > u[1:]).all())  # strictly decreasing to 0
    for j in (1, 2, 500, 999, 1000):
        lhs = (float(u[j - 1]) ** 2 + 1) * max(abar(j - 1) / abar(j), C_1)
        assert lhs == pytest.approx(float(u[j]) ** 2 + 1, rel=1e-5)
    net = iDDPMPrecond(16, 3, **TINY['adm'])
    assert net.sigma_min == pytest.approx(float(u[M - 1]), rel=1e-6)
    assert net.sigma_max == pytest.approx(float(u[0]), rel=1e-6)
    assert torch.equal(net.round_sigma(net.u[[3, 700]] * 1.0001), net.u[[3, 700]])
    assert 'u' in net.state_dict()


def test_vp_sigma_inverse_and_range():
    net = VPPrecond(16, 3, **TINY['ddpmpp'])
    t = torch.tensor([1e-5, 0.01, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=1e-6, atol=1e-9)
    assert net.sigma_min == pytest.approx(_vp_sigma(1e-5), rel=1e-9)
    assert net.sigma_max == pytest.approx(_vp_sigma(1.0), rel=1e-9)


# --- forward-mode AD ----------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_jvp_through_unet_with_attention(arch):
    net = tiny(EDMPrecond, arch)
    assert any(getattr(m, 'num_heads', 0) for m in net.modules())  # attention is exercised
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([0.7])
    v = torch.randn_like(x)

    def f(x):
        return net(x, sigma)

    out, tangent = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, f(x))
    eps = 1e-3
    finite_diff = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    err = (tangent - finite_diff).norm() / finite_diff.norm()
    assert err < 2e-2, float(err)


# --- two-time conditioning -----------------------------------------------------------------------
TWO_TIME_CASES = [(EDMPrecond, 'ddpmpp'), (EDMPrecond, 'ncsnpp'), (EDMPrecond, 'adm'),
                  (VPPrecond, 'ddpmpp'), (VEPrecond, 'ncsnpp'), (iDDPMPrecond, 'adm')]


@pytest.mark.parametrize('precond,arch', TWO_TIME_CASES,
                         ids=[f'{p.__name__}-{a}' for p, a in TWO_TIME_CASES])
def test_two_time_equals_original_at_init(precond, arch):
    net = tiny(precond, arch, label_dim=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    two = net.with_condition_time().eval()
    assert isinstance(two, TwoTimePrecond)
    x = torch.randn(4, 3, 16, 16)
    sigma = torch.tensor([0.02, 0.4, 3.0, 50.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    ref = net(x, sigma, labels)
    for cond in (torch.tensor([0.01, 0.2, 1.0, 30.0]), 5.0, sigma):
        assert (two(x, sigma, labels, cond_sigma=cond) - ref).abs().max() <= 1e-6
    assert torch.equal(two(x, sigma, labels), ref)  # no cond_sigma: the original network

    # the original network is untouched, and the copy keeps its weights under net.
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    two_sd = two.state_dict()
    assert all(torch.equal(two_sd['net.' + k], v) for k, v in before.items())
    assert set(two_sd) - {'net.' + k for k in before} == {
        k for k in two_sd if k.startswith('cond_embedding.')}

    # the second path is live: opening the gate makes the output depend on cond_sigma
    with torch.no_grad():
        two.cond_embedding.gate.weight.normal_(0, 0.1)
    a = two(x, sigma, labels, cond_sigma=0.1)
    b = two(x, sigma, labels, cond_sigma=10.0)
    assert not torch.allclose(a, b)


def test_two_time_gate_receives_gradient_and_jvp_works():
    two = tiny(EDMPrecond, 'ddpmpp').with_condition_time()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    two(x, sigma, cond_sigma=torch.tensor([0.1, 1.0])).square().mean().backward()
    assert two.cond_embedding.gate.weight.grad.abs().sum() > 0
    v = torch.randn_like(x)
    out, tangent = torch.func.jvp(lambda x: two(x, sigma, cond_sigma=0.3), (x,), (v,))
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0


def test_two_time_from_config_and_parameter_increase():
    # built from a MODELS config
    two = MODELS.build(dict(type='TwoTimePrecond',
                            net=dict(type='EDMPrecond', img_resolution=16, img_channels=3,
                                     **TINY['ddpmpp'])))
    assert isinstance(two.net, EDMPrecond) and two.img_resolution == 16
    with pytest.raises(TypeError, match='wraps an EDM preconditioner'):
        TwoTimePrecond(nn.Linear(2, 2))

    increase = {}
    for name in ('edm-cifar10-32x32-cond-vp', 'edm-imagenet-64x64-cond-adm'):
        cfg = dict(MANIFESTS[name]['constructor'])
        cfg.pop('precond')
        with torch.device('meta'):
            two = EDMPrecond(**cfg).with_condition_time()
        unet = two.net.model
        noise_ch, emb_ch = unet.map_layer0.in_features, unet.emb_channels
        expected = ((noise_ch + 1) * emb_ch + (emb_ch + 1) * emb_ch  # copied map_layer0/1
                    + (emb_ch + 1) * emb_ch)  # zero-initialised gate
        assert two.num_added_params == expected
        total = sum(p.numel() for p in two.parameters())
        assert total == MANIFESTS[name]['num_params'] + expected
        increase[name] = expected / MANIFESTS[name]['num_params']
    assert increase['edm-cifar10-32x32-cond-vp'] == pytest.approx(591360 / 55735299)
    assert increase['edm-imagenet-64x64-cond-adm'] == pytest.approx(1329408 / 295899267)


def test_networks_registered():
    for name in ('SongUNet', 'DhariwalUNet', 'EDMPrecond', 'VPPrecond', 'VEPrecond',
                 'iDDPMPrecond', 'TwoTimePrecond'):
        assert MODELS.get(name) is not None, name
    net = MODELS.build(dict(type='VEPrecond', img_resolution=16, img_channels=3,
                            **TINY['ncsnpp']))
    assert isinstance(net.model, SongUNet) and isinstance(
        MODELS.build(dict(type='iDDPMPrecond', img_resolution=16, img_channels=3,
                          **TINY['adm'])).model, DhariwalUNet)
