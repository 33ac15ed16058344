"""Safe loading of EDM pickles. The tests write EDM-format pickles themselves: every network
object becomes a REDUCE call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)``,
as EDM's ``persistence`` module writes them, with random weights and arbitrary module_src."""
import collections
import contextlib
import copy
import importlib.util
import io
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
import types
import uuid

import numpy as np
import pytest
import torch
from torch import nn

from gdistill.networks.edm import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from gdistill.registry import TEACHERS
from gdistill.teachers import EDMTeacher
from gdistill.teachers.edm_pickle import (NETWORK_CLASSES, EDMPickleError, PersistentRecord,
                                          UnsafePickleError, load_edm_pickle, read_edm_pickle)

TINY_SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], dropout=0.0)
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], dropout=0.1)



# --- writing EDM-format pickles --------------------------------------------------------------
def _reconstruct_persistent_obj(meta):  # pickled by reference only; never called here
    raise AssertionError('the loader must not call the real persistence function')


_reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'


class EasyDict(dict):
    """Pickles as dnnlib.util.EasyDict, like EDM's dataset_kwargs."""


EasyDict.__module__ = 'dnnlib.util'


class Persistent:
    """Pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


@contextlib.contextmanager
def edm_globals():
    """Make the stand-ins importable under EDM's names while pickling (and only then)."""
    fake = {'torch_utils': types.ModuleType('torch_utils'),
            'torch_utils.persistence': types.ModuleType('torch_utils.persistence'),
            'dnnlib': types.ModuleType('dnnlib'), 'dnnlib.util': types.ModuleType('dnnlib.util')}
    fake['torch_utils.persistence']._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fake['torch_utils'].persistence = fake['torch_utils.persistence']
    fake['dnnlib.util'].EasyDict = EasyDict
    fake['dnnlib'].util = fake['dnnlib.util']
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def persistent(class_name, state, module_src='# training/networks.py\n'):
    return Persistent(dict(type='class', version=4, module_src=module_src,
                           class_name=class_name, state=state))


def as_edm(module, init_kwargs=None, module_src='# training/networks.py\n'):
    """A gdistill module tree as EDM's persistence would have pickled it."""
    children = collections.OrderedDict(
        (name, None if child is None else as_edm(child, module_src=module_src))
        for name, child in module._modules.items())
    if isinstance(module, nn.ModuleDict):  # plain torch class: pickled by reference
        md = nn.ModuleDict()
        md.__dict__.update(module.__dict__)
        md.__dict__['_modules'] = children
        return md
    state = dict(module.__dict__, _modules=children, _init_args=(),
                 _init_kwargs=copy.deepcopy(init_kwargs or {}))
    return persistent(f'training.networks.{type(module).__name__}', state, module_src)


def write_edm_pickle(path, net, init_kwargs, protocol=pickle.DEFAULT_PROTOCOL,
                     module_src='# training/networks.py\n', **extra):
    data = dict(
        ema=as_edm(net, init_kwargs, module_src),
        loss_fn=persistent('training.loss.EDMLoss', dict(P_mean=-1.2, P_std=1.2,
                                                         sigma_data=0.5)),
        augment_pipe=persistent('training.augment.AugmentPipe',
                                dict(p=np.float64(0.12), xflip=np.float32(1e8),
                                     _init_kwargs=dict(p=0.12))),
        dataset_kwargs=EasyDict(class_name='training.dataset.ImageFolderDataset',
                                path='cifar10-32x32.zip', use_labels=True, xflip=False,
                                resolution=np.int64(32)),
        **extra)
    with edm_globals(), open(path, 'wb') as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def randomize_(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def make(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(cls(**kwargs), seed).eval(), kwargs


def outputs(net, label_dim=0, **kw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.05, 4.0])
    labels = torch.eye(label_dim)[[0, label_dim - 1]] if label_dim else None
    return net(x, sigma, labels, **kw)


def marker():
    return osp.join('/tmp', f'pwned_{uuid.uuid4().hex}')


# --- round trips -----------------------------------------------------------------------------
CASES = {
    'edm-ddpmpp-cond-augment': (EDMPrecond, dict(img_resolution=16, img_channels=3, label_dim=10,
                                                 augment_dim=9, **TINY_SONG)),
    'edm-ncsnpp': (EDMPrecond, dict(img_resolution=16, img_channels=3, embedding_type='fourier',
                                    encoder_type='residual', channel_mult_noise=2,
                                    resample_filter=[1, 3, 3, 1], **TINY_SONG)),
    'edm-adm-cond': (EDMPrecond, dict(img_resolution=16, img_channels=3, label_dim=7,
                                      **TINY_ADM)),
    'vp': (VPPrecond, dict(img_resolution=16, img_channels=3, **TINY_SONG)),
    've': (VEPrecond, dict(img_resolution=16, img_channels=3, **TINY_SONG)),
    'iddpm': (iDDPMPrecond, dict(img_resolution=16, img_channels=3, **TINY_ADM)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_round_trip_equals_source_network(case, tmp_path):
    cls, kwargs = CASES[case]
    net, kwargs = make(cls, **kwargs)
    path = write_edm_pickle(tmp_path / 'net.pkl', net, kwargs)
    loaded = load_edm_pickle(str(path))
    assert type(loaded) is cls and not loaded.training
    ref_sd, got_sd = net.state_dict(), loaded.state_dict()
    assert list(ref_sd) == list(got_sd)
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    extra = dict(augment_labels=torch.randn(2, 9)) if kwargs.get('augment_dim') else {}
    label_dim = kwargs.get('label_dim', 0)
    with torch.no_grad():
        assert torch.equal(outputs(loaded, label_dim, **extra), outputs(net, label_dim, **extra))


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_pickle_protocols(protocol, tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['edm-ncsnpp'][1])
    if protocol == 2:  # Python-2 spellings (__builtin__.set, _codecs.encode) stay refused
        path = write_edm_pickle(tmp_path / 'p2.pkl', net, kwargs, protocol=2)
        with pytest.raises(UnsafePickleError, match='refusing to load global __builtin__'):
            load_edm_pickle(str(path))
        return
    path = write_edm_pickle(tmp_path / 'net.pkl', net, kwargs, protocol=protocol)
    with torch.no_grad():
        assert torch.equal(outputs(load_edm_pickle(path)), outputs(net))


def test_snapshot_extras_are_inert_records(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    src_marker = marker()
    src = f"open({src_marker!r}, 'w').write('executed')\nimport os\nos.system('true')\n"
    path = write_edm_pickle(tmp_path / 'snap.pkl', net, kwargs, module_src=src)
    data = read_edm_pickle(path)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert isinstance(data['loss_fn'], PersistentRecord)
    assert data['loss_fn'].class_name == 'training.loss.EDMLoss'
    assert data['augment_pipe'].state['p'] == 0.12  # numpy scalar rebuilt safely
    assert isinstance(data['augment_pipe'].state['p'], np.float64)
    assert data['dataset_kwargs'].path == 'cifar10-32x32.zip'  # EasyDict attribute access
    assert data['ema'].module_src == src  # kept as text ...
    load_edm_pickle(path)
    assert not osp.exists(src_marker)  # ... and never executed


def test_loader_needs_no_edm_modules(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['ve'][1])
    path = write_edm_pickle(tmp_path / 'net.pkl', net, kwargs)
    for name in ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util', 'training'):
        assert name not in sys.modules
    load_edm_pickle(path)
    assert 'torch_utils' not in sys.modules and 'training' not in sys.modules


# --- refusing what is not allowed ----------------------------------------------------------
class Call:
    """Pickles as a call ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(path):
    return {
        'os.system': (Call(os.system, f'touch {path}'), ('posix.system', 'os.system')),
        'builtins.eval': (Call(eval, f"open({path!r}, 'w')"), ('builtins.eval',)),
        'builtins.exec': (Call(exec, f"open({path!r}, 'w')"), ('builtins.exec',)),
        'subprocess.Popen': (Call(subprocess.Popen, ['touch', path]), ('subprocess.Popen',)),
        'builtins.__import__': (Call(__import__, 'os'), ('builtins.__import__',)),
    }


@pytest.mark.parametrize('where', ['top', 'in_state', 'in_loss_fn'])
@pytest.mark.parametrize('kind', sorted(_payloads('x')))
def test_malicious_globals_are_refused(kind, where, tmp_path):
    target = marker()
    payload, names = _payloads(target)[kind]
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    path = tmp_path / 'evil.pkl'
    if where == 'top':
        with open(path, 'wb') as f:
            pickle.dump({'ema': payload}, f)
    elif where == 'in_state':
        net.evil = payload  # a plain attribute in the recorded state
        write_edm_pickle(path, net, kwargs)
    else:
        write_edm_pickle(path, net, kwargs).unlink()
        with edm_globals(), open(path, 'wb') as f:
            pickle.dump(dict(ema=as_edm(net, kwargs),
                             loss_fn=persistent('training.loss.EDMLoss', dict(hook=payload))), f)
    with pytest.raises(UnsafePickleError) as err:
        load_edm_pickle(path)
    assert any(name in str(err.value) for name in names), str(err.value)
    assert 'refusing to load global' in str(err.value)
    assert not osp.exists(target)
    with pytest.raises(UnsafePickleError):
        EDMTeacher(path=str(path))
    assert not osp.exists(target)


def test_storage_bytes_are_read_with_weights_only(tmp_path):
    """A storage blob is a nested torch.save file: a code call inside it must be refused."""
    target = marker()
    blob = io.BytesIO()
    torch.save(Call(os.system, f'touch {target}'), blob, _use_new_zipfile_serialization=False)

    class EvilStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (blob.getvalue(),)

    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump({'ema': EvilStorage()}, f)
    with pytest.raises(UnsafePickleError, match='weights_only=True'):
        load_edm_pickle(tmp_path / 'evil.pkl')
    assert not osp.exists(target)


def test_unknown_network_class_lists_supported(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    path = tmp_path / 'net.pkl'
    with edm_globals(), open(path, 'wb') as f:
        pickle.dump({'ema': persistent('training.networks.MyFancyNet',
                                       dict(_init_kwargs=kwargs, _modules={}))}, f)
    with pytest.raises(EDMPickleError) as err:
        load_edm_pickle(path)
    msg = str(err.value)
    assert 'MyFancyNet' in msg
    assert all(name in msg for name in NETWORK_CLASSES)


def test_unknown_inner_class_and_mismatched_tensors_are_clear_errors(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    # an inner module of a class gdistill does not know
    evil = as_edm(net, kwargs)
    evil.meta['state']['_modules']['model'].meta['class_name'] = 'training.networks.Strange'
    with edm_globals(), open(tmp_path / 'a.pkl', 'wb') as f:
        pickle.dump({'ema': evil}, f)
    with pytest.raises(EDMPickleError, match=r"at model: unsupported class "
                                             r"'training.networks.Strange'.*UNetBlock"):
        load_edm_pickle(tmp_path / 'a.pkl')
    # constructor arguments that do not fit the recorded tensors: strict loading refuses
    wrong = dict(kwargs, model_channels=32)
    write_edm_pickle(tmp_path / 'b.pkl', net, wrong)
    with pytest.raises(EDMPickleError, match=r'do not fit EDMPrecond.*size mismatches: '
                                             r'model.map_layer0.weight \[64, 16\] in the file '
                                             r'vs \[128, 32\]'):
        load_edm_pickle(tmp_path / 'b.pkl')
    # a missing tensor
    net2 = copy.deepcopy(net)
    del net2.model.map_layer1._parameters['bias']
    write_edm_pickle(tmp_path / 'c.pkl', net2, kwargs)
    with pytest.raises(EDMPickleError, match='1 missing: model.map_layer1.bias'):
        load_edm_pickle(tmp_path / 'c.pkl')
    # wrong key / wrong file kind
    with pytest.raises(EDMPickleError, match="no 'ema'.*'net'"):
        with open(tmp_path / 'd.pkl', 'wb') as f:
            pickle.dump({'net': 1}, f)
        load_edm_pickle(tmp_path / 'd.pkl')
    torch.save(net.state_dict(), tmp_path / 'e.pt')
    with pytest.raises(EDMPickleError, match='torch.save file'):
        load_edm_pickle(tmp_path / 'e.pt')


# --- teacher and converter ---------------------------------------------------------------------
def test_edm_teacher_from_pickle(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['edm-adm-cond'][1])
    path = write_edm_pickle(tmp_path / 'net.pkl', net, kwargs)
    teacher = TEACHERS.build(dict(type='EDMTeacher', path=str(path)))
    assert teacher.sigma_data == 0.5 and teacher.label_dim == 7
    assert teacher.data_shape == (3, 16, 16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.network.training  # stays in eval (no dropout)
    x = torch.randn(2, 3, 16, 16)
    one_hot = torch.eye(7)[[2, 5]]
    with torch.no_grad():
        ref = net(x, torch.tensor([0.3, 3.0]), one_hot)
        torch.testing.assert_close(teacher.edm_denoise(x, torch.tensor([0.3, 3.0]), one_hot),
                                   ref, rtol=0, atol=0)
        # integer labels are one-hot encoded; a scalar sigma is broadcast
        torch.testing.assert_close(teacher.edm_denoise(x, torch.tensor([0.3, 3.0]),
                                                       torch.tensor([2, 5])), ref, rtol=0, atol=0)
        same = teacher.edm_denoise(x, 0.3, torch.tensor([2, 5]))
        torch.testing.assert_close(same, net(x, torch.tensor([0.3, 0.3]), one_hot))


def test_edm_teacher_from_config_and_errors(tmp_path):
    cfg = dict(type='EDMPrecond', img_resolution=16, img_channels=3, **TINY_SONG)
    teacher = EDMTeacher(network=cfg)
    assert teacher.data_shape == (3, 16, 16) and teacher.label_dim == 0
    out = teacher.edm_denoise(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='exactly one of path'):
        EDMTeacher()
    with pytest.raises(ValueError, match='exactly one of path'):
        EDMTeacher(path='x.pkl', network=cfg)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        EDMTeacher(path=str(tmp_path / 'missing.pkl'))
    with pytest.raises(TypeError, match='raw F'):
        EDMTeacher(network=dict(type='SongUNet', img_resolution=16, in_channels=3,
                                out_channels=3, model_channels=16, channel_mult=[1]))


def _convert_tool():
    path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools', 'convert_edm.py')
    spec = importlib.util.spec_from_file_location('convert_edm', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_edm_writes_state_dict_and_config(tmp_path, capsys):
    net, kwargs = make(EDMPrecond, **CASES['edm-ddpmpp-cond-augment'][1])
    path = write_edm_pickle(tmp_path / 'edm.pkl', net, kwargs)
    out = tmp_path / 'converted'
    _convert_tool().main([str(path), str(out)])
    assert 'EDMPrecond' in capsys.readouterr().out
    state = torch.load(out / 'state_dict.pt', weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    meta = json.loads((out / 'network.json').read_text())
    assert meta['network'] == dict(type='EDMPrecond', **kwargs)
    assert meta['num_params'] == sum(p.numel() for p in net.parameters())
    ns = {}
    exec((out / 'teacher.py').read_text(), ns)  # our own generated config file
    teacher = EDMTeacher(**{k: v for k, v in ns['teacher'].items() if k != 'type'})
    x, aug = torch.randn(2, 3, 16, 16), torch.zeros(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(teacher.edm_denoise(x, torch.tensor([0.2, 9.0])),
                                   net(x, torch.tensor([0.2, 9.0]), augment_labels=aug),
                                   rtol=0, atol=0)
