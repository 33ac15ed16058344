"""Shared by tests/test_device_clean.py (CPU) and tests/test_cuda.py (GPU): one small model of
every image method, built from the method's own config with tiny networks, a batch for it,
and a guard that catches gdistill code creating tensors without saying on which device.

The guard (:class:`FactoryGuard`) is a ``TorchFunctionMode``: it sees every call of a torch
factory function (``torch.tensor``, ``zeros``, ``randn``, ``arange``, …) with its arguments
*before* torch fills in the default device, and the Python frame that made it. A call made by
a file of the ``gdistill`` package with no ``device=`` creates a CPU tensor whatever device the data is on — the bug that stops a step on a GPU
("Expected all tensors to be on the same device, cuda:0 and cpu") — and is recorded with its
file and line. (A ``TorchDispatchMode`` sees the call only after the default device has been
filled in, so it cannot tell a forgotten device from a deliberate CPU tensor on a CPU run.)
"""
import os.path as osp
import sys

import torch
from torch.overrides import TorchFunctionMode

import gdistill

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = osp.dirname(osp.abspath(gdistill.__file__)) + osp.sep
sys.path.insert(0, osp.join(ROOT, 'tools'))

FACTORIES = {getattr(torch, n) for n in (
    'tensor', 'as_tensor', 'scalar_tensor', 'zeros', 'ones', 'empty', 'full', 'arange', 'linspace',
    'logspace', 'randn', 'rand', 'randint', 'randperm', 'eye', 'empty_strided', 'tril_indices',
    'triu_indices')}


class FactoryGuard(TorchFunctionMode):
    """Records factory calls from gdistill source that name no device (a deliberate
    ``device='cpu'``, e.g. for a seed drawn from the CPU generator, is the caller's choice).
    ``torch.as_tensor``/``torch.tensor`` of a tensor keep its device and are not counted."""

    def __init__(self, missing_device=True):
        super().__init__()
        self.missing_device = missing_device
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            data_is_tensor = func in (torch.tensor, torch.as_tensor) and args and \
                isinstance(args[0], torch.Tensor)
            device, generator = kwargs.get('device'), kwargs.get('generator')
            # where the tensor lands: the device given, else the default one
            target = torch.device(device) if device is not None else torch.get_default_device()
            problem = None
            if generator is not None and generator.device.type != target.type:
                problem = f'a {generator.device.type} generator for a {target.type} tensor'
            elif self.missing_device and not data_is_tensor and device is None:
                problem = 'no device'
            frame = sys._getframe(1)
            if problem and frame.f_code.co_filename.startswith(PACKAGE):
                where = f'{osp.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}'
                self.calls.append(f'{where} ({frame.f_code.co_name}): torch.{func.__name__} '
                                  f'with {problem}')
        return func(*args, **kwargs)

    def report(self):
        return 'tensors created without the device of the data they meet:\n  ' + \
            '\n  '.join(sorted(set(self.calls)))


# --- tiny models of every image method ---------------------------------------------------------
RES = 8
TINY_SONG = dict(_delete_=True, type='EDMPrecond', img_resolution=RES, img_channels=3, label_dim=0,
                 model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)
TINY_TEACHER = {'model.teacher.network': TINY_SONG}

# name -> (config, cfg-options, whether its batches carry images)
METHODS = {
    'cosim': ('projects/cosim/cifar10.py', TINY_TEACHER, False),
    # SiD keeps its augmentation pipe: the teacher takes its labels (augment_dim 9)
    'sid': ('configs/sid/cifar10.py', {'model.teacher.network': dict(TINY_SONG, augment_dim=9)}, False),
    'hsivi': ('configs/hsivi/cifar10.py', TINY_TEACHER, False),
    'scd': ('configs/scm/cifar10_scd.py', TINY_TEACHER, True),
    'sct': ('configs/scm/cifar10_scd.py', dict(TINY_TEACHER, **{'model.mode': 'sct'}), True),
    'siddm': ('configs/siddm/cifar10.py', {
        'model.generator': TINY_SONG,
        'model.discriminator': dict(_delete_=True, type='ConvDiscriminator', img_resolution=RES,
                                    img_channels=3, model_channels=8, channel_mult=[1, 2], emb_dim=16,
                                    label_dim=0)}, True),
    'denoising': ('configs/teachers/edm_tiny_images.py', {'model.network': TINY_SONG}, True),
}


def method_config(name):
    from train import load_config
    path, options, _ = METHODS[name]
    options = dict(options)
    # one process, every network stepped on this one batch
    cfg = load_config(osp.join(ROOT, path))
    for key in ('generator', 'aux', 'discriminator', 'network'):
        if key in cfg.get('optim_wrapper', {}):
            options[f'optim_wrapper.{key}.accumulative_counts'] = 1
    for key, value in options.items():
        parts = key.split('.')
        node = cfg
        for p in parts[:-1]:
            node = node[p]
        if isinstance(value, dict) and value.get('_delete_'):
            node[parts[-1]] = {k: v for k, v in value.items() if k != '_delete_'}
        else:
            node[parts[-1]] = value
    return cfg


def build_method(name):
    """(model, config, optimiser-wrapper settings without the constructor) of method ``name``
    with tiny networks."""
    import gdistill.data  # noqa: F401
    import gdistill.distillers  # noqa: F401
    import gdistill.engine  # noqa: F401
    import gdistill.networks  # noqa: F401
    from gdistill.registry import MODELS
    cfg = method_config(name)
    model = MODELS.build(cfg.model)
    ow = dict(cfg.optim_wrapper)
    ow.pop('constructor')
    return model, cfg, ow


def optim_wrappers(model, ow):
    from gdistill.engine.optim import MultiOptimWrapperConstructor
    return MultiOptimWrapperConstructor(ow)(model)


def batch(name, n=2, seed=0):
    """A batch as the method's loader gives it: indices, and uint8 images where it trains on data."""
    data = dict(idx=list(range(n)))
    if METHODS[name][2]:
        g = torch.Generator().manual_seed(seed)
        data['img'] = list(torch.randint(0, 256, (n, 3, RES, RES), generator=g, dtype=torch.uint8))
    return data
