"""The semi-implicit distiller's choices that follow the papers and SiD's official loop: the
mixing distribution from data (CoSIM eq. 8), the networks' modes in each update, the NaN
normalisation, the augmentation of the fake-score update, and the official SiD recipes."""
import os.path as osp
import sys

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from torch.utils.data import DataLoader
from torch.utils._python_dispatch import TorchDispatchMode

import gdistill.data  # noqa: F401
from gdistill.data import MixtureSampleDataset
from gdistill.distillers.semi_implicit import finite_samples, reduce_finite
from gdistill.registry import MODELS
from gdistill.utils import append_dims

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

TINY_TEACHER = {'teacher.network.hidden': 16, 'teacher.network.depth': 1, 'teacher.fit.iters': 5,
                'teacher.fit.batch_size': 32}
TINY_UNET = dict(_delete_=True, type='EDMPrecond', img_resolution=8, img_channels=3, label_dim=0,
                 model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], augment_dim=9, dropout=0.13)


def build(config, tmp_path=None, **options):
    opts = dict(options)
    if tmp_path is not None:
        opts.update(TINY_TEACHER, **{'teacher.fit.cache_dir': str(tmp_path)})
    cfg = load_config(osp.join(ROOT, config), cfg_options=opts)
    DefaultScope.get_instance(f'test_{id(cfg)}', scope_name='gdistill')
    return cfg, MODELS.build(cfg.model)


def sgd(model, k=1):
    return {name: OptimWrapper(torch.optim.SGD(getattr(model, name).parameters(), lr=1e-3), accumulative_counts=k)
            for name in model.trained}


def loader_batch(n, seed=0):
    """One batch of ring8's exact samples as the runner's dataloader hands it over."""
    dataset = MixtureSampleDataset(mixture=dict(name='ring8'), length=4096, seed=seed)
    batch = next(iter(DataLoader(dataset, batch_size=n, shuffle=False, collate_fn=pseudo_collate)))
    return dataset, batch


# --- mixing='data': x_t ~ p(x_t | x0) with x0 from the loader ----------------------------------
def test_data_mixing_is_the_forward_process_of_the_batch(tmp_path):
    """x_t = a(t)·x0 + σ(t)·ε for the pairs not from the prior (σ(t)·ε for those), x0 the
    loader's batch: exactly (same ε), and in mean over 4 000 noise draws, under a VP schedule
    where a(t) ≠ 1."""
    _, model = build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'data',
                                                             'model.schedule': dict(type='VPSchedule')})
    dataset, batch = loader_batch(64)
    data = model.data_preprocessor(batch, True)
    x0 = dataset.samples[:64]
    assert torch.equal(data['inputs'], x0)
    torch.manual_seed(0)
    pairs, _ = model._draw(64, None, 'generator', data)
    rest = ~pairs['from_prior']
    assert rest.any() and pairs['from_prior'].any()
    sched = model.schedule
    a, sigma = append_dims(sched.alpha(pairs['t']), 2), append_dims(sched.sigma(pairs['t']), 2)
    assert float((1 - a[rest]).max()) > 0.5                     # VP: the data is scaled

    torch.manual_seed(5)
    x_t = model.mixing_samples(pairs, None, data)
    torch.manual_seed(5)
    eps = torch.randn(64, 2)
    expected = torch.where(append_dims(rest, 2), a * x0, torch.zeros_like(x0)) + sigma * eps
    torch.testing.assert_close(x_t, expected, rtol=1e-6, atol=1e-6)

    draws = torch.stack([model.mixing_samples(pairs, None, data) for _ in range(4000)])
    mean_err = (draws.mean(0) - torch.where(append_dims(rest, 2), a * x0, torch.zeros_like(x0))).abs() / sigma
    assert float(mean_err.max()) < 5 / 4000 ** 0.5
    torch.testing.assert_close(draws.std(0) / sigma, torch.ones(64, 2), rtol=0.1, atol=0)


def test_data_mixing_reads_the_train_step_batch(tmp_path, monkeypatch):
    """Through train_step (ψ- and φ-update, two micro-batches): every mixing draw uses the
    loader's samples of that micro-batch, and nothing else."""
    _, model = build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'data', 'model.share_batch': False})
    dataset, batch = loader_batch(64)
    seen = []
    orig = type(model).data_samples

    def spy(self, data, n):
        x0 = orig(self, data, n)
        seen.append(x0.clone())
        return x0
    monkeypatch.setattr(type(model), 'data_samples', spy)
    model.train_step(batch, sgd(model, k=2))
    halves = [dataset.samples[:32], dataset.samples[32:64]]
    assert len(seen) == 4                                         # 2 updates × 2 micro-batches
    for i, x0 in enumerate(seen):
        assert torch.equal(x0, halves[i % 2])


def test_data_mixing_needs_samples_in_the_batch(tmp_path):
    _, model = build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'data'})
    with pytest.raises(ValueError, match=r"mixing='data' draws x_t ~ p\(x_t \| x0\).*MixtureSampleDataset"):
        model.train_step({'idx': list(range(8))}, sgd(model))
    with pytest.raises(ValueError, match=r"mixing is 'model' .*, 'data' .* or 'chain' .*got 'dataset'"):
        build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'dataset'})
    with pytest.raises(ValueError, match=r"HSIVIDistiller draws its own mixing samples"):
        build('configs/hsivi/toy2d.py', tmp_path, **{'model.mixing': 'data'})


# --- mixing='chain': x_t is the sampler's chain run to the pair's level ---------------------------
CHAIN = {'model.mixing': 'chain', 'model.time_sampler.window': 'sampler',
         'model.time_sampler.sampler_sigmas': [80.0, 20.0, 3.0, 0.5]}


def test_chain_mixing_runs_the_samplers_chain(tmp_path, monkeypatch):
    """With G(x; σ) = 0.9·x the chain's variance is closed-form: v_0 = σ_0², v_{j+1} =
    0.81·v_j + σ_{j+1}²; the pairs at level σ_i have it per coordinate (and the prior pairs σ_0²),
    while the one-jump sample of mixing='model' would have 0.81·σ_0² + σ_i² (13–30 % off)."""
    _, model = build('projects/cosim/toy2d.py', tmp_path, **CHAIN)
    monkeypatch.setattr(model, 'denoise', lambda net, x, t, labels=None, **kw: 0.9 * x)
    levels = CHAIN['model.time_sampler.sampler_sigmas']
    torch.manual_seed(0)
    pairs = model.time_sampler.sample(150_000, model.schedule, generator=torch.Generator().manual_seed(1))
    pairs = {k: (v.float() if v.is_floating_point() else v) for k, v in pairs.items()}
    x_t = model.mixing_samples(pairs, None)
    top = pairs['from_prior']
    assert abs(float(x_t[top].var()) / 80.0 ** 2 - 1) < 0.03
    v = levels[0] ** 2
    for level in levels[1:]:
        v = 0.81 * v + level ** 2
        at = ~top & torch.isclose(pairs['sigma_t'].double(), torch.tensor(level, dtype=torch.float64))
        assert int(at.sum()) > 20_000
        ratio = float(x_t[at].var()) / v
        assert abs(ratio - 1) < 0.03, (level, ratio)
        if level != levels[1]:      # the first level is the one-jump sample itself
            one_jump = 0.81 * levels[0] ** 2 + level ** 2
            assert abs(float(x_t[at].var()) / one_jump - 1) > 0.1


def test_chain_mixing_trains_and_needs_the_samplers_levels(tmp_path):
    _, model = build('projects/cosim/toy2d.py', tmp_path, **CHAIN)
    _, batch = loader_batch(32)
    before = [p.detach().clone() for p in model.generator.parameters()]
    log = model.train_step(batch, sgd(model))
    assert all(torch.isfinite(v).all() for v in log.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))
    with pytest.raises(ValueError, match=r"mixing='chain' .* window='sampler' .*got CoSIMTimeSampler with window='fixed'"):
        build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'chain'})


def test_data_mixing_is_sync_free(tmp_path):
    """The data path and the NaN handling read no tensor value on the host (no .item(),
    bool(), int() or data-dependent shape): no aten._local_scalar_dense, no nonzero."""
    _, model = build('projects/cosim/toy2d.py', tmp_path, **{'model.mixing': 'data'})
    _, batch = loader_batch(32)
    data = model.data_preprocessor(batch, True)

    class NoSync(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero,
                                       torch.ops.aten.masked_select):
                self.calls.append(str(func))
            return func(*args, **(kwargs or {}))
    with NoSync() as mode:
        model.aux_losses(32, None, data)
        model.generator_losses(32, None, data)
    assert mode.calls == []


# --- network modes ---------------------------------------------------------------------------
def record_modes(model):
    """(phase, network, grad enabled, training) of every forward of G and f_ψ."""
    log, phase = [], ['-']
    for name in ('generator', 'aux'):
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: log.append((phase[0], name, torch.is_grad_enabled(), m.training)))
    orig = model.update_network

    def update_network(ph, *args, **kw):
        phase[0] = ph
        return orig(ph, *args, **kw)
    model.update_network = update_network
    return log


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_network_modes_in_each_update(tmp_path, mode):
    """inactive_mode='eval' (SiD's loop): G runs in eval mode wherever it only makes samples
    (the ψ-update, the mixing samples), f_ψ in eval mode inside the φ-update; each trained
    network is in train mode in its own update. 'train': all in train mode."""
    _, model = build('projects/cosim/toy2d.py', tmp_path, **{'model.inactive_mode': mode, 'model.share_batch': False})
    model.train()
    log = record_modes(model)
    model.train_step({'idx': list(range(64))}, sgd(model))
    assert {(p, n) for p, n, _, _ in log} == {('aux', 'generator'), ('aux', 'aux'),
                                              ('generator', 'generator'), ('generator', 'aux')}
    for phase, net, grad, training in log:
        trains_it = phase == net and grad     # the update's own network, with its gradient
        assert training == (trains_it or mode == 'train'), (phase, net, grad, training)
    assert model.generator.training and model.aux.training        # restored after the step


def test_sid_recipe_modes_on_a_dropout_unet(tmp_path):
    """configs/sid/cifar10.py (tiny UNet with dropout 0.13): the same modes, and dropout acts
    only in train mode: f_ψ in the φ-update is deterministic."""
    _, model = build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET,
                                                  'optim_wrapper.generator.accumulative_counts': 1,
                                                  'optim_wrapper.aux.accumulative_counts': 1})
    assert model.inactive_mode == 'eval' and model.nonfinite == 'batch'
    model.train()
    log = record_modes(model)
    model.train_step({'idx': list(range(4))}, sgd(model))
    for phase, net, grad, training in log:
        assert training == (phase == net and grad), (phase, net, grad, training)
    with model.inactive(model.aux):
        x, s = torch.randn(2, 3, 8, 8), torch.full((2,), 1.0)
        torch.testing.assert_close(model.aux(x, s, cond_sigma=s * 2.5), model.aux(x, s, cond_sigma=s * 2.5))
    assert model.aux.training


# --- NaN normalisation ----------------------------------------------------------------------
def test_reduce_finite_divides_by_the_batch_or_the_count():
    loss = torch.tensor([1.0, 2.0, float('nan'), 4.0], requires_grad=True)
    ok = torch.ones(4, dtype=torch.bool)
    value = reduce_finite(loss, ok, 'batch')
    assert float(value) == pytest.approx(7 / 4)                  # Σ finite / B (SiD)
    value.backward()
    assert loss.grad.tolist() == [0.25, 0.25, 0.0, 0.25]
    assert float(reduce_finite(loss.detach(), ok, 'finite')) == pytest.approx(7 / 3)
    assert float(reduce_finite(loss.detach(), torch.tensor([True, False, True, True]), 'batch')) == pytest.approx(5 / 4)
    assert torch.isnan(reduce_finite(torch.full((3,), float('nan')), torch.ones(3, dtype=torch.bool), 'batch'))
    assert torch.isnan(reduce_finite(torch.ones(3), torch.zeros(3, dtype=torch.bool), 'finite'))
    x = torch.tensor([[1.0, 2.0], [float('inf'), 0.0], [3.0, 4.0]], requires_grad=True)
    ok, (clean, none) = finite_samples(x, None)
    assert ok.tolist() == [True, False, True] and none is None
    clean.sum().backward()
    assert x.grad.tolist() == [[1, 1], [0, 0], [1, 1]]            # the dropped sample passes nothing


def nan_output(net, rows):
    """``net`` returns NaN for the given rows of every batch."""
    def hook(module, args, out):
        out = out.clone()
        out[rows] = float('nan')
        return out
    return net.register_forward_hook(hook)


@pytest.mark.parametrize('stage,source', [('generator', 'teacher'), ('aux', 'aux')])
def test_nan_samples_are_dropped_and_the_loss_divided_by_the_batch(tmp_path, stage, source):
    """A NaN in one sample's denoiser output (the teacher's in the φ-update, f_ψ's in the
    ψ-update): 'batch' gives Σ_others / B, 'finite' gives Σ_others / (B − 1) (same random
    numbers), and the gradient stays finite (the NaN sample is masked before the loss, as SiD
    indexes it out)."""
    values = {}
    for norm in ('batch', 'finite'):
        _, model = build('configs/sid/toy2d.py', tmp_path, **{'model.nonfinite': norm})
        nan_output(model.teacher.network if source == 'teacher' else model.aux, [3])
        torch.manual_seed(7)
        loss = getattr(model, f'{stage}_losses')(16, None, {})[f'loss_{stage}']
        net = model.generator if stage == 'generator' else model.aux
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
        assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        values[norm] = float(loss)
    assert values['batch'] * 16 == pytest.approx(values['finite'] * 15, rel=1e-5)


def test_all_nan_batch_reaches_the_guard(tmp_path):
    _, model = build('configs/sid/toy2d.py', tmp_path, **{'model.nonfinite': 'batch'})
    nan_output(model.aux, slice(None))                            # every sample of both updates
    before = [p.detach().clone() for p in model.generator.parameters()]
    logs = model.train_step({'idx': list(range(16))}, sgd(model))
    assert torch.isnan(logs['loss_generator'])
    assert model.nonfinite_guard.skipped == 2                      # the ψ- and the φ-update
    assert all(torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))


# --- augmentation in the fake-score update ----------------------------------------------------
def test_augment_labels_reach_f_psi_in_the_psi_update_only():
    _, model = build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET,
                                                  'model.augment.p': 1.0,
                                                  'optim_wrapper.generator.accumulative_counts': 1,
                                                  'optim_wrapper.aux.accumulative_counts': 1})
    assert model.augment_pipe.label_dim == 9 == model.teacher.network.model.map_augment.in_features
    calls = []
    model.aux.register_forward_pre_hook(lambda m, a, kw: calls.append((torch.is_grad_enabled(), kw.get('augment_labels'))),
                                        with_kwargs=True)
    model.teacher.network.register_forward_pre_hook(lambda m, a, kw: calls.append(('teacher', kw.get('augment_labels'))),
                                                    with_kwargs=True)
    torch.manual_seed(0)
    model.aux_losses(4, None, {})
    psi = [lab for g, lab in calls if g is True]
    assert len(psi) == 1 and psi[0].shape == (4, 9) and bool((psi[0][:, 0].abs() + psi[0][:, 2:].abs().sum(1) > 0).all())
    assert all(lab is None for who, lab in calls if who == 'teacher')
    calls.clear()
    model.generator_losses(4, None, {})
    assert calls and all(lab is None for _, lab in calls)
    with pytest.raises(ValueError, match='with augment the ψ-stage sees augmented images'):
        build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET, 'model.share_batch': True,
                                           'model.time_sampler.aux_lognormal': None})


def test_augmented_psi_target_is_the_augmented_sample():
    """With only x-flips (drawn always, a fair coin each): the ψ-stage's x̂₀ is G's sample
    flipped exactly where the label says."""
    _, model = build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET})
    model.augment_pipe = MODELS.build(dict(type='AugmentPipe', p=1.0, xflip=1e8))
    model.eval()
    torch.manual_seed(1)
    k = model.kernel_pass(8, None, 'aux', grad=False, augment=True)
    torch.manual_seed(1)
    pairs, x_t = model._draw(8, None, 'aux')
    x0 = model.denoise(model.generator, x_t, pairs['t'])
    flip = k['augment_labels'][:, 0].view(8, 1, 1, 1) == 1
    torch.testing.assert_close(k['x0'], torch.where(flip, x0.flip(3), x0))


# --- the official recipes --------------------------------------------------------------------
def test_sid_cifar10_config_is_run_sid_sh():
    cfg, model = build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET})
    assert cfg.global_batch == 256 and cfg.max_iters == 500_000_000 // 256
    for name in ('generator', 'aux'):
        opt = cfg.optim_wrapper[name]['optimizer']
        assert (opt['type'], opt['lr'], tuple(opt['betas']), opt['eps']) == ('Adam', 1e-5, (0.0, 0.999), 1e-8)
    assert cfg.train_dataloader.batch_size * cfg.num_gpus == cfg.global_batch
    assert model.student_dropout == 0.13
    assert [m.dropout for m in model.generator.modules() if isinstance(getattr(m, 'dropout', None), float)][0] == 0.13
    pipe = model.augment_pipe
    assert pipe.p == 0.12 and pipe.label_dim == 9
    assert {k for k, v in pipe.mult.items() if v > 0} == {'xflip', 'yflip', 'scale', 'rotate_frac', 'aniso', 'translate_frac'}
    assert model.divergence.alpha == 1.2 and model.divergence.coef == pytest.approx(0.5)
    assert model.time_sampler.sigma_init == 2.5 and model.ema_half_life_images == 500_000
    assert (model.inactive_mode, model.nonfinite) == ('eval', 'batch')


def test_sid_imagenet64_config_is_run_sid_sh():
    cfg = load_config(osp.join(ROOT, 'configs/sid/imagenet64.py'))
    assert cfg.global_batch == 8192 and cfg.max_iters == 1_000_000_000 // 8192
    for name in ('generator', 'aux'):
        opt = cfg.optim_wrapper[name]['optimizer']
        assert (opt['lr'], tuple(opt['betas']), opt['eps']) == (4e-6, (0.0, 0.999), 1e-6)
    m = cfg.model
    assert m.student_dropout == 0.1 and m.teacher.network.use_fp16 and m.augment is None
    assert (m.inactive_mode, m.nonfinite, m.ema_half_life_images) == ('eval', 'batch', 2_000_000)


def test_augment_warns_when_f_psi_takes_no_augment_labels(monkeypatch):
    import gdistill.distillers.semi_implicit as si
    logged = []
    monkeypatch.setattr(si, 'print_log', lambda msg, **kw: logged.append(msg))
    build('configs/sid/cifar10.py', **{'model.teacher.network': TINY_UNET})
    assert logged == []
    build('configs/sid/cifar10.py', **{'model.teacher.network': dict(TINY_UNET, augment_dim=0)})
    assert len(logged) == 1 and 'the augmentation pipe writes 9 label columns but f_ψ takes no augment labels' in logged[0]


def test_evaluation_sources_pick_the_ema_the_raw_generator_or_the_teacher(tmp_path):
    from gdistill.engine.image_eval import denoiser_for
    _, model = build('projects/cosim/toy2d.py', tmp_path)
    assert model.generator_ema is not None and model.generator_ema is not model.generator
    assert denoiser_for(model, 'student') is model.generator_ema
    assert denoiser_for(model, 'student_raw') is model.generator
    assert denoiser_for(model, 'teacher') is model.teacher
    with pytest.raises(ValueError, match=r"source is 'student', 'student_raw' or 'teacher', got 'ema'"):
        denoiser_for(model, 'ema')
