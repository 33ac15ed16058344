"""The semi-implicit distiller's two stages against independent computations: SiD's fused
loss as its public code writes it, and the shared-draw option's gradients."""
import copy
import os.path as osp
import sys

import pytest
import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from gdistill.registry import MODELS
from gdistill.utils import append_dims

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

TINY_TEACHER = {'teacher.network.hidden': 16, 'teacher.network.depth': 1, 'teacher.fit.iters': 5,
                'teacher.fit.batch_size': 32}


def build(config, tmp_path, **options):
    cfg = load_config(osp.join(ROOT, config), cfg_options=dict(
        TINY_TEACHER, **{'teacher.fit.cache_dir': str(tmp_path)}, **options))
    DefaultScope.get_instance(f'test_{id(cfg)}', scope_name='gdistill')
    return MODELS.build(cfg.model)


def test_sid_config_computes_sids_fused_loss(tmp_path):
    """configs/sid/toy2d.py = SiD: x_g = G(σ_init·z, σ_init), x_s = x_g + σ·n,
    loss = mean_i Σ (f_φ − f_ψ)·[(f_φ − x_g) − α(f_φ − f_ψ)] / mean|x_g − f_φ| (NaN-free batch)."""
    model = build('configs/sid/toy2d.py', tmp_path)
    torch.manual_seed(3)
    loss = model.generator_losses(256, None, {})['loss_generator']

    torch.manual_seed(3)
    pairs, x_t = model._draw(256, None, 'generator')
    assert torch.allclose(pairs['sigma_t'], torch.full_like(pairs['sigma_t'], 2.5))
    assert float(pairs['sigma_s'].max()) <= 24.5                 # t_max = 800 of 1000
    sigma_init = torch.full((256,), 2.5)
    x_g = model.generator(x_t, sigma_init)
    sigma = pairs['sigma_s'].float()
    x_s = x_g + append_dims(sigma, 2) * torch.randn(x_g.shape)
    f_phi = model.teacher.network(x_s, sigma)
    f_psi = model.aux(x_s, sigma, cond_sigma=sigma_init)
    w = (x_g - f_phi).abs().mean(dim=1).detach().clamp(min=1e-5)
    expected = (((f_phi - f_psi) * ((f_phi - x_g) - 1.2 * (f_phi - f_psi))).sum(dim=1) / w).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_sid_fake_score_step_is_denoising_score_matching(tmp_path):
    """With coef = ½ the ψ-loss (a Fenchel–Young gap) is exactly ½·w_EDM·‖f_ψ − x_g‖²: EDM's
    denoising loss on detached generator samples."""
    model = build('configs/sid/toy2d.py', tmp_path)
    torch.manual_seed(5)
    loss = model.aux_losses(256, None, {})['loss_aux']
    torch.manual_seed(5)
    k = model.kernel_pass(256, None, 'aux', grad=False)
    sigma, sd = k['pairs']['sigma_s'].float(), model.teacher.sigma_data
    f_psi = model.aux(k['x_s'], sigma, cond_sigma=k['pairs']['sigma_t'].float())
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    dsm = 0.5 * w * ((f_psi - k['x0']) ** 2).sum(1)
    torch.testing.assert_close(loss, dsm.mean(), rtol=1e-5, atol=1e-6)
    # SiD's ψ-stage draws ln σ ~ N(−1.2, 1.2²), not the generator's ramp
    torch.manual_seed(0)
    ln_sigma = model.time_sampler.sample(20000, model.schedule, stage='aux')['sigma_s'].log()
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.05 and abs(float(ln_sigma.std()) - 1.2) < 0.05


def _capture_grads(net):
    """The parameters' gradients summed over every backward pass."""
    grads = {}
    for name, p in net.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, grads.get(name, 0) + g.clone()))
    return grads


@pytest.mark.parametrize('micro', [1, 2])
def test_shared_draw_gives_the_gradient_of_the_phi_loss_on_that_draw(tmp_path, micro):
    """share_batch: the φ-update's gradient equals the gradient of the φ-loss recomputed from
    scratch on the ψ-stage's draws (same random numbers, G before its update, ψ after its),
    also when each update accumulates ``micro`` micro-batches (micro-batch i reuses draw i)."""
    model = build('projects/cosim/toy2d.py', tmp_path, **{'model.share_batch': True,
                                                          'train_dataloader.batch_size': 128})
    before = copy.deepcopy(model)
    opt = {k: torch.optim.SGD(getattr(model, k).parameters(), lr=0.1) for k in ('aux', 'generator')}

    grads, aux_grads = _capture_grads(model.generator), _capture_grads(model.aux)
    torch.manual_seed(11)
    model.train_step({'idx': list(range(128))},
                     {k: OptimWrapper(o, accumulative_counts=micro) for k, o in opt.items()})
    assert grads and aux_grads

    torch.manual_seed(11)                                       # the same draws, from scratch
    draws = [before.kernel_pass(128 // micro, None, 'generator', grad=True) for _ in range(micro)]
    loss_aux = 0
    for k in draws:
        pairs, x0, f_phi = k['pairs'], k['x0'].detach(), k['f_phi'].detach()
        f_psi = before.aux(k['x_s'].detach(), pairs['sigma_s'].float(), cond_sigma=pairs['sigma_t'].float())
        w = before.divergence.aux_weight(x0, f_phi, pairs['sigma_s'].float(), before.teacher.sigma_data)
        loss_aux = loss_aux + before.divergence.aux_loss(f_phi - x0, f_phi - f_psi, w).mean() / micro
    for (name, p), g in zip(before.aux.named_parameters(), torch.autograd.grad(loss_aux, list(before.aux.parameters()))):
        torch.testing.assert_close(aux_grads[name], g, rtol=1e-5, atol=1e-8)

    before.aux.load_state_dict(model.aux.state_dict())          # ψ after its update
    before._shared = draws
    loss = 0
    for i in range(micro):
        before.micro_batch = (i, micro)
        loss = loss + before.generator_losses(128 // micro, None, {})['loss_generator'] / micro
    expected = torch.autograd.grad(loss, list(before.generator.parameters()))
    for (name, _), g in zip(before.generator.named_parameters(), expected):
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8)


def test_shared_draw_needs_one_time_distribution(tmp_path):
    with pytest.raises(ValueError, match='share_batch needs one time distribution'):
        build('configs/sid/toy2d.py', tmp_path, **{'model.share_batch': True})
