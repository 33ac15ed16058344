"""CoSIM on ImageNet-512 (latent) with EDM2 teachers: the S/M/L configs hold Table 5's settings,
the full-size S model takes one CoSIM step on the CPU with latents and labels, M and L build on
the meta device with EDM2's parameter counts, and the latent toy (tiny VAE, tiny EDM2 teacher
trained by DenoisingTrainer, CoSIM with the same config family, decoded samples) runs end to end."""
import json
import os.path as osp
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('diffusers')

import gdistill.data  # noqa: E402,F401
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
from gdistill.engine.optim import MultiOptimWrapperConstructor  # noqa: E402
from gdistill.registry import MODELS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

# EDM2's released img512 networks (their parameter counts, built on 'meta' there)
EDM2_PARAMS = dict(s=280_212_837, m=497_807_781, l=777_498_085)
# Table 5 of the CoSIM paper, ImageNet-512 S / M / L
TABLE5 = dict(s=dict(lr=2e-5, R=8, images=200_000_000, dropout=0.0, channels=192),
              m=dict(lr=2e-5, R=4, images=200_000_000, dropout=0.1, channels=256),
              l=dict(lr=1e-4, R=4, images=20_000_000, dropout=0.1, channels=320))


def config(size, **options):
    return load_config(osp.join(ROOT, 'projects', 'cosim', f'imagenet512_{size}.py'), cfg_options=options)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('size', ['s', 'm', 'l'])
def test_table5_settings(size):
    cfg, row = config(size), TABLE5[size]
    acc = cfg.optim_wrapper.generator.accumulative_counts
    assert (cfg.num_gpus, cfg.train_dataloader.batch_size, acc) == (8, 32 * 8, 8)
    assert cfg.num_gpus * cfg.train_dataloader.batch_size == 2048 == cfg.global_batch
    assert cfg.optim_wrapper.aux.accumulative_counts == acc
    for net in ('generator', 'aux'):
        opt = cfg.optim_wrapper[net].optimizer
        assert (opt.type, opt.lr, opt.eps, tuple(opt.betas)) == ('Adam', row['lr'], 1e-12, (0.0, 0.99))
    assert cfg.train_cfg.max_iters == row['images'] // 2048
    assert cfg.model.ema_half_life_images == 2_000_000
    assert cfg.model.time_sampler.R == row['R'] and cfg.model.student_dropout == row['dropout']
    assert cfg.model.divergence.h.alpha == 1.2 and cfg.model.divergence.coef == 1.0
    assert cfg.model.sampler == dict(type='MultistepSampler', num_steps=4)
    net = cfg.model.teacher.network
    assert (net.type, net.img_resolution, net.img_channels, net.label_dim, net.model_channels) == \
        ('EDM2Precond', 64, 4, 1000, row['channels'])
    # latents in, pixels out: EDM2's latent dataset with a fresh draw per step, the VAE to decode,
    # FD-DINOv2 on the decoded images
    assert cfg.train_dataloader.dataset.type == 'EDM2LatentDataset'
    assert cfg.model.data_preprocessor.type == 'LatentDataPreprocessor'
    assert cfg.decoder.type == 'StabilityVAE'
    assert [m.detector.type for m in cfg.image_metrics] == ['DINOv2Detector']
    assert cfg.image_metrics[0].name == 'fd_dinov2'
    hooks = {h.type: h for h in cfg.custom_hooks}
    assert hooks['SampleVisualizationHook'].decoder == cfg.decoder
    # the files are config keys, and the command line reaches them
    for key in ('teacher_path', 'latent_data', 'vae_path', 'dinov2_weights', 'dinov2_reference'):
        assert key in cfg
    cli = config(size, **{'teacher.path': '/x/edm2.pkl', 'teacher.network': None,
                          'train_dataloader.dataset.path': '/d/lat.zip'})
    assert cli.model.teacher.path == '/x/edm2.pkl' and cli.model.teacher.network is None
    assert cli.train_dataloader.dataset.path == '/d/lat.zip'


@pytest.mark.parametrize('size', ['s', 'm', 'l'])
def test_full_models_build_on_meta(size):
    cfg = config(size)
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert count(model.teacher.network) == EDM2_PARAMS[size] == count(model.generator)
    assert count(model.aux) > count(model.generator)          # f_ψ's second time path
    rates = {m.dropout for m in model.generator.modules() if isinstance(getattr(m, 'dropout', None), float)}
    assert rates == {TABLE5[size]['dropout']}
    assert next(model.generator.parameters()).is_meta


@pytest.mark.slow
def test_s_config_one_step_with_latents_and_labels(monkeypatch):
    """The S configuration takes one CoSIM step on the CPU on a batch of one raw latent
    (8x64x64) and its label: every setting but the width (192 -> 32 channels; the full size,
    280 M parameters per network, is built on meta above — its step took a minute and 12 GB)."""
    seen = []
    from gdistill.teachers.edm import EDMTeacher
    orig = EDMTeacher.edm_denoise

    def spy(self, x, sigma, class_labels=None, **kw):
        seen.append((tuple(x.shape), None if class_labels is None else class_labels.argmax(-1).tolist()))
        return orig(self, x, sigma, class_labels, **kw)
    monkeypatch.setattr(EDMTeacher, 'edm_denoise', spy)
    # one process: no accumulation, so the single step updates the weights
    cfg = config('s', **{'optim_wrapper.generator.accumulative_counts': 1, 'optim_wrapper.aux.accumulative_counts': 1,
                         'model.teacher.network.model_channels': 32})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    assert count(model.teacher.network) < EDM2_PARAMS['s'] / 20
    ow = dict(cfg.optim_wrapper)
    assert ow.pop('constructor') == 'MultiOptimWrapperConstructor'
    wrappers = MultiOptimWrapperConstructor(ow)(model)
    g0 = [p.detach().flatten()[:16].clone() for p in model.generator.parameters()]
    a0 = [p.detach().flatten()[:16].clone() for p in model.aux.parameters()]
    moments = torch.cat([torch.randn(4, 64, 64) * 4, torch.rand(4, 64, 64)])   # posterior mean and std
    data = dict(img=[moments], label=[torch.nn.functional.one_hot(torch.tensor(7), 1000).float()], idx=[0])
    out = model.train_step(data, wrappers)
    assert set(out) == {'loss_aux', 'loss_generator'}
    assert all(torch.isfinite(v) for v in out.values()), out
    assert any(not torch.equal(b, p.detach().flatten()[:16]) for b, p in zip(g0, model.generator.parameters()))
    assert any(not torch.equal(b, p.detach().flatten()[:16]) for b, p in zip(a0, model.aux.parameters()))
    assert seen and all(shape == (1, 4, 64, 64) and lab == [7] for shape, lab in seen)


@pytest.mark.slow
def test_latent_toy_end_to_end(tmp_path):
    """Tiny VAE -> EDM2 latent dataset of the digits -> EDM2 teacher trained by DenoisingTrainer ->
    CoSIM with the imagenet512 config family -> decoded samples, on the CPU; then tools/sample.py
    decodes the trained student's samples through the config's `decoder`."""
    import latent_toy
    import sample
    work = tmp_path / 'toy'
    s = latent_toy.main(['--work-dir', str(work), '--teacher-iters', '40', '--iters', '12', '--batch', '16',
                         '--num-samples', '8'])
    assert np.isfinite(s['teacher']['loss_denoise'])
    assert np.isfinite(s['cosim']['loss_aux']) and np.isfinite(s['cosim']['loss_generator'])
    assert s['num_latents'] == 1347 and len(s['raw_std']) == 4 and min(s['raw_std']) > 0
    for name, nfe in [('samples_student_nfe4', 4), ('samples_student_nfe1', 1), ('samples_teacher_edm2', 31)]:
        images = np.load(work / f'{name}.npz')['images']
        assert images.dtype == np.uint8 and images.shape == (8, 1, 8, 8)       # decoded: 8x8 grey pixels
        assert s['samples'][name]['nfe'] == nfe and images.std() > 0
    assert (work / 'samples.png').is_file() and (work / 'teacher' / 'iter_40.pth').is_file()
    pictures = list((work / 'cosim' / 'samples').glob('iter_*.png'))
    assert pictures                                              # the training hook decoded its pictures
    from PIL import Image
    assert Image.open(pictures[0]).size[0] >= 8
    # the dumped config of the run samples and decodes through tools/sample.py
    out = tmp_path / 'sampled'
    sample.main([str(work / 'cosim' / 'latent_toy.py'), str(work / 'cosim' / 'iter_12.pth'), '--num', '6',
                 '--steps', '2', '--out', str(out)])
    x = np.load(out / 'samples_nfe2.npz')['samples']
    assert x.shape == (6, 1, 8, 8)                               # pixels, not 4x4x4 latents
    q = (x + 1) * 127.5
    assert np.abs(q - np.round(q)).max() < 1e-3 and q.min() >= 0 and q.max() <= 255   # EDM2's uint8 levels
    with open(work / 'summary.json') as f:
        assert json.load(f)['cosim'] == s['cosim']
