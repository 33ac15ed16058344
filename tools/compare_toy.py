"""Train every method on the toy mixtures with the same budget and tabulate the results.

    python tools/compare_toy.py [--methods cosim sid hsivi ...] [--mixtures ring8 grid25 random16]
        [--iters 4000] [--jobs 2] [--threads T] [--work-dir work_dirs/compare] [--out FILE.md]
        [--mmd-targets 0.03 0.02 0.01] [--seeds 0 1 2] [--cfg-options KEY=VALUE ...]

Each (method, mixture) run is the method's toy config with the mixture swapped everywhere it
appears (teacher fit target, data, evaluation) and ``train_cfg.max_iters = --iters``; all
configs share the batch (1024), so every method sees the same number of generated samples.
Runs go through ``tools/train.py`` in their own processes (``--jobs`` at a time, torch threads
split between them); a run whose ``metrics.json`` exists is not repeated, so an interrupted
comparison resumes. The markdown table lists each method's rows, the teacher's samplers and
the exact floor per mixture, with wall times, and the iterations each method needed for its
first-row MMD² to reach each of ``--mmd-targets`` (from the evaluation history).

``--seeds``: every (method, mixture) is trained once per seed (``randomness.seed``; the toy
teacher's fit has its own fixed seed, so all seeds distil the same teacher), in
``WORK_DIR/<mixture>/<method>/seed<S>``, and every cell of the table is the mean ± standard
deviation (n − 1) over the seeds. A drift table follows: for each run's first evaluation row,
the best mode TV of its evaluation history, its last value, and how many seeds end within 0.01
of their best. Without ``--seeds`` one run per pair, with the config's seed, in
``WORK_DIR/<mixture>/<method>`` (the layout of earlier comparisons). ``--cfg-options`` are given
to every run (e.g. a sampler or a learning-rate schedule under test; use a fresh work dir).
"""
import argparse
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mmengine.config import Config, DictAction

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
METHODS = {
    'cosim': 'projects/cosim/toy2d.py',
    'sid': 'configs/sid/toy2d.py',
    'hsivi': 'configs/hsivi/toy2d.py',
    'scd': 'configs/scm/toy2d.py',
    'sct': 'configs/scm/toy2d_sct.py',
    'siddm': 'configs/siddm/toy2d.py',
}
# settings of a method under test, run only when named in --methods
VARIANTS = {
    'cosim_pairs': 'projects/cosim/toy2d_regression.py',   # CoSIM + DMD's regression at the levels
}
CONFIGS = {**METHODS, **VARIANTS}
MIXTURES = {
    'ring8': dict(name='ring8'),
    'grid25': dict(name='grid25'),
    'random16': dict(name='random_mixture', dim=16),
    'wring8': dict(name='weighted_ring'),
    'wring4': dict(name='weighted_ring', num_modes=4),
}
COLUMNS = ('sw2', 'mmd', 'near_mode', 'mode_tv', 'near_mode_tv', 'nll')


def _mixture_dim(mixture):
    return int(mixture.get('dim', 2))


def swap_mixture(node, mixture, old_dim):
    """Every ``mixture=`` entry becomes ``mixture``; every ``dim`` equal to the old data dimension
    (the networks' input size) becomes the new one. Returns the number of mixtures replaced."""
    count = 0
    if isinstance(node, dict):
        for key in list(node):
            if key == 'mixture' and isinstance(node[key], dict):
                node[key] = dict(mixture)
                count += 1
            elif key == 'dim' and node[key] == old_dim:
                node[key] = _mixture_dim(mixture)
            else:
                count += swap_mixture(node[key], mixture, old_dim)
    elif isinstance(node, list):
        for item in node:
            count += swap_mixture(item, mixture, old_dim)
    return count


def stretch_schedules(cfg, old_iters, new_iters):
    """A learning-rate schedule that spans the config's run (``end`` or ``T_max`` equal to its
    max_iters) spans the new length instead, so that a decay still ends where the run does."""
    schedulers = cfg.get('param_scheduler') or []
    for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
        for key in ('end', 'T_max'):
            if sched.get(key) == old_iters:
                sched[key] = new_iters


def variant_config(method, mixture_name, iters, eval_interval, seed=None, cfg_options=None):
    """The method's toy config for one mixture, as a Config (the caller dumps it); ``seed`` sets
    ``randomness.seed`` and ``cfg_options`` (dotted keys) are merged last."""
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[method]))
    data = cfg.to_dict()
    found = []
    _find_mixtures(data, found)
    if not found:
        raise ValueError(f'{CONFIGS[method]}: no `mixture` entry to swap; is it a toy config?')
    old_dim = _mixture_dim(found[0])
    swap_mixture(data, MIXTURES[mixture_name], old_dim)
    stretch_schedules(data, data['train_cfg']['max_iters'], iters)
    data['train_cfg']['max_iters'] = iters
    for hook in data.get('custom_hooks', []):
        if hook.get('type') == 'ToyEvaluationHook':
            hook['interval'] = eval_interval
    if seed is not None:
        data.setdefault('randomness', {})['seed'] = int(seed)
    cfg = Config(data)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def run_dir(work_dir, mixture, method, seed=None):
    """Where one run lives: ``<mixture>/<method>`` or, with a seed, ``.../seed<S>``."""
    path = osp.join(work_dir, mixture, method)
    return path if seed is None else osp.join(path, f'seed{seed}')


def _find_mixtures(node, found):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'mixture' and isinstance(value, dict):
                found.append(value)
            else:
                _find_mixtures(value, found)
    elif isinstance(node, list):
        for item in node:
            _find_mixtures(item, found)


def run_variant(method, mixture, args, threads, seed=None):
    """Train one variant unless its metrics exist; returns a status dict."""
    work_dir = run_dir(args.work_dir, mixture, method, seed)
    metrics = osp.join(work_dir, 'metrics.json')
    if osp.isfile(metrics):
        return dict(method=method, mixture=mixture, seed=seed, status='done')
    os.makedirs(work_dir, exist_ok=True)
    lock = osp.join(work_dir, 'RUNNING')
    try:   # a second comparison started beside this one must not train into the same folder
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(lock) as f:
            pid = f.read().strip()
        if pid.isdigit() and osp.exists(f'/proc/{pid}'):
            return dict(method=method, mixture=mixture, seed=seed, status='failed',
                        error=f'already being trained by process {pid} (remove {lock} if it is not)')
        os.remove(lock)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    try:
        return dict(_train(method, mixture, args, threads, work_dir, metrics, seed), seed=seed)
    finally:
        os.remove(lock)


def _train(method, mixture, args, threads, work_dir, metrics, seed=None):
    timing = osp.join(work_dir, 'wall_seconds.json')
    config = osp.join(work_dir, f'{method}_{mixture}.py')
    variant_config(method, mixture, args.iters, args.eval_interval, seed,
                   getattr(args, 'cfg_options', None)).dump(config)
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', work_dir,
           '--cfg-options', f'torch_threads={threads}']
    start = time.time()
    with open(osp.join(work_dir, 'train.log'), 'w') as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    seconds = time.time() - start
    if proc.returncode != 0 or not osp.isfile(metrics):
        with open(osp.join(work_dir, 'train.log')) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-1:]
        return dict(method=method, mixture=mixture, status='failed', error=tail[0] if tail else '?')
    with open(timing, 'w') as f:
        json.dump(dict(seconds=round(seconds, 1), threads=threads, jobs=args.jobs), f)
    return dict(method=method, mixture=mixture, status='done')


def iterations_to(history, target):
    for h in history:
        if h['mmd'] <= target:
            return h['iter']
    return None


def mean_std(values):
    """(mean, sample standard deviation with n − 1; 0 for one value) of the finite values, or
    (nan, nan) if there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float('nan'), float('nan')
    mu = sum(vals) / len(vals)
    if len(vals) == 1:
        return mu, 0.0
    return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))


def _cell(values, fmt):
    mu, sd = mean_std(values)
    if math.isnan(mu):
        return 'nan'
    return fmt.format(mu) if len(values) < 2 else f'{fmt.format(mu)} ± {fmt.format(sd)}'


_FORMATS = dict(sw2='{:.3f}', mmd='{:.2f}', near_mode='{:.3f}', mode_tv='{:.3f}', near_mode_tv='{:.3f}',
                nll='{:.3g}')


def _row(name, label, nfe, runs, wall):
    """One table row from the metric dicts of a row over seeds (MMD² shown ×10³)."""
    cells = []
    for key in COLUMNS:
        vals = [r.get(key) for r in runs]
        if key == 'mmd':
            vals = [None if v is None else v * 1e3 for v in vals]
        cells.append(_cell(vals, _FORMATS[key]) if any(v is not None for v in vals) else '–')
    return f"| {name} | {label} | {nfe} | " + ' | '.join(cells) + f' | {wall} |'


def _seeds(args):
    return list(args.seeds) if getattr(args, 'seeds', None) else [None]


def collect(args, statuses):
    """Markdown: one table per mixture (mean ± std over seeds), then the iterations-to-MMD and the
    mode-weight drift summaries."""
    seeds = _seeds(args)
    seeded = seeds != [None]
    lines = [f'Budget: {args.iters} iterations × batch 1024 for every method; '
             f'{args.jobs} run(s) at a time. MMD² ×10³ (Gaussian kernel).'
             + (f' Each cell: mean ± std over seeds {", ".join(map(str, seeds))}.' if seeded else ''), '']
    failed = {(s['method'], s['mixture'], s.get('seed')): s.get('error', '') for s in statuses
              if s['status'] == 'failed'}
    reach, drift = [], []
    for mixture in args.mixtures:
        lines += [f'### {mixture}', '',
                  '| method | sampler | NFE | sliced-W2 | MMD²×10³ | near-mode | mode TV | near-mode TV | NLL '
                  '| train wall (s) |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        shared = {}
        for method in args.methods:
            per_row, walls, hist = {}, [], []
            for seed in seeds:
                if (method, mixture, seed) in failed:
                    error = failed[(method, mixture, seed)][:80].replace('|', '/')   # keep the table's columns
                    tag = '' if seed is None else f' (seed {seed})'
                    lines.append(f'| {method} | failed{tag}: {error} | | | | | | | | |')
                    continue
                work_dir = run_dir(args.work_dir, mixture, method, seed)
                if not osp.isfile(osp.join(work_dir, 'metrics.json')):
                    continue
                with open(osp.join(work_dir, 'metrics.json')) as f:
                    rows = json.load(f)
                if osp.isfile(osp.join(work_dir, 'wall_seconds.json')):
                    with open(osp.join(work_dir, 'wall_seconds.json')) as f:
                        walls.append(json.load(f)['seconds'])
                for r in rows:
                    if r['name'].startswith('teacher') or r['name'] == 'exact floor':
                        shared.setdefault((r['name'], r['nfe']), []).append(r)
                    else:
                        per_row.setdefault((r['name'], r['nfe']), []).append(r)
                details = osp.join(work_dir, 'eval_details.json')
                history = []
                if osp.isfile(details):
                    with open(details) as f:
                        history = json.load(f).get('history', [])
                if history:
                    hist.append(history)
                    if all('mode_tv' in h for h in history):
                        final = rows[0].get('mode_tv') if rows else None
                        drift.append((mixture, method, seed, history, final))
            wall = '' if not walls else (f'{walls[0]}' if len(walls) == 1 else _cell(walls, '{:.0f}'))
            for (name, nfe), runs in per_row.items():
                lines.append(_row(method, name, nfe, runs, wall))
            if hist:
                reach.append((mixture, method, [[iterations_to(h, m) for h in hist] for m in args.mmd_targets],
                              [h[-1]['iter'] for h in hist]))
        for (name, nfe), runs in sorted(shared.items(), key=lambda kv: (kv[0][0] == 'exact floor', -kv[0][1])):
            # the teacher is fitted once per mixture: its rows are the same in every run, shown once
            first = [runs[0]] if len({json.dumps(r, sort_keys=True) for r in runs}) == 1 else runs
            lines.append(_row('exact' if name == 'exact floor' else 'teacher', name, nfe, first, ''))
        lines.append('')
    targets = ' | '.join(f'MMD² ≤ {m}' for m in args.mmd_targets)
    lines += [f'Iterations until the first evaluation row reaches each MMD² target '
              f'(evaluated every {args.eval_interval} iterations on 4 000 samples'
              + ('; one entry per seed' if seeded else '') + '):', '',
              f'| mixture | method | {targets} |', '|---|---|' + '---|' * len(args.mmd_targets)]
    for mixture, method, its, lasts in reach:
        cells = ' | '.join(' / '.join(str(i) if i is not None else f'> {last}' for i, last in zip(per, lasts))
                           for per in its)
        lines.append(f'| {mixture} | {method} | {cells} |')
    if drift:
        lines += ['', 'Mode-weight drift of the first evaluation row (history: 4 000 samples per evaluation; '
                  '"final" is the end-of-run evaluation):', '',
                  '| mixture | method | seeds | best mode TV (history) | at iteration | last (history) '
                  '| last − best | final mode TV | seeds with last ≤ best + 0.01 |', '|---|---|---|---|---|---|---|---|---|']
        groups = {}
        for mixture, method, seed, history, final in drift:
            groups.setdefault((mixture, method), []).append((history, final))
        for (mixture, method), runs in groups.items():
            best = [min(h['mode_tv'] for h in hist) for hist, _ in runs]
            at = [min(hist, key=lambda h: h['mode_tv'])['iter'] for hist, _ in runs]
            last = [hist[-1]['mode_tv'] for hist, _ in runs]
            gap = [b - a for a, b in zip(best, last)]
            ok = sum(g <= 0.01 for g in gap)
            lines.append(f'| {mixture} | {method} | {len(runs)} | {_cell(best, "{:.3f}")} | '
                         f'{" / ".join(map(str, at))} | {_cell(last, "{:.3f}")} | {_cell(gap, "{:.3f}")} | '
                         f'{_cell([f for _, f in runs], "{:.3f}")} | {ok}/{len(runs)} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', choices=sorted(CONFIGS),
                   default=[m for m, c in METHODS.items() if osp.isfile(osp.join(ROOT, c))],
                   help='default: every method whose toy config exists; variants '
                        f'{sorted(VARIANTS)} only when named')
    p.add_argument('--mixtures', nargs='+', default=['ring8', 'grid25', 'random16'], choices=sorted(MIXTURES))
    p.add_argument('--iters', type=int, default=4000)
    p.add_argument('--eval-interval', type=int, default=250)
    p.add_argument('--mmd-targets', type=float, nargs='+', default=[0.03, 0.02, 0.01])
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads per run (default: the cores split between the jobs)')
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'compare'))
    p.add_argument('--out', default=None, help='markdown file for the table (default: WORK_DIR/comparison.md)')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='train every pair once per seed (randomness.seed) and tabulate mean ± std')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='KEY=VALUE options merged into every run\'s config')
    args = p.parse_args(argv)
    missing = [m for m in args.methods if not osp.isfile(osp.join(ROOT, CONFIGS[m]))]
    if missing:
        raise FileNotFoundError(f'no toy config for {missing}: expected {[CONFIGS[m] for m in missing]}')
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(m, x, seed) for x in args.mixtures for m in args.methods for seed in _seeds(args)]
    with ThreadPoolExecutor(args.jobs) as pool:
        statuses = list(pool.map(lambda mxs: run_variant(mxs[0], mxs[1], args, threads, mxs[2]), todo))
    for s in statuses:
        if s['status'] == 'failed':
            print(f"{s['method']} on {s['mixture']} (seed {s.get('seed')}) failed: {s['error']}", file=sys.stderr)
    table = collect(args, statuses)
    out = args.out or osp.join(args.work_dir, 'comparison.md')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out + '.tmp', 'w') as f:
        f.write(table)
    os.replace(out + '.tmp', out)
    print(table)
    print('written to', out)


if __name__ == '__main__':
    main()
