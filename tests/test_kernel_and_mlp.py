"""Tests of gdistill.kernels.GaussianKernel (CoSIM's transition kernel) and
gdistill.networks.mlp.MLPDenoiser (EDM preconditioning, second time path)."""
import math

import pytest
import torch

from gdistill.kernels.gaussian import GaussianKernel
from gdistill.networks.mlp import MLPDenoiser
from gdistill.schedules import EDMSchedule, VPSchedule

F64 = torch.float64



def rand_times(schedule, n, g):
    return schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(n, generator=g, dtype=F64)


SCHEDULES = [EDMSchedule(), VPSchedule(), VPSchedule(beta_d=0.0, beta_min=2.0, t_min=1e-3, t_max=4.0)]


# ----------------------------------------------------------------------------- GaussianKernel
@pytest.mark.parametrize('schedule', SCHEDULES, ids=['edm', 'vp', 'vp_ou'])
@pytest.mark.parametrize('std_scale', [1.0, 0.5, 2.0])
def test_conditional_score_is_the_autograd_gradient(schedule, std_scale):
    g = torch.Generator().manual_seed(0)
    kernel = GaussianKernel(std_scale=std_scale)
    s = rand_times(schedule, 6, g)
    x0_hat = torch.randn(6, 3, 2, generator=g, dtype=F64)
    x_s = torch.randn(6, 3, 2, generator=g, dtype=F64) * 3
    x_s.requires_grad_(True)
    mean = schedule.alpha(s)[:, None, None] * x0_hat
    std = std_scale * schedule.sigma(s)[:, None, None]
    logp = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_s).sum()
    (grad,) = torch.autograd.grad(logp, x_s)
    score = kernel.conditional_score(x_s.detach(), x0_hat, s, schedule)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-12)
    # with std_scale = 1 it is Tweedie's form, the schedule's score_from_x0
    if std_scale == 1.0:
        torch.testing.assert_close(score, schedule.score_from_x0(x_s.detach(), x0_hat, s), rtol=1e-14, atol=0)


@pytest.mark.parametrize('schedule', SCHEDULES[:2], ids=['edm', 'vp'])
def test_kernel_sample_is_reparameterised(schedule):
    g = torch.Generator().manual_seed(1)
    kernel = GaussianKernel(std_scale=1.5)
    s = rand_times(schedule, 4, g)
    x0_hat = torch.randn(4, 5, generator=g, dtype=F64)
    noise = torch.randn(4, 5, generator=g, dtype=F64)
    x_s = kernel.sample(x0_hat, s, schedule, noise)
    a, sig = schedule.alpha(s)[:, None], schedule.sigma(s)[:, None]
    torch.testing.assert_close(x_s, a * x0_hat + 1.5 * sig * noise, rtol=1e-14, atol=0)
    # the score at the sampled point is −ε/std
    torch.testing.assert_close(kernel.conditional_score(x_s, x0_hat, s, schedule), -noise / (1.5 * sig),
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kernel.std(s, schedule), 1.5 * schedule.sigma(s), rtol=0, atol=0)


@pytest.mark.parametrize('schedule', SCHEDULES[:2], ids=['edm', 'vp'])
def test_kernel_sample_moments(schedule):
    """Monte Carlo: x_s | x̂₀ has mean a(s)·x̂₀ and std std_scale·σ(s) per coordinate."""
    n, k = 200000, 0.8
    g = torch.Generator().manual_seed(2)
    s = torch.tensor([0.3 * schedule.t_max + 0.7 * schedule.t_min], dtype=F64).expand(n)
    x0_hat = torch.tensor([[1.0, -2.0]], dtype=F64).expand(n, 2)
    x_s = GaussianKernel(std_scale=k).sample(x0_hat, s, schedule, torch.randn(n, 2, generator=g, dtype=F64))
    a, sig = float(schedule.alpha(s[0])), float(schedule.sigma(s[0]))
    std = k * sig
    se = std / math.sqrt(n)
    for j, m in enumerate((1.0, -2.0)):
        assert abs(float(x_s[:, j].mean()) - a * m) < 5 * se
        assert abs(float(x_s[:, j].std()) - std) < 5 * std / math.sqrt(2 * n)


def test_kernel_float32_and_bad_std_scale():
    sched = VPSchedule()
    s = torch.tensor([0.2, 0.7], dtype=F64)
    x0 = torch.randn(2, 3)
    out = GaussianKernel().sample(x0, s, sched, torch.zeros(2, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sched.alpha(s).float()[:, None] * x0)
    with pytest.raises(ValueError, match=r'GaussianKernel: std_scale must be > 0, got 0'):
        GaussianKernel(std_scale=0)


# ----------------------------------------------------------------------------- MLPDenoiser
def small_net(**kw):
    torch.manual_seed(0)
    return MLPDenoiser(**{**dict(dim=3, hidden=32, depth=2, emb_dim=16), **kw}).double()


@pytest.mark.parametrize('sd', [0.5, 1.3])
def test_preconditioning_is_edm(sd):
    net = small_net(sigma_data=sd)
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = net.precondition(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert float(c_skip[i]) == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-14)
        assert float(c_out[i]) == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-14)
        assert float(c_in[i]) == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-14)
        assert float(c_noise[i]) == pytest.approx(0.25 * math.log(s), rel=1e-14)
    # EDM's identities: c_in²(σ²+σ_d²) = 1 and c_skip + (c_out/σ_d)² = 1
    torch.testing.assert_close(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_skip + (c_out / sd) ** 2, torch.ones_like(sigma), rtol=1e-14, atol=0)


def test_zero_output_layer_gives_the_skip_connection():
    net = small_net()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    sigma = torch.exp(torch.randn(5, generator=g, dtype=F64))
    out = net(x, sigma)
    assert torch.equal(out, net.precondition(sigma)[0][:, None] * x)
    torch.testing.assert_close(out, 0.25 / (sigma[:, None] ** 2 + 0.25) * x, rtol=1e-14, atol=0)


def test_output_is_preconditioned_network():
    """The raw network F sees c_in·x, and D = c_skip·x + c_out·F (captured with forward hooks)."""
    net = small_net()
    seen = {}
    h1 = net.inp.register_forward_hook(lambda m, inp, out: seen.__setitem__('in', inp[0].clone()))
    h2 = net.out.register_forward_hook(lambda m, inp, out: seen.__setitem__('F', out.clone()))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    out = net(x, sigma)
    h1.remove(), h2.remove()
    sd2 = 0.25
    c_in = 1 / torch.sqrt(sigma ** 2 + sd2)
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * 0.5 / torch.sqrt(sigma ** 2 + sd2)
    torch.testing.assert_close(seen['in'], c_in[:, None] * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(out, c_skip[:, None] * x + c_out[:, None] * seen['F'], rtol=1e-13, atol=1e-15)
    # and a scalar σ broadcasts over the batch
    assert torch.equal(net(x, 0.3), net(x, torch.full((4,), 0.3, dtype=F64)))


def test_with_condition_time_equals_original_at_init():
    net = small_net()
    aux = net.with_condition_time()
    assert net.cond_time is None and aux.cond_time is not None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    sigma = torch.exp(torch.randn(7, generator=g, dtype=F64))
    cond = torch.exp(2 * torch.randn(7, generator=g, dtype=F64))
    ref = net(x, sigma)
    assert torch.equal(aux(x, sigma, cond_sigma=cond), ref)
    assert torch.equal(aux(x, sigma), ref)
    # the copy is independent of the original
    assert aux.out.weight.data_ptr() != net.out.weight.data_ptr()
    # perturbing the new path's last layer makes cond_sigma matter
    with torch.no_grad():
        aux.cond_time[-1].weight.normal_(generator=g)
        aux.cond_time[-1].bias.normal_(generator=g)
    out = aux(x, sigma, cond_sigma=cond)
    assert not torch.allclose(out, ref)
    assert not torch.allclose(out, aux(x, sigma, cond_sigma=cond * 3))
    assert torch.equal(aux(x, sigma), ref)  # without cond_sigma it is still the original
    assert torch.equal(net(x, sigma), ref)  # and the original is untouched


def test_cond_sigma_gradient_is_zero_at_init_only_through_new_layer():
    """At init the output does not depend on cond_sigma, but the zero layer still gets gradients
    (otherwise the new path could never learn)."""
    aux = small_net().with_condition_time()
    x = torch.randn(4, 3, dtype=F64)
    cond = torch.full((4,), 2.0, dtype=F64, requires_grad=True)
    out = aux(x, torch.full((4,), 0.7, dtype=F64), cond_sigma=cond)
    out.square().sum().backward()
    assert float(cond.grad.abs().max()) == 0.0
    assert float(aux.cond_time[-1].weight.grad.abs().max()) > 0


def test_original_network_rejects_cond_sigma():
    net = small_net()
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r'cond_sigma given to a network without a second time path; '
                                         r'build the auxiliary network with with_condition_time\(\)'):
        net(x, torch.ones(2, dtype=F64), cond_sigma=torch.ones(2, dtype=F64))


@pytest.mark.parametrize('kw', [dict(dim=0), dict(hidden=0), dict(depth=0)])
def test_mlp_bad_arguments(kw):
    with pytest.raises(ValueError, match=r'MLPDenoiser: dim, hidden and depth must be >= 1'):
        MLPDenoiser(**kw)


def test_class_labels_condition_the_output():
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=1, emb_dim=8, label_dim=3).double()
    x = torch.randn(3, 2, dtype=F64)
    sigma = torch.ones(3, dtype=F64)
    a = net(x, sigma, class_labels=torch.eye(3, dtype=F64))
    b = net(x, sigma, class_labels=torch.eye(3, dtype=F64)[[1, 2, 0]])
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, sigma, class_labels=torch.zeros(3, 3, dtype=F64)), net(x, sigma))
