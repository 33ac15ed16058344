"""Hooks around the training loop: speed and ETA, what a checkpoint carries for an exact resume,
crash-safe checkpoint rotation, replica checks, sample pictures."""
import contextlib
import os
import os.path as osp
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from mmengine.dist import is_main_process
from mmengine.fileio import FileClient
from mmengine.hooks import CheckpointHook as MMCheckpointHook
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..registry import HOOKS
from .visual import save_samples_figure


@HOOKS.register_module()
class SpeedHook(Hook):
    """Puts iterations/s and images/s (over the last ``window`` iterations) into the log, next
    to the ETA that mmengine's logger prints."""

    priority = 'VERY_LOW'

    def __init__(self, window=20):
        self.window = window
        self._times = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._times.append(time.perf_counter())
        self._times = self._times[-(self.window + 1):]
        if len(self._times) > 1:
            ips = (len(self._times) - 1) / (self._times[-1] - self._times[0])
            runner.message_hub.update_scalar('train/it_per_s', ips)
            bs = getattr(runner.train_dataloader, 'batch_size', None)
            if bs:
                runner.message_hub.update_scalar('train/img_per_s', ips * bs)


def random_state():
    """This process's random states: torch (CPU and, once initialised, every CUDA device),
    numpy and python."""
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def data_order(runner):
    """What fixes the order of the training batches: sampler, its seed and shuffling, batch
    size, number of processes, dataset length, and how many batches were consumed."""
    loader = runner.train_dataloader
    sampler = getattr(loader, 'sampler', None)
    return dict(sampler=type(sampler).__name__, seed=getattr(sampler, 'seed', None),
                shuffle=getattr(sampler, 'shuffle', None), batch_size=loader.batch_size,
                world_size=runner.world_size, dataset_length=len(loader.dataset),
                batches_consumed=runner.iter + 1)


class CheckpointMismatchError(ValueError):
    """A checkpoint of another model (method) than the one this run builds."""


def model_identity(model):
    return dict(type=type(model).__name__, trained=list(getattr(model, 'trained', ())))


def check_identity(checkpoint, model, path=''):
    """Refuse a checkpoint of another method: by the model recorded in it, or (older
    checkpoints) by whether its weights hold this model's trained networks."""
    mine = model_identity(model)
    theirs = checkpoint.get('meta', {}).get('model')
    where = f' {path}' if path else ''
    if theirs is not None:
        if theirs['type'] != mine['type'] or list(theirs['trained']) != mine['trained']:
            raise CheckpointMismatchError(
                f'checkpoint{where} is of a {theirs["type"]} (trained networks {theirs["trained"]}), but this '
                f'run\'s model is a {mine["type"]} (trained networks {mine["trained"]}); give a checkpoint '
                f'of a {mine["type"]} run, or the matching config')
        return
    tops = {k.split('.', 1)[0] for k in checkpoint.get('state_dict', {}) if '.' in k}  # sub-modules, not buffers
    missing = [n for n in mine['trained'] if n not in tops]
    if missing:
        raise CheckpointMismatchError(
            f'checkpoint{where} holds the networks {sorted(tops)}, not {missing} of this run\'s '
            f'{mine["type"]}: it is a checkpoint of another method')


def wrapped_names(runner):
    """Sub-networks that a DDP wrapper holds (their state_dict keys gain '.module')."""
    model = getattr(runner.model, 'module', None)
    if model is None or not is_model_wrapper(runner.model):
        return []
    return [n for n, m in model.named_children() if is_model_wrapper(m)]


def canonical_keys(state_dict, names):
    """state_dict keys as an unwrapped model has them: 'generator.module.x' -> 'generator.x'."""
    out = type(state_dict)()
    for key, value in state_dict.items():
        head, _, rest = key.partition('.')
        if head in names and rest.startswith('module.'):
            key = f'{head}.{rest[len("module."):]}'
        out[key] = value
    return out


def model_layout_keys(state_dict, model, names):
    """Checkpoint keys as mmengine's loader expects them (it looks through DDP wrappers):
    canonical, also for checkpoints written with DDP's '.module' in their keys."""
    expected = set(canonical_keys(dict.fromkeys(model.state_dict()), names))
    out = type(state_dict)()
    for key, value in state_dict.items():
        if key not in expected and '.module.' in key and key.replace('.module.', '.', 1) in expected:
            key = key.replace('.module.', '.', 1)
        out[key] = value
    return out


@HOOKS.register_module()
class ResumeStateHook(Hook):
    """Puts in every checkpoint what a resumed run needs, besides weights and optimiser state,
    to go on exactly as an unbroken one, and restores it on resume:

    - every process's random states (torch CPU and CUDA, numpy, python), gathered by
      ``GdRunner.save_checkpoint`` — each process draws its own noise;
    - the data order (``data_order``): on resume mmengine's loop skips the consumed batches
      of the same deterministic sampler; a different sampler, seed, batch size or number of
      processes is reported, since the order then differs;
    - the model's loop state (``train_state_dict``: completed steps, the alternation of
      phases, non-finite skip counts);
    - the model's type and trained networks, so that a checkpoint of another method is
      refused by name (also for ``load_from``).

    State-dict keys are saved without DDP's '.module' (a checkpoint loads whatever the number
    of processes). ``GdRunner`` adds this hook when a config does not list it
    (``RandomStateHook`` is its former name)."""

    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint):
        model = getattr(runner.model, 'module', runner.model)
        checkpoint['meta']['model'] = model_identity(model)
        checkpoint['state_dict'] = canonical_keys(checkpoint['state_dict'], wrapped_names(runner))
        states = getattr(runner, 'process_random_states', None) or [random_state()]
        checkpoint['resume_state'] = dict(random=states, data=data_order(runner),
                                          model=getattr(model, 'train_state_dict', dict)())

    def after_load_checkpoint(self, runner, checkpoint):
        model = getattr(runner.model, 'module', runner.model)
        check_identity(checkpoint, model, getattr(runner, 'loading_path', ''))
        checkpoint['state_dict'] = model_layout_keys(checkpoint['state_dict'], model, wrapped_names(runner))
        if not runner._resume:  # load_from: weights only
            return
        state = checkpoint.get('resume_state')
        if state is None:
            runner.logger.warning('the checkpoint has no resume state (random states, data order, loop '
                                  'counters): the resumed run will not repeat an unbroken one')
            return
        states, rank = state['random'], runner.rank
        if len(states) != runner.world_size:
            runner.logger.warning(f'the checkpoint was written by {len(states)} processes, this run has '
                                  f'{runner.world_size}: the noise and data order differ from an unbroken run')
        set_random_state(states[rank % len(states)])
        saved, now = state['data'], data_order(runner)
        diff = {k: (saved.get(k), now[k]) for k in now if k != 'batches_consumed' and saved.get(k) != now[k]}
        if diff:
            runner.logger.warning('the data order differs from the checkpoint\'s (saved, now): '
                                  + ', '.join(f'{k}={v[0]!r}->{v[1]!r}' for k, v in diff.items()))
        if state['model'] and hasattr(model, 'load_train_state_dict'):
            if list(state['model'].get('phases', [])) != list(getattr(model, 'phases', lambda: [])()):
                runner.logger.warning(f'the alternation of updates changed: checkpoint '
                                      f'{state["model"].get("phases")}, now {list(model.phases())}')
            model.load_train_state_dict(state['model'])


HOOKS.register_module(name='RandomStateHook', module=ResumeStateHook)


@contextlib.contextmanager
def unused_file_client():
    """mmengine's checkpoint code builds a ``FileClient`` even when no ``file_client_args`` are
    given and it then writes through ``get_file_backend`` — only to log FileClient's deprecation
    warning. Inside this context ``FileClient.infer_client`` returns None for
    ``file_client_args=None`` (the value it is never used for) and builds the client as before
    otherwise."""
    infer = FileClient.__dict__['infer_client']

    def quiet(cls, file_client_args=None, uri=None):
        return None if file_client_args is None else infer.__func__(cls, file_client_args, uri)
    FileClient.infer_client = classmethod(quiet)
    try:
        yield
    finally:
        FileClient.infer_client = infer


@HOOKS.register_module(name='CheckpointHook')
class SafeCheckpointHook(MMCheckpointHook):
    """mmengine's ``CheckpointHook`` (which it replaces in gdistill's scope), with the outdated
    checkpoint beyond ``max_keep_ckpts`` removed only *after* the new one is on disk — mmengine
    removes it first, so with ``max_keep_ckpts=1`` a crash while saving left no checkpoint. The
    ``last_checkpoint`` pointer is left to ``GdRunner.save_checkpoint`` (atomic, relative).
    Without ``file_client_args`` no unused ``FileClient`` is built (``unused_file_client``)."""

    def before_train(self, runner):
        with unused_file_client():
            super().before_train(runner)

    def _save_checkpoint_with_step(self, runner, step, meta):
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        # no parameter schedulers (the default run): nothing to save, and no warning about it
        schedulers = bool(getattr(runner, 'param_schedulers', None))
        with unused_file_client():
            runner.save_checkpoint(self.out_dir, filename, self.file_client_args, save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler and schedulers, meta=meta,
                                   by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if outdated is not None and is_main_process():
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)


def replica_digest(module):
    """A checksum of the replicated (not FSDP-sharded) parameters and buffers of ``module``."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(list(module.parameters()) + list(module.buffers())):
        if hasattr(t, 'to_local') or not t.is_floating_point():
            continue
        v = t.detach().double().flatten().cpu()
        # position-weighted, so that permuted or swapped values change the sum
        total += (v * torch.linspace(1, 2, v.numel(), dtype=torch.float64)).sum() * (i + 1)
    return float(total)


@HOOKS.register_module()
class ReplicaConsistencyHook(Hook):
    """Every ``interval`` iterations (and at the end) checks that all processes hold the same
    trained weights — data parallelism keeps replicas identical only if every process took the
    same updates — and stops the run with the processes' checksums if they differ."""

    priority = 'LOW'

    def __init__(self, interval=1000):
        self.interval = interval

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not (self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner)):
            return
        if not (dist.is_available() and dist.is_initialized()):
            return
        model = getattr(runner.model, 'module', runner.model)
        mine = {name: replica_digest(getattr(model, name)) for name in getattr(model, 'trained', ())}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if any(d != every[0] for d in every):
            raise RuntimeError(f'iteration {runner.iter + 1}: the processes hold different weights '
                               f'(checksums per process: {every})')
        runner.message_hub.update_info('replica_digests', every)
        runner.logger.info(f'iteration {runner.iter + 1}: weights identical on all {len(every)} processes '
                           f'(checksums {every[0]})')


@HOOKS.register_module()
class SampleVisualizationHook(Hook):
    """Every ``interval`` iterations (and at the end) draws samples from fixed noise and fixed
    labels with the distiller's sampler, saves a picture under ``work_dir/samples/`` and sends
    it to the visualizer (tensorboard). 2-D data: a scatter plot; images: a grid. ``decoder``
    (a MODELS config such as ``StabilityVAE``): the samples of a latent model are decoded to
    pixels first (``DecodedSampler``)."""

    priority = 'LOW'

    def __init__(self, interval=1000, num_samples=2048, seed=0, decoder=None):
        self.interval, self.num_samples, self.seed = interval, num_samples, seed
        self.decoder, self._decoded = decoder, None

    def before_train(self, runner):
        if self.decoder is not None:  # a missing VAE or a wrong whitening fails now, not at the first picture
            from ..samplers.decoded import DecodedSampler, check_whitening
            check_whitening(self.decoder, runner.model)
            DecodedSampler(None, self.decoder).decoder

    def _draw(self, runner, step):
        model = getattr(runner.model, 'module', runner.model)
        g = torch.Generator(device=model.device_).manual_seed(self.seed)
        noise = torch.randn((self.num_samples,) + model.data_shape, generator=g, device=model.device_)
        labels = None
        if model.teacher.label_dim:
            idx = torch.arange(self.num_samples, device=model.device_) % model.teacher.label_dim
            labels = torch.nn.functional.one_hot(idx, model.teacher.label_dim).float()
        sampler = None
        if self.decoder is not None:
            from ..samplers.decoded import DecodedSampler
            if self._decoded is None or self._decoded.sampler is not model.sampler:
                self._decoded = DecodedSampler(model.sampler, self.decoder)
            sampler = self._decoded
        x = model.sample(noise, labels, sampler=sampler, generator=g)
        if not is_main_process():
            return
        os.makedirs(osp.join(runner.work_dir, 'samples'), exist_ok=True)
        path = osp.join(runner.work_dir, 'samples', f'iter_{step:07d}.png')
        image = save_samples_figure(x.cpu(), path, title=f'{type(model).__name__} · iter {step} · '
                                    f'NFE {model.sampler.nfe}')
        runner.visualizer.add_image('samples', image, step=step)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.every_n_train_iters(runner, self.interval):
            return
        model = getattr(runner.model, 'module', runner.model)
        # a network sharded by FSDP samples on every process (its forward gathers the shards)
        net = model.sampling_network() if hasattr(model, 'sampling_network') else getattr(model, 'network', None)
        sharded = net is not None and any(hasattr(p, 'to_local') for p in net.parameters())
        if sharded or is_main_process():
            self._draw(runner, runner.iter + 1)
