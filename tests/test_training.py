"""End-to-end: the train tool on a tiny toy config — options and resume (two processes:
tests/test_distributed.py)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from gdistill.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(ROOT, 'tools', 'train.py')
CONFIG = osp.join(ROOT, 'projects', 'cosim', 'toy2d.py')
TINY = osp.join(ROOT, 'tests', 'configs', 'toy_tiny.py')


def tiny(cache, iters, interval=3):
    """Options for the tiny toy config (tests/configs/toy_tiny.py)."""
    return ['--cfg-options', f'train_cfg.max_iters={iters}', f'model.teacher.fit.cache_dir={cache}',
            f'default_hooks.checkpoint.interval={interval}']


def run(args, env=None, launcher=None):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517']
           if launcher else [sys.executable]) + [TRAIN, TINY] + args
    if launcher:
        cmd += ['--launcher', 'pytorch']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def weights(path):
    state = torch.load(path, map_location='cpu', weights_only=False)['state_dict']
    return {k: v for k, v in state.items() if not k.startswith('teacher.')}


def test_cfg_options_swap_components():
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from train import load_config
    cfg = load_config(CONFIG, cfg_options={
        'model.schedule.type': 'VPSchedule', 'model.divergence.coef': 0.75, 'model.time_sampler.R': 4,
        'model.divergence.h.type': 'PseudoHuberH', 'teacher.network.hidden': 16,
        'model.teacher.fit.iters': 5, 'model.teacher.fit.cache_dir': '/tmp/gdistill_test_cache'})
    model = MODELS.build(cfg.model)
    assert type(model.schedule).__name__ == 'VPSchedule'
    assert model.divergence.coef == pytest.approx(0.75)
    assert type(model.divergence.h).__name__ == 'PseudoHuberH'
    assert model.time_sampler.R == 4
    assert model.teacher.network.blocks[0].in_features == 16      # the teacher.* alias reached the model


@pytest.mark.slow
def test_resume_gives_the_weights_of_an_unbroken_run(tmp_path):
    cache = tmp_path / 'cache'
    run(['--work-dir', str(tmp_path / 'straight')] + tiny(cache, 6))
    run(['--work-dir', str(tmp_path / 'broken')] + tiny(cache, 3))
    run(['--work-dir', str(tmp_path / 'broken'), '--resume'] + tiny(cache, 6))
    a = weights(tmp_path / 'straight' / 'iter_6.pth')
    b = weights(tmp_path / 'broken' / 'iter_6.pth')
    assert a.keys() == b.keys() and any(k.startswith('generator.') for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the broken run really resumed (it did not start again from iteration 0)
    assert not torch.equal(a['generator.out.weight'], weights(tmp_path / 'broken' / 'iter_3.pth')['generator.out.weight'])

    # tools/sample.py: the checkpoint's student at 2 steps, saved as .npz and .png
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'sample.py'), TINY, str(tmp_path / 'straight' / 'iter_6.pth'),
                          '--steps', '2', '--num', '300', '--out', str(tmp_path / 'samples'),
                          '--cfg-options', f'model.teacher.fit.cache_dir={cache}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import numpy as np
    x = np.load(tmp_path / 'samples' / 'samples_nfe2.npz')['samples']
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (tmp_path / 'samples' / 'samples_nfe2.png').stat().st_size > 1000


def test_ema_step_is_the_half_life_average_with_rampup():
    """β = 0.5^(batch/half-life), the half-life capped at rampup·(images seen); buffers copied."""
    import copy

    from gdistill.distillers.base import ema_step
    net = torch.nn.BatchNorm1d(3)
    torch.nn.init.normal_(net.weight)
    net.running_mean.normal_()
    ema = copy.deepcopy(net)
    torch.nn.init.normal_(ema.weight)
    torch.nn.init.normal_(ema.bias)
    before = [p.detach().clone() for p in ema.parameters()]
    for half_life, seen, rampup in ((1000, 10_000, None), (1000, 400, 0.5)):
        start = [p.detach().clone() for p in ema.parameters()]
        ema_step(ema, net, batch_size=100, half_life=half_life, images_seen=seen, rampup=rampup)
        h = half_life if rampup is None else min(half_life, seen * rampup)   # 1000, then 200
        beta = 0.5 ** (100 / h)
        for e, s, p in zip(ema.parameters(), start, net.parameters()):
            torch.testing.assert_close(e, beta * s + (1 - beta) * p.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ema.running_mean, net.running_mean, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.parameters()))
