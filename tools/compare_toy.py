"""Train every method on the toy mixtures with the same budget and tabulate the results.

    python tools/compare_toy.py [--methods cosim sid hsivi ...] [--mixtures ring8 grid25 random16]
        [--iters 4000] [--jobs 2] [--threads T] [--work-dir work_dirs/compare] [--out FILE.md]
        [--mmd-targets 0.03 0.02 0.01]

Each (method, mixture) run is the method's toy config with the mixture swapped everywhere it
appears (teacher fit target, data, evaluation) and ``train_cfg.max_iters = --iters``; all
configs share the batch (1024), so every method sees the same number of generated samples.
Runs go through ``tools/train.py`` in their own processes (``--jobs`` at a time, torch threads
split between them); a run whose ``metrics.json`` exists is not repeated, so an interrupted
comparison resumes. The markdown table lists each method's rows, the teacher's samplers and
the exact floor per mixture, with wall times, and the iterations each method needed for its
first-row MMD² to reach each of ``--mmd-targets`` (from the evaluation history).
"""
import argparse
import copy
import json
import os
import os.path as osp
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
METHODS = {
    'cosim': 'projects/cosim/toy2d.py',
    'sid': 'configs/sid/toy2d.py',
    'hsivi': 'configs/hsivi/toy2d.py',
    'scd': 'configs/scm/toy2d.py',
    'sct': 'configs/scm/toy2d_sct.py',
    'siddm': 'configs/siddm/toy2d.py',
}
MIXTURES = {
    'ring8': dict(name='ring8'),
    'grid25': dict(name='grid25'),
    'random16': dict(name='random_mixture', dim=16),
}
COLUMNS = ('sw2', 'mmd', 'near_mode', 'mode_tv', 'nll')


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


def variant_config(method, mixture_name, iters, eval_interval):
    """The method's toy config for one mixture, as a Config (the caller dumps it)."""
    cfg = Config.fromfile(osp.join(ROOT, METHODS[method]))
    data = cfg.to_dict()
    found = []
    _find_mixtures(data, found)
    if not found:
        raise ValueError(f'{METHODS[method]}: no `mixture` entry to swap; is it a toy config?')
    old_dim = _mixture_dim(found[0])
    swap_mixture(data, MIXTURES[mixture_name], old_dim)
    stretch_schedules(data, data['train_cfg']['max_iters'], iters)
    data['train_cfg']['max_iters'] = iters
    for hook in data.get('custom_hooks', []):
        if hook.get('type') == 'ToyEvaluationHook':
            hook['interval'] = eval_interval
    return Config(data)


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


def run_variant(method, mixture, args, threads):
    """Train one variant unless its metrics exist; returns a status dict."""
    work_dir = osp.join(args.work_dir, mixture, method)
    metrics = osp.join(work_dir, 'metrics.json')
    if osp.isfile(metrics):
        return dict(method=method, mixture=mixture, status='done')
    os.makedirs(work_dir, exist_ok=True)
    lock = osp.join(work_dir, 'RUNNING')
    try:   # a second comparison started beside this one must not train into the same folder
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(lock) as f:
            pid = f.read().strip()
        if pid.isdigit() and osp.exists(f'/proc/{pid}'):
            return dict(method=method, mixture=mixture, status='failed',
                        error=f'already being trained by process {pid} (remove {lock} if it is not)')
        os.remove(lock)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    try:
        return _train(method, mixture, args, threads, work_dir, metrics)
    finally:
        os.remove(lock)


def _train(method, mixture, args, threads, work_dir, metrics):
    timing = osp.join(work_dir, 'wall_seconds.json')
    config = osp.join(work_dir, f'{method}_{mixture}.py')
    variant_config(method, mixture, args.iters, args.eval_interval).dump(config)
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


def collect(args, statuses):
    """Markdown: one table per mixture, then the iterations-to-MMD summary."""
    lines = [f'Budget: {args.iters} iterations × batch 1024 for every method; '
             f'{args.jobs} run(s) at a time. MMD² ×10³ (Gaussian kernel).', '']
    failed = {(s['method'], s['mixture']): s.get('error', '') for s in statuses if s['status'] == 'failed'}
    reach = []
    for mixture in args.mixtures:
        lines += [f'### {mixture}', '',
                  '| method | sampler | NFE | sliced-W2 | MMD²×10³ | near-mode | mode TV | NLL | train wall (s) |',
                  '|---|---|---|---|---|---|---|---|---|']
        shared = {}
        for method in args.methods:
            if (method, mixture) in failed:
                error = failed[(method, mixture)][:80].replace('|', '/')   # keep the table's columns
                lines.append(f'| {method} | failed: {error} | | | | | | | |')
                continue
            work_dir = osp.join(args.work_dir, mixture, method)
            with open(osp.join(work_dir, 'metrics.json')) as f:
                rows = json.load(f)
            wall = ''
            if osp.isfile(osp.join(work_dir, 'wall_seconds.json')):
                with open(osp.join(work_dir, 'wall_seconds.json')) as f:
                    wall = json.load(f)['seconds']
            for r in rows:
                if r['name'].startswith('teacher') or r['name'] == 'exact floor':
                    shared.setdefault((r['name'], r['nfe']), r)
                else:
                    lines.append(_row(method, r, wall))
            with open(osp.join(work_dir, 'eval_details.json')) as f:
                history = json.load(f).get('history', [])
            if history:
                reach.append((mixture, method, [iterations_to(history, m) for m in args.mmd_targets],
                              history[-1]['iter']))
        for (name, nfe), r in sorted(shared.items(), key=lambda kv: (kv[0][0] == 'exact floor', -kv[0][1])):
            lines.append(_row('exact' if name == 'exact floor' else 'teacher', r, ''))
        lines.append('')
    targets = ' | '.join(f'MMD² ≤ {m}' for m in args.mmd_targets)
    lines += [f'Iterations until the first evaluation row reaches each MMD² target '
              f'(evaluated every {args.eval_interval} iterations on 4 000 samples):', '',
              f'| mixture | method | {targets} |', '|---|---|' + '---|' * len(args.mmd_targets)]
    for mixture, method, its, last in reach:
        cells = ' | '.join(str(it) if it is not None else f'> {last}' for it in its)
        lines.append(f'| {mixture} | {method} | {cells} |')
    return '\n'.join(lines) + '\n'


def _row(name, r, wall):
    return (f"| {name} | {r['name']} | {r['nfe']} | {r['sw2']:.3f} | {r['mmd'] * 1e3:.2f} | "
            f"{r['near_mode']:.3f} | {r['mode_tv']:.3f} | {r['nll']:.3g} | {wall} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', choices=sorted(METHODS),
                   default=[m for m, c in METHODS.items() if osp.isfile(osp.join(ROOT, c))],
                   help='default: every method whose toy config exists')
    p.add_argument('--mixtures', nargs='+', default=['ring8', 'grid25', 'random16'], choices=sorted(MIXTURES))
    p.add_argument('--iters', type=int, default=4000)
    p.add_argument('--eval-interval', type=int, default=250)
    p.add_argument('--mmd-targets', type=float, nargs='+', default=[0.03, 0.02, 0.01])
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads per run (default: the cores split between the jobs)')
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'compare'))
    p.add_argument('--out', default=None, help='markdown file for the table (default: WORK_DIR/comparison.md)')
    args = p.parse_args(argv)
    missing = [m for m in args.methods if not osp.isfile(osp.join(ROOT, METHODS[m]))]
    if missing:
        raise FileNotFoundError(f'no toy config for {missing}: expected {[METHODS[m] for m in missing]}')
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(m, x) for x in args.mixtures for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        statuses = list(pool.map(lambda mx: run_variant(mx[0], mx[1], args, threads), todo))
    for s in statuses:
        if s['status'] == 'failed':
            print(f"{s['method']} on {s['mixture']} failed: {s['error']}", file=sys.stderr)
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
