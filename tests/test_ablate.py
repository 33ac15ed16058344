"""tools/ablate.py: grid expansion and option text, and the real tool on a tiny toy grid — every
variant trained in its own process, a failing variant reported in the table, finished variants
skipped on a second run, an interrupted one redone, and a checkpoint evaluated under a sampler
grid."""
import csv
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import ablate  # noqa: E402

TINY = osp.join(ROOT, 'tests', 'configs', 'toy_tiny.py')


def write_grid(path, **settings):
    path.write_text(''.join(f'{k} = {v!r}\n' for k, v in settings.items()))
    return str(path)


def test_variants_cover_the_product_with_unique_names_and_exact_options(tmp_path):
    grid = ablate.load_grid(write_grid(
        tmp_path / 'g.py', base=TINY, axes={'model.divergence.coef': [0.5, 1.0], 'train_cfg.max_iters': [3, 5, 8],
                                            'model.sampler.sigmas': [[2.5], [80.0, 1.0]]},
        seeds=[0, 7], cfg_options={'model.sampler.scale': 1.7, 'model.teacher.fit.iters': 5}))
    vs = ablate.variants(grid)
    assert len(vs) == 2 * 3 * 2 * 2
    assert len({v['name'] for v in vs}) == len(vs)
    from mmengine.config import DictAction
    seen = set()
    for v in vs:
        parsed = {k: DictAction._parse_iterable(t) for k, t in v['options'].items()}
        # every option reads back as the value the grid gave (ints stay ints, lists stay lists)
        for key, value in v['values'].items():
            assert ablate._same(parsed[key], value), (key, parsed[key], value)
        assert parsed['randomness.seed'] == v['seed'] and parsed['model.sampler.scale'] == 1.7
        seen.add((parsed['model.divergence.coef'], parsed['train_cfg.max_iters'],
                  tuple(parsed['model.sampler.sigmas']), parsed['randomness.seed']))
    assert len(seen) == len(vs)  # the whole product, each point once
    assert vs[0]['name'] == 'coef0.5_max_iters3_sigmas2.5_seed0'
    cmd = ablate.command(grid, vs[0], threads=3)
    assert cmd[1].endswith('train.py') and '--resume' in cmd and 'torch_threads=3' in cmd
    assert cmd[cmd.index('--work-dir') + 1] == osp.join(grid['work_dir'], vs[0]['name'])


def test_labels_tell_clashing_axes_apart():
    labels = ablate._labels(['model.generator.lr', 'model.aux.lr', 'train_cfg.max_iters'])
    assert labels == {'model.generator.lr': 'generator.lr', 'model.aux.lr': 'aux.lr',
                      'train_cfg.max_iters': 'max_iters'}


@pytest.mark.parametrize('value, words', [(dict(a=1), 'dict'), ('3', 'read back'), ('a,b', 'read back')])
def test_values_the_command_line_cannot_carry_are_refused(value, words):
    with pytest.raises(ablate.GridError, match=words):
        ablate.option_text('model.x', value)


def test_bad_grid_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ablate.GridError, match='unknown grid keys'):
        ablate.load_grid(write_grid(tmp_path / 'a.py', base=TINY, axes={'x': [1]}, seed=[0]))
    with pytest.raises(ablate.GridError, match='needs `axes`'):
        ablate.load_grid(write_grid(tmp_path / 'b.py', base=TINY))
    with pytest.raises(ablate.GridError, match='repeats a value'):
        ablate.load_grid(write_grid(tmp_path / 'c.py', base=TINY, axes={'x': [1, 1]}))
    with pytest.raises(FileNotFoundError, match='base config'):
        ablate.load_grid(write_grid(tmp_path / 'd.py', base='configs/none.py', axes={'x': [1]}))
    with pytest.raises(ablate.GridError, match='plot_x'):
        ablate.load_grid(write_grid(tmp_path / 'e.py', base=TINY, axes={'x': [1]}, plot_x='y'))


def test_command_line_work_dir_and_options_reach_every_variant(tmp_path):
    grid = ablate.load_grid(write_grid(tmp_path / 'g.py', base=TINY, axes={'model.divergence.coef': [0.5, 1.0]},
                                       cfg_options={'train_cfg.max_iters': 5, 'model.sampler.scale': 1.7}))
    options = ablate.parse_options(['train_cfg.max_iters=9', 'model.teacher.fit.target.mixture.num_modes=4'])
    moved = ablate.with_overrides(grid, str(tmp_path / 'elsewhere'), options)
    assert grid['cfg_options'] == {'train_cfg.max_iters': 5, 'model.sampler.scale': 1.7}  # not mutated
    for v in ablate.variants(moved):
        # the command line wins over the grid file's option; the grid's other options stay
        assert v['options']['train_cfg.max_iters'] == '9' and v['options']['model.sampler.scale'] == '1.7'
        assert v['options']['model.teacher.fit.target.mixture.num_modes'] == '4'
        cmd = ablate.command(moved, v, threads=1)
        assert cmd[cmd.index('--work-dir') + 1] == osp.join(str(tmp_path / 'elsewhere'), v['name'])
        assert 'model.teacher.fit.target.mixture.num_modes=4' in cmd
    with pytest.raises(ablate.GridError, match='axes of'):
        ablate.with_overrides(grid, None, {'model.divergence.coef': 0.75})
    with pytest.raises(ablate.GridError, match='KEY=VALUE'):
        ablate.parse_options(['train_cfg.max_iters'])


def run_tool(args):
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'ablate.py')] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    # the tiny toy run with an evaluation at the end (so that it writes metrics.json)
    config = tmp_path / 'tiny_eval.py'
    config.write_text(
        f'_base_ = [{TINY!r}]\n'
        "custom_hooks = [dict(type='RandomStateHook'), dict(type='ToyEvaluationHook', num_samples=300, "
        "evaluations=[dict(name='student', source='student', sampler=dict(type='MultistepSampler', num_steps=1))])]\n")
    work = tmp_path / 'grid'
    # coef = α(1+λ) = 0 is refused by GFIDivergence when the model is built: that variant fails
    grid = write_grid(tmp_path / 'tiny.py', base=str(config), work_dir=str(work),
                      axes={'model.divergence.coef': [1.0, 0.75, 0.0]},
                      cfg_options={'model.teacher.fit.cache_dir': str(tmp_path / 'cache'), 'train_cfg.max_iters': 4})

    dry = run_tool([grid, '--dry-run'])
    assert dry.count('train.py') == 3 and 'model.divergence.coef=0.75' in dry and not work.exists()

    out = run_tool([grid, '--jobs', '2'])
    ok, bad = ['coef1.0', 'coef0.75'], 'coef0.0'
    for name in ok:
        # the options reached the run: it stopped at max_iters (checkpoints every 3 and at the end)
        assert sorted(f for f in os.listdir(work / name) if f.startswith('iter_')) == ['iter_3.pth', 'iter_4.pth']
    with open(work / 'results.csv') as f:
        records = list(csv.DictReader(f))
    for name in ok:
        with open(work / name / 'metrics.json') as f:
            rows = json.load(f)
        mine = [r for r in records if r['variant'] == name]
        assert [r['name'] for r in mine] == [r['name'] for r in rows] == ['student', 'exact floor']
        assert all(r['status'] == 'done' for r in mine)
        for r, m in zip(mine, rows):
            for key in ('sw2', 'mmd', 'near_mode', 'mode_tv', 'nll'):
                assert float(r[key]) == pytest.approx(m[key], rel=1e-9)
    student = {r['variant']: float(r['mmd']) for r in records if r['name'] == 'student'}
    assert student['coef1.0'] != student['coef0.75']   # same seed, other coef: another student
    (r,) = [r for r in records if r['variant'] == bad]
    assert r['status'] == 'failed' and 'coef = α(1+λ) must be > 0' in r['error']
    assert not (work / bad / 'metrics.json').exists()
    table = (work / 'results.md').read_text()
    assert table.count('**failed**') == 1 and 'must be > 0' in table and table.count('| student |') == 2
    assert (work / 'results.png').stat().st_size > 5000
    assert '2 variant(s) done, 1 failed' in out

    # a second run skips the finished variant and retries the failed one; an interrupted one
    # (no metrics.json) is run again, from its last checkpoint
    stamp = os.stat(work / ok[0] / 'metrics.json').st_mtime_ns
    os.remove(work / ok[1] / 'metrics.json')
    out = run_tool([grid, '--jobs', '2'])
    assert f'{ok[0]}: skipped' in out and f'{ok[1]}: done' in out and f'{bad}: failed' in out
    assert os.stat(work / ok[0] / 'metrics.json').st_mtime_ns == stamp
    assert (work / ok[1] / 'metrics.json').exists()
    assert 'resumed from' in (work / ok[1] / 'ablate.log').read_text()

    # a checkpoint grid: one trained student evaluated with several samplers, no training
    evals = tmp_path / 'evals'
    grid = write_grid(tmp_path / 'nfe.py', base=str(config), work_dir=str(evals),
                      checkpoint=str(work / ok[0] / 'iter_4.pth'), rows=['student'],
                      axes={'model.sampler.sigmas': [[2.5], [80.0, 0.5], [80.0, 2.0, 0.5]]},
                      cfg_options={'model.teacher.fit.cache_dir': str(tmp_path / 'cache')})
    run_tool([grid, '--jobs', '2'])
    with open(evals / 'results.csv') as f:
        records = [r for r in csv.DictReader(f) if r['name'] == 'student']
    assert [int(r['nfe']) for r in records] == [1, 2, 3]       # each variant's sampler ran
    assert len({r['mmd'] for r in records}) == 3
    assert not any(f.startswith('iter_') for f in os.listdir(evals / records[0]['variant']))
