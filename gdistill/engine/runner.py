"""Building mmengine's Runner for gdistill: CPU-distributed set-up, config checks, mixed
precision, trusted and exact resume of the run's own checkpoints on torch ≥ 2.6, atomic
checkpoint files, FSDP checkpoints and clear errors."""
import contextlib
import glob
import logging
import os
import os.path as osp
import re

import torch
import torch.distributed as dist
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mm_checkpoint

from ..distillers.base import BaseDistiller
from ..registry import MODELS, UnknownTypeError
from . import hooks  # noqa: F401  (registers the hooks before the runner builds them)
from .config_check import ConfigKeyError, check_component, check_config, check_model_data
from .fsdp import is_fsdp, serving
from .hooks import random_state

ALIASES = {'teacher.': 'model.teacher.'}


def expand_aliases(options):
    """``--cfg-options teacher.path=…`` is short for ``model.teacher.path=…``."""
    out = {}
    for key, value in (options or {}).items():
        for short, full in ALIASES.items():
            if key.startswith(short):
                key = full + key[len(short):]
        out[key] = value
    return out


DDP_WRAPPERS = ('MMSeparateDistributedDataParallel', 'MMDistributedDataParallel')


def setup_cpu_distributed(cfg, launcher):
    """mmengine's ``launcher='pytorch'`` assumes NCCL and CUDA; on a CPU the process group is
    gloo and DDP takes ``device_ids=None``. (A no-op on GPUs and for ``launcher='none'``.)"""
    if launcher == 'none' or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    if cfg.get('fsdp'):
        apply_fsdp(cfg)
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMSeparateDistributedDataParallel')
    if wrapper.get('type', 'MMDistributedDataParallel') in DDP_WRAPPERS:
        wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'


def apply_mixed_precision(cfg, cuda=None):
    """``mixed_precision = 'bf16'``: every optimiser wrapper becomes mmengine's
    ``AmpOptimWrapper`` with bfloat16 autocast (no loss scaling: bf16 has fp32's range). Only on
    CUDA: on a CPU the run stays in float32 with a warning (CPU bf16 autocast is slow and breaks
    forward-mode AD inside conv2d). Returns the precision the run will use."""
    mode = cfg.get('mixed_precision')
    if mode in (None, 'fp32'):
        return 'fp32'
    if mode != 'bf16':
        raise ValueError(f"mixed_precision is 'bf16' or None (float32), got {mode!r}; fp16 is not offered: it "
                         'needs loss scaling, whose overflow steps the non-finite guard would count as failures')
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        print_log("mixed_precision='bf16' asks for bfloat16 autocast, which needs a CUDA GPU; none is "
                  'available, so this run trains in float32', logger='current', level=logging.WARNING)
        return 'fp32'
    ow = cfg['optim_wrapper']
    if ow.get('constructor') == 'MultiOptimWrapperConstructor':
        entries = [v for k, v in ow.items() if k not in ('constructor', 'paramwise_cfg') and isinstance(v, dict)]
    else:
        entries = [ow]
    for entry in entries:
        if entry.get('type', 'OptimWrapper') not in ('OptimWrapper', 'AmpOptimWrapper'):
            raise ValueError(f"mixed_precision='bf16' needs OptimWrapper entries, got type {entry['type']!r}")
        entry.update(type='AmpOptimWrapper', dtype='bfloat16', loss_scale=1.0)
    return 'bf16'


def apply_fsdp(cfg):
    """``fsdp = True`` or ``fsdp = dict(shard_modules=[...], reshard_after_forward=...)``: shard
    the trained networks with FSDP2 (``FullyShardedDistiller``) instead of replicating them
    with DDP, in a distributed run; a single process has nothing to shard."""
    opts = cfg.get('fsdp')
    if not opts:
        return
    if cfg.get('launcher', 'none') == 'none':
        print_log('fsdp is set but this run is one process (launcher none): nothing to shard', logger='current',
                  level=logging.WARNING)
        return
    opts = {} if opts is True else dict(opts)
    problems = []
    check_component(dict(opts, type='FullyShardedDistiller'), 'fsdp', problems)
    if problems:
        raise ConfigKeyError('unknown config keys:\n  ' + '\n  '.join(problems))
    # scoped: mmengine's wrap_model looks the type up in its root registry
    cfg['model_wrapper_cfg'] = dict(type='gdistill.FullyShardedDistiller', **opts)


def prepare_config(cfg):
    """gdistill's additions before the runner is built: key check, the resume-state hook
    (random states, data order, loop counters) even where a config does not list it, and the
    FSDP and mixed-precision options."""
    check_config(cfg)
    apply_fsdp(cfg)
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and h.get('type') in ('ResumeStateHook', 'RandomStateHook') for h in hooks):
        hooks.append(dict(type='ResumeStateHook'))
    cfg['custom_hooks'] = hooks
    apply_mixed_precision(cfg)
    return cfg


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt)."""


@contextlib.contextmanager
def trusting(path):
    """Load ``path`` — a checkpoint this run wrote itself — with ``weights_only=False``
    (mmengine's checkpoints hold its log history objects). Every other file keeps torch's
    safe default. A failure to read the file becomes an :class:`UnreadableCheckpointError`."""
    original = torch.load
    target = osp.realpath(path)

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and osp.realpath(f) == target:
            kwargs['weights_only'] = False
            try:
                return original(f, *args, **kwargs)
            except Exception as err:
                raise UnreadableCheckpointError(f'{path}: {type(err).__name__}: {err}') from err
        return original(f, *args, **kwargs)

    mm_checkpoint.torch.load = load
    try:
        yield
    finally:
        mm_checkpoint.torch.load = original


def load_trained_model(model_cfg, checkpoint, config_name=None):
    """The model of ``model_cfg`` with the weights of ``checkpoint``, in eval mode, for sampling
    and evaluation. The checkpoint is one this project's runner wrote (it holds mmengine's log
    history, hence ``weights_only=False`` for it only). The teacher's weights may be absent (it is
    rebuilt from its config); any other missing or unexpected key is an error naming both."""
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    model = MODELS.build(model_cfg)
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    missing, unexpected = model.load_state_dict(state.get('state_dict', state), strict=False)
    if unexpected or [k for k in missing if not k.startswith('teacher.')]:
        source = f' of {config_name}' if config_name else ''
        raise RuntimeError(f'{checkpoint} does not fit {model_cfg["type"]}{source}: missing {missing[:5]}, '
                           f'unexpected {unexpected[:5]}')
    return model.eval()


def _iteration(path):
    m = re.search(r'iter_(\d+)\.pth$', path)
    return int(m.group(1)) if m else -1


def checkpoint_candidates(work_dir):
    """Checkpoints of ``work_dir``, newest first: every ``iter_*.pth`` by iteration, and the one
    ``last_checkpoint`` names (resolved relative to the work dir, so a moved dir still works;
    first when its name tells no iteration)."""
    named = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            text = f.read().strip()
        for path in (osp.join(work_dir, text), text, osp.join(work_dir, osp.basename(text))):
            if text and osp.isfile(path):
                named = path
                break
    found = glob.glob(osp.join(work_dir, 'iter_*.pth'))
    if named is not None and all(osp.realpath(named) != osp.realpath(p) for p in found):
        found.append(named)
    return sorted(found, key=lambda p: (_iteration(p) if _iteration(p) >= 0 else float('inf')), reverse=True)


def gather_random_states():
    """Every process's random states (a collective when distributed)."""
    mine = random_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


class GdRunner(Runner):
    """mmengine's Runner with what long runs need (most are pitfalls of mmengine 0.10 on torch ≥ 2.6):

    - resume loads this run's own checkpoints with ``weights_only=False`` and only those, and
      strictly (a missing or misshapen weight is an error, not a warning); it falls back to the
      previous checkpoint, with a warning, when the newest is unreadable (a truncated file),
      and finds them after the work dir was moved;
    - checkpoints are written to a temporary file and renamed, so a crash never leaves a
      half-written one under a checkpoint's name; they carry every process's random states
      (``ResumeStateHook``) and, under FSDP, the gathered whole weights and optimiser state;
    - the train dataloader has its own random generator, so a resumed run's skip over the
      batches already seen draws nothing from the global one;
    - before training, the data is checked against the teacher (``check_model_data``)."""

    @staticmethod
    def build_dataloader(dataloader, seed=None, diff_rank_seed=False):
        if isinstance(dataloader, dict) and 'generator' not in dataloader:
            dataloader = dict(dataloader, generator=torch.Generator().manual_seed(seed or 0))
        return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)

    def build_optim_wrapper(self, optim_wrapper):
        built = super().build_optim_wrapper(optim_wrapper)
        if isinstance(getattr(self.model, 'module', self.model), BaseDistiller):
            # a distiller's train_step is one whole update of each network (it accumulates the
            # micro-batches itself), so mmengine's iteration count, and its warning about
            # resuming in the middle of an accumulation, do not apply
            for wrapper in (built.values() if isinstance(built, OptimWrapperDict) else [built]):
                wrapper.initialize_count_status = lambda *args, **kwargs: None
        return built

    def _init_model_weights(self):
        if not is_fsdp(self.model):
            return super()._init_model_weights()
        model = self.model.module
        if hasattr(model, 'init_weights'):
            model.init_weights()
        for value in model.state_dict().values():  # shards are each process's own: sync only whole tensors
            if not hasattr(value, 'to_local'):
                dist.broadcast(value, 0)

    def train(self):
        model = self.model.module if is_model_wrapper(self.model) else self.model
        check_model_data(model, self.train_dataloader.dataset)
        return super().train()

    def load_or_resume(self):
        if self._has_loaded:
            return
        if self._resume:
            if is_main_process():
                for stale in glob.glob(osp.join(self.work_dir, '.*.pth.tmp')):
                    os.remove(stale)  # a save that a crash interrupted
            paths = [self._load_from] if self._load_from else checkpoint_candidates(self.work_dir)
            if not paths:
                self.logger.warning(f'--resume: no checkpoint in {self.work_dir}; starting afresh')
            for i, path in enumerate(paths):
                try:
                    with trusting(path):
                        self.resume(path)
                except UnreadableCheckpointError as err:  # try the one before
                    if i + 1 == len(paths):
                        raise RuntimeError(f'cannot resume: no readable checkpoint in {self.work_dir} '
                                           f'(last error: {err})') from err
                    self.logger.warning(f'checkpoint {path} is unreadable ({err}); resuming from '
                                        f'{paths[i + 1]} instead')
                    continue
                self.logger.info(f'resumed from {path} at iteration {self.iter}')
                self._has_loaded = True
                return
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
            self._has_loaded = True

    def load_checkpoint(self, filename, map_location='cpu', strict=False, revise_keys=[(r'^module.', '')]):
        self.loading_path = filename  # for ResumeStateHook's messages
        strict = strict or self._resume
        if not is_fsdp(self.model):
            return super().load_checkpoint(filename, map_location=map_location, strict=strict,
                                           revise_keys=revise_keys)
        checkpoint = mm_checkpoint._load_checkpoint(filename, map_location='cpu')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        self.model.load_full_state_dict(checkpoint['state_dict'], strict=strict)
        optim_state = checkpoint.pop('optimizer', None)  # so that mmengine's resume does not load it
        if optim_state is not None and self._resume:
            self.optim_wrapper = self.build_optim_wrapper(self.optim_wrapper)
            self.model.load_full_optim_state_dict(self.optim_wrapper, optim_state)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        # collectives first, on every process: mmengine's save runs on the main one only
        self.process_random_states = gather_random_states()
        tmp = f'.{filename}.tmp'
        try:
            if is_fsdp(self.model):
                state, optim_state = self.model.full_state_dict(), self.model.full_optim_state_dict(self.optim_wrapper)
                with serving(self.model.module, self.optim_wrapper, state, optim_state):
                    super().save_checkpoint(out_dir, tmp, *args, **kwargs)
            else:
                super().save_checkpoint(out_dir, tmp, *args, **kwargs)
        finally:
            self.process_random_states = None
        if not is_main_process():  # only the main process writes files
            return
        os.replace(osp.join(out_dir, tmp), osp.join(out_dir, filename))
        with open(osp.join(self.work_dir, 'last_checkpoint.tmp'), 'w') as f:
            f.write(osp.relpath(osp.join(out_dir, filename), self.work_dir))
        os.replace(osp.join(self.work_dir, 'last_checkpoint.tmp'), osp.join(self.work_dir, 'last_checkpoint'))


def build_runner(cfg):
    """``GdRunner.from_cfg`` after ``prepare_config`` (key check, resume state, precision), with
    mmengine's unknown-type errors turned into ones that list the registered names (gdistill's
    own registries already do)."""
    prepare_config(cfg)
    try:
        return GdRunner.from_cfg(cfg)
    except KeyError as err:
        if isinstance(err, UnknownTypeError):
            raise
        m = re.search(r'`?(\w+)`? is not in the (\S+)::(\S+) registry', str(err))
        if not m:
            raise
        raise UnknownTypeError(_explain(m.group(1), m.group(2), m.group(3))) from err


def _explain(key, scope, registry_name):
    from .. import registry as R
    regs = [r for r in vars(R).values() if isinstance(r, R.Registry) and r.name == registry_name]
    regs.sort(key=lambda r: r.scope != scope)  # the registry of the scope the error names first
    if regs:
        return R.unknown_type_message(key, regs[0])
    return f'{key!r} is not a registered {registry_name}'
