"""The image configs: the full-size CoSIM models of projects/cosim take a training step, a tiny
image CoSIM run goes through the train tool, and EDM denoising training (DenoisingTrainer)."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gdistill.data  # noqa: F401
import gdistill.distillers  # noqa: F401
import gdistill.engine  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.distillers.denoising import DenoisingTrainer
from gdistill.engine.optim import MultiOptimWrapperConstructor
from gdistill.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(ROOT, 'tools', 'train.py')
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def optim_wrappers(cfg, model):
    ow = dict(cfg.optim_wrapper)
    assert ow.pop('constructor') == 'MultiOptimWrapperConstructor'
    return MultiOptimWrapperConstructor(ow)(model)


def probe(module):
    """A few entries of every parameter (cheap to keep beside a 300 M-parameter model)."""
    return [p.detach().flatten()[:16].clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(b, p.detach().flatten()[:16]) for b, p in zip(before, module.parameters()))


def count(module):
    return sum(p.numel() for p in module.parameters())


# --- the paper's settings --------------------------------------------------------------------
def test_table5_settings():
    c = load_config(osp.join(ROOT, 'projects', 'cosim', 'cifar10.py'))
    i = load_config(osp.join(ROOT, 'projects', 'cosim', 'imagenet64.py'))
    for cfg in (c, i):
        acc = cfg.optim_wrapper.generator.accumulative_counts
        # one iteration = one step on the global batch, each GPU's batch in `acc` micro-batches
        assert cfg.train_dataloader.batch_size * cfg.num_gpus == 2048 and cfg.train_dataloader.batch_size == 32 * acc
        assert cfg.optim_wrapper.aux.accumulative_counts == acc
        assert cfg.train_cfg.max_iters == 200_000_000 // 2048
        assert cfg.model.divergence.h.alpha == 1.2 and cfg.model.divergence.coef == 1.0
        assert cfg.model.sampler == dict(type='MultistepSampler', num_steps=4)
        assert cfg.optim_wrapper.generator.optimizer == cfg.optim_wrapper.aux.optimizer
    co, io = c.optim_wrapper.generator.optimizer, i.optim_wrapper.generator.optimizer
    assert (co.lr, co.eps, tuple(co.betas)) == (1e-5, 1e-8, (0.0, 0.999))
    assert (io.lr, io.eps, tuple(io.betas)) == (4e-6, 1e-12, (0.0, 0.99))
    assert (c.model.time_sampler.R, i.model.time_sampler.R) == (4, 8)
    assert (c.model.ema_half_life_images, i.model.ema_half_life_images) == (500_000, 2_000_000)
    assert (c.model.student_dropout, i.model.student_dropout) == (0.0, 0.1)
    assert i.train_dataloader.dataset.label_dim == 1000 == i.model.teacher.network.label_dim
    # the alias the docs give for real teachers reaches the model
    p = load_config(osp.join(ROOT, 'projects', 'cosim', 'cifar10.py'),
                    cfg_options={'teacher.path': '/x/edm.pkl', 'teacher.network': None})
    assert p.model.teacher.path == '/x/edm.pkl' and p.model.teacher.network is None


def one_full_step(name, labels, **options):
    # one process: no gradient accumulation, so this single step updates the weights
    cfg = load_config(osp.join(ROOT, 'projects', 'cosim', f'{name}.py'), cfg_options={
        'optim_wrapper.generator.accumulative_counts': 1, 'optim_wrapper.aux.accumulative_counts': 1, **options})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    wrappers = optim_wrappers(cfg, model)
    g0, a0 = probe(model.generator), probe(model.aux)
    data = dict(idx=[0])
    if labels:
        data['label'] = [torch.nn.functional.one_hot(torch.tensor(7), labels).float()]
    out = model.train_step(data, wrappers)
    assert set(out) == {'loss_aux', 'loss_generator'}
    assert all(torch.isfinite(v) for v in out.values()), out
    assert changed(g0, model.generator) and changed(a0, model.aux)
    return model


@pytest.mark.slow
def test_full_cifar10_model_one_step():
    model = one_full_step('cifar10', 0)
    assert count(model.teacher.network) == 55_733_891 == count(model.generator)   # EDM's pickle count
    assert count(model.aux) > count(model.generator)                            # f_ψ's second time path
    blocks = [m for m in model.generator.modules() if hasattr(m, 'dropout') and isinstance(m.dropout, float)]
    assert blocks and all(m.dropout == 0.0 for m in blocks)


def test_full_imagenet64_model_builds_on_meta():
    cfg = load_config(osp.join(ROOT, 'projects', 'cosim', 'imagenet64.py'))
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert count(model.teacher.network) == 295_899_267 == count(model.generator)   # EDM's pickle count
    assert model.generator.label_dim == model.aux.label_dim == 1000
    rates = {m.dropout for m in model.generator.modules() if isinstance(getattr(m, 'dropout', None), float)}
    assert rates == {0.1}


@pytest.mark.slow
def test_imagenet64_config_one_step_at_reduced_width(monkeypatch):
    """The ImageNet-64 config's every setting but the ADM width (192 -> 32 channels: the full
    296 M-parameter step took minutes of a CPU CI run and is covered on meta above)."""
    model_labels = []
    from gdistill.teachers.edm import EDMTeacher
    orig = EDMTeacher.edm_denoise

    def spy(self, x, sigma, class_labels=None):
        model_labels.append(None if class_labels is None else class_labels.argmax(-1).tolist())
        return orig(self, x, sigma, class_labels)
    monkeypatch.setattr(EDMTeacher, 'edm_denoise', spy)
    model = one_full_step('imagenet64', 1000, **{'model.teacher.network.model_channels': 32})
    assert model_labels and all(lab == [7] for lab in model_labels)      # the batch's class reached the teacher
    assert model.generator.label_dim == model.aux.label_dim == 1000


# --- a tiny image CoSIM run through the train tool ----------------------------------------------
def train(args, timeout=300):
    out = subprocess.run([sys.executable, TRAIN] + args, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def logged(work_dir):
    files = glob.glob(osp.join(str(work_dir), '*', 'vis_data', 'scalars.json'))
    assert files, f'no scalars.json under {work_dir}'
    return [json.loads(line) for line in open(files[0])]


@pytest.mark.slow
def test_tiny_image_cosim_through_train_tool(tmp_path):
    config = osp.join(ROOT, 'tests', 'configs', 'cosim_tiny_images.py')
    train([config, '--work-dir', str(tmp_path)])
    rows = [r for r in logged(tmp_path) if 'loss_aux' in r]
    assert len(rows) == 4
    assert all(np.isfinite(r['loss_aux']) and np.isfinite(r['loss_generator']) for r in rows)
    assert sorted(os.listdir(tmp_path / 'samples')) == ['iter_0000002.png', 'iter_0000004.png']
    cfg = load_config(config)
    model = MODELS.build(cfg.model)
    state = torch.load(tmp_path / 'iter_4.pth', map_location='cpu', weights_only=False)['state_dict']
    model.load_state_dict(state)
    assert float(model.images_seen) == 8
    x = model.sample(torch.randn(4, 3, 8, 8))
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()
    # training moved the generator away from the teacher it started from
    assert not torch.equal(model.generator.model.enc['8x8_conv'].weight,
                           model.teacher.network.model.enc['8x8_conv'].weight)


# --- EDM denoising training ----------------------------------------------------------------------
def tiny_network(label_dim=0, res=8):
    return dict(type='EDMPrecond', img_resolution=res, img_channels=3, label_dim=label_dim,
                model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0)


def test_denoising_loss_is_edm_weighted_loss():
    torch.manual_seed(0)
    trainer = DenoisingTrainer(network=tiny_network(label_dim=5), ema_half_life_images=100)
    with torch.no_grad():      # EDM zero-initialises some layers: make every path count
        for p in trainer.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.rand(3, 3, 8, 8) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.tensor([0, 4, 2]), 5).float()
    sigma, noise = torch.tensor([0.05, 1.0, 20.0]), torch.randn(3, 3, 8, 8)
    got = trainer.denoising_loss(y, labels, sigma=sigma, noise=noise)
    # independently: EDM preconditioning around the raw F, weight (σ²+σ_d²)/(σσ_d)²
    sd, s = 0.5, sigma.view(-1, 1, 1, 1)
    x = y + s * noise
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (s ** 2 + sd ** 2).sqrt(), s.log().flatten() / 4
    D = c_skip * x + c_out * trainer.network.model(c_in * x, c_noise, class_labels=labels)
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    want = w * ((D - y) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the labels matter (so they are really passed on)
    other = trainer.denoising_loss(y, labels.roll(1, 0), sigma=sigma, noise=noise)
    assert not torch.allclose(got, other)
    # σ ~ exp(P_mean + P_std·N): log σ has mean −1.2 and std 1.2
    ls = trainer.sample_sigma(20000).log()
    assert abs(float(ls.mean()) + 1.2) < 0.05 and abs(float(ls.std()) - 1.2) < 0.05


def test_denoising_trainer_steps_reduce_loss():
    torch.manual_seed(0)
    trainer = DenoisingTrainer(network=tiny_network(), ema_half_life_images=1000)
    wrappers = MultiOptimWrapperConstructor(dict(network=dict(optimizer=dict(type='Adam', lr=2e-3))))(trainer)
    # a fixed batch of a simple image family: constant-colour squares
    colours = torch.rand(16, 3, 1, 1) * 255
    imgs = colours.expand(16, 3, 8, 8).round().to(torch.uint8)
    batch = dict(img=list(imgs), idx=list(range(16)))
    g = torch.Generator().manual_seed(1)
    sig, noise = torch.exp(-1.2 + 1.2 * torch.randn(16, generator=g)), torch.randn(16, 3, 8, 8, generator=g)
    y = imgs.float() / 127.5 - 1

    def fixed_loss():
        with torch.no_grad():
            return float(trainer.denoising_loss(y, sigma=sig, noise=noise).mean())
    before, ema0 = fixed_loss(), probe(trainer.network_ema)
    for _ in range(30):
        out = trainer.train_step(batch, wrappers)
        assert torch.isfinite(out['loss_denoise'])
    assert fixed_loss() < 0.9 * before       # measured: 1.04 -> 0.88
    assert float(trainer.images_seen) == 30 * 16 and changed(ema0, trainer.network_ema)
    with pytest.raises(ValueError, match='needs images'):
        trainer.train_step(dict(idx=[0, 1]), wrappers)


def write_png_folder(path, n=12, res=8):
    rng = np.random.default_rng(0)
    os.makedirs(path / '00000')
    for i in range(n):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (res, res, 3)).copy()).save(path / '00000' / f'img{i:08d}.png')


@pytest.mark.slow
def test_denoising_trainer_through_train_tool(tmp_path):
    write_png_folder(tmp_path / 'data')
    config = osp.join(ROOT, 'configs', 'teachers', 'edm_tiny_images.py')
    train([config, '--work-dir', str(tmp_path / 'run'), '--cfg-options',
           f'train_dataloader.dataset.path={tmp_path / "data"}', 'train_dataloader.dataset.resolution=8',
           'model.network.img_resolution=8', 'model.network.attn_resolutions=[4]',
           'train_dataloader.batch_size=4', 'train_dataloader.num_workers=0', 'train_cfg.max_iters=4',
           'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=4',
           'custom_hooks.2.interval=4', 'custom_hooks.2.num_samples=4', 'model.sampler.num_steps=3',
           'torch_threads=1'])
    rows = [r for r in logged(tmp_path / 'run') if 'loss_denoise' in r]
    assert len(rows) == 4 and all(np.isfinite(r['loss_denoise']) for r in rows)
    assert os.listdir(tmp_path / 'run' / 'samples') == ['iter_0000004.png']
    state = torch.load(tmp_path / 'run' / 'iter_4.pth', map_location='cpu', weights_only=False)['state_dict']
    assert float(state['images_seen']) == 16
    assert any(k.startswith('network_ema.') for k in state)
