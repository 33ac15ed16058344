"""DMD's regression term on the semi-implicit distiller: the pool of teacher pairs against an
independent Heun integration, the loss against its formula, the pool file, and bad options."""
import math
import os.path as osp
import sys

import pytest
import torch
from mmengine.registry import DefaultScope

from gdistill.distillers.regression import TeacherPairRegression
from gdistill.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

TINY_TEACHER = {'teacher.network.hidden': 16, 'teacher.network.depth': 1, 'teacher.fit.iters': 5,
                'teacher.fit.batch_size': 32}
HEUN3 = dict(type='EDMHeunSampler', num_steps=3)


def build(config, tmp_path, **options):
    cfg = load_config(osp.join(ROOT, config), cfg_options=dict(
        TINY_TEACHER, **{'teacher.fit.cache_dir': str(tmp_path)}, **options))
    DefaultScope.get_instance(f'test_{id(cfg)}', scope_name='gdistill')
    return MODELS.build(cfg.model)


def heun_by_hand(denoiser, z, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al. 2022, Algorithm 1 with the eq. 5 steps and t_N = 0, in float64."""
    ramp = [(sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(num_steps)] + [0.0]

    def d(x, t):
        return (x - denoiser(x.float(), torch.full((x.shape[0],), t)).double()) / t
    x = z.double() * ramp[0]
    for t, t_next in zip(ramp[:-1], ramp[1:]):
        slope = d(x, t)
        x_next = x + (t_next - t) * slope
        if t_next > 0:
            x_next = x + (t_next - t) * 0.5 * (slope + d(x_next, t_next))
        x = x_next
    return x


def test_regression_term_is_half_the_squared_distance_to_the_teachers_ode_sample(tmp_path):
    """loss_regression = λ·½‖G(σ_init·z; σ_init) − y‖² averaged over pool pairs, y the teacher's
    deterministic Heun sample from σ_max·z, z the pool's seeded latents (SiD: σ_init = 2.5)."""
    model = build('configs/sid/toy2d.py', tmp_path,
                  **{'model.regression': dict(weight=0.7, num_pairs=64, sampler=HEUN3, seed=3, chunk=10)})
    torch.manual_seed(1)
    loss = model.regression_losses(32)
    pool = model.regression.pool
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pool['latents'], z) and pool['labels'] is None
    y = heun_by_hand(model.teacher.network, z, 3)
    torch.testing.assert_close(pool['samples'].double(), y, rtol=1e-4, atol=1e-5)

    torch.manual_seed(1)
    i = torch.randint(0, 64, (32,))
    x = model.generator(2.5 * z[i], torch.full((32,), 2.5))
    torch.testing.assert_close(loss, 0.7 * 0.5 * (x - pool['samples'][i]).square().sum(1))
    loss.sum().backward()                       # the term trains the generator
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())

    out = model.generator_losses(32, None, {})
    assert set(out) == {'loss_generator', 'loss_regression'}
    assert float(out['loss_regression'].detach()) > 0


def test_cosim_feeds_the_generator_its_prior_level(tmp_path):
    """CoSIM's one-step map starts at σ_max = 80 (the time sampler's prior level), under any
    schedule: with a VP schedule the input is x_t = σ(t)·z at the t of EDM level 80."""
    model = build('projects/cosim/toy2d.py', tmp_path, **{
        'model.regression': dict(weight=1.0, num_pairs=16, sampler=HEUN3),
        'model.schedule': dict(type='VPSchedule')})
    seen = []
    model.generator.register_forward_hook(lambda m, args, out: seen.append(args))
    torch.manual_seed(0)
    model.regression_losses(8)
    x_in, sigma_in = seen[-1][0], seen[-1][1]
    z = model.regression.pool['latents']
    torch.testing.assert_close(sigma_in, torch.full((8,), 80.0))
    # the network sees x_t / a(t) = σ_EDM·z, i.e. 80·z for a pool latent
    rows = [(x_in[k] / 80.0 - z).norm(dim=1).min() for k in range(8)]
    assert max(rows) < 1e-4


class LabelDenoiser(torch.nn.Module):
    """D(x; σ, c) = class index of c everywhere: the ODE's end is the class index."""

    def forward(self, x, sigma, class_labels=None):
        c = class_labels.argmax(1).to(x.dtype)
        return c.view((-1,) + (1,) * (x.ndim - 1)).expand_as(x)


def test_pool_labels_cycle_the_classes_and_the_pool_does_not_depend_on_the_chunk():
    reg = TeacherPairRegression(80.0, num_pairs=10, sampler=dict(type='EulerSampler', num_steps=4), chunk=3)
    pool = reg.compute(LabelDenoiser(), (1, 2, 2), 3, 'cpu')
    assert torch.equal(pool['labels'].argmax(1), torch.arange(10) % 3)
    # Euler from 80·z onto D ≡ c lands at c exactly (the last step to σ = 0 is x − σ·(x − c)/σ)
    torch.testing.assert_close(pool['samples'].flatten(1), (torch.arange(10) % 3).float()[:, None].expand(10, 4))
    again = TeacherPairRegression(80.0, num_pairs=10, sampler=dict(type='EulerSampler', num_steps=4), chunk=10)
    assert torch.equal(again.compute(LabelDenoiser(), (1, 2, 2), 3, 'cpu')['latents'], pool['latents'])


def test_pool_file_is_reused_only_for_the_same_setting(tmp_path, monkeypatch):
    cache = tmp_path / 'pairs'
    cfg = dict(weight=1.0, num_pairs=16, sampler=HEUN3, cache_dir=str(cache))
    model = build('configs/sid/toy2d.py', tmp_path, **{'model.regression': cfg})
    model.regression_losses(4)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith('teacher_pairs_')
    first = model.regression.pool['samples']

    def refuse(*args, **kwargs):
        raise AssertionError('the pool was computed again')
    monkeypatch.setattr(TeacherPairRegression, 'compute', refuse)
    again = build('configs/sid/toy2d.py', tmp_path, **{'model.regression': dict(cfg, weight=3.0)})
    again.regression_losses(4)                  # λ does not change the pool: read back
    assert torch.equal(again.regression.pool['samples'], first)

    monkeypatch.undo()      # another seed: a second file, the first kept
    other = build('configs/sid/toy2d.py', tmp_path, **{'model.regression': dict(cfg, seed=1)})
    other.regression_losses(4)
    assert len(list(cache.iterdir())) == 2
    with torch.no_grad():   # another teacher (same shapes): another file name
        next(other.teacher.parameters()).add_(1.0)
    reg = other.regression
    assert reg.cache_path(reg._meta(other.teacher, (2,), 0)) != reg.cache_path(reg._meta(model.teacher, (2,), 0))


@pytest.mark.parametrize('cfg, match', [
    (dict(weight=0.0), 'weight'),
    (dict(sampler=dict(type='EDMHeunSampler', num_steps=4, S_churn=10.0)), 'deterministic'),
    (dict(num_pairs=0), 'num_pairs'),
])
def test_bad_regression_options_are_named(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        build('configs/sid/toy2d.py', tmp_path, **{'model.regression': cfg})


def test_a_misspelled_regression_option_lists_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="regression takes no \\['wieght'\\]; its options are \\['weight', 'num_pairs'"):
        build('configs/sid/toy2d.py', tmp_path, **{'model.regression': dict(wieght=1.0)})


def test_regression_is_refused_where_the_kernel_is_the_models_own(tmp_path):
    with pytest.raises(ValueError, match='regression is SemiImplicitDistiller'):
        build('configs/hsivi/toy2d.py', tmp_path, **{'model.regression': dict(weight=1.0)})


def test_trajectory_points_follow_the_exact_probability_flow_of_a_gaussian():
    """Data N(0, s²): D(x; σ) = x·s²/(s² + σ²), and the probability-flow ODE (EDM eq. 3) carries
    x(σ_max) to x(σ) = x(σ_max)·√(s² + σ²)/√(s² + σ_max²). The Heun trajectory with the levels
    added to its grid meets that at every level and at 0."""
    from gdistill.distillers.regression import heun_trajectory
    from gdistill.samplers import EDMHeunSampler
    s2 = 0.3 ** 2

    def gaussian(x, sigma, labels=None):
        return x * (s2 / (s2 + sigma.view(-1, 1) ** 2))
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    levels = [20.0, 3.3, 0.4]
    y, at = heun_trajectory(EDMHeunSampler(num_steps=256), gaussian, z, None, levels)
    x_max = 80.0 * z.double()
    for k, sigma in enumerate(levels):
        exact = x_max * math.sqrt(s2 + sigma ** 2) / math.sqrt(s2 + 80.0 ** 2)
        torch.testing.assert_close(at[:, k], exact, rtol=5e-4, atol=1e-6)
    torch.testing.assert_close(y, x_max * math.sqrt(s2) / math.sqrt(s2 + 80.0 ** 2), rtol=5e-4, atol=1e-6)


def test_levels_feed_each_call_the_teachers_trajectory_point(tmp_path):
    """With levels (80, 20, 0.4) a regressed sample at σ_i > 0 below σ_max enters G as the
    trajectory's point there (CoSIM's toy config, EDM schedule), at σ_max as 80·z."""
    model = build('projects/cosim/toy2d.py', tmp_path, **{'model.regression': dict(
        weight=1.0, num_pairs=32, sampler=dict(type='EDMHeunSampler', num_steps=6), levels=[80.0, 20.0, 0.4])})
    seen = []
    model.generator.register_forward_hook(lambda m, args, out: seen.append(args))
    torch.manual_seed(2)
    model.regression_losses(64)
    x_in, sigma_in = seen[-1][0], seen[-1][1]
    pool = model.regression.pool
    assert pool['points'].shape == (32, 2, 2)
    torch.manual_seed(2)
    i, k = torch.randint(0, 32, (64,)), torch.randint(0, 3, (64,))
    torch.testing.assert_close(sigma_in, torch.tensor([80.0, 20.0, 0.4])[k])
    expected = torch.where((k == 0)[:, None], 80.0 * pool['latents'][i], pool['points'][i, (k - 1).clamp(min=0)])
    torch.testing.assert_close(x_in, expected)
    assert set(k.tolist()) == {0, 1, 2}


@pytest.mark.parametrize('levels', [[70.0, 20.0], [80.0, 90.0], [80.0, 20.0, 20.0]])
def test_levels_must_start_at_the_one_step_level_and_decrease(tmp_path, levels):
    with pytest.raises(ValueError, match='levels start at'):
        build('projects/cosim/toy2d.py', tmp_path, **{'model.regression': dict(levels=levels)})


def test_level_weights_scale_each_samples_term_by_its_level(tmp_path):
    """level_weights [1, 0.25, 0] multiply λ·½‖G(x; σ) − y‖² by the weight of each sample's level."""
    options = dict(weight=2.0, num_pairs=32, sampler=dict(type='EDMHeunSampler', num_steps=6), levels=[80.0, 20.0, 0.4])
    plain = build('projects/cosim/toy2d.py', tmp_path, **{'model.regression': options})
    weighted = build('projects/cosim/toy2d.py', tmp_path, **{'model.regression': dict(options, level_weights=[1.0, 0.25, 0.0])})
    weighted.generator.load_state_dict(plain.generator.state_dict())
    torch.manual_seed(3)
    a = plain.regression_losses(64)
    torch.manual_seed(3)
    b = weighted.regression_losses(64)
    torch.manual_seed(3)
    _, k = torch.randint(0, 32, (64,)), torch.randint(0, 3, (64,))   # the batch's draws: pair, then level
    torch.testing.assert_close(b, a * torch.tensor([1.0, 0.25, 0.0])[k])
    assert (b[k == 2] == 0).all() and (b[k == 0] > 0).all()


@pytest.mark.parametrize('level_weights', [[1.0, 1.0], [1.0, -0.5, 1.0], [0.0, 0.0, 0.0]])
def test_level_weights_need_one_non_negative_weight_per_level(tmp_path, level_weights):
    with pytest.raises(ValueError, match='level_weights takes one multiplier >= 0 per level'):
        build('projects/cosim/toy2d.py', tmp_path, **{'model.regression': dict(levels=[80.0, 20.0, 0.4],
                                                                              level_weights=level_weights)})
