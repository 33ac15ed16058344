"""Checkpoint files that run no code when read, and that say when they were corrupted.

Writing (``write_checkpoint``): mmengine's checkpoint dict is turned into tensors and plain
containers only (``to_plain``: its ``HistoryBuffer`` log history, numpy arrays such as numpy's
random state, numpy scalars and dict subclasses become tagged plain dicts, lists and numbers),
and a SHA-256 digest of everything in it — every tensor's dtype, shape and bytes, every key and
plain value — is stored under ``checkpoint['integrity']``. The file is written and fsynced
under the name the caller gives (``GdRunner`` gives a temporary one and renames it).

Reading (``read_checkpoint``): ``torch.load(weights_only=True)`` always — torch's restricted
unpickler, which builds tensors and plain containers and nothing else, so a file whose pickle
would call a function (``os.system``, a ``__reduce__``) is refused before anything of it runs.
Checkpoints written before this format pickle mmengine's ``HistoryBuffer`` (whose pickle calls
``getattr``) and numpy arrays: they are refused with the command that converts them once
(``tools/upgrade_checkpoint.py``, ``read_legacy_checkpoint``: an unpickler that resolves a
fixed list of data classes and nothing else). The digest is then
recomputed and compared: a mismatch (bytes flipped inside a tensor, a changed number) is a
:class:`CorruptCheckpointError`, as is a truncated or otherwise unreadable file
(:class:`UnreadableCheckpointError`), so that resume can fall back to the previous checkpoint.
"""
import collections
import hashlib
import logging
import os
import os.path as osp
import pickle
import re
import zipfile

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log

TAG = '__gdistill_type__'
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read (truncated, not a torch file)."""


class CorruptCheckpointError(UnreadableCheckpointError):
    """A checkpoint whose contents differ from what was written (the digest disagrees)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that holds pickled objects other than tensors and plain containers, i.e. one
    whose loading could run code. It is refused, not loaded."""


# --- plain types --------------------------------------------------------------------------------------
def _encode_array(a):
    if a.dtype.hasobject:
        raise TypeError(f'a numpy array of dtype {a.dtype} (objects) cannot be stored as plain data')
    return {TAG: 'ndarray', 'dtype': a.dtype.str, 'shape': list(a.shape), 'data': np.ascontiguousarray(a).tobytes()}


def to_plain(obj, where='checkpoint', lenient=False):
    """``obj`` with every value a tensor, str, bytes, int, float, bool, None or a dict, list,
    tuple or OrderedDict of those, which ``torch.load(weights_only=True)`` reads. mmengine's
    ``HistoryBuffer`` and numpy arrays become tagged dicts (``from_plain`` rebuilds them), numpy
    scalars Python numbers, other dict subclasses dicts. Anything else is a ``TypeError`` naming
    where it is — or, with ``lenient`` (the message hub's free-form runtime information), is
    kept as its ``repr`` with a warning."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, (bool, int, float, str, bytes)):  # other subclasses: the plain value
        return {bool: bool, int: int, float: float, str: str, bytes: bytes}[
            next(t for t in (bool, int, float, str, bytes) if isinstance(obj, t))](obj)
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, HistoryBuffer):
        return {TAG: 'HistoryBuffer', 'log_history': _encode_array(obj._log_history),
                'count_history': _encode_array(obj._count_history), 'max_length': int(obj.max_length)}
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f'{where}: a key of type {type(key).__name__} cannot be stored as plain data')
            child_lenient = lenient or (where == 'checkpoint.message_hub' and key == 'runtime_info')
            out[key] = to_plain(value, f'{where}.{key}', child_lenient)
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f'{where}[{i}]', lenient) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return {TAG: 'set', 'items': [to_plain(v, f'{where}[]', lenient) for v in obj]}
    if lenient:
        print_log(f'{where}: a {type(obj).__name__} is not plain data; the checkpoint keeps its repr',
                  logger='current', level=logging.WARNING)
        return repr(obj)
    raise TypeError(f'{where}: a {type(obj).__module__}.{type(obj).__name__} cannot be stored in a checkpoint that '
                    'loads without running code; give it as tensors, numbers, strings, lists or dicts')


def _decode_array(d):
    return np.frombuffer(d['data'], dtype=np.dtype(d['dtype'])).reshape(d['shape']).copy()


def from_plain(obj):
    """The inverse of ``to_plain``: tagged dicts become ``HistoryBuffer``, numpy arrays, sets."""
    if isinstance(obj, dict):
        kind = obj.get(TAG)
        if kind == 'ndarray':
            return _decode_array(obj)
        if kind == 'HistoryBuffer':
            buffer = HistoryBuffer(max_length=obj['max_length'])
            buffer._log_history, buffer._count_history = (_decode_array(obj['log_history']),
                                                          _decode_array(obj['count_history']))
            return buffer
        if kind == 'set':
            return {from_plain(v) for v in obj['items']}
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = from_plain(value)
        return out
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(from_plain(v) for v in obj)
    return obj


# --- digest -------------------------------------------------------------------------------------------
def _feed(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f'T{t.dtype}{tuple(t.shape)}'.encode())
        if t.numel():
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(data.numpy()))
    elif isinstance(obj, dict):
        h.update(b'{%d' % len(obj))
        for key, value in obj.items():
            h.update(f'{type(key).__name__}:{key!r}='.encode())
            _feed(h, value)
        h.update(b'}')
    elif isinstance(obj, (list, tuple)):
        h.update(b'[%d' % len(obj) if isinstance(obj, list) else b'(%d' % len(obj))
        for value in obj:
            _feed(h, value)
        h.update(b']')
    elif isinstance(obj, bytes):
        h.update(b'B%d:' % len(obj) + obj)
    else:
        h.update(f'{type(obj).__name__}:{obj!r};'.encode())


def digest(checkpoint):
    """SHA-256 over everything in a plain checkpoint except its ``integrity`` entry: every
    tensor's dtype, shape and bytes, and every key and plain value, in order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != 'integrity'})
    return h.hexdigest()


def seal(checkpoint):
    """``checkpoint`` (a dict) in plain types, with its digest under ``'integrity'``."""
    plain = to_plain(dict(checkpoint))
    plain.pop('integrity', None)
    plain['integrity'] = dict(format=FORMAT, algorithm='sha256', digest=digest(plain))
    return plain


def write_checkpoint(checkpoint, path):
    """Write ``checkpoint`` sealed (plain types and digest) to ``path``, fsynced."""
    plain = seal(checkpoint)
    with open(path, 'wb') as f:
        torch.save(plain, f)
        f.flush()
        os.fsync(f.fileno())
    return plain


# --- reading ------------------------------------------------------------------------------------------
LEGACY_HINT = ('it was written before gdistill\'s checkpoints held plain data only (it pickles mmengine\'s '
               'HistoryBuffer and numpy arrays); convert it once with `python tools/upgrade_checkpoint.py {path}`, '
               'which reads tensors, numbers and that log history and runs nothing from the file')
LEGACY_MARKS = ('mmengine.logging.history_buffer.HistoryBuffer', 'numpy._core.multiarray._reconstruct',
                'numpy.core.multiarray._reconstruct', 'numpy.core.multiarray.scalar',
                'numpy._core.multiarray.scalar', 'numpy.dtype', 'numpy.ndarray')


def _refused_global(err):
    m = re.search(r'GLOBAL ([\w.]+)', str(err))
    return m.group(1) if m else None


def _load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_global(err)
        if refused is None:  # no global asked for: a damaged pickle (nothing of it ran either way)
            m = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', str(err))
            first = m.group(1).strip() if m else (str(err).strip().splitlines() or [''])[0]
            raise UnreadableCheckpointError(f'{path}: not a readable checkpoint (torch.load(weights_only=True) '
                                            f'stopped: {first})') from None
    if refused in LEGACY_MARKS:
        raise UnsafeCheckpointError(f'{path}: refused by torch.load(weights_only=True): '
                                    + LEGACY_HINT.format(path=path)) from None
    raise UnsafeCheckpointError(
        f'{path}: refused: the file holds the global {refused!r}, which could run code when loaded; gdistill reads '
        'checkpoints with torch.load(weights_only=True) only (tensors, numbers, strings, lists, dicts)') from None


def read_checkpoint(path, map_location='cpu', verify=True):
    """The checkpoint at ``path`` as mmengine and gdistill use it (``HistoryBuffer`` and numpy
    arrays rebuilt), read with ``torch.load(weights_only=True)`` and checked against its
    digest. Raises ``FileNotFoundError``, :class:`UnsafeCheckpointError` (the file would run
    code), :class:`UnreadableCheckpointError` (truncated, not a torch file) or
    :class:`CorruptCheckpointError` (digest mismatch), each naming ``path``."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist' if not osp.exists(path)
                                else f'checkpoint {path!r} is not a file')
    try:
        loaded = _load(path, map_location)
    except (CheckpointError, MemoryError):
        raise
    except Exception as err:  # a truncated zip, a file that is no torch file, a bad storage
        raise UnreadableCheckpointError(f'{path}: not a readable checkpoint ({type(err).__name__}: '
                                        f'{str(err).splitlines()[0] if str(err) else ""})') from None
    if not isinstance(loaded, dict):
        return loaded
    record = loaded.get('integrity')
    if record is None:
        # a plain state dict (e.g. tools/convert_edm.py's) has none; a runner checkpoint from
        # before checkpoints had one is accepted with a warning
        if verify and 'state_dict' in loaded:
            print_log(f'{path} carries no digest (written before checkpoints had one): its contents cannot be '
                      'checked for corruption', logger='current', level=logging.WARNING)
        return from_plain(loaded)
    if verify:
        want = record.get('digest') if isinstance(record, dict) else None
        got = digest(loaded)
        if got != want:
            raise CorruptCheckpointError(
                f'{path}: integrity check failed: its contents hash to {got[:16]}…, the file records '
                f'{str(want)[:16]}… (the file changed after it was written: a bad disk, an interrupted copy)')
    loaded.pop('integrity')
    return from_plain(loaded)


def read_state_dict(path, map_location='cpu'):
    """The weights in ``path``: a checkpoint's ``state_dict`` or a plain state dict file."""
    loaded = read_checkpoint(path, map_location)
    if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
        return loaded['state_dict']
    if not isinstance(loaded, dict):
        raise CheckpointError(f'{path}: holds a {type(loaded).__name__}, not a checkpoint or state dict')
    return loaded


# --- checkpoints of the earlier format ------------------------------------------------------------------
def _history_getattr(obj, name):
    statistics = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in statistics:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'refused: getattr({obj!r}, {name!r}) (only HistoryBuffer\'s statistics)')


def _latin1_encode(text, encoding='latin1'):
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'refused: _codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode('latin1')


def _legacy_globals():
    core = getattr(np, '_core', None) or np.core
    allowed = {('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
               ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
               ('collections', 'OrderedDict'): collections.OrderedDict,
               ('mmengine.logging.history_buffer', 'HistoryBuffer'): HistoryBuffer,
               ('__builtin__', 'getattr'): _history_getattr, ('builtins', 'getattr'): _history_getattr,
               ('_codecs', 'encode'): _latin1_encode,
               ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[(module, '_reconstruct')] = core.multiarray._reconstruct
        allowed[(module, 'scalar')] = core.multiarray.scalar
    return allowed


class _LegacyUnpickler(pickle.Unpickler):
    allowed = _legacy_globals()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f'refused global {module}.{name}: not a tensor, number, numpy array or '
                                         'HistoryBuffer')
        return found


def _legacy_load(file, **kwargs):
    return _LegacyUnpickler(file, **kwargs).load()


# torch.load calls both ``pickle_module.Unpickler`` (zip files) and ``pickle_module.load``
# (the magic number and header of its older non-zip format): both must be the restricted one
_legacy_pickle = type(pickle)('gdistill_legacy_checkpoint_pickle')
_legacy_pickle.Unpickler = _LegacyUnpickler
_legacy_pickle.load = _legacy_load


def read_legacy_checkpoint(path):
    """A checkpoint of the earlier format (mmengine's ``HistoryBuffer`` and numpy arrays
    pickled), for ``tools/upgrade_checkpoint.py`` only. The unpickler resolves a fixed list of
    globals — torch's tensor rebuilders, ``OrderedDict``, numpy's array, dtype and scalar
    rebuilders, ``HistoryBuffer``, ``getattr`` of a ``HistoryBuffer`` statistic and latin-1
    ``_codecs.encode`` (how protocol 2 stores bytes) — and refuses every other one, so no code
    from the file runs."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if not zipfile.is_zipfile(path):  # mmengine's runner always wrote torch's zip format
        raise UnreadableCheckpointError(f'{path}: not a checkpoint of gdistill\'s runner (not a torch zip file)')
    try:
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_legacy_pickle)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f'{path}: {err}') from None
    except Exception as err:
        raise UnreadableCheckpointError(f'{path}: not a readable checkpoint ({type(err).__name__}: {err})') from None
