"""One optimiser wrapper per trained sub-network (mmengine has no such constructor)."""
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapperDict

from ..registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MultiOptimWrapperConstructor:
    """``optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=dict(type='Adam', lr=1e-5)), aux=dict(...))`` builds an
    ``OptimWrapperDict`` whose key ``name`` optimises ``model.name``. Each entry is an ordinary
    mmengine optimiser-wrapper config (type, optimizer, clip_grad, accumulative_counts, …)."""

    def __init__(self, optim_wrapper_cfg, paramwise_cfg=None):
        if not isinstance(optim_wrapper_cfg, dict) or not optim_wrapper_cfg:
            raise ValueError('MultiOptimWrapperConstructor: give one optimiser-wrapper config per '
                             f'trained network, e.g. generator=dict(optimizer=...); got {optim_wrapper_cfg!r}')
        self.cfgs = dict(optim_wrapper_cfg)
        self.paramwise_cfg = paramwise_cfg

    def __call__(self, model):
        model = getattr(model, 'module', model)
        trained = tuple(getattr(model, 'trained', ()))
        missing = [n for n in trained if n not in self.cfgs]
        unknown = [n for n in self.cfgs if n not in trained]
        if missing or unknown:
            raise KeyError(f'optim_wrapper must name exactly the trained networks {list(trained)} of '
                           f'{type(model).__name__}; missing {missing}, not trained {unknown}')
        wrappers = {}
        for name, cfg in self.cfgs.items():
            cfg = dict(cfg)
            cfg.setdefault('type', 'OptimWrapper')
            paramwise = cfg.pop('paramwise_cfg', self.paramwise_cfg)
            wrappers[name] = DefaultOptimWrapperConstructor(cfg, paramwise)(getattr(model, name))
        return OptimWrapperDict(**wrappers)
