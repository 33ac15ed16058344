"""Safe loading of EDM pickles.

The real test is against ``tests/data/edm_fixtures``: four pickles written by the official
NVlabs/edm code (bare class names, persistence version 6, full training snapshots) with what
the official code computed from them (``D`` and an 18-step ``edm_sampler`` run) — loaded through
``load_edm_pickle``, ``EDMTeacher(path=...)`` and ``tools/convert_edm.py`` + its config.

The other tests write EDM-format pickles themselves, for what the fixtures do not hold (VP
networks, augmentation labels, every pickle protocol, malicious files): every network object
becomes a REDUCE call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the
bare class name and version 6, as EDM's ``persistence`` module writes them."""
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
from mmengine.config import Config
from torch import nn

from gdistill.networks.edm import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from gdistill.registry import TEACHERS
from gdistill.samplers import EDMHeunSampler
from gdistill.teachers import EDMTeacher
from gdistill.teachers.edm_pickle import (PICKLE_CLASSES, EDMPickleError, PersistentRecord,
                                          UnsafePickleError, load_edm_pickle, read_edm_pickle,
                                          register_pickle_class)

FIXTURES = osp.join(osp.dirname(osp.abspath(__file__)), 'data', 'edm_fixtures')
FIXTURE_NAMES = ['edm_adm_cond', 'edm_ddpmpp_uncond', 'iddpm_adm_cond', 've_ncsnpp_uncond']
FIXTURE_CLASSES = dict(edm_adm_cond=EDMPrecond, edm_ddpmpp_uncond=EDMPrecond,
                       iddpm_adm_cond=iDDPMPrecond, ve_ncsnpp_uncond=VEPrecond)

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
    return Persistent(dict(type='class', version=6, module_src=module_src,
                           class_name=class_name, state=state))


def as_edm(module, init_kwargs=None, module_src='# training/networks.py\n', prefix=''):
    """A gdistill module tree as EDM's persistence would have pickled it (``prefix``
    ``'training.networks.'`` writes the dotted spelling instead of the bare class name)."""
    children = collections.OrderedDict(
        (name, None if child is None else as_edm(child, module_src=module_src, prefix=prefix))
        for name, child in module._modules.items())
    if isinstance(module, nn.ModuleDict):  # plain torch class: pickled by reference
        md = nn.ModuleDict()
        md.__dict__.update(module.__dict__)
        md.__dict__['_modules'] = children
        return md
    state = dict(module.__dict__, _modules=children, _init_args=(),
                 _init_kwargs=copy.deepcopy(init_kwargs or {}))
    return persistent(f'{prefix}{type(module).__name__}', state, module_src)


def write_edm_pickle(path, net, init_kwargs, protocol=pickle.DEFAULT_PROTOCOL,
                     module_src='# training/networks.py\n', prefix='', **extra):
    data = dict(
        ema=as_edm(net, init_kwargs, module_src, prefix),
        loss_fn=persistent('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
        augment_pipe=persistent('AugmentPipe',
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
    assert data['loss_fn'].class_name == 'EDMLoss'
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
                             loss_fn=persistent('EDMLoss', dict(hook=payload))), f)
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


def _networks():
    return sorted(n for n, e in PICKLE_CLASSES.items() if e.network)


@pytest.mark.parametrize('class_name', ['MyFancyNet', 'training.networks.MyFancyNet'])
def test_unknown_network_class_lists_supported(class_name, tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    path = tmp_path / 'net.pkl'
    with edm_globals(), open(path, 'wb') as f:
        pickle.dump({'ema': persistent(class_name, dict(_init_kwargs=kwargs, _modules={}))}, f)
    with pytest.raises(EDMPickleError) as err:
        load_edm_pickle(path)
    msg = str(err.value)
    assert f'unsupported network class {class_name!r}' in msg
    supported = msg.split('supported: ')[1]
    assert 'MyFancyNet' not in supported            # the offender is not listed as supported
    assert all(name in supported for name in _networks())
    assert {'EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'} <= set(_networks())


def test_layer_or_foreign_module_as_network_is_refused(tmp_path):
    path = tmp_path / 'net.pkl'
    for name, match in (('UNetBlock', r"unsupported network class 'UNetBlock' \(a layer, not a "
                                      r"network.*supported: DhariwalUNet, EDMPrecond"),
                        ('evil.module.EDMPrecond', r"reads EDMPrecond only as recorded by "
                                                   r"training.networks.*not from module "
                                                   r"'evil.module'")):
        with edm_globals(), open(path, 'wb') as f:
            pickle.dump({'ema': persistent(name, dict(_init_kwargs={}, _modules={}))}, f)
        with pytest.raises(EDMPickleError, match=match) as err:
            load_edm_pickle(path)
        if name == 'UNetBlock':   # layers are not listed among the networks a pickle can hold
            assert 'UNetBlock' not in str(err.value).split('supported: ')[-1]


def test_dotted_class_names_load_too(tmp_path):
    """Bare names are what EDM writes; the dotted 'training.networks.X' is accepted as well."""
    net, kwargs = make(VPPrecond, **CASES['vp'][1])
    path = write_edm_pickle(tmp_path / 'net.pkl', net, kwargs, prefix='training.networks.')
    assert read_edm_pickle(path)['ema'].class_name == 'training.networks.VPPrecond'
    with torch.no_grad():
        assert torch.equal(outputs(load_edm_pickle(path)), outputs(net))


class Doubler(nn.Module):
    """A network class of another module, registered for the test below."""

    def __init__(self, channels=2):
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.full((channels,), 2.0))

    def forward(self, x):
        return x * self.scale


def test_register_pickle_class_is_one_line_for_another_module(tmp_path):
    net = Doubler(3)
    with torch.no_grad():
        net.scale.copy_(torch.tensor([1.0, 2.0, 3.0]))
    with edm_globals(), open(tmp_path / 'd.pkl', 'wb') as f:
        pickle.dump({'ema': as_edm(net, dict(channels=3))}, f)
    with pytest.raises(EDMPickleError, match="unsupported network class 'Doubler'"):
        load_edm_pickle(tmp_path / 'd.pkl')
    register_pickle_class('Doubler', Doubler, module='training.networks_other', network=True)
    try:
        loaded = load_edm_pickle(tmp_path / 'd.pkl')
        assert type(loaded) is Doubler and torch.equal(loaded.scale, net.scale)
        with edm_globals(), open(tmp_path / 'e.pkl', 'wb') as f:
            pickle.dump({'ema': as_edm(net, dict(channels=3), prefix='training.networks_other.')}, f)
        assert torch.equal(load_edm_pickle(tmp_path / 'e.pkl').scale, net.scale)
        with pytest.raises(ValueError, match='already registered'):
            register_pickle_class('Doubler', nn.Linear, module='training.networks_other')
    finally:
        PICKLE_CLASSES.pop('Doubler')


def test_unknown_inner_class_and_mismatched_tensors_are_clear_errors(tmp_path):
    net, kwargs = make(EDMPrecond, **CASES['vp'][1])
    # an inner module of a class gdistill does not know
    evil = as_edm(net, kwargs)
    evil.meta['state']['_modules']['model'].meta['class_name'] = 'Strange'
    with edm_globals(), open(tmp_path / 'a.pkl', 'wb') as f:
        pickle.dump({'ema': evil}, f)
    with pytest.raises(EDMPickleError, match=r"at model: unsupported class "
                                             r"'Strange'.*UNetBlock"):
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
    # the config names no absolute path: the folder can move
    text = (out / 'teacher.py').read_text()
    assert str(tmp_path) not in text and "checkpoint='{{ fileDirname }}/state_dict.pt'" in text
    moved = tmp_path / 'elsewhere' / 'teacher-copy'
    os.makedirs(moved.parent)
    os.rename(out, moved)
    teacher = TEACHERS.build(Config.fromfile(str(moved / 'teacher.py')).edm_teacher)
    x, aug = torch.randn(2, 3, 16, 16), torch.randn(2, 9)
    with torch.no_grad():
        sigma = torch.tensor([0.2, 9.0])
        torch.testing.assert_close(teacher.edm_denoise(x, sigma),
                                   net(x, sigma, augment_labels=torch.zeros(2, 9)), rtol=0, atol=0)
        # augment_labels are passed through to the network when given
        with_aug = teacher.edm_denoise(x, sigma, augment_labels=aug)
        torch.testing.assert_close(with_aug, net(x, sigma, augment_labels=aug), rtol=0, atol=0)
        assert not torch.allclose(with_aug, teacher.edm_denoise(x, sigma))


def test_converted_teacher_config_is_a_base_of_a_method_config(tmp_path):
    """The README's recipe: a method config with the converted teacher as a second base."""
    out = tmp_path / 'converted'
    _convert_tool().main([osp.join(FIXTURES, 've_ncsnpp_uncond.pkl'), str(out)])
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    run = tmp_path / 'run' / 'my_run.py'
    os.makedirs(run.parent)
    run.write_text(f"_base_ = [{osp.join(root, 'projects', 'cosim', 'cifar10.py')!r}, "
                   "'../converted/teacher.py']\n"
                   "model = dict(teacher=dict(_delete_=True, **_base_.edm_teacher))\n")
    cfg = Config.fromfile(str(run))
    assert cfg.model.teacher.checkpoint == str(out / 'state_dict.pt')
    assert cfg.model.teacher.network.type == 'VEPrecond' and 'path' not in cfg.model.teacher
    assert cfg.model.type == 'SemiImplicitDistiller'


# --- the genuine pickles written by the official code -----------------------------------------
def rel_err(got, ref):
    """max |got − ref| relative to the output scale max |ref|."""
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float((got.double() - ref).abs().max() / ref.abs().max())


def fixture(name):
    ref = dict(np.load(osp.join(FIXTURES, f'{name}.npz')))
    ref = {k: torch.from_numpy(v) for k, v in ref.items()}
    return osp.join(FIXTURES, f'{name}.pkl'), ref


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_genuine_pickles_are_read_as_written(name):
    path, _ = fixture(name)
    data = read_edm_pickle(path)
    record = data['ema']
    assert record.class_name == FIXTURE_CLASSES[name].__name__   # the bare name ...
    assert record.version == 6                                    # ... of persistence version 6
    assert 'class ' in record.module_src                          # source kept as text only
    if name != 'iddpm_adm_cond':                                  # full training snapshots
        assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
        assert isinstance(data['loss_fn'], PersistentRecord) and data['augment_pipe'] is None
        assert data['dataset_kwargs']['resolution'] == 8
    net = load_edm_pickle(path)
    assert type(net) is FIXTURE_CLASSES[name] and not net.training
    for mod in ('torch_utils', 'dnnlib', 'training'):
        assert mod not in sys.modules


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_genuine_pickles_match_the_official_outputs(name):
    """D(x, σ, labels) and EDM's 18-step Heun sampler, as the official code computed them, to
    1e-5 of the output scale, through load_edm_pickle and EDMTeacher(path=...)."""
    path, ref = fixture(name)
    labels = ref.get('labels')
    net = load_edm_pickle(path)
    teacher = EDMTeacher(path=path)
    with torch.no_grad():
        assert rel_err(net(ref['x'], ref['sigma'], labels), ref['D']) < 1e-5
        assert rel_err(teacher.edm_denoise(ref['x'], ref['sigma'], labels), ref['D']) < 1e-5
        heun = EDMHeunSampler(num_steps=18)(teacher, ref['latents'], labels)
    assert rel_err(heun, ref['heun18']) < 1e-5


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_genuine_pickles_through_convert_edm_and_its_config(name, tmp_path):
    path, ref = fixture(name)
    labels = ref.get('labels')
    _convert_tool().main([path, str(tmp_path / name)])
    teacher = TEACHERS.build(Config.fromfile(str(tmp_path / name / 'teacher.py')).edm_teacher)
    assert type(teacher.network) is FIXTURE_CLASSES[name]
    with torch.no_grad():
        assert rel_err(teacher.edm_denoise(ref['x'], ref['sigma'], labels), ref['D']) < 1e-5
        heun = EDMHeunSampler(num_steps=18)(teacher, ref['latents'], labels)
    assert rel_err(heun, ref['heun18']) < 1e-5
