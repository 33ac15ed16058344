"""Read EDM's network pickles without executing anything they contain.

An official EDM pickle (``edm-*.pkl``, or a ``network-snapshot-*.pkl`` of EDM's training) is a
dict ``{'ema': network, ...}`` (snapshots add ``loss_fn``, ``augment_pipe``,
``dataset_kwargs``). Every network object in it is stored as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class',
version, module_src, class_name, state}`` (NVlabs/edm torch_utils/persistence.py: ``class_name``
is the BARE class name, ``_orig_class_name = orig_class.__name__``, e.g. ``'EDMPrecond'``, and
``version`` is 6 in every released file); unpickling it the ordinary way ``exec``s
``module_src`` — arbitrary code from the file.

:class:`SafeEDMUnpickler` resolves globals from an explicit allow-list only. The persistence
call becomes an inert :class:`PersistentRecord` (``module_src`` is kept as text and never
run), ``ModuleDict`` an inert :class:`ModuleDictRecord`, tensors are rebuilt by torch's own
functions (a storage's inner bytes are read with ``torch.load(..., weights_only=True)``), and
every other global — ``os.system``, ``builtins.eval``, ``subprocess.Popen``, … — is refused
with an :class:`UnsafePickleError` naming it. The network is then built from gdistill's own
classes with the recorded ``_init_kwargs`` and loaded with ``load_state_dict(strict=True)``
from the tensors collected out of the nested state.

Recorded class names map to gdistill classes through :data:`PICKLE_CLASSES`; the bare name and
the dotted ``'<module>.<name>'`` of the registered module are both accepted. Networks of
another module are added with one :func:`register_pickle_class` call each.
"""
import collections
import io
import os
import pickle

import numpy as np
import torch
from torch import nn

from ..networks.edm import (Conv2d, DhariwalUNet, EDMPrecond, FourierEmbedding, GroupNorm,
                            Linear, PositionalEmbedding, SongUNet, UNetBlock, VEPrecond,
                            VPPrecond, iDDPMPrecond)

# --- the class table ----------------------------------------------------------------------------
# EDM's persistence records an object's class by its BARE name (``_orig_class_name =
# orig_class.__name__``, e.g. ``'EDMPrecond'``; NVlabs/edm torch_utils/persistence.py), with
# version 6 in every released file. A dotted spelling ``'<module>.<name>'`` of a registered
# module is accepted as well. Networks may be a pickle's top-level object; layers only appear
# inside one.
class PickleClass:
    """A registered recorded class: the gdistill class that rebuilds it, the module that defines
    it in the original code, and whether it is a whole network (buildable from its recorded
    ``_init_kwargs``) or a layer inside one."""

    def __init__(self, name, cls, module, network):
        self.name, self.cls, self.module, self.network = name, cls, module, network

    def __repr__(self):
        kind = 'network' if self.network else 'layer'
        return f'PickleClass({self.module}.{self.name} -> {self.cls.__name__}, {kind})'


PICKLE_CLASSES = {}


def register_pickle_class(name, cls, module='training.networks', network=False):
    """Let the safe loader rebuild a recorded class ``name`` (bare, as persistence records it)
    of ``module`` with gdistill's ``cls``. ``network=True``: it may be the pickled network itself
    and is built as ``cls(**_init_kwargs)``; otherwise it is a layer, which must be exactly what
    the enclosing network builds at its place. Returns ``cls``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f'register_pickle_class: name must be a bare class name, got {name!r}')
    known = PICKLE_CLASSES.get(name)
    if known is not None and (known.cls is not cls or known.module != module):
        raise ValueError(f'register_pickle_class: {name!r} is already registered as {known!r}')
    PICKLE_CLASSES[name] = PickleClass(name, cls, module, bool(network))
    return cls


for _cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, SongUNet, DhariwalUNet):
    register_pickle_class(_cls.__name__, _cls, network=True)
for _cls in (Linear, Conv2d, GroupNorm, UNetBlock, PositionalEmbedding, FourierEmbedding):
    register_pickle_class(_cls.__name__, _cls)
del _cls


def _supported(network_only):
    return ', '.join(sorted(n for n, e in PICKLE_CLASSES.items() if e.network or not network_only))


def lookup_pickle_class(class_name, network_only=False, where=None):
    """The :class:`PickleClass` of a recorded class name (``'EDMPrecond'`` or
    ``'training.networks.EDMPrecond'``); a clear :class:`EDMPickleError` otherwise."""
    at = f'at {where}: ' if where else ''
    kind = 'network class' if network_only else 'class'
    if not isinstance(class_name, str):
        raise EDMPickleError(f'{at}the recorded class name is {type(class_name).__name__}, not a str')
    module, _, bare = class_name.rpartition('.')
    entry = PICKLE_CLASSES.get(bare)
    if entry is not None and module and module != entry.module:
        raise EDMPickleError(f'{at}unsupported {kind} {class_name!r}: gdistill reads {bare} '
                             f'only as recorded by {entry.module} ({bare!r} or '
                             f'{entry.module + "." + bare!r}), not from module {module!r}')
    if entry is None or (network_only and not entry.network):
        what = ('a layer, not a network that a pickle can hold by itself; '
                if entry is not None else '')
        raise EDMPickleError(f'{at}unsupported {kind} {class_name!r} ({what}supported: '
                             f'{_supported(network_only)})')
    return entry


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for something the safe loader does not allow (a global off the
    allow-list, or malformed persistence data)."""


class EDMPickleError(ValueError):
    """The file was read safely but does not hold a network gdistill can build."""


# --- inert stand-ins ------------------------------------------------------------------------------
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` recorded: class name, version, the defining
    module's source (text only, never executed) and the object's ``__dict__`` (``state``)."""

    def __init__(self, class_name, version, module_src, state):
        self.class_name = class_name
        self.version = version
        self.module_src = module_src
        self.state = state

    def __repr__(self):
        return f'PersistentRecord({self.class_name!r})'


class ModuleDictRecord:
    """An inert ``torch.nn.ModuleDict`` from the file: only its ``state`` (``__dict__``)."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f'ModuleDict state must be a dict, got {type(state).__name__}')
        self.state = state

    def __repr__(self):
        return f'ModuleDictRecord({list(self.state.get("_modules", {}))})'


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict whose keys read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


# --- safe replacements of the allowed globals ---------------------------------------------------
def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise UnsafePickleError('torch_utils.persistence._reconstruct_persistent_obj expects '
                                "meta = {'type': 'class', ...}; got "
                                f'{meta.get("type") if isinstance(meta, dict) else type(meta)!r}')
    class_name, state = meta.get('class_name'), meta.get('state')
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UnsafePickleError('persistent object meta needs a str class_name and a dict state')
    return PersistentRecord(class_name, meta.get('version'), meta.get('module_src'), state)


def _load_from_bytes(data):
    """A storage serialised by ``torch.save``, read back with ``weights_only=True`` (torch's
    own ``_load_from_bytes`` would use ``weights_only=False``)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f'torch.storage._load_from_bytes expects bytes, got '
                                f'{type(data).__name__}')
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(f'a tensor storage in this file was refused by torch.load'
                                f'(weights_only=True): {err}') from err
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'torch.storage._load_from_bytes produced a '
                                f'{type(storage).__name__}, not a storage')
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'torch._utils._rebuild_tensor_v2 expects a storage, got '
                                f'{type(storage).__name__}')
    if backward_hooks:
        raise UnsafePickleError('refusing a tensor with backward hooks')
    # metadata (Python attributes set on the tensor) is dropped: a state_dict needs none
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                           bool(requires_grad), collections.OrderedDict())


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f'torch._utils._rebuild_parameter expects a tensor, got '
                                f'{type(data).__name__}')
    if backward_hooks:
        raise UnsafePickleError('refusing a parameter with backward hooks')
    return nn.Parameter(data, requires_grad=bool(requires_grad))


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafePickleError(f'numpy.dtype expects a type string, got {type(spec).__name__}')
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.hasobject:
        raise UnsafePickleError(f'refusing numpy object dtype {spec!r}')
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError('numpy scalar must be (non-object dtype, bytes)')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class _NumpyArrayClass:
    """Stands for ``numpy.ndarray`` when a file names it (the class argument of
    ``_reconstruct``); it constructs nothing."""


class SafeNumpyArray(np.ndarray):
    """A numpy array read from a pickle (EDM2's ``StabilityVAEEncoder`` stores its ``scale``
    and ``bias`` so): its state is checked — a non-object dtype and exactly shape·itemsize bytes
    of raw data — before numpy's own ``__setstate__`` copies the bytes in."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError('numpy array state must be (version, shape, dtype, '
                                    f'is_fortran, data); got {type(state).__name__}')
        _, shape, dtype, _, data = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise UnsafePickleError(f'refusing a numpy array of dtype {dtype!r} (object arrays '
                                    'unpickle arbitrary objects)')
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise UnsafePickleError(f'numpy array shape must be a tuple of ints, got {shape!r}')
        if not isinstance(data, (bytes, bytearray)) or len(data) != int(np.prod(shape)) * dtype.itemsize:
            raise UnsafePickleError(f'numpy array data must be {int(np.prod(shape)) * dtype.itemsize} '
                                    f'raw bytes for shape {shape} and dtype {dtype}')
        super().__setstate__(state)


def _numpy_reconstruct(cls, shape, typecode):
    """``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``: the empty array that
    pickle then fills with ``__setstate__`` (checked by :class:`SafeNumpyArray`)."""
    if cls is not _NumpyArrayClass:
        raise UnsafePickleError(f'numpy _reconstruct may only build numpy.ndarray, got {cls!r}')
    return SafeNumpyArray((0,), dtype=np.int8)


ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.nn.modules.container', 'ModuleDict'): ModuleDictRecord,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    # numpy arrays (EDM2's StabilityVAEEncoder scale/bias), written by numpy 1.x or >= 2
    ('numpy', 'ndarray'): _NumpyArrayClass,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('dnnlib.util', 'EasyDict'): EasyDict,
    # protocol 3 spells sets (e.g. a module's _non_persistent_buffers_set) as calls
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
}


class SafeEDMUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`ALLOWED_GLOBALS` (to the safe stand-ins above)."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f'refusing to load global {module}.{name}: an EDM network pickle needs only '
                f'{allowed}') from None

    def persistent_load(self, pid):
        raise UnsafePickleError(
            'this file uses persistent ids, so it is a torch.save file, not an EDM network '
            'pickle; load a plain state_dict with torch.load(path, weights_only=True)')


# --- reading ----------------------------------------------------------------------------------
def read_edm_pickle(source):
    """Unpickle ``source`` (path or binary file object) safely; returns what the file holds,
    with networks as inert :class:`PersistentRecord` objects."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, 'rb') as f:
            try:
                return read_edm_pickle(f)
            except (UnsafePickleError, EDMPickleError) as err:  # name the file
                raise type(err)(f'{os.fspath(source)}: {err}') from None
    head = b''
    if getattr(source, 'seekable', lambda: False)():
        start = source.tell()
        head = source.read(4)
        source.seek(start)
    if head.startswith(b'PK'):
        raise EDMPickleError('this is a zip archive (a torch.save file), not an EDM network '
                             'pickle; load a plain state_dict with torch.load(path, '
                             'weights_only=True)')
    return SafeEDMUnpickler(source).load()


def _plain(value, where):
    """Constructor arguments as plain Python data (numpy scalars → Python numbers)."""
    if isinstance(value, (str, bool, int, float, type(None))):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise EDMPickleError(f'{where}: constructor argument of type {type(value).__name__} is not '
                         'plain data')


def network_config(record):
    """The recorded constructor call of a network record as a MODELS config:
    ``dict(type='EDMPrecond', img_resolution=..., ...)``."""
    _check_network_record(record)
    args = record.state.get('_init_args', ())
    kwargs = record.state.get('_init_kwargs', {})
    if not isinstance(kwargs, dict):
        raise EDMPickleError(f'{record.class_name}: _init_kwargs is {type(kwargs).__name__}, '
                             'expected a dict')
    if args:
        raise EDMPickleError(f'{record.class_name} was constructed with positional arguments '
                             f'{args!r}; EDM constructs its networks with keywords only')
    kwargs = _plain(dict(kwargs), record.class_name)
    return dict(type=lookup_pickle_class(record.class_name, network_only=True).cls.__name__,
                **kwargs)


def _check_network_record(record):
    if not isinstance(record, PersistentRecord):
        raise EDMPickleError(f'expected a persistent network object, found '
                             f'{type(record).__name__}')
    lookup_pickle_class(record.class_name, network_only=True)


def collect_state_dict(record, module, prefix=''):
    """Tensors of a recorded module tree as a state_dict, checking on the way that each
    recorded module's class is the one gdistill built at that path."""
    where = prefix[:-1] or '<root>'
    if isinstance(record, PersistentRecord):
        expected = lookup_pickle_class(record.class_name, where=where).cls
    elif isinstance(record, ModuleDictRecord):
        expected = nn.ModuleDict
    else:
        raise EDMPickleError(f'at {where}: expected a module, found {type(record).__name__}')
    if type(module) is not expected:
        raise EDMPickleError(f'at {where}: the file records {expected.__name__} but gdistill '
                             f'builds {type(module).__name__} from the recorded constructor '
                             'arguments')
    state = record.state
    out = collections.OrderedDict()
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for kind in ('_parameters', '_buffers'):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is None or (kind == '_buffers' and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise EDMPickleError(f'at {prefix}{name}: expected a tensor, found '
                                     f'{type(tensor).__name__}')
            out[prefix + name] = tensor.detach()
    children = dict(module.named_children())
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        if name not in children:
            raise EDMPickleError(f'the file has a module {prefix}{name} that gdistill does not '
                                 f'build from the recorded constructor arguments')
        out.update(collect_state_dict(child, children[name], f'{prefix}{name}.'))
    return out


def _state_dict_mismatch(found, expected, show=3):
    """Short descriptions of missing, unexpected and differently shaped entries."""
    def listing(what, names):
        more = f' (+{len(names) - show} more)' if len(names) > show else ''
        return f'{len(names)} {what}: {", ".join(names[:show])}{more}'

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k} {list(found[k].shape)} in the file vs {list(expected[k].shape)} built'
              for k in expected if k in found and found[k].shape != expected[k].shape]
    return [listing(what, names) for what, names in
            (('missing', missing), ('unexpected', unexpected), ('size mismatches', shapes))
            if names]


def network_from_record(record):
    """Build gdistill's network for a network record and load its tensors strictly."""
    cfg = network_config(record)
    cls = lookup_pickle_class(record.class_name, network_only=True).cls
    kwargs = {k: v for k, v in cfg.items() if k != 'type'}
    with torch.device('meta'):  # no random init of weights that are overwritten next
        try:
            net = cls(**kwargs)
        except TypeError as err:
            raise EDMPickleError(f'cannot build {cls.__name__} from the recorded constructor '
                                 f'arguments {kwargs}: {err}') from err
    state_dict = collect_state_dict(record, net)
    problems = _state_dict_mismatch(state_dict, net.state_dict())
    if problems:
        raise EDMPickleError(f'the tensors in the file do not fit {cls.__name__}(**{kwargs}): '
                             + '; '.join(problems))
    net.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [n for n, t in list(net.named_parameters()) + list(net.named_buffers())
                    if t.is_meta]
    if left_on_meta:
        raise EDMPickleError(f'the file lacks values for {left_on_meta}')
    return net.eval()


def load_edm_pickle(source, key='ema'):
    """The network stored under ``key`` of an EDM pickle, as a gdistill module (eval mode).

    ``source`` is a path or a binary file object. Nothing in the file is executed; see the
    module docstring."""
    data = read_edm_pickle(source)
    if isinstance(data, PersistentRecord):  # a bare network object
        return network_from_record(data)
    if not isinstance(data, dict):
        raise EDMPickleError(f'an EDM pickle holds a dict with key {key!r}; this one holds '
                             f'{type(data).__name__}')
    if key not in data:
        raise EDMPickleError(f'no {key!r} in this EDM pickle; it has keys {sorted(map(str, data))}')
    return network_from_record(data[key])
