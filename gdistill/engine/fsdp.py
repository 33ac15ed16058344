"""Sharding the trained networks of a distiller with torch's FSDP2 (``fully_shard``).

Selected by config: ``fsdp = True`` (or ``fsdp = dict(shard_modules=['UNetBlock'])``) with
``--launcher pytorch``, which sets ``model_wrapper_cfg = dict(type='FullyShardedDistiller', ...)``.
Each trained network's parameters, gradients and Adam moments are split across the processes
(the frozen teacher and the EMA copy stay whole on every process); a network's parameters are
gathered only while it runs. Checkpoints hold the whole (gathered)
weights and optimiser state, so they load in any number of processes, with or without FSDP
(the optimiser state of an FSDP run resumes an FSDP run only: it is keyed by parameter name)."""
import collections
import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..registry import MODEL_WRAPPERS

FULL_OPTIM_FORMAT = 'fsdp-full-by-name'


def _fsdp_api():
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    return dict(StateDictOptions=StateDictOptions, get_model_state_dict=get_model_state_dict,
                get_optimizer_state_dict=get_optimizer_state_dict, set_model_state_dict=set_model_state_dict,
                set_optimizer_state_dict=set_optimizer_state_dict, init_device_mesh=init_device_mesh,
                fully_shard=fully_shard)


@MODEL_WRAPPERS.register_module()
class FullyShardedDistiller(nn.Module):
    """Applies ``fully_shard`` to every network in ``module.trained`` (first to each sub-module
    whose class name is in ``shard_modules``, e.g. ``['UNetBlock']``, so that one block at a
    time is gathered, then to the network itself). ``reshard_after_forward``: free the gathered
    parameters after each forward (less memory, one more all-gather in backward).

    ``train_step`` is the distiller's own: its optimiser wrappers, gradient accumulation and
    non-finite guard work on the sharded parameters (FSDP reduce-scatters the gradients)."""

    def __init__(self, module, shard_modules=(), reshard_after_forward=True):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError('FullyShardedDistiller needs a process group: launch with torchrun and '
                               '--launcher pytorch')
        api = _fsdp_api()
        trained = tuple(getattr(module, 'trained', ()))
        if not trained:
            raise ValueError(f'FullyShardedDistiller: {type(module).__name__} names no trained networks '
                             '(`trained`)')
        if torch.cuda.is_available():
            device_type = 'cuda'
            module = module.to(torch.device('cuda', torch.cuda.current_device()))
        else:
            device_type = 'cpu'
        mesh = api['init_device_mesh'](device_type, (dist.get_world_size(),))
        wanted = set(shard_modules or ())
        for t in module.state_dict().values():  # every process starts from the main one's weights, as DDP does
            dist.broadcast(t, 0)
        self.module = module
        self.trained = trained
        for name in trained:
            net = getattr(module, name)
            for sub in list(net.modules())[1:]:
                if type(sub).__name__ in wanted:
                    api['fully_shard'](sub, mesh=mesh, reshard_after_forward=reshard_after_forward)
            api['fully_shard'](net, mesh=mesh, reshard_after_forward=reshard_after_forward)

    def train_step(self, data, optim_wrapper):
        return self.module.train_step(data, optim_wrapper)

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)

    def train(self, mode=True):
        self.training = mode
        self.module.train(mode)
        return self

    # --- whole state for checkpoints (collectives: every process calls them) ----------------
    def full_state_dict(self):
        """Every weight of the distiller, gathered: plain tensors on the main process (the
        others get an empty dict)."""
        api = _fsdp_api()
        opts = api['StateDictOptions'](full_state_dict=True, cpu_offload=True)
        return api['get_model_state_dict'](self.module, options=opts)

    def full_optim_state_dict(self, optim_wrapper):
        """Each trained network's optimiser state, gathered and keyed by parameter name, plus the
        wrapper's own entries (e.g. a loss scaler); main process only, like the weights."""
        api = _fsdp_api()
        opts = api['StateDictOptions'](full_state_dict=True, cpu_offload=True)
        out = {}
        for name in self.trained:
            wrapper = optim_wrapper[name]
            state = api['get_optimizer_state_dict'](getattr(self.module, name), wrapper.optimizer, options=opts)
            extra = {k: v for k, v in wrapper.state_dict().items() if k not in ('state', 'param_groups')}
            out[name] = dict(extra, format=FULL_OPTIM_FORMAT, **state)
        return out

    def load_full_state_dict(self, state_dict, strict=True):
        api = _fsdp_api()
        opts = api['StateDictOptions'](full_state_dict=True, strict=strict)
        return api['set_model_state_dict'](self.module, state_dict, options=opts)

    def load_full_optim_state_dict(self, optim_wrapper, state):
        api = _fsdp_api()
        opts = api['StateDictOptions'](full_state_dict=True)
        for name in self.trained:
            entry = dict(state[name])
            if entry.pop('format', None) != FULL_OPTIM_FORMAT:
                raise ValueError('this checkpoint\'s optimiser state was not written by an FSDP run '
                                 '(it is keyed by position, not by parameter name); resume it without '
                                 'FullyShardedDistiller, or start from its weights with load_from')
            wrapper = optim_wrapper[name]
            if 'loss_scaler' in entry and hasattr(wrapper, 'loss_scaler'):
                wrapper.loss_scaler.load_state_dict(entry.pop('loss_scaler'))
            entry.pop('base_param_settings', None)
            api['set_optimizer_state_dict'](getattr(self.module, name), wrapper.optimizer, entry, options=opts)


@contextlib.contextmanager
def serving(model, optim_wrapper, state_dict, optim_state):
    """Within the block, ``model.state_dict()`` and each wrapper's ``state_dict()`` return the
    gathered whole states, so that mmengine's ``save_checkpoint`` writes those."""
    state_dict = collections.OrderedDict(state_dict)  # what mmengine's weights_to_cpu expects
    patched = [(model, 'state_dict', lambda *a, **k: state_dict)]
    patched += [(optim_wrapper[name], 'state_dict', (lambda s: lambda: s)(optim_state[name]))
                for name in optim_state]
    for obj, attr, fn in patched:
        setattr(obj, attr, fn)
    try:
        yield
    finally:
        for obj, attr, _ in patched:
            delattr(obj, attr)


def is_fsdp(model):
    return isinstance(model, FullyShardedDistiller)

