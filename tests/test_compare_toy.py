"""tools/compare_toy.py: the mixture swap reaches every place a toy config names the data, and
the table is assembled from the runs' files."""
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import compare_toy  # noqa: E402


def test_mixture_swap_reaches_teacher_and_network():
    cfg = compare_toy.variant_config('cosim', 'random16', iters=7, eval_interval=5)
    teacher = cfg.model.teacher
    assert teacher.fit.target.mixture == dict(name='random_mixture', dim=16)
    assert teacher.network.dim == 16 and teacher.network.hidden == 256
    assert cfg.train_cfg.max_iters == 7
    hook = [h for h in cfg.custom_hooks if h['type'] == 'ToyEvaluationHook'][0]
    assert hook['interval'] == 5
    scd = compare_toy.variant_config('scd', 'ring8', iters=7, eval_interval=5)
    assert scd.param_scheduler[0]['T_max'] == scd.param_scheduler[0]['end'] == 7      # the decay follows the run
    grid = compare_toy.variant_config('sid', 'grid25', iters=7, eval_interval=5)
    assert grid.model.teacher.fit.target.mixture == dict(name='grid25') and grid.model.teacher.network.dim == 2


def test_table_from_run_files(tmp_path):
    args = type('A', (), dict(iters=10, jobs=1, mixtures=['ring8'], methods=['cosim', 'sid'],
                              work_dir=str(tmp_path), mmd_targets=[0.03, 0.01], eval_interval=5))()
    row = dict(sw2=0.2, mmd=0.005, near_mode=0.9, mode_tv=0.03, nll=2.5)
    for method, first in (('cosim', 'CoSIM'), ('sid', 'SiD')):
        d = tmp_path / 'ring8' / method
        d.mkdir(parents=True)
        rows = [dict(name=first, nfe=1, **row), dict(name='teacher Heun', nfe=35, **row),
                dict(name='exact floor', nfe=0, **row)]
        (d / 'metrics.json').write_text(json.dumps(rows))
        history = [dict(iter=5, mmd=0.02), dict(iter=10, mmd=0.008 if method == 'cosim' else 0.02)]
        (d / 'eval_details.json').write_text(json.dumps(dict(history=history)))
    statuses = [dict(method='cosim', mixture='ring8', status='done'), dict(method='sid', mixture='ring8', status='done')]
    table = compare_toy.collect(args, statuses)
    assert table.count('teacher Heun') == 1 and table.count('exact floor') == 1   # shared rows once
    assert '| ring8 | cosim | 5 | 10 |' in table and '| ring8 | sid | 5 | > 10 |' in table
    failed = compare_toy.collect(args, [dict(method='sid', mixture='ring8', status='failed', error='boom')])
    assert 'failed: boom' in failed


def test_seeds_give_mean_and_std_and_drift(tmp_path):
    cfg = compare_toy.variant_config('cosim', 'wring8', iters=7, eval_interval=5, seed=3,
                                     cfg_options={'model.sampler.scale': 1.2})
    assert cfg.randomness.seed == 3 and cfg.model.sampler.scale == 1.2
    assert cfg.model.teacher.fit.target.mixture == dict(name='weighted_ring')
    args = type('A', (), dict(iters=10, jobs=1, mixtures=['ring8'], methods=['cosim'], seeds=[0, 1, 2],
                              work_dir=str(tmp_path), mmd_targets=[0.01], eval_interval=5))()
    for seed, (mmd, tv, last) in enumerate([(0.004, 0.02, 0.05), (0.006, 0.04, 0.02), (0.008, 0.06, 0.03)]):
        d = tmp_path / 'ring8' / 'cosim' / f'seed{seed}'
        d.mkdir(parents=True)
        rows = [dict(name='CoSIM', nfe=4, sw2=0.2, mmd=mmd, near_mode=0.9, mode_tv=tv, near_mode_tv=0.1, nll=2.0),
                dict(name='exact floor', nfe=0, sw2=0.1, mmd=0.0, near_mode=0.99, mode_tv=0.0, near_mode_tv=0.0, nll=1.0)]
        (d / 'metrics.json').write_text(json.dumps(rows))
        history = [dict(iter=5, mmd=0.02, mode_tv=0.02), dict(iter=10, mmd=0.009, mode_tv=last)]
        (d / 'eval_details.json').write_text(json.dumps(dict(history=history)))
    statuses = [dict(method='cosim', mixture='ring8', seed=s, status='done') for s in range(3)]
    table = compare_toy.collect(args, statuses)
    # MMD² ×10³: 4, 6, 8 -> 6.00 ± 2.00; mode TV 0.02, 0.04, 0.06 -> 0.040 ± 0.020
    assert '| cosim | CoSIM | 4 | 0.200 ± 0.000 | 6.00 ± 2.00 | 0.900 ± 0.000 | 0.040 ± 0.020 |' in table
    assert table.count('exact floor') == 1 and '| 10 / 10 / 10 |' in table
    # drift: best 0.02 in every seed, last 0.05 / 0.02 / 0.03 -> gaps 0.03, 0, 0.01 -> 2 of 3 within 0.01
    assert '| ring8 | cosim | 3 | 0.020 ± 0.000 | 5 / 5 / 5 | 0.033 ± 0.015 | 0.013 ± 0.015 | 0.040 ± 0.020 | 2/3 |' in table
    assert compare_toy.mean_std([1.0, float('nan'), 3.0]) == (2.0, 2 ** 0.5)


def test_variant_runs_its_own_config_on_the_swapped_mixture():
    cfg = compare_toy.variant_config('cosim_pairs', 'wring4', iters=7, eval_interval=5, seed=1)
    assert cfg.model.teacher.fit.target.mixture == dict(name='weighted_ring', num_modes=4)
    assert cfg.model.regression.levels == [80.0, 29.7973, 4.2759, 0.2886] and cfg.model.regression.weight == 10.0
    assert cfg.optim_wrapper.generator.optimizer.lr == 1e-3
    assert cfg.optim_wrapper.aux.optimizer.lr == compare_toy.variant_config('cosim', 'wring4', 7, 5).optim_wrapper.aux.optimizer.lr
    assert 'cosim_pairs' not in compare_toy.METHODS    # a variant is run only when named
