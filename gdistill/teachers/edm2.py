"""EDM2 teachers (Karras et al. 2024): a released EDM2 network, read without executing the
pickle's code, or a gdistill EDM2 network built from a config.

A released EDM2 file (``edm2-img512-s-2147483-0.130.pkl``, or a training snapshot
``network-snapshot-*.pkl``) is a ``dnnlib.util.EasyDict`` with ``encoder``
(``StabilityVAEEncoder`` for latents, with numpy ``scale``/``bias``; ``StandardRGBEncoder`` for
pixels), ``dataset_kwargs``, ``loss_fn`` (``EDM2Loss``) and ``ema`` (the ``Precond`` network,
every tensor float16; NVlabs/edm2 training/training_loop.py:193-204). This module registers
EDM2's recorded classes (bare names ``Precond``, ``UNet``, ``Block``, ``MPConv``, ``MPFourier``
of ``training.networks_edm2``) with the safe loader of :mod:`gdistill.teachers.edm_pickle`, so
``load_edm_pickle`` and ``EDMTeacher(path=...)`` read them; :class:`EDM2Teacher` adds the
choice of precision and the encoder's constants.
"""
import os.path as osp

import numpy as np
import torch

from ..networks.edm2 import (EDM2Block, EDM2Precond, EDM2TwoTimePrecond, EDM2UNet, MPConv,
                             MPFourier)
from ..registry import TEACHERS
from .edm import EDMTeacher
from .edm_pickle import (EDMPickleError, PersistentRecord, network_from_record, read_edm_pickle,
                         register_pickle_class)

EDM2_MODULE = 'training.networks_edm2'
register_pickle_class('Precond', EDM2Precond, module=EDM2_MODULE, network=True)
register_pickle_class('UNet', EDM2UNet, module=EDM2_MODULE, network=True)
register_pickle_class('Block', EDM2Block, module=EDM2_MODULE)
register_pickle_class('MPConv', MPConv, module=EDM2_MODULE)
register_pickle_class('MPFourier', MPFourier, module=EDM2_MODULE)

#: precisions an EDM2 teacher may hold its weights in
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'stored': None}


def _plain_data(value):
    """Recorded state as plain Python/numpy data (numpy arrays copied into ordinary arrays)."""
    if isinstance(value, np.ndarray):
        return np.array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_data(v) for v in value)
    return value


def read_edm2_encoder(source):
    """The encoder an EDM2 file records, as plain data: ``{'class_name': 'StabilityVAEEncoder',
    'vae_name': ..., 'scale': float32 [4], 'bias': float32 [4], ...}`` or ``{'class_name':
    'StandardRGBEncoder'}``; None when the file holds no encoder (EDM2's reader then uses
    ``StandardRGBEncoder``, generate_images.py:169-173). Nothing in the file is executed."""
    return _encoder_of(read_edm_pickle(source))


def _encoder_of(data):
    enc = data.get('encoder') if isinstance(data, dict) else None
    if enc is None:
        return None
    if not isinstance(enc, PersistentRecord):
        raise EDMPickleError(f'the file\'s encoder is a {type(enc).__name__}, not a recorded object')
    state = {k: v for k, v in enc.state.items() if not k.startswith('_')}
    return dict(class_name=enc.class_name, **_plain_data(state))


@TEACHERS.register_module()
class EDM2Teacher(EDMTeacher):
    """A frozen EDM2 denoiser D(x; σ) (``EDM2Precond``).

    Give exactly one of ``path`` (a released EDM2 pickle or training snapshot; the network
    under ``key``, default ``'ema'``, is read without running code from the file) or
    ``network`` (a MODELS config such as ``edm2_config('s')``, random weights unless
    ``checkpoint`` names a state_dict; see :class:`EDMTeacher`).

    ``dtype``: ``'float32'`` (default; what EDM2's reconstruct_phema.py computes with and what
    students copied from the teacher train in), ``'float16'`` or ``'stored'`` (as in the file:
    float16 for every released network, exactly what generate_images.py evaluates). With fp16
    parameters MPConv's gain/√fan_in is rounded to fp16, so D differs from the fp32 copy by
    ~1e-4 relative (EDM2.md §1). ``encoder``: the file's encoder constants
    (:func:`read_edm2_encoder`), None for a ``network=`` teacher.
    """

    def __init__(self, path=None, network=None, checkpoint=None, key='ema', checkpoint_prefix=None,
                 dtype='float32'):
        if dtype not in DTYPES:
            raise ValueError(f'EDM2Teacher: dtype must be one of {sorted(DTYPES)}; got {dtype!r}')
        data = None
        if path is not None:
            if network is not None or checkpoint is not None:
                raise ValueError('EDM2Teacher: path= (an EDM2 pickle, weights included) goes '
                                 f'alone; got network={network!r}, checkpoint={checkpoint!r}')
            if not osp.isfile(path):
                raise FileNotFoundError(f'EDM2Teacher: EDM2 pickle {path!r} does not exist')
            data = read_edm_pickle(path)  # read once: the network and the encoder
            if not isinstance(data, dict) or key not in data:
                have = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
                raise EDMPickleError(f'EDM2Teacher: no {key!r} in {path}; it holds {have}')
            network = network_from_record(data[key])
        super().__init__(network=network, checkpoint=checkpoint, checkpoint_prefix=checkpoint_prefix)
        self.path = path
        if not isinstance(self.network, (EDM2Precond, EDM2TwoTimePrecond)):
            raise TypeError(f'EDM2Teacher needs an EDM2 network (EDM2Precond); got '
                            f'{type(self.network).__name__} — use EDMTeacher for EDM networks')
        if DTYPES[dtype] is not None:
            self.network.to(DTYPES[dtype])
        self.dtype_name = dtype
        self.encoder = _encoder_of(data) if data is not None else None
        self.freeze()
