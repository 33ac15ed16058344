"""Registries of gdistill, all in scope ``gdistill``.

Kinds that mmengine already has (models, datasets, hooks, loops, metrics, optimiser-wrapper
constructors, model wrappers) are children of mmengine's root registries, so mmengine's
``Runner`` finds gdistill's classes once ``default_scope='gdistill'``. The kinds that are
gdistill's own (teachers, schedules, kernels, divergences, convex functions, time samplers,
samplers, detectors) are roots of their own.

An unknown ``type`` fails with the registered names and the closest match.
"""
import difflib

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry
from mmengine import registry as _mmengine_registry


class UnknownTypeError(KeyError):
    """A config names a ``type`` that its registry does not hold."""

    def __str__(self):  # KeyError would repr() the message and show the quotes
        return str(self.args[0])


def unknown_type_message(key, registry):
    known = sorted(registry.module_dict)
    parent = registry.parent
    while parent is not None:  # a child also builds what its ancestors hold
        known += sorted(k for k in parent.module_dict if k not in known)
        parent = parent.parent
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"{key!r} is not a registered {registry.name} in scope "
            f"{registry.scope!r}.{hint} Known: {', '.join(known) or '(none)'}.")


class GdRegistry(Registry):
    """A Registry whose ``build`` names what is known when the type is not."""

    def build(self, cfg, *args, **kwargs):
        if isinstance(cfg, dict) and 'type' not in cfg:
            raise KeyError(f'a {self.name} config needs a "type" key; got keys '
                           f'{sorted(cfg)}. Known {self.name} types: '
                           f'{", ".join(sorted(self.module_dict))}.')
        if isinstance(cfg, dict) and isinstance(cfg['type'], str):
            if self.get(cfg['type']) is None:
                raise UnknownTypeError(unknown_type_message(cfg['type'], self))
        return super().build(cfg, *args, **kwargs)


def _root(name, loc):
    return GdRegistry(name, scope='gdistill', locations=[f'gdistill.{loc}'])


def _child(name, parent, loc):
    return GdRegistry(name, parent=parent, scope='gdistill',
                      locations=[f'gdistill.{l}' for l in loc])


TEACHERS = _root('teacher', 'teachers')
SCHEDULES = _root('schedule', 'schedules')
KERNELS = _root('kernel', 'kernels')
DIVERGENCES = _root('divergence', 'divergences')
CONVEX_FUNCTIONS = _root('convex function', 'divergences')
TIME_SAMPLERS = _root('time sampler', 'time_samplers')
SAMPLERS = _root('sampler', 'samplers')
DETECTORS = _root('detector', 'metrics')  # feature networks of the image metrics (FID, FD-DINOv2)

MODELS = _child('model', MMENGINE_MODELS, ['distillers', 'networks', 'data'])
NETWORKS = MODELS  # networks are models; the alias says which kind a config means
DATASETS = _child('dataset', MMENGINE_DATASETS, ['data'])
DATA_SAMPLERS = _child('data sampler', MMENGINE_DATA_SAMPLERS, ['data'])
HOOKS = _child('hook', MMENGINE_HOOKS, ['engine'])
LOOPS = _child('loop', MMENGINE_LOOPS, ['engine'])
METRICS = _child('metric', MMENGINE_METRICS, ['metrics'])
OPTIM_WRAPPER_CONSTRUCTORS = _child('optimizer wrapper constructor',
                                    MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, ['engine'])
MODEL_WRAPPERS = _child('model_wrapper', MMENGINE_MODEL_WRAPPERS, ['engine'])
VISUALIZERS = _child('visualizer', MMENGINE_VISUALIZERS, ['engine'])


def _scope_children():
    """An empty gdistill child of every other mmengine root registry (optimizers, optimiser
    wrappers, parameter schedulers, visualisation backends, log processors, …). Under
    ``default_scope='gdistill'`` mmengine looks for a registry of that scope in each registry
    tree it builds from; without one it warns ("Failed to search registry with scope gdistill
    in the … registry tree") and falls back to its own. A child finds everything its parent
    holds, so these change no lookup and silence the warning."""
    children = {}
    for attr in sorted(dir(_mmengine_registry)):
        root = getattr(_mmengine_registry, attr)
        if not (attr.isupper() and isinstance(root, Registry)) or root.parent is not None:
            continue
        if 'gdistill' in root.children:
            children[attr] = root.children['gdistill']
        else:
            # the parent's locations: a child imports them before it looks up its parent
            children[attr] = GdRegistry(root.name, parent=root, scope='gdistill',
                                        locations=list(getattr(root, '_locations', [])))
    return children


SCOPE_CHILDREN = _scope_children()
OPTIMIZERS = SCOPE_CHILDREN['OPTIMIZERS']
OPTIM_WRAPPERS = SCOPE_CHILDREN['OPTIM_WRAPPERS']
PARAM_SCHEDULERS = SCOPE_CHILDREN['PARAM_SCHEDULERS']
VISBACKENDS = SCOPE_CHILDREN['VISBACKENDS']


def build(registry, cfg, **kwargs):
    """Build ``cfg`` from ``registry``; an already-built object passes through."""
    if cfg is None or not isinstance(cfg, dict):
        return cfg
    return registry.build(cfg, default_args=kwargs or None)
