"""Safe by construction: a file whose unpickling would run code runs nothing at any entry point
(resume, --resume FILE, load_from, sample, eval, ablate, convert, upgrade, teachers, detectors),
checkpoints are plain data with a digest, resume reads only files inside the work dir, config
values that cannot run are refused by key, every user error is one line with exit status 2, and
a stopped peer ends a distributed run with its rank named. (Bit flips inside a tensor during a
resume, and the bitwise-exact resumes: tests/test_reliability.py.)"""
import datetime
import os
import os.path as osp
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MMLogger

import gdistill.engine  # noqa: F401
from gdistill.engine import checkpoint as checkpoint_module
from gdistill.engine import cli
from gdistill.engine.checkpoint import (CorruptCheckpointError, UnreadableCheckpointError, UnsafeCheckpointError,
                                        digest, from_plain, read_checkpoint, seal, to_plain, write_checkpoint)
from gdistill.engine.config_check import ConfigValueError, check_config
from gdistill.engine.peers import PeerFailureError, is_peer_failure, peer_failure
from gdistill.engine.runner import checkpoint_candidates, dist_timeout, setup_cpu_distributed

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
TINY = osp.join(ROOT, 'tests', 'configs', 'toy_tiny.py')
TOY2D = osp.join(ROOT, 'projects', 'cosim', 'toy2d.py')   # has the ToyEvaluationHook that ablate needs
sys.path.insert(0, TOOLS)
import ablate  # noqa: E402
import convert_edm  # noqa: E402
import eval as eval_tool  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import upgrade_checkpoint  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS='1')


class Payload:
    """Unpickled unsafely, this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def plant(path, marker, form='zip'):
    """A checkpoint-shaped file whose pickle runs ``touch marker`` when unpickled unsafely."""
    obj = dict(meta=dict(epoch=0, iter=99), state_dict={'generator.inp.weight': torch.zeros(2)},
               message_hub=Payload(marker))
    if form == 'zip':
        torch.save(obj, path)
    elif form == 'legacy':
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as EDM's network pickles are
        with open(path, 'wb') as f:
            pickle.dump(obj, f)
    return path


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('teacher_cache')


def opts(cache, *more):
    return ['--cfg-options', f'model.teacher.fit.cache_dir={cache}', 'train_cfg.max_iters=4',
            'default_hooks.checkpoint.interval=2', *more]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, cache):
    """A 4-iteration run through the train tool, checkpoints at 2 and 4; its stdout."""
    work = tmp_path_factory.mktemp('run')
    out = subprocess.run([sys.executable, osp.join(TOOLS, 'train.py'), TINY, '--work-dir', str(work),
                          *opts(cache)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, out.stdout + out.stderr


def call(main, argv, capsys):
    """Run a tool's ``main`` through the shared entry (``cli.run``): (exit status, stderr lines)."""
    capsys.readouterr()
    # loggers of earlier in-process runs hold handlers on streams pytest has closed since
    MMLogger._instance_dict.clear()
    try:
        cli.run(main, argv, prog='tool')
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code, err, path, marker):
    assert not osp.exists(marker), 'code from the file ran'
    assert code == 2
    assert len(err) == 1, err
    assert str(path) in err[0] and 'refused' in err[0], err[0]


# --- the planted file ---------------------------------------------------------------------------
def test_the_planted_file_does_run_code_when_unpickled_unsafely(tmp_path):
    """The payload works: an unsafe load runs it (so the refusals below are not vacuous)."""
    for form in ('zip', 'legacy'):
        marker = tmp_path / f'ran_{form}'
        torch.load(plant(tmp_path / f'{form}.pth', marker, form), weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize('form', ['zip', 'legacy'])
def test_resume_from_a_given_planted_file_runs_nothing_and_names_it(tmp_path, cache, capsys, form):
    marker, evil = tmp_path / 'ran', tmp_path / 'evil.pth'
    plant(evil, marker, form)
    code, err = call(train.main, [TINY, '--work-dir', str(tmp_path / 'w'), '--resume', str(evil), *opts(cache)], capsys)
    assert_refused(code, err, evil, marker)
    assert err[0].startswith(f'tool: error: UnsafeCheckpointError: {evil}: refused: the file holds the global ')


def test_planted_newest_checkpoint_in_the_work_dir_runs_nothing(tmp_path, run_dir, cache, capsys):
    work, _ = run_dir
    mine = tmp_path / 'w'
    shutil.copytree(work, mine)
    marker, evil = tmp_path / 'ran', mine / 'iter_9.pth'
    plant(evil, marker)
    code, err = call(train.main, [TINY, '--work-dir', str(mine), '--resume', *opts(cache)], capsys)
    assert_refused(code, err, evil, marker)


def test_last_checkpoint_naming_a_file_outside_the_work_dir_is_not_read(tmp_path, run_dir, cache, capsys):
    work, _ = run_dir
    mine = tmp_path / 'w'
    mine.mkdir()
    shutil.copy(work / 'iter_2.pth', mine / 'iter_2.pth')
    (tmp_path / 'outside').mkdir()
    marker = tmp_path / 'ran'
    evil = plant(tmp_path / 'outside' / 'iter_9.pth', marker)
    (mine / 'last_checkpoint').write_text(str(evil))              # absolute, outside: osp.join keeps it
    assert osp.join(str(mine), str(evil)) == str(evil)             # the pitfall
    assert checkpoint_candidates(str(mine)) == [str(mine / 'iter_2.pth')]
    (mine / 'last_checkpoint').write_text('../outside/iter_9.pth')  # relative, leading out
    assert checkpoint_candidates(str(mine)) == [str(mine / 'iter_2.pth')]
    os.symlink(evil, mine / 'iter_8.pth')                          # a link leading out
    assert checkpoint_candidates(str(mine)) == [str(mine / 'iter_2.pth')]
    code, err = call(train.main, [TINY, '--work-dir', str(mine), '--resume', *opts(cache)], capsys)
    assert code == 0 and err == [] and not marker.exists()
    assert read_checkpoint(mine / 'iter_4.pth')['meta']['iter'] == 4   # resumed at 2, trained to 4


def test_load_from_a_planted_file_runs_nothing(tmp_path, cache, capsys):
    marker, evil = tmp_path / 'ran', tmp_path / 'evil.pth'
    plant(evil, marker)
    code, err = call(train.main, [TINY, '--work-dir', str(tmp_path / 'w'), *opts(cache, f'load_from={evil}')],
                     capsys)
    assert_refused(code, err, evil, marker)


def test_sample_eval_and_ablate_refuse_a_planted_checkpoint(tmp_path, cache, capsys):
    marker, evil = tmp_path / 'ran', tmp_path / 'evil.pth'
    plant(evil, marker)
    options = ['--cfg-options', f'model.teacher.fit.cache_dir={cache}']
    for main, argv in ((sample.main, [TINY, str(evil), '--num', '8', '--out', str(tmp_path / 's'), *options]),
                       (eval_tool.main, ['gen', TINY, str(evil), '--num-samples', '8', *options]),
                       (ablate.main, ['--evaluate', TOY2D, str(evil), '--work-dir', str(tmp_path / 'a'),
                                      '--cfg-options', f'model.teacher.fit.cache_dir={cache}'])):
        code, err = call(main, argv, capsys)
        assert_refused(code, err, evil, marker)


def test_convert_and_upgrade_tools_refuse_planted_files(tmp_path, capsys):
    marker = tmp_path / 'ran'
    for form in ('zip', 'legacy', 'pickle'):
        evil = plant(tmp_path / f'evil_{form}.pkl', marker, form)
        code, err = call(convert_edm.main, [str(evil), str(tmp_path / 'out')], capsys)
        assert not marker.exists() and code == 2 and len(err) == 1, err
        if form != 'legacy':   # torch's old format starts with a plain int, which is read and then refused
            assert f': {evil}: ' in err[0], err
            assert ('not an EDM network pickle' if form == 'zip' else 'refusing to load global ') in err[0]
        code, err = call(upgrade_checkpoint.main, [str(evil)], capsys)
        assert not marker.exists() and code == 2 and len(err) == 1 and f': {evil}: ' in err[0], err
        assert dict(zip='refused global posix.system', legacy='not a torch zip file',
                    pickle='not a readable checkpoint')[form] in err[0]
        # the upgrade's unpickler itself, also where torch calls pickle_module.load (non-zip files)
        with pytest.raises(pickle.UnpicklingError, match='refused global'):
            torch.load(evil, map_location='cpu', weights_only=False, pickle_module=checkpoint_module._legacy_pickle)
        assert not marker.exists()


def test_teachers_and_detectors_refuse_planted_checkpoints(tmp_path):
    from gdistill.metrics.detectors import NetworkDetector
    from gdistill.registry import TEACHERS
    from gdistill.teachers.edm_pickle import UnsafePickleError
    marker = tmp_path / 'ran'
    evil = plant(tmp_path / 'evil.pth', marker)
    net = dict(type='EDMPrecond', img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet',
               model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f'{evil}: refused')):
        TEACHERS.build(dict(type='EDMTeacher', network=net, checkpoint=str(evil)))
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f'{evil}: refused')):
        TEACHERS.build(dict(type='NetworkTeacher', network=dict(type='MLPDenoiser', dim=2), checkpoint=str(evil)))
    with pytest.raises(UnsafePickleError):
        TEACHERS.build(dict(type='EDMTeacher', path=str(plant(tmp_path / 'evil.pkl', marker, 'pickle'))))
    with pytest.raises(pickle.UnpicklingError):
        NetworkDetector(network=dict(type='MLPDenoiser', dim=2), checkpoint=str(evil))
    assert not marker.exists()


# --- the format -------------------------------------------------------------------------------------
def test_checkpoints_are_plain_data_with_a_digest(run_dir):
    work, _ = run_dir
    raw = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)   # torch's safe default reads it
    assert raw['integrity']['algorithm'] == 'sha256' and raw['integrity']['digest'] == digest(raw)
    ckpt = read_checkpoint(work / 'iter_4.pth')
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss_aux'], HistoryBuffer)
    assert ckpt['message_hub']['log_scalars']['train/loss_aux']._log_history.shape == (4,)
    state = ckpt['resume_state']['random'][0]['numpy']
    assert state[0] == 'MT19937' and state[1].dtype == np.uint32 and state[1].shape == (624,)
    np.random.set_state(state)                      # numpy accepts the rebuilt state


def test_plain_round_trip_and_digest_sensitivity():
    buf = HistoryBuffer([0.5, 0.25], [1, 2])
    obj = dict(a=torch.arange(6.).reshape(2, 3), hub=buf, rng=np.random.get_state(), n=np.float64(0.5),
               i=np.int64(3), s={1, 2}, t=(1, 'x', None), nested=dict(b=[np.arange(3, dtype=np.int16)]))
    back = from_plain(to_plain(obj))
    assert torch.equal(back['a'], obj['a']) and back['s'] == {1, 2} and back['t'] == (1, 'x', None)
    assert type(back['n']) is float and back['n'] == 0.5 and type(back['i']) is int
    assert np.array_equal(back['hub']._log_history, buf._log_history) and back['hub'].mean() == buf.mean()
    assert back['rng'][0] == obj['rng'][0] and np.array_equal(back['rng'][1], obj['rng'][1])
    assert back['nested']['b'][0].dtype == np.int16
    with pytest.raises(TypeError, match=r'checkpoint\.f: a builtins\.builtin_function_or_method cannot be stored'):
        to_plain(dict(f=print), 'checkpoint')
    sealed = seal(dict(state_dict={'w': torch.ones(4)}, meta=dict(iter=3)))
    d = sealed['integrity']['digest']
    w = torch.ones(4)
    w[1] = torch.nextafter(w[1], torch.tensor(2.0))
    assert digest(dict(sealed, state_dict={'w': w})) != d       # one ulp in one tensor element
    assert digest(dict(sealed, meta=dict(iter=4))) != d         # a plain value
    assert digest(dict(sealed, state_dict={'w': torch.ones(4, dtype=torch.float64)})) != d   # the dtype
    assert digest(dict(sealed)) == d


def test_unreadable_and_corrupt_files_are_told_apart(tmp_path):
    write_checkpoint(dict(state_dict={'w': torch.arange(64.)}, meta=dict(iter=1)), tmp_path / 'c.pth')
    data = (tmp_path / 'c.pth').read_bytes()
    (tmp_path / 'half.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(UnreadableCheckpointError, match=re.escape(f'{tmp_path / "half.pth"}: not a readable')):
        read_checkpoint(tmp_path / 'half.pth')
    raw = torch.arange(64.).numpy().tobytes()
    at = data.find(raw) + 100
    (tmp_path / 'flip.pth').write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at:at + 16]) + data[at + 16:])
    with pytest.raises(CorruptCheckpointError, match=re.escape(f'{tmp_path / "flip.pth"}: integrity check failed')):
        read_checkpoint(tmp_path / 'flip.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        read_checkpoint(tmp_path / 'nope.pth')
    # a damaged pickle (the opcode after PROTO overwritten): unreadable, so resume may fall back
    with zipfile.ZipFile(tmp_path / 'c.pth') as z:
        info = next(i for i in z.infolist() if i.filename.endswith('data.pkl'))
    at = info.header_offset   # the local header: its own name and extra-field lengths
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], 'little') + int.from_bytes(data[at + 28:at + 30], 'little')
    assert data[start] == 0x80   # PROTO
    (tmp_path / 'pkl.pth').write_bytes(data[:start + 2] + b'\xff' + data[start + 3:])
    with pytest.raises(UnreadableCheckpointError, match=r'pkl\.pth: not a readable checkpoint') as info:
        read_checkpoint(tmp_path / 'pkl.pth')
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_earlier_checkpoints_are_refused_with_the_command_and_upgraded_without_running_code(tmp_path, capsys):
    buf = HistoryBuffer([0.5, 0.25], [1, 1])
    old = dict(meta=dict(iter=2), state_dict={'w': torch.arange(3.)}, message_hub=dict(log_scalars={'loss': buf}),
               resume_state=dict(random=[dict(numpy=np.random.get_state(), torch=torch.get_rng_state())]))
    path = tmp_path / 'iter_2.pth'
    torch.save(old, path)   # the earlier format: pickled HistoryBuffer (with getattr) and numpy arrays
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f'python tools/upgrade_checkpoint.py {path}')):
        read_checkpoint(path)
    code, err = call(upgrade_checkpoint.main, [str(path)], capsys)
    assert code == 0 and err == []
    new = read_checkpoint(path)
    assert torch.equal(new['state_dict']['w'], old['state_dict']['w'])
    assert np.array_equal(new['message_hub']['log_scalars']['loss']._log_history, buf._log_history)
    assert np.array_equal(new['resume_state']['random'][0]['numpy'][1], old['resume_state']['random'][0]['numpy'][1])
    assert torch.equal(new['resume_state']['random'][0]['torch'], old['resume_state']['random'][0]['torch'])
    assert (tmp_path / 'iter_2.pth.legacy').exists()


# --- config values and one-line errors ----------------------------------------------------------------
@pytest.mark.parametrize('option, message', [
    ('train_cfg.max_iters=0', 'train_cfg.max_iters = 0: must be an integer >= 1'),
    ('train_cfg.max_iters=-5', 'train_cfg.max_iters = -5: must be an integer >= 1'),
    ('train_dataloader.batch_size=0', 'train_dataloader.batch_size = 0: must be an integer >= 1'),
    ('optim_wrapper.aux.optimizer.lr=abc', "optim_wrapper.aux.optimizer.lr = 'abc': the learning rate must be a "
                                           'positive finite number'),
    ('optim_wrapper.generator.optimizer.lr=-0.001', 'optim_wrapper.generator.optimizer.lr = -0.001: the learning'),
    ('optim_wrapper.aux.optimizer.lr=0', 'optim_wrapper.aux.optimizer.lr = 0: the learning rate'),
    ('optim_wrapper.aux.accumulative_counts=0', 'optim_wrapper.aux.accumulative_counts = 0: must be an integer'),
    ('default_hooks.checkpoint.interval=0', 'default_hooks.checkpoint.interval = 0: must be an integer >= 1'),
    ('dist_timeout=0', 'dist_timeout = 0: must be a positive number of seconds'),
])
def test_bad_values_end_the_train_tool_in_one_line_naming_key_and_value(option, message, tmp_path, cache, capsys):
    code, err = call(train.main, [TINY, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                                  f'model.teacher.fit.cache_dir={cache}', option], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f'tool: error: ConfigValueError: {message}'), err[0]
    assert not (tmp_path / 'w').exists()   # before anything was built


def test_check_config_includes_the_value_check():
    cfg = Config.fromfile(TINY)
    check_config(cfg)
    cfg.train_cfg.max_iters = 0
    with pytest.raises(ConfigValueError):
        check_config(cfg)


@pytest.mark.parametrize('argv, named', [
    (['model.divergance.coef=0.5'], "model.divergance: SemiImplicitDistiller takes no 'divergance'"),
    (['model.divergence.type=NoSuchDivergence'], 'NoSuchDivergence'),
    (['model.teacher.checkpoint=/nonexistent/teacher.pth'], "checkpoint '/nonexistent/teacher.pth' does not exist"),
])
def test_user_errors_are_one_line(argv, named, tmp_path, cache, capsys):
    code, err = call(train.main, [TINY, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                                  f'model.teacher.fit.cache_dir={cache}', 'train_cfg.max_iters=2', *argv], capsys)
    assert len(err) == 1 and err[0].startswith('tool: error: '), err
    assert code == 2, err
    assert named in err[0]


def test_missing_files_are_one_line_naming_them(tmp_path, cache, capsys):
    code, err = call(train.main, [str(tmp_path / 'no_config.py')], capsys)
    assert code == 2 and err == [f"tool: error: FileNotFoundError: config file '{tmp_path / 'no_config.py'}' "
                                 'does not exist']
    code, err = call(train.main, [TINY, '--work-dir', str(tmp_path / 'w'), '--resume', str(tmp_path / 'gone.pth'),
                                  *opts(cache)], capsys)
    assert code == 2 and len(err) == 1 and str(tmp_path / 'gone.pth') in err[0]


def test_resume_of_a_given_corrupt_file_names_that_file(tmp_path, run_dir, cache, capsys):
    work, _ = run_dir
    mine = tmp_path / 'w'
    shutil.copytree(work, mine)
    bad = mine / 'iter_4.pth'
    data = bytearray(bad.read_bytes())
    key = 'generator.blocks.0.weight'
    raw = read_checkpoint(bad)['state_dict'][key].numpy().tobytes()
    at = data.find(raw) + 8
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    bad.write_bytes(bytes(data))
    code, err = call(train.main, [TINY, '--work-dir', str(mine), '--resume', str(bad), *opts(cache)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f'tool: error: CorruptCheckpointError: {bad}: integrity check failed'), err[0]
    assert 'no readable checkpoint' not in err[0]


def test_the_train_process_prints_one_line_and_no_environment_dump(tmp_path, cache, run_dir):
    _, log = run_dir
    assert 'System environment' not in log and 'Config:' not in log and 'Hooks will be executed' not in log
    cmd = [sys.executable, osp.join(TOOLS, 'train.py'), TINY, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
           f'model.teacher.fit.cache_dir={cache}', 'train_dataloader.batch_size=0']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2 and out.stdout == ''
    assert out.stderr.splitlines() == ['train.py: error: ConfigValueError: train_dataloader.batch_size = 0: must be '
                                       'an integer >= 1']
    debug = subprocess.run(cmd + ['--debug'], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert debug.returncode == 1 and 'Traceback (most recent call last)' in debug.stderr
    assert debug.stderr.rstrip().endswith('ConfigValueError: train_dataloader.batch_size = 0: must be an integer >= 1')


def test_environment_dump_goes_to_the_log_file(run_dir):
    work, log = run_dir
    logs = [osp.join(d, f) for d, _, fs in os.walk(work) for f in fs if f.endswith('.log')]
    text = ''.join(open(f).read() for f in logs)
    assert 'System environment' in text and 'Config:' in text and 'Hooks will be executed' in text
    assert 'System environment' not in log


# --- a hung peer --------------------------------------------------------------------------------------
def test_process_group_timeout_defaults_and_config():
    cfg = Config(dict())
    assert dist_timeout(cfg, cuda=False) == 300 and dist_timeout(cfg, cuda=True) is None
    assert dist_timeout(Config(dict(dist_timeout=7)), cuda=False) == 7.0
    assert is_peer_failure(RuntimeError('[gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv'))
    assert is_peer_failure(RuntimeError('Connection closed by peer [127.0.0.1]:1234'))
    assert not is_peer_failure(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert not is_peer_failure(PeerFailureError('rank 0: rank 1 stopped answering'))
    if not torch.cuda.is_available():
        setup_cpu_distributed(Config(dict(dist_timeout=9)), 'none')   # one process: nothing to set up


class FakeHeartbeat:
    period = 1.0

    def __init__(self, ages):
        self._ages = ages

    def ages(self):
        return self._ages


def test_the_failure_message_names_the_silent_rank():
    timeout = RuntimeError('[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation')
    msg = str(peer_failure(timeout, FakeHeartbeat({0: 0.2, 1: 0.5, 2: 41.0}), 4, rank=0, world=3))
    assert msg.startswith('rank 0: rank 2 stopped answering (rank 2 last seen 41 s ago); a collective waited '
                          'dist_timeout=4 s and failed'), msg
    msg = str(peer_failure(timeout, FakeHeartbeat(None), 4, rank=1, world=3))
    assert msg.startswith('rank 1: one of ranks [0, 2] stopped answering (the store did not answer'), msg
    closed = RuntimeError('[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711')
    msg = str(peer_failure(closed, FakeHeartbeat({0: 0.2, 1: 0.4}), 300, rank=0, world=2))
    assert msg.startswith('rank 0: rank 1 closed its connection (the process died or was killed; every heartbeat '
                          'is recent)'), msg


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stopped_peer_ends_the_run_naming_its_rank(tmp_path, cache):
    """Two processes (gloo); rank 1 is stopped (SIGSTOP) mid-run. With dist_timeout=4 the
    collective of rank 0 fails after 4 s and the run ends, naming rank 1, instead of waiting for
    torch's 30-minute default."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, osp.join(TOOLS, 'train.py'), TINY, '--launcher', 'pytorch', '--work-dir',
             str(tmp_path / 'w'), '--cfg-options', f'model.teacher.fit.cache_dir={cache}', 'train_cfg.max_iters=100000',
             'dist_timeout=4', 'default_hooks.checkpoint.interval=100000', 'train_dataloader.batch_size=32'],
            cwd=ROOT, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=env))
    try:
        for line in procs[0].stdout:   # wait until both train
            if re.search(r'Iter\(train\) \[\s*5/', line):
                break
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        procs[0].stdout.read()
        err = procs[0].stderr.read()
        procs[0].wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 1, err[-2000:]
    lines = err.strip().splitlines()
    assert 'Traceback' not in err   # (mmengine's UserWarning about OMP_NUM_THREADS precedes the one error line)
    assert lines[-1].startswith('train.py: error: PeerFailureError: rank 0: rank 1 stopped answering (rank 1 last '
                                'seen'), lines[-1]
    assert 'dist_timeout=4 s' in lines[-1]
    assert 4 <= took < 60, took
    print(f'rank 0 ended {took:.1f} s after rank 1 was stopped: {lines[-1]}')


def test_timeout_reaches_mmengine_on_gpus(monkeypatch):
    cfg = Config(dict(dist_timeout=42))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    setup_cpu_distributed(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.timeout == 42.0
    plain = Config(dict())
    setup_cpu_distributed(plain, 'pytorch')
    assert 'env_cfg' not in plain   # NCCL's own default
    assert datetime.timedelta(seconds=dist_timeout(cfg)) == datetime.timedelta(seconds=42)


def test_eval_tool_process_group_has_the_timeout(monkeypatch):
    sys.path.insert(0, TOOLS)
    import eval as eval_tool
    seen = []
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kw: seen.append(kw))
    monkeypatch.setattr(torch.distributed, 'get_rank', lambda: 0)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert eval_tool.init_distributed('pytorch', 7) == (0, 2)
    assert eval_tool.init_distributed('pytorch') == (0, 2)
    assert seen == [dict(backend='gloo', timeout=datetime.timedelta(seconds=7)),
                    dict(backend='gloo', timeout=datetime.timedelta(seconds=300))]
    assert eval_tool.init_distributed('none', 7) == (0, 1) and len(seen) == 2
