"""Building mmengine's Runner for gdistill: CPU-distributed set-up, trusted resume of the
run's own checkpoints on torch ≥ 2.6, atomic checkpoint files and clear config errors."""
import contextlib
import glob
import os
import os.path as osp
import re

import torch
import torch.distributed as dist
from mmengine.dist import is_main_process
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mm_checkpoint

from ..registry import UnknownTypeError
from . import hooks  # noqa: F401  (registers the hooks before the runner builds them)

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


def setup_cpu_distributed(cfg, launcher):
    """mmengine's ``launcher='pytorch'`` assumes NCCL and CUDA; on a CPU the process group is
    gloo and DDP takes ``device_ids=None``. (A no-op on GPUs and for ``launcher='none'``.)"""
    if launcher == 'none' or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMSeparateDistributedDataParallel')
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'


@contextlib.contextmanager
def trusting(path):
    """Load ``path`` — a checkpoint this run wrote itself — with ``weights_only=False``
    (mmengine's checkpoints hold its log history objects). Every other file keeps torch's
    safe default."""
    original = torch.load
    target = osp.realpath(path)

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and osp.realpath(f) == target:
            kwargs['weights_only'] = False
        return original(f, *args, **kwargs)

    mm_checkpoint.torch.load = load
    try:
        yield
    finally:
        mm_checkpoint.torch.load = original


def _iteration(path):
    m = re.search(r'iter_(\d+)\.pth$', path)
    return int(m.group(1)) if m else -1


def checkpoint_candidates(work_dir):
    """Checkpoints of ``work_dir``, newest first: the one ``last_checkpoint`` names (resolved
    relative to the work dir when the dir was moved), then every ``iter_*.pth`` by iteration."""
    found = []
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        for path in (named, osp.join(work_dir, named), osp.join(work_dir, osp.basename(named))):
            if path and osp.isfile(path):
                found.append(path)
                break
    rest = sorted(glob.glob(osp.join(work_dir, 'iter_*.pth')), key=_iteration, reverse=True)
    return found + [p for p in rest if not found or osp.realpath(p) != osp.realpath(found[0])]


class GdRunner(Runner):
    """mmengine's Runner with three changes (each a known pitfall of mmengine 0.10 on torch ≥ 2.6):

    - resume loads this run's own checkpoints with ``weights_only=False`` and only those;
      it falls back to the previous checkpoint, with a warning, when the newest is unreadable
      (a truncated file), and finds them after the work dir was moved;
    - checkpoints are written to a temporary file and renamed, so a crash never leaves a
      half-written one under a checkpoint's name;
    - the train dataloader has its own random generator, so a resumed run's skip over the
      batches already seen draws nothing from the global one."""

    @staticmethod
    def build_dataloader(dataloader, seed=None, diff_rank_seed=False):
        if isinstance(dataloader, dict) and 'generator' not in dataloader:
            dataloader = dict(dataloader, generator=torch.Generator().manual_seed(seed or 0))
        return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)

    def load_or_resume(self):
        if self._has_loaded:
            return
        if self._resume:
            paths = [self._load_from] if self._load_from else checkpoint_candidates(self.work_dir)
            if not paths:
                self.logger.warning(f'--resume: no checkpoint in {self.work_dir}; starting afresh')
            for i, path in enumerate(paths):
                try:
                    with trusting(path):
                        self.resume(path)
                except Exception as err:  # an unreadable file: try the one before
                    if i + 1 == len(paths):
                        raise RuntimeError(f'cannot resume: no readable checkpoint in {self.work_dir} '
                                           f'(last error on {path}: {err})') from err
                    self.logger.warning(f'checkpoint {path} is unreadable ({type(err).__name__}: {err}); '
                                        f'resuming from {paths[i + 1]} instead')
                    continue
                self.logger.info(f'resumed from {path} at iteration {self.iter}')
                self._has_loaded = True
                return
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
            self._has_loaded = True

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        tmp = f'.{filename}.tmp'
        super().save_checkpoint(out_dir, tmp, *args, **kwargs)
        if not is_main_process():  # only the main process writes files
            return
        os.replace(osp.join(out_dir, tmp), osp.join(out_dir, filename))
        with open(osp.join(self.work_dir, 'last_checkpoint.tmp'), 'w') as f:
            f.write(osp.relpath(osp.join(out_dir, filename), self.work_dir))
        os.replace(osp.join(self.work_dir, 'last_checkpoint.tmp'), osp.join(self.work_dir, 'last_checkpoint'))


def build_runner(cfg):
    """``GdRunner.from_cfg`` with mmengine's unknown-type errors turned into ones that list the
    registered names (gdistill's own registries already do)."""
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
