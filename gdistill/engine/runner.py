"""Building mmengine's Runner for gdistill: CPU-distributed set-up with a process-group
timeout, config checks, mixed precision, exact resume, checkpoints that load with
``torch.load(weights_only=True)`` and carry a digest, atomic checkpoint files, FSDP
checkpoints and clear errors."""
import contextlib
import datetime
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
from mmengine.runner import runner as mm_runner

from ..distillers.base import BaseDistiller
from ..registry import MODELS, UnknownTypeError
from . import hooks  # noqa: F401  (registers the hooks before the runner builds them)
from .checkpoint import (CheckpointError, UnreadableCheckpointError, UnsafeCheckpointError, read_checkpoint,
                         read_state_dict, write_checkpoint)
from .config_check import ConfigKeyError, check_component, check_config, check_model_data
from .fsdp import is_fsdp, serving
from .hooks import random_state
from .peers import Heartbeat, is_peer_failure, peer_failure

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


CPU_DIST_TIMEOUT = 300  # seconds: gloo's collectives wait this long for a peer before the run stops


def dist_timeout(cfg, cuda=None):
    """The process group's timeout in seconds (``dist_timeout`` in the config): its value if
    given; else ``CPU_DIST_TIMEOUT`` for a CPU (gloo) run and None — torch's NCCL default — on
    GPUs. A hung peer then ends the run after that long instead of blocking it for 30 minutes."""
    value = cfg.get('dist_timeout')
    if value is not None:
        return float(value)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return None if cuda else float(CPU_DIST_TIMEOUT)


def setup_cpu_distributed(cfg, launcher):
    """mmengine's ``launcher='pytorch'`` assumes NCCL and CUDA; on a CPU the process group is
    gloo (with ``dist_timeout``) and DDP takes ``device_ids=None``. On GPUs only a configured
    ``dist_timeout`` is passed on to mmengine's set-up; ``launcher='none'`` is a no-op."""
    if launcher == 'none':
        return
    if torch.cuda.is_available():
        timeout = dist_timeout(cfg, cuda=True)
        if timeout is not None:
            env = dict(cfg.get('env_cfg') or {})
            env['dist_cfg'] = dict(env.get('dist_cfg') or {}, timeout=timeout)
            cfg['env_cfg'] = env
        return
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', timeout=datetime.timedelta(seconds=dist_timeout(cfg, cuda=False)))
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


def load_trained_model(model_cfg, checkpoint, config_name=None):
    """The model of ``model_cfg`` with the weights of ``checkpoint``, in eval mode, for sampling
    and evaluation. The file is read with ``torch.load(weights_only=True)`` and checked against
    its digest (``read_checkpoint``): a file that would run code, or whose contents changed, is
    refused with an error naming it. The teacher's weights may be absent (it is rebuilt from its
    config); any other missing or unexpected key is an error naming both."""
    state = read_state_dict(checkpoint)  # before building: a bad file fails fast
    model = MODELS.build(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith('teacher.')]:
        source = f' of {config_name}' if config_name else ''
        raise CheckpointError(f'{checkpoint} does not fit {model_cfg["type"]}{source}: missing {missing[:5]}, '
                              f'unexpected {unexpected[:5]}')
    return model.eval()


def _iteration(path):
    m = re.search(r'iter_(\d+)\.pth$', path)
    return int(m.group(1)) if m else -1


def _inside(path, directory):
    """Whether ``path``, with every link resolved, is a file inside ``directory``."""
    real, root = osp.realpath(path), osp.realpath(directory)
    return osp.isfile(real) and osp.commonpath([real, root]) == root


def checkpoint_candidates(work_dir):
    """Checkpoints of ``work_dir``, newest first: every ``iter_*.pth`` by iteration, and the one
    ``last_checkpoint`` names (first when its name tells no iteration). Only files inside the
    work dir count: the pointer is resolved relative to the work dir, an absolute or ``..`` path
    that leads elsewhere is replaced by the file of its name in the work dir (the dir was
    moved), and a link that leads out of the work dir is skipped, so that resume never reads a
    file from outside it because a pointer said so."""
    named = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            text = f.read().strip()
        if text:
            for path in (osp.join(work_dir, text), osp.join(work_dir, osp.basename(text))):
                if _inside(path, work_dir):
                    named = osp.normpath(path)
                    break
    found = [p for p in glob.glob(osp.join(work_dir, 'iter_*.pth')) if _inside(p, work_dir)]
    if named is not None and all(osp.realpath(named) != osp.realpath(p) for p in found):
        found.append(named)
    return sorted(found, key=lambda p: (_iteration(p) if _iteration(p) >= 0 else float('inf')), reverse=True)


@contextlib.contextmanager
def writing_sealed():
    """Within: mmengine's runner writes checkpoints with ``write_checkpoint`` (plain types, so
    that ``torch.load(weights_only=True)`` reads them, a digest of the contents, fsync)."""
    original = mm_runner.save_checkpoint

    def write(checkpoint, filepath, file_client_args=None, backend_args=None):
        write_checkpoint(checkpoint, filepath)

    mm_runner.save_checkpoint = write
    try:
        yield
    finally:
        mm_runner.save_checkpoint = original


def gather_random_states():
    """Every process's random states (a collective when distributed)."""
    mine = random_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


class FileOnly(logging.Filter):
    """Keeps mmengine's environment, config and hook-order dumps (some 250 lines) off the
    terminal; they still go to the log file. ``print_env = True`` (``tools/train.py
    --print-env``) shows them."""

    PREFIXES = ('\n' + '-' * 60 + '\nSystem environment', 'Config:\n', 'Hooks will be executed in the following order')

    def filter(self, record):
        msg = record.msg if isinstance(record.msg, str) else ''
        return not msg.startswith(self.PREFIXES)


class GdRunner(Runner):
    """mmengine's Runner with what long runs need (most are pitfalls of mmengine 0.10 on torch ≥ 2.6):

    - every checkpoint is read with ``torch.load(weights_only=True)`` and checked against its
      digest (``gdistill.engine.checkpoint``): resume, ``--resume FILE`` and ``load_from``
      alike; a file that would run code is refused;
    - resume loads strictly (a missing or misshapen weight is an error, not a warning); it
      falls back to the previous checkpoint, with a warning, when the newest is unreadable
      (truncated) or corrupt (digest mismatch); it only reads files inside the work dir, and
      finds them after the work dir was moved;
    - checkpoints are written in plain types with a digest, to a temporary file that is
      renamed, so a crash never leaves a half-written one under a checkpoint's name; they
      carry every process's random states (``ResumeStateHook``) and, under FSDP, the gathered
      whole weights and optimiser state;
    - mmengine's environment and config dump goes to the log file only (``print_env``); in a
      distributed run a collective that waits longer than ``dist_timeout`` on a hung peer
      stops the run with the rank that stopped answering (``PeerFailureError``);
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

    def build_logger(self, *args, **kwargs):
        logger = super().build_logger(*args, **kwargs)
        if not self.cfg.get('print_env'):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler and not any(isinstance(f, FileOnly) for f in handler.filters):
                    handler.addFilter(FileOnly())
        return logger

    def train(self):
        model = self.model.module if is_model_wrapper(self.model) else self.model
        check_model_data(model, self.train_dataloader.dataset)
        if not (self.distributed and dist.is_initialized()):
            return super().train()
        timeout = dist_timeout(self.cfg)
        heartbeat = Heartbeat(period=min(10.0, max(0.5, (timeout or 600) / 5))).start()
        try:
            return super().train()
        except Exception as err:
            if is_peer_failure(err):
                raise peer_failure(err, heartbeat, timeout) from err
            raise
        finally:
            heartbeat.stop()

    def load_or_resume(self):
        if self._has_loaded:
            return
        if self._resume:
            if is_main_process():
                for stale in glob.glob(osp.join(self.work_dir, '.*.pth.tmp')):
                    os.remove(stale)  # a save that a crash interrupted
            if self._load_from:  # --resume FILE: that file, and no other
                self.resume(self._load_from)
                self.logger.info(f'resumed from {self._load_from} at iteration {self.iter}')
                self._has_loaded = True
                return
            paths = checkpoint_candidates(self.work_dir)
            if not paths:
                self.logger.warning(f'--resume: no checkpoint in {self.work_dir}; starting afresh')
            for i, path in enumerate(paths):
                try:
                    self.resume(path)
                except UnreadableCheckpointError as err:  # truncated, corrupted: try the one before
                    if i + 1 == len(paths):
                        raise UnreadableCheckpointError(
                            f'cannot resume: no readable checkpoint in {self.work_dir} (tried '
                            f'{", ".join(osp.basename(p) for p in paths)}; last error: {err})') from err
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
        """mmengine's, reading the file with ``read_checkpoint`` (``torch.load(weights_only=True)``,
        digest checked) whatever the path: resume, ``--resume FILE`` and ``load_from`` alike."""
        self.loading_path = filename  # for ResumeStateHook's messages
        strict = strict or self._resume
        # read to the CPU (where the digest is computed); loading copies to the parameters' device
        checkpoint = read_checkpoint(filename, map_location='cpu')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        if not is_fsdp(self.model):
            model = self.model.module if is_model_wrapper(self.model) else self.model
            checkpoint = mm_checkpoint._load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
            self._has_loaded = True
            self.logger.info(f'Load checkpoint from {filename}')
            return checkpoint
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
            with writing_sealed():
                if is_fsdp(self.model):
                    state = self.model.full_state_dict()
                    optim_state = self.model.full_optim_state_dict(self.optim_wrapper)
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
