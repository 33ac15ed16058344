"""Checks a config before anything is built, and the model against its data before training.

``check_config``: every key of a component config (a dict with a ``type``) must be an argument
of that class's constructor — following ``**kwargs`` up the class hierarchy where the source
passes them on as ``super().__init__(..., **kwargs)``; a class that keeps ``**kwargs`` for
itself is not checked — so a misspelled key (``model.divergance``,
``train_cfg.max_iter``) fails at once with the closest right one, instead of being ignored or
failing deep inside a build; then ``check_values`` refuses values that cannot run
(``max_iters=0``, a batch size of 0, ``lr='abc'``), naming key and value. Top-level keys that are one typo away from a key the runner reads
(``custom_hook``) fail the same way; other top-level names are the config's own variables.

``check_model_data``: an empty training set, and a teacher whose resolution, channels or label
count disagree with the dataset's, fail before the first iteration."""
import difflib
import inspect
import math
import re

from mmengine.hooks import CheckpointHook as MMCheckpointHook
from mmengine.registry import (FUNCTIONS, LOG_PROCESSORS, OPTIM_WRAPPERS, OPTIMIZERS, PARAM_SCHEDULERS,
                               VISBACKENDS)
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader

from .. import registry as R
from ..distillers.base import describe_shape


class ConfigKeyError(KeyError):
    """Config keys that no constructor takes, each with the closest known one."""

    def __str__(self):
        return str(self.args[0])


# top-level keys the runner, mmengine's from_cfg or gdistill's tools read
RUNNER_KEYS = ({p for p in inspect.signature(Runner.__init__).parameters if p != 'self'}
               | {'model_wrapper_cfg', 'find_unused_parameters', 'sync_bn', 'activation_checkpointing',
                  'efficient_conv_bn_eval', 'compile', 'gpu_ids', 'custom_imports', 'vis_backends',
                  'torch_threads', 'mixed_precision', 'fsdp', 'dist_timeout', 'print_env'})
LOOP_KEYS = {'by_epoch', 'max_iters', 'max_epochs', 'val_begin', 'val_interval', 'dynamic_intervals'}
ENV_KEYS = {'cudnn_benchmark', 'mp_cfg', 'dist_cfg', 'resource_limit'}
RANDOMNESS_KEYS = {'seed', 'diff_rank_seed', 'deterministic'}
META_KEYS = {'type', '_scope_'}


def _registries():
    regs = [r for r in vars(R).values() if isinstance(r, R.Registry)]
    return regs + [OPTIMIZERS, OPTIM_WRAPPERS, PARAM_SCHEDULERS, LOG_PROCESSORS, VISBACKENDS, FUNCTIONS]


def resolve(type_):
    """The class a config's ``type`` names, or None when no registry knows it (the builder then
    reports the unknown type itself)."""
    if inspect.isclass(type_):
        return type_
    if not isinstance(type_, str):
        return None
    for reg in _registries():
        try:
            found = reg.get(type_)
        except Exception:  # a scope prefix another registry does not know
            found = None
        if inspect.isclass(found):
            return found
    return None


def _passes_to_super(init, name):
    """Whether ``init``'s source hands ``**name`` on to ``super().__init__(...)``."""
    try:
        src = inspect.getsource(init)
    except (OSError, TypeError):
        return False
    for m in re.finditer(r'super\([^)]*\)\.__init__\(', src):
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {'(': 1, ')': -1}.get(src[i], 0)
            i += 1
        if re.search(r'\*\*\s*' + re.escape(name) + r'\b', src[m.end():i]):
            return True
    return False


def _params(fn):
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def constructor_args(cls):
    """Keyword arguments ``cls(...)`` accepts, and whether that set is open (any key may be
    valid). A ``**kwargs`` handed to ``super().__init__`` adds the parent's arguments; one used
    otherwise (stored, passed elsewhere) leaves the set open — except mmengine's
    ``CheckpointHook``, whose extra keywords go to ``Runner.save_checkpoint``."""
    if issubclass(cls, MMCheckpointHook):
        return _params(MMCheckpointHook.__init__) | _params(Runner.save_checkpoint), False
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        if klass in (object, nn.Module):
            return names, False
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            return names, True
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var = [p.name for p in params if p.kind == p.VAR_KEYWORD]
        if not var:
            return names, False
        if not _passes_to_super(init, var[0]):
            return names, True
    return names, True


def _unknown(where, key, known, owner):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    return f'{where}.{key}: {owner} takes no {key!r}.{hint} Known: {", ".join(sorted(known))}.'


def _check_keys(cfg, where, known, owner, problems):
    for key in cfg:
        if key not in known and key not in META_KEYS:
            problems.append(_unknown(where, key, known, owner))


def _check_nested(value, where, problems):
    if isinstance(value, dict):
        if 'type' in value:
            check_component(value, where, problems)
        else:
            for k, v in value.items():
                if isinstance(v, (dict, list, tuple)):
                    _check_nested(v, f'{where}.{k}', problems)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_nested(v, f'{where}[{i}]', problems)


def check_component(cfg, where, problems, default_type=None, extra=()):
    """Append to ``problems`` every key of ``cfg`` (and of the component configs inside it)
    that its class's constructor does not take."""
    cls = resolve(cfg.get('type', default_type))
    if cls is not None:
        known, open_ = constructor_args(cls)
        if not open_:
            _check_keys(cfg, where, known | set(extra), cls.__name__, problems)
    for key, value in cfg.items():
        if key not in META_KEYS:
            _check_nested(value, f'{where}.{key}', problems)


def check_config(cfg):
    """Raise :class:`ConfigKeyError` listing every misspelled key of ``cfg`` (an mmengine
    Config or dict) with the closest right one."""
    problems = []
    for key in cfg:
        if key.startswith('_') or key in RUNNER_KEYS:
            continue
        close = difflib.get_close_matches(key, sorted(RUNNER_KEYS), n=1, cutoff=0.85)
        if close:
            problems.append(f'{key}: the runner reads no top-level {key!r}. Did you mean {close[0]!r}? '
                            '(rename it, or start a variable of your own with "_")')
    if isinstance(cfg.get('model'), dict):
        check_component(cfg['model'], 'model', problems)
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if isinstance(loader, dict):
            known = {p for p in inspect.signature(DataLoader.__init__).parameters if p != 'self'}
            _check_keys(loader, name, known, 'DataLoader', problems)
            for key in ('dataset', 'sampler', 'batch_sampler', 'collate_fn'):
                _check_nested(loader.get(key), f'{name}.{key}', problems)
    loop = cfg.get('train_cfg')
    if isinstance(loop, dict):
        if 'type' in loop:
            check_component(loop, 'train_cfg', problems, extra=('runner', 'dataloader'))
        else:
            _check_keys(loop, 'train_cfg', LOOP_KEYS, 'the training loop', problems)
    _check_optim_wrapper(cfg.get('optim_wrapper'), problems)
    for name in ('default_hooks', 'model_wrapper_cfg', 'visualizer', 'param_scheduler', 'custom_hooks'):
        _check_nested(cfg.get(name), name, problems)
    if isinstance(cfg.get('log_processor'), dict):
        check_component(cfg['log_processor'], 'log_processor', problems, default_type='LogProcessor')
    for name, known in (('env_cfg', ENV_KEYS), ('randomness', RANDOMNESS_KEYS)):
        if isinstance(cfg.get(name), dict):
            _check_keys(cfg[name], name, known, name, problems)
    if problems:
        raise ConfigKeyError('unknown config keys:\n  ' + '\n  '.join(problems))
    check_values(cfg)


def _check_optim_wrapper(ow, problems):
    if not isinstance(ow, dict):
        return
    if ow.get('constructor') == 'MultiOptimWrapperConstructor':
        for name, entry in ow.items():
            if name in ('constructor', 'paramwise_cfg'):
                continue
            if isinstance(entry, dict):
                check_component(entry, f'optim_wrapper.{name}', problems, default_type='OptimWrapper',
                                extra=('paramwise_cfg',))
    else:
        check_component(ow, 'optim_wrapper', problems, default_type='OptimWrapper',
                        extra=('constructor', 'paramwise_cfg'))


class ConfigValueError(ValueError):
    """Config values out of range or of the wrong kind, each named by its key."""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rule(problems, key, value, ok, want):
    if not ok(value):
        problems.append(f'{key} = {value!r}: {want}')


def _optimizer_entries(ow):
    if not isinstance(ow, dict):
        return []
    if ow.get('constructor') == 'MultiOptimWrapperConstructor':
        return [(f'optim_wrapper.{k}', v) for k, v in ow.items()
                if k not in ('constructor', 'paramwise_cfg') and isinstance(v, dict)]
    return [('optim_wrapper', ow)]


def check_values(cfg):
    """Raise :class:`ConfigValueError` for values that cannot run: ``train_cfg.max_iters`` /
    ``max_epochs`` < 1, a batch size < 1, a learning rate that is not a positive finite number,
    a negative weight decay, betas outside [0, 1), ``accumulative_counts`` < 1, checkpoint and
    log intervals < 1, ``dist_timeout`` <= 0, ``torch_threads`` < 1 — each named with its key
    and value."""
    problems = []
    positive_int = (_is_int, 'must be an integer >= 1')

    def check(key, value, ok, want):
        if value is not None:
            _rule(problems, key, value, ok, want)

    loop = cfg.get('train_cfg')
    if isinstance(loop, dict):
        for key in ('max_iters', 'max_epochs', 'val_interval'):
            check(f'train_cfg.{key}', loop.get(key), lambda v: _is_int(v) and v >= 1,
                  'must be an integer >= 1' + (' (the number of training iterations)' if key == 'max_iters' else ''))
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if isinstance(loader, dict):
            check(f'{name}.batch_size', loader.get('batch_size'), lambda v: _is_int(v) and v >= 1,
                  positive_int[1])
            check(f'{name}.num_workers', loader.get('num_workers'), lambda v: _is_int(v) and v >= 0,
                  'must be an integer >= 0')
    for where, entry in _optimizer_entries(cfg.get('optim_wrapper')):
        check(f'{where}.accumulative_counts', entry.get('accumulative_counts'), lambda v: _is_int(v) and v >= 1,
              positive_int[1])
        opt = entry.get('optimizer')
        if isinstance(opt, dict):
            check(f'{where}.optimizer.lr', opt.get('lr'), lambda v: _is_number(v) and v > 0,
                  'the learning rate must be a positive finite number')
            check(f'{where}.optimizer.weight_decay', opt.get('weight_decay'), lambda v: _is_number(v) and v >= 0,
                  'must be a number >= 0')
            check(f'{where}.optimizer.eps', opt.get('eps'), lambda v: _is_number(v) and v > 0,
                  'must be a positive number')
            check(f'{where}.optimizer.betas', opt.get('betas'),
                  lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
                  'must be two numbers in [0, 1)')
        clip = entry.get('clip_grad')
        if isinstance(clip, dict):
            check(f'{where}.clip_grad.max_norm', clip.get('max_norm'), lambda v: _is_number(v) and v > 0,
                  'must be a positive number')
    hooks = cfg.get('default_hooks')
    if isinstance(hooks, dict):
        ckpt = hooks.get('checkpoint')
        if isinstance(ckpt, dict):
            check('default_hooks.checkpoint.interval', ckpt.get('interval'),
                  lambda v: _is_int(v) and (v >= 1 or v == -1), 'must be an integer >= 1 (or -1: never)')
            check('default_hooks.checkpoint.max_keep_ckpts', ckpt.get('max_keep_ckpts'),
                  lambda v: _is_int(v) and (v >= 1 or v == -1), 'must be an integer >= 1 (or -1: keep all)')
        logger = hooks.get('logger')
        if isinstance(logger, dict):
            check('default_hooks.logger.interval', logger.get('interval'), lambda v: _is_int(v) and v >= 1,
                  positive_int[1])
    check('dist_timeout', cfg.get('dist_timeout'), lambda v: _is_number(v) and v > 0,
          'must be a positive number of seconds')
    check('torch_threads', cfg.get('torch_threads'), lambda v: _is_int(v) and v >= 1, positive_int[1])
    if problems:
        raise ConfigValueError('; '.join(problems))


class DataMismatchError(ValueError):
    """The training data is empty or does not fit the model's teacher."""


def check_model_data(model, dataset):
    """Fail before training when ``dataset`` is empty, or its images' shape or label count
    disagree with the teacher of ``model`` (what the dataset declares: ``image_shape``,
    ``label_dim``; each batch is checked again in the distillers' ``train_step``)."""
    name = type(dataset).__name__
    try:
        length = len(dataset)
    except TypeError:
        length = None
    if length == 0:
        raise DataMismatchError(f'the training dataset {name} is empty: it has no items '
                                '(an infinite sampler would wait for data forever)')
    teacher = getattr(model, 'teacher', None)
    if teacher is None:
        return
    tname = type(teacher).__name__ if teacher is not model else f'the {type(model).__name__} network'
    shape = getattr(dataset, 'image_shape', None)
    want = tuple(getattr(teacher, 'data_shape', ()) or ())
    if shape is not None and want and tuple(shape) != want:
        raise DataMismatchError(f'the data does not fit the teacher: {name} has images of shape '
                                f'{describe_shape(shape)}, {tname} makes {describe_shape(want)}; use data of '
                                'its resolution and channels, or a teacher trained on this data')
    k_data, k = getattr(dataset, 'label_dim', None), int(getattr(teacher, 'label_dim', 0) or 0)
    if k_data and k_data != k:
        fix = (' (it is unconditional: train without labels, e.g. use_labels=False or label_dim=0)'
               if k == 0 else f'; give the dataset label_dim={k}')
        raise DataMismatchError(f'the labels do not fit the teacher: {name} has {k_data} classes, '
                                f'{tname} has label_dim={k}{fix}')
