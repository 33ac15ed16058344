"""On a CUDA GPU (``pytest -m cuda``; skipped without one): one training step of every image
method on small networks in float32 and bfloat16, every sampler, the image metrics, and the
two-process launcher (gloo, so one GPU suffices: NCCL needs a GPU per process).

The models are built both ways a user builds them: under ``with torch.device('cuda')`` and on
the CPU followed by ``.to('cuda')``. The CPU side of the same checks is tests/test_device_clean.py.
"""
import glob
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from device_check import METHODS, ROOT, FactoryGuard, batch, build_method, optim_wrappers

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

CUDA = torch.device('cuda')


def build_on_cuda(name, how):
    if how == 'under_device':
        with torch.device('cuda'):
            model, cfg, ow = build_method(name)
        model.to(CUDA)   # what the runner does; here it moves nothing but the data preprocessor's device
    else:
        model, cfg, ow = build_method(name)
        model.to(CUDA)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type != 'cuda']
    assert not left, f'{name} ({how}): left off the GPU: {left[:5]}'
    return model, cfg, ow


def wrappers_for(cfg, ow, model, precision):
    if precision == 'bf16':
        from gdistill.engine.runner import apply_mixed_precision
        cfg.optim_wrapper = dict(ow, constructor='MultiOptimWrapperConstructor')
        cfg.mixed_precision = 'bf16'
        assert apply_mixed_precision(cfg, cuda=True) == 'bf16'
        ow = {k: v for k, v in cfg.optim_wrapper.items() if k != 'constructor'}
    return optim_wrappers(model, ow)


@pytest.mark.parametrize('precision,how', [('fp32', 'under_device'), ('bf16', 'moved')])
@pytest.mark.parametrize('name', sorted(METHODS))
def test_train_step_and_sampling_on_cuda(name, precision, how):
    torch.manual_seed(0)
    model, cfg, ow = build_on_cuda(name, how)
    wrappers = wrappers_for(cfg, ow, model, precision)
    guard = FactoryGuard()
    with guard:
        out = model.train_step(batch(name), wrappers)
    assert not guard.calls, guard.report()
    assert out and all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values()), out
    noise = torch.randn(2, 3, 8, 8, device=CUDA)
    samples = model.sample(noise, generator=torch.Generator(device=CUDA).manual_seed(0))
    assert samples.device.type == 'cuda' and samples.shape == noise.shape
    assert torch.isfinite(samples).all()


@pytest.mark.parametrize('precond', ['EDMPrecond', 'VEPrecond', 'iDDPMPrecond'])
def test_teacher_samplers_on_cuda(precond):
    """EDM's Heun (deterministic and with churn), Euler and EDM2's sampler on a teacher on the
    GPU, with the network's σ range and (iDDPM) its levels held on the GPU: the same samples as
    on the CPU."""
    from gdistill.samplers import EDM2Sampler, EDMHeunSampler, EulerSampler
    from gdistill.teachers import EDMTeacher
    model = 'DhariwalUNet' if precond == 'iDDPMPrecond' else 'SongUNet'
    torch.manual_seed(0)
    teacher = EDMTeacher(network=dict(type=precond, img_resolution=8, img_channels=3, model_type=model,
                                      model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                      attn_resolutions=[4]))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cpu = {}
    with torch.no_grad():
        for sampler in (EDMHeunSampler(4), EulerSampler(4), EDM2Sampler(4)):
            cpu[repr(sampler)] = sampler(teacher, noise)
        teacher.to(CUDA)
        for sampler in (EDMHeunSampler(4), EulerSampler(4), EDM2Sampler(4)):
            got = sampler(teacher, noise.to(CUDA))
            assert got.device.type == 'cuda'
            torch.testing.assert_close(got.cpu(), cpu[repr(sampler)], rtol=1e-3, atol=1e-3)
        churn = EDMHeunSampler(4, S_churn=10.0)(teacher, noise.to(CUDA),
                                                generator=torch.Generator(device=CUDA).manual_seed(0))
        assert torch.isfinite(churn).all()


def test_image_metrics_on_cuda_equal_the_cpu(tmp_path):
    from gdistill.metrics.frechet import FeatureStats, save_reference
    from gdistill.metrics.image import ImageEvaluator
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ref_images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 200, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    det = dict(type='NetworkDetector', network=dict(type='DigitClassifier', in_channels=3, resolution=8,
                                                    feature_dim=16))
    state = {}

    def metrics():
        # one random detector for both devices: its weights are saved after the first build
        return [dict(type='FrechetDistance', detector=dict(det, checkpoint=state.get('ckpt')),
                     reference=str(tmp_path / 'ref.npz')),
                dict(type='PrecisionRecall', detector=dict(det, checkpoint=state.get('ckpt')),
                     reference=str(tmp_path / 'ref.npz'))]

    from gdistill.metrics.detectors import NetworkDetector
    d = NetworkDetector(network=det['network'])
    torch.save(d.network.state_dict(), tmp_path / 'det.pt')
    state['ckpt'] = str(tmp_path / 'det.pt')
    d = NetworkDetector(network=det['network'], checkpoint=state['ckpt'])
    with torch.no_grad():
        feats = d(ref_images)
    stats = FeatureStats(feats.shape[1]).update(feats)
    save_reference(tmp_path / 'ref.npz', stats.mean, stats.cov, features=feats.numpy())
    results = {}
    for device in ('cpu', 'cuda'):
        ev = ImageEvaluator(metrics(), device=device)
        ev.reset(len(images))
        ev.update(images)
        results[device] = ev.finish()
    for key, value in results['cpu'].items():
        assert results['cuda'][key] == pytest.approx(value, rel=1e-3, abs=1e-4), (key, results)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_launcher_on_cuda_with_gloo(tmp_path):
    """``--launcher pytorch`` with two processes on gloo and CUDA tensors: with two GPUs through
    torchrun, with one GPU as two processes that both use GPU 0 (LOCAL_RANK=0)."""
    config = osp.join(ROOT, 'tests', 'configs', 'cosim_tiny_images.py')
    args = [osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', str(tmp_path), '--launcher', 'pytorch',
            '--cfg-options', 'train_cfg.max_iters=2', 'env_cfg.dist_cfg.backend=gloo',
            'custom_hooks=[]', 'default_hooks.checkpoint.interval=2']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    port = free_port()
    if torch.cuda.device_count() >= 2:
        procs = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                                   f'--master_port={port}'] + args, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        procs = [subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=dict(env, RANK=str(r), LOCAL_RANK='0', WORLD_SIZE='2',
                                           LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                                           MASTER_PORT=str(port)))
                 for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    scalars = glob.glob(osp.join(str(tmp_path), '*', 'vis_data', 'scalars.json'))
    assert scalars, outs[0][-2000:]
    logged = [json.loads(line) for line in open(scalars[0])]
    assert any('loss_generator' in row and np.isfinite(row['loss_generator']) for row in logged), logged
    assert glob.glob(osp.join(str(tmp_path), 'iter_2.pth'))
