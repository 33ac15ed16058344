"""Reliability: the non-finite guard, gradient accumulation across the alternating updates,
mixed precision, exact resume after SIGKILL, truncated checkpoints, bytes flipped inside a
checkpoint's tensor, moved work dirs, crash-safe
checkpoint rotation, and clear errors for misspelled keys, mismatched data and checkpoints of
another method. (Two-process runs, DDP and FSDP: tests/test_distributed.py; files that would run
code, config values, one-line errors, hung peers: tests/test_checkpoint_safety.py.)"""
import collections
import copy
import glob
import json
import logging
import os
import os.path as osp
import random
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.fileio import get_file_backend
from mmengine.hooks import CheckpointHook as MMCheckpointHook
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS as MM_HOOKS
from mmengine.registry import DefaultScope
from PIL import Image
from torch import nn

import gdistill.data  # noqa: F401
import gdistill.distillers  # noqa: F401
import gdistill.engine  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.data import DatasetFormatError
from gdistill.distillers.base import BaseDistiller, NonFiniteError, frozen
from gdistill.engine.config_check import ConfigKeyError, DataMismatchError, check_config, check_model_data
from gdistill.distillers.denoising import DenoisingTrainer
from gdistill.engine.hooks import (CheckpointMismatchError, SafeCheckpointHook, check_identity, model_identity,
                                  model_layout_keys, replica_digest)
from gdistill.engine.optim import MultiOptimWrapperConstructor
from gdistill.engine import runner as gd_runner
from gdistill.engine.checkpoint import CorruptCheckpointError, read_checkpoint
from gdistill.engine.runner import GdRunner, apply_mixed_precision, checkpoint_candidates
from gdistill.registry import DATASETS, MODELS, TEACHERS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(ROOT, 'tools', 'train.py')
TINY = osp.join(ROOT, 'tests', 'configs', 'toy_tiny.py')
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

ITERS, EVERY = 200, 25   # the resume runs: 200 iterations, a checkpoint every 25
ITER_LINE = re.compile(r'Iter\(train\) \[\s*(\d+)/')
ENV = dict(os.environ, OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('teacher_cache')


def tiny_cfg(cache, **options):
    return load_config(TINY, cfg_options={'model.teacher.fit.cache_dir': str(cache), **options})


def build(cache, **options):
    cfg = tiny_cfg(cache, **options)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ow = dict(cfg.optim_wrapper)
    ow.pop('constructor')
    return model, MultiOptimWrapperConstructor(ow)(model)


def batch(n=64):
    return dict(idx=list(range(n)))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def adam_state(wrapper):
    state = wrapper.optimizer.state_dict()['state']
    return {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_state(a, b):
    return a.keys() == b.keys() and all(a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i])
                                        for i in a)


# --- the non-finite guard -------------------------------------------------------------------------
def test_nonfinite_loss_skips_the_update_leaving_weights_and_adam_untouched(cache):
    model, wrappers = build(cache)
    model.train_step(batch(), wrappers)                     # Adam now has a step count and moments
    aux_before, adam_before = params(model.aux), adam_state(wrappers['aux'])
    gen_before = params(model.generator)
    assert int(adam_before[0]['step']) == 1

    real = model.aux_losses
    model.aux_losses = lambda n, labels, data: {k: v * float('nan') for k, v in real(n, labels, data).items()}
    out = model.train_step(batch(), wrappers)
    assert set(out) == {'loss_aux', 'loss_generator'}
    assert torch.isnan(out['loss_aux']) and torch.isfinite(out['loss_generator'])
    assert MessageHub.get_current_instance().get_scalar('train/nonfinite_skips').current() == 1   # for the log
    assert same(params(model.aux), aux_before)                                  # weights untouched
    assert same_state(adam_state(wrappers['aux']), adam_before)                 # step count and moments too
    assert all(p.grad is None for p in model.aux.parameters())                  # the NaN gradient is gone
    assert not same(params(model.generator), gen_before)                        # the other update went ahead
    assert model.nonfinite_guard.in_a_row['aux'][0] == 1

    model.aux_losses = real                                                     # a finite step resumes
    model.train_step(batch(), wrappers)
    assert model.nonfinite_guard.skipped == 1 and 'aux' not in model.nonfinite_guard.in_a_row
    assert int(adam_state(wrappers['aux'])[0]['step']) == 2 and not same(params(model.aux), aux_before)


def test_nonfinite_gradient_with_a_finite_loss_is_caught_and_named(cache):
    model, wrappers = build(cache, **{'model.nonfinite_patience': 1})
    names = dict(model.aux.named_parameters())
    hook = names['blocks.0.weight'].register_hook(lambda g: torch.full_like(g, float('inf')))
    before = params(model.aux)
    MessageHub.get_current_instance().update_info('iter', 41)       # what the runner records
    with pytest.raises(NonFiniteError) as info:
        model.train_step(batch(), wrappers)
    msg = str(info.value)
    assert msg.startswith('iteration 42: non-finite gradient of loss_aux in aux.blocks.0.weight')
    assert 'nonfinite_patience=1' in msg
    assert same(params(model.aux), before) and wrappers['aux'].optimizer.state_dict()['state'] == {}
    hook.remove()


def test_patience_counts_skips_in_a_row_and_stops_naming_term_and_iteration(cache):
    model, wrappers = build(cache, **{'model.nonfinite_patience': 3})
    real = model.generator_losses
    nan = lambda n, labels, data: {k: v + float('nan') for k, v in real(n, labels, data).items()}  # noqa: E731
    hub = MessageHub.get_current_instance()
    for it, poisoned in enumerate([True, True, False, True, True]):   # a finite step breaks the streak
        hub.update_info('iter', it)
        model.generator_losses = nan if poisoned else real
        model.train_step(batch(), wrappers)
    assert model.nonfinite_guard.skipped == 4 and model.nonfinite_guard.in_a_row['generator'] == (2, 4)
    hub.update_info('iter', 5)
    model.generator_losses = nan
    with pytest.raises(NonFiniteError) as info:
        model.train_step(batch(), wrappers)
    msg = str(info.value)
    assert msg.startswith('iteration 6: non-finite loss_generator. The generator update was skipped 3 times in a row')
    assert 'as they were before iteration 4' in msg
    with pytest.raises(ValueError, match='nonfinite_patience must be an int >= 1'):
        build(cache, **{'model.nonfinite_patience': 0})


def test_nan_run_stops_through_the_train_tool(tmp_path, cache):
    """A learning rate of 1e30 blows the aux network up after one step; every later update is
    skipped and the third skip in a row stops the run with the term and the iteration."""
    out = subprocess.run([sys.executable, TRAIN, TINY, '--work-dir', str(tmp_path / 'nan'), '--cfg-options',
                          'train_cfg.max_iters=50', f'model.teacher.fit.cache_dir={cache}',
                          'optim_wrapper.aux.optimizer.lr=1e30', 'model.nonfinite_patience=3'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode != 0
    assert ('NonFiniteError: iteration 3: non-finite loss_generator. The generator update was skipped 3 times '
            'in a row') in out.stderr
    scalars = glob.glob(str(tmp_path / 'nan' / '*' / 'vis_data' / 'scalars.json'))[0]
    logged = [json.loads(line) for line in open(scalars)]
    assert [r['nonfinite_skips'] for r in logged] == [1.0, 3.0]   # the count is in the logs (iterations 1, 2)


# --- gradient accumulation -------------------------------------------------------------------------
class PairDistiller(BaseDistiller):
    """Two small networks whose losses are deterministic functions of the batch's points, with a
    distiller's alternation: the aux network fits the generator's output, then the generator is
    trained through the just-updated, frozen aux network."""

    trained = ('aux', 'generator')

    def __init__(self):
        super().__init__(teacher=dict(type='MixtureTeacher'))
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.aux = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.make_ema()

    def aux_losses(self, n, labels, data):
        x = data['inputs']
        return dict(loss_aux=((self.aux(x) - self.generator(x).detach()) ** 2).sum(1).mean())

    def generator_losses(self, n, labels, data):
        x = data['inputs']
        with frozen(self.aux):
            y = self.aux(self.generator(x))
        return dict(loss_generator=((y - x.flip(1)) ** 2).sum(1).mean())


def pair(optimizer, k):
    model = PairDistiller()
    wrappers = OptimWrapperDict(**{name: OptimWrapper(optimizer(getattr(model, name).parameters()),
                                                      accumulative_counts=k) for name in model.trained})
    return model, wrappers


def points(step):
    return dict(img=list(torch.randn(8, 2, generator=torch.Generator().manual_seed(step))))


@pytest.mark.parametrize('optimizer', [lambda p: torch.optim.SGD(p, lr=0.2),
                                       lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.0, 0.99))],
                         ids=['sgd', 'adam'])
def test_accumulating_two_half_batches_is_one_whole_batch_step(optimizer):
    whole, w1 = pair(optimizer, 1)
    halves, w2 = pair(optimizer, 2)
    start = params(whole)
    for step in range(3):
        a = whole.train_step(points(step), w1)
        b = halves.train_step(points(step), w2)
        for key in a:   # the logged loss is the batch mean either way
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    moved = max((p - q).abs().max() for p, q in zip(params(whole), start))
    assert moved > 1e-2
    for p, q in zip(params(whole), params(halves)):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    if 'Adam' in type(w2['aux'].optimizer).__name__:   # one Adam step per update, not per micro-batch
        assert all(int(s['step']) == 3 for s in w2['aux'].optimizer.state_dict()['state'].values())
    assert float(halves.images_seen) == 24 and halves.train_steps == 3

    # the test has teeth: mmengine's own accumulation (one micro-batch per iteration, each
    # network stepping after its second one) trains the generator's first half-batch against
    # the aux network from before its update, and ends elsewhere
    naive, w3 = pair(optimizer, 2)
    for w in w3.values():
        w.initialize_count_status(naive, 0, 6)
    for step in range(3):
        data = naive.data_preprocessor(points(step), True)
        for i in range(2):
            part = dict(data, inputs=data['inputs'][4 * i:4 * i + 4], batch_size=4)
            for phase in naive.phases():
                loss, _ = naive.parse_losses(getattr(naive, f'{phase}_losses')(4, None, part))
                w3[phase].update_params(loss)
    gap = max((p - q).abs().max() for p, q in zip(params(whole), params(naive)))
    assert gap > 1e-3   # measured: 0.12 with SGD, 0.019 with Adam (against 6e-8 for the split batch)


def test_accumulation_needs_a_divisible_batch():
    model, wrappers = pair(lambda p: torch.optim.SGD(p, lr=0.1), 3)
    with pytest.raises(ValueError, match=r'aux: a batch of 8 does not split into accumulative_counts=3'):
        model.train_step(points(0), wrappers)


def test_toy_distiller_accumulates_one_adam_step_per_iteration(cache):
    model, wrappers = build(cache, **{'optim_wrapper.aux.accumulative_counts': 4,
                                      'optim_wrapper.generator.accumulative_counts': 2})
    before = params(model.generator)
    for _ in range(2):
        out = model.train_step(batch(64), wrappers)
    assert all(torch.isfinite(v) for v in out.values())
    assert not same(params(model.generator), before)
    for name in model.trained:
        assert all(int(s['step']) == 2 for s in wrappers[name].optimizer.state_dict()['state'].values())
    assert float(model.images_seen) == 128


# --- mixed precision -------------------------------------------------------------------------------
def test_bf16_uses_amp_wrappers_on_cuda_and_float32_with_a_message_on_cpu(monkeypatch, cache):
    said = []
    monkeypatch.setattr(gd_runner, 'print_log', lambda msg, **kw: said.append((msg, kw.get('level'))))
    cfg = tiny_cfg(cache, mixed_precision='bf16')
    plain = copy.deepcopy(cfg.optim_wrapper)
    assert apply_mixed_precision(cfg, cuda=False) == 'fp32'
    assert cfg.optim_wrapper == plain                                    # the CPU run stays float32
    assert said == [("mixed_precision='bf16' asks for bfloat16 autocast, which needs a CUDA GPU; none is "
                     'available, so this run trains in float32', logging.WARNING)]
    assert apply_mixed_precision(cfg, cuda=True) == 'bf16'
    for name in ('aux', 'generator'):
        w = cfg.optim_wrapper[name]
        assert (w.type, w.dtype, w.loss_scale) == ('AmpOptimWrapper', 'bfloat16', 1.0)
        assert w.optimizer == plain[name].optimizer
    assert apply_mixed_precision(tiny_cfg(cache), cuda=True) == 'fp32'   # not asked: untouched
    with pytest.raises(ValueError, match="mixed_precision is 'bf16' or None"):
        apply_mixed_precision(tiny_cfg(cache, mixed_precision='fp16'))


# --- exact resume ------------------------------------------------------------------------------------
def train_cmd(work, cache, iters=ITERS, resume=False):
    cmd = [sys.executable, TRAIN, TINY, '--work-dir', str(work), '--cfg-options', f'train_cfg.max_iters={iters}',
           f'model.teacher.fit.cache_dir={cache}', f'default_hooks.checkpoint.interval={EVERY}',
           f'default_hooks.checkpoint.max_keep_ckpts={ITERS // EVERY}', 'default_hooks.logger.interval=1']
    return cmd + (['--resume'] if resume else [])


def train(work, cache, **kw):
    out = subprocess.run(train_cmd(work, cache, **kw), cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def load(path):
    return read_checkpoint(path)   # torch.load(weights_only=True), digest checked


def assert_bitwise_equal(a, b):
    a, b = load(a), load(b)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    for name in ('aux', 'generator'):
        assert same_state(a['optimizer'][name]['state'], b['optimizer'][name]['state']), name
    assert a['resume_state']['model'] == b['resume_state']['model']


@pytest.fixture(scope='module')
def straight(tmp_path_factory, cache):
    """An unbroken run, keeping every checkpoint."""
    work = tmp_path_factory.mktemp('straight')
    train(work, cache)
    return work


def test_sigkill_at_arbitrary_iterations_then_resume_is_bitwise_exact(tmp_path, straight, cache):
    work, rng = tmp_path / 'killed', random.Random(2024)
    kills, resumed_at = [], []
    for low, high in ((EVERY + 1, 3 * EVERY), (4 * EVERY, 6 * EVERY)):   # two kills, each after a checkpoint
        target = rng.randint(low, high)
        proc = subprocess.Popen(train_cmd(work, cache, resume=bool(kills)), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=ENV)
        for line in proc.stdout:
            if 'resumed from' in line:
                resumed_at.append(int(line.rsplit('iteration', 1)[1]))
            m = ITER_LINE.search(line)
            if m and int(m.group(1)) >= target:
                proc.kill()   # SIGKILL
                break
        proc.wait(timeout=60)
        assert proc.returncode == -9, f'the run ended before iteration {target}'
        newest = max(int(re.search(r'iter_(\d+)', p).group(1)) for p in glob.glob(str(work / 'iter_*.pth')))
        assert EVERY <= newest <= target
        kills.append((target, newest))
    log = train(work, cache, resume=True)
    resumed_at.append(int(re.search(r'resumed from \S+ at iteration (\d+)', log).group(1)))
    assert resumed_at == [kills[0][1], kills[1][1]]   # each resume went back to the last checkpoint
    assert_bitwise_equal(straight / f'iter_{ITERS}.pth', work / f'iter_{ITERS}.pth')
    assert open(work / 'last_checkpoint').read() == f'iter_{ITERS}.pth'   # relative: the dir may move
    assert not glob.glob(str(work / '.*.tmp'))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, cache):
    work = tmp_path / 'truncated'
    work.mkdir()
    for it in (ITERS - 2 * EVERY, ITERS - EVERY):
        (work / f'iter_{it}.pth').write_bytes((straight / f'iter_{it}.pth').read_bytes())
    newest = work / f'iter_{ITERS - EVERY}.pth'
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])       # cut in half
    (work / f'.iter_{ITERS}.pth.tmp').write_bytes(b'a save a crash interrupted')
    (work / 'last_checkpoint').write_text(newest.name)
    log = train(work, cache, resume=True)
    assert f'checkpoint {newest} is unreadable' in log
    assert f'resumed from {work}/iter_{ITERS - 2 * EVERY}.pth at iteration {ITERS - 2 * EVERY}' in log
    assert_bitwise_equal(straight / f'iter_{ITERS}.pth', work / f'iter_{ITERS}.pth')
    assert not (work / f'.iter_{ITERS}.pth.tmp').exists()


def flip_tensor_bytes(path, key, n=16):
    """Flip ``n`` bytes in the middle of the stored data of ``state_dict[key]`` — inside the
    tensor's own record of the zip file, not in its header or pickle."""
    tensor = torch.load(path, map_location='cpu', weights_only=True)['state_dict'][key]
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, 'the tensor\'s bytes are not unique in the file'
    mid = at + len(raw) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))
    return tensor


def test_bytes_flipped_inside_a_tensor_are_detected_and_the_previous_checkpoint_used(tmp_path, straight, cache):
    work = tmp_path / 'flipped'
    work.mkdir()
    for it in (ITERS - 2 * EVERY, ITERS - EVERY):
        (work / f'iter_{it}.pth').write_bytes((straight / f'iter_{it}.pth').read_bytes())
    newest = work / f'iter_{ITERS - EVERY}.pth'
    key = 'generator.blocks.0.weight'
    before = flip_tensor_bytes(newest, key)
    # torch itself notices nothing: the file loads, with other weights
    after = torch.load(newest, map_location='cpu', weights_only=True)['state_dict'][key]
    assert not torch.equal(before, after) and after.shape == before.shape
    with pytest.raises(CorruptCheckpointError, match=rf'{re.escape(str(newest))}: integrity check failed'):
        read_checkpoint(newest)
    (work / 'last_checkpoint').write_text(newest.name)
    log = train(work, cache, resume=True)
    assert f'checkpoint {newest} is unreadable ({newest}: integrity check failed' in log
    assert f'resumed from {work}/iter_{ITERS - 2 * EVERY}.pth at iteration {ITERS - 2 * EVERY}' in log
    assert_bitwise_equal(straight / f'iter_{ITERS}.pth', work / f'iter_{ITERS}.pth')


def test_moved_work_dir_still_resumes(tmp_path, straight, cache):
    moved = tmp_path / 'moved'
    moved.mkdir()
    it = ITERS - EVERY
    (moved / f'iter_{it}.pth').write_bytes((straight / f'iter_{it}.pth').read_bytes())
    # the pointer as mmengine writes it: an absolute path into the dir before the move
    (moved / 'last_checkpoint').write_text(f'/gone/old_work_dir/iter_{it}.pth')
    assert checkpoint_candidates(str(moved)) == [str(moved / f'iter_{it}.pth')]
    log = train(moved, cache, resume=True)
    assert f'resumed from {moved}/iter_{it}.pth at iteration {it}' in log
    assert_bitwise_equal(straight / f'iter_{ITERS}.pth', moved / f'iter_{ITERS}.pth')


def test_checkpoints_written_with_ddp_module_keys_still_load(cache):
    """Before checkpoints were written without DDP's '.module', a two-process run's keys had it."""
    model, _ = build(cache)
    state = model.state_dict()
    old = collections.OrderedDict((k.replace('.', '.module.', 1) if k.split('.')[0] in model.trained else k, v)
                                  for k, v in state.items())
    assert 'generator.module.out.weight' in old
    assert list(model_layout_keys(old, model, [])) == list(state)


def test_checkpoint_carries_random_states_data_order_and_loop_state(straight):
    ckpt = load(straight / f'iter_{EVERY}.pth')
    state = ckpt['resume_state']
    assert len(state['random']) == 1 and set(state['random'][0]) >= {'torch', 'numpy', 'python'}
    assert state['data'] == dict(sampler='InfiniteSampler', seed=state['data']['seed'], shuffle=False, batch_size=64,
                                 world_size=1, dataset_length=1 << 20, batches_consumed=EVERY)
    assert state['model'] == dict(train_steps=EVERY, phases=['aux', 'generator'],
                                  nonfinite=dict(skipped=0, in_a_row={}))
    assert ckpt['meta']['model'] == dict(type='SemiImplicitDistiller', trained=['aux', 'generator'])
    # the random state saved is the one after iteration 25, not the start's
    later = load(straight / f'iter_{2 * EVERY}.pth')['resume_state']['random'][0]['torch']
    assert not torch.equal(state['random'][0]['torch'], later)


def test_checkpoint_rotation_removes_the_old_checkpoint_only_after_the_new_one_is_saved(tmp_path):
    with DefaultScope.overwrite_default_scope('gdistill'):
        hook = MM_HOOKS.build(dict(type='CheckpointHook', interval=1, by_epoch=False, max_keep_ckpts=1))
    assert isinstance(hook, SafeCheckpointHook)   # gdistill's scope gets the safe rotation

    def crash(*args, **kwargs):
        raise OSError('No space left on device')
    runner = types.SimpleNamespace(message_hub=MessageHub.get_instance('rotation'), save_checkpoint=crash)
    for h in (hook, MMCheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=1)):
        (tmp_path / 'iter_1.pth').write_bytes(b'the only checkpoint')
        h.out_dir, h.filename_tmpl = str(tmp_path), 'iter_{}.pth'
        h.file_backend = get_file_backend(str(tmp_path))
        h.keep_ckpt_ids = collections.deque([1])
        with pytest.raises(OSError):
            h._save_checkpoint_with_step(runner, 2, meta={})
        kept = (tmp_path / 'iter_1.pth').exists()
        assert kept == (h is hook)   # mmengine's own hook deleted it before the failed save


def test_replica_digest_sees_a_one_ulp_change():
    net = nn.Linear(8, 8)
    d = replica_digest(net)
    assert replica_digest(copy.deepcopy(net)) == d
    with torch.no_grad():
        net.weight[3, 5] = torch.nextafter(net.weight[3, 5], torch.tensor(1.0))
    assert replica_digest(net) != d


# --- clear errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('option, message', [
    ({'model.divergance.coef': 1.0},
     "model.divergance: SemiImplicitDistiller takes no 'divergance'. Did you mean 'divergence'?"),
    ({'train_cfg.max_iter': 5},
     "train_cfg.max_iter: IterBasedTrainLoop takes no 'max_iter'. Did you mean 'max_iters'?"),
    ({'model.divergence.cof': 0.5}, "model.divergence.cof: GFIDivergence takes no 'cof'. Did you mean 'coef'?"),
    ({'model.teacher.network.hiden': 3}, "MLPDenoiser takes no 'hiden'. Did you mean 'hidden'?"),
    ({'optim_wrapper.aux.optimizer.betaz': (0, 0.9)}, "Adam takes no 'betaz'. Did you mean 'betas'?"),
    ({'optim_wrapper.generator.accumulative_count': 2},
     "OptimWrapper takes no 'accumulative_count'. Did you mean 'accumulative_counts'?"),
    ({'default_hooks.checkpoint.intervall': 2}, "CheckpointHook takes no 'intervall'. Did you mean 'interval'?"),
    ({'train_dataloader.batch_sise': 2}, "DataLoader takes no 'batch_sise'. Did you mean 'batch_size'?"),
    ({'custom_hook': []}, "custom_hook: the runner reads no top-level 'custom_hook'. Did you mean 'custom_hooks'?"),
])
def test_misspelled_config_keys_name_the_right_one(option, message, cache):
    with pytest.raises(ConfigKeyError) as info:
        check_config(tiny_cfg(cache, **option))
    assert message in str(info.value)


def _is_grid(path):
    return osp.basename(osp.dirname(path)) == 'ablations'


def test_every_config_of_the_repository_passes_the_key_check():
    files = [f for pattern in ('configs/**/*.py', 'projects/**/*.py', 'tests/configs/*.py')
             for f in glob.glob(osp.join(ROOT, pattern), recursive=True) if not _is_grid(f)]
    assert len(files) >= 10
    for f in files:
        check_config(Config.fromfile(f))


def test_every_ablation_grid_of_the_repository_builds_checked_configs():
    """Grid files are read by tools/ablate.py (plain Python, not mmengine configs): each one
    loads, and every variant's options applied to its base config pass the key check."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import ablate
    from mmengine.config import DictAction
    grids = glob.glob(osp.join(ROOT, 'projects', '**', 'ablations', '*.py'), recursive=True)
    assert len(grids) >= 5
    for path in grids:
        grid = ablate.load_grid(path)
        for variant in ablate.variants(grid):
            cfg = Config.fromfile(grid['base'])
            cfg.merge_from_dict({k: DictAction._parse_iterable(t) for k, t in variant['options'].items()})
            check_config(cfg)


def test_misspelled_key_fails_the_train_tool_before_anything_runs(tmp_path, cache):
    import train
    with pytest.raises(ConfigKeyError, match="model.divergance: SemiImplicitDistiller takes no 'divergance'. "
                                             "Did you mean 'divergence'?"):
        train.main([TINY, '--work-dir', str(tmp_path / 'w'), '--cfg-options', f'model.teacher.fit.cache_dir={cache}',
                    'model.divergance.coef=0.5'])
    assert not (tmp_path / 'w').exists()   # failed before the runner was built


def image_folder(path, n, size, channels=3, labels=None):
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path / f'img{i:03d}.png')
    if labels is not None:
        (path / 'dataset.json').write_text(json.dumps({'labels': [[f'img{i:03d}.png', labels[i]] for i in range(n)]}))
    return path


TINY_EDM = dict(type='EDMTeacher', network=dict(
    type='EDMPrecond', img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=16,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0))


def test_teacher_and_data_disagreeing_fail_before_training(tmp_path):
    teacher = TEACHERS.build(TINY_EDM)
    model = types.SimpleNamespace(teacher=teacher)
    big = DATASETS.build(dict(type='EDMImageDataset', path=str(image_folder(tmp_path / 'big', 2, 16))))
    with pytest.raises(DataMismatchError, match=r'EDMImageDataset has images of shape \(3, 16, 16\) \(3 channels, '
                                                r'16x16\), EDMTeacher makes \(3, 8, 8\) \(3 channels, 8x8\)'):
        check_model_data(model, big)
    grey = DATASETS.build(dict(type='EDMImageDataset', path=str(image_folder(tmp_path / 'grey', 2, 8, channels=1))))
    with pytest.raises(DataMismatchError, match=r'\(1 channels, 8x8\), EDMTeacher makes \(3, 8, 8\)'):
        check_model_data(model, grey)
    lab = image_folder(tmp_path / 'lab', 3, 8, labels=[0, 1, 2])
    labelled = DATASETS.build(dict(type='EDMImageDataset', path=str(lab)))
    with pytest.raises(DataMismatchError, match=r'EDMImageDataset has 3 classes, EDMTeacher has label_dim=0 '
                                                r'\(it is unconditional'):
        check_model_data(model, labelled)
    check_model_data(model, DATASETS.build(dict(type='EDMImageDataset', path=str(tmp_path / 'lab'), use_labels=False)))

    class Empty(torch.utils.data.Dataset):
        def __len__(self):
            return 0
    with pytest.raises(DataMismatchError, match='the training dataset Empty is empty'):
        check_model_data(model, Empty())


def test_each_batch_is_checked_against_the_teacher(cache):
    model, wrappers = build(cache)
    with pytest.raises(ValueError, match=r'the dataset gives samples of shape \(3,\) but NetworkTeacher makes \(2,\)'):
        model.train_step(dict(img=list(torch.zeros(4, 3))), wrappers)
    one_hot = list(torch.eye(10)[:4])
    with pytest.raises(ValueError, match=r'the dataset has 10 classes but NetworkTeacher has label_dim=0 '
                                         r'\(it is unconditional'):
        model.train_step(dict(idx=[0, 1, 2, 3], label=one_hot), wrappers)
    with pytest.raises(DataMismatchError, match='the labels do not fit the teacher: DistillationDataset has 10 cl'):
        check_model_data(model, DATASETS.build(dict(type='DistillationDataset', label_dim=10)))


def test_empty_or_malformed_datasets_fail_with_the_file_named(tmp_path):
    def loader(path):  # the runner's way of building it
        with DefaultScope.overwrite_default_scope('gdistill'):
            return GdRunner.build_dataloader(dict(batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler'),
                                                  dataset=dict(type='EDMImageDataset', path=str(path))), seed=0)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetFormatError, match='no images found'):
        loader(tmp_path / 'empty')
    bad = image_folder(tmp_path / 'bad', 2, 8)
    (bad / 'img001.png').write_bytes(b'not a png at all')
    with pytest.raises(DatasetFormatError, match=r'img001\.png: not a readable PNG/JPEG image'):
        loader(bad)
    mixed = image_folder(tmp_path / 'mixed', 2, 8)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / 'img002.png')
    with pytest.raises(DatasetFormatError, match=r'img002\.png: image is 16x16 with 3 channel\(s\), expected 8x8'):
        loader(mixed)
    with pytest.raises(ValueError, match='DistillationDataset: need length >= 1'):
        DATASETS.build(dict(type='DistillationDataset', length=0))


def test_checkpoint_of_another_method_is_refused_naming_both(tmp_path, cache):
    # a checkpoint as a DenoisingTrainer run writes it (its networks and its model record)
    teacher = DenoisingTrainer(network=dict(TINY_EDM['network'], model_channels=8))
    ckpt = tmp_path / 'teacher_iter_1.pth'
    torch.save(dict(meta=dict(epoch=0, iter=1, model=model_identity(teacher)), state_dict=teacher.state_dict(),
                    message_hub={}), ckpt)
    out = subprocess.run([sys.executable, TRAIN, TINY, '--work-dir', str(tmp_path / 'cosim'), '--resume', str(ckpt),
                          '--cfg-options', f'model.teacher.fit.cache_dir={cache}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode != 0
    assert (f"CheckpointMismatchError: checkpoint {ckpt} is of a DenoisingTrainer (trained networks ['network']), "
            "but this run's model is a SemiImplicitDistiller (trained networks ['aux', 'generator'])") in out.stderr
    assert 'Iter(train)' not in out.stdout + out.stderr        # refused before any training
    # a checkpoint from before models were recorded in it: told apart by its networks
    old = dict(meta=dict(epoch=0, iter=1), state_dict=teacher.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"holds the networks \['network'\], not "
                                                      r"\['aux', 'generator'\] of this run's SemiImplicitDistiller"):
        check_identity(old, build(cache)[0])


def test_a_fitted_toy_teacher_does_not_depend_on_the_run_seed(tmp_path):
    """Runs with different seeds (and processes racing for an empty cache) fit the same teacher,
    and fitting leaves the run's random stream where a cache hit leaves it."""
    def teacher(cache):
        return TEACHERS.build(dict(type='NetworkTeacher', network=dict(type='MLPDenoiser', dim=2, hidden=16, depth=2),
                                   fit=dict(target=dict(type='MixtureTeacher', mixture=dict(name='ring8')),
                                            iters=3, batch_size=32, cache_dir=str(tmp_path / cache))))
    torch.manual_seed(1)
    a = teacher('a').network.state_dict()
    fitted = torch.rand(3)
    torch.manual_seed(2)
    b = teacher('b').network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    loaded = teacher('a').network.state_dict()   # a cache hit
    assert all(torch.equal(a[k], loaded[k]) for k in a)
    assert torch.equal(torch.rand(3), fitted)
