"""Run an ablation grid: every variant of a config over a Cartesian product of option values,
then one CSV, markdown table and plot of their metrics.

    python tools/ablate.py GRID [--jobs N] [--threads T] [--dry-run] [--work-dir DIR]
        [--cfg-options KEY=VALUE ...]

GRID is a Python file of plain values:

    base = 'projects/cosim/toy2d.py'            # the config, relative to the repository root
    axes = {'model.divergence.coef': [0.5, 0.75, 1.0], 'train_cfg.max_iters': [1000, 2000]}
    seeds = [0, 1]                               # optional: one variant per seed (randomness.seed)
    cfg_options = {'model.sampler.scale': 1.7}   # optional: given to every variant
    work_dir = 'work_dirs/ablations/coef'        # optional (default work_dirs/ablations/<grid name>)
    checkpoint = 'work_dirs/.../iter_2000.pth'   # optional: evaluate this checkpoint, do not train
    rows = ['CoSIM']                             # optional: the metric rows (by name) in table and plot
    metrics = ['mmd', 'near_mode', 'mode_tv']    # optional: the metrics plotted
    plot_x = 'model.divergence.coef'             # optional: the plot's x axis (default: the first axis)

Each variant is one ``python tools/train.py BASE --work-dir WORK_DIR/<variant> --resume
--cfg-options <axis values> ...`` in its own process, ``--jobs`` at a time, each with the CPU
cores split between them (``--threads`` per process overrides). A variant whose ``metrics.json``
exists is skipped, and one that was interrupted resumes from its last checkpoint, so running the
grid again finishes an interrupted grid. A variant that fails is reported in the table with the
last line of its log, and the others go on. ``--work-dir`` and ``--cfg-options`` run the same grid
elsewhere with extra options for every variant (e.g. on another mixture); they win over the grid
file's ``work_dir`` and ``cfg_options``, and may not name an axis.

With ``checkpoint``, each variant instead evaluates that checkpoint with its own config (axes such
as ``model.sampler.num_steps`` and ``model.sampler.scale``): the student with the variant's
``model.sampler`` on the toy mixture, as ``ToyEvaluationHook`` does, written to the variant's
``metrics.json``. That step is ``python tools/ablate.py --evaluate CONFIG CHECKPOINT --work-dir DIR
[--cfg-options ...]``.

Outputs in the work dir: ``results.csv`` (every row of every variant), ``results.md`` (the table),
``results.png`` (each metric against ``plot_x``, one line per value of the other axes and per
metric row, seeds averaged with their range as error bars), and per variant ``ablate.log`` and
``ablate_status.json``.
"""
import argparse
import csv
import itertools
import json
import math
import os
import os.path as osp
import re
import runpy
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
GRID_KEYS = {'base', 'axes', 'seeds', 'cfg_options', 'work_dir', 'checkpoint', 'rows', 'metrics', 'plot_x'}
NOT_METRICS = {'name', 'sampler', 'nfe', 'seconds', 'num_samples'}


class GridError(ValueError):
    """A grid file that does not describe a runnable grid."""


# --- the grid file ------------------------------------------------------------------------------
def _repo_path(path):
    return path if osp.isabs(path) else osp.join(ROOT, path)


def load_grid(path):
    """The grid file's settings, checked, with paths made absolute."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'grid file {path!r} does not exist')
    found = {k: v for k, v in runpy.run_path(path).items() if not k.startswith('_')
             and not callable(v) and not isinstance(v, type(os))}
    unknown = sorted(set(found) - GRID_KEYS)
    if unknown:
        raise GridError(f'{path}: unknown grid keys {unknown}; a grid file sets {sorted(GRID_KEYS)}')
    for key in ('base', 'axes'):
        if key not in found:
            raise GridError(f'{path}: a grid file needs `{key}` (e.g. base = \'projects/cosim/toy2d.py\', '
                            "axes = {'model.divergence.coef': [0.5, 1.0]})")
    grid = dict(seeds=None, cfg_options={}, checkpoint=None, rows=None, metrics=None, plot_x=None)
    grid.update(found)
    axes = grid['axes']
    if not isinstance(axes, dict) or not axes:
        raise GridError(f'{path}: axes must be a non-empty dict {{option key: [values]}}, got {axes!r}')
    for key, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise GridError(f'{path}: axis {key!r} needs a non-empty list of values, got {values!r}')
        if len(set(map(repr, values))) != len(values):
            raise GridError(f'{path}: axis {key!r} repeats a value: {values!r}')
    if grid['seeds'] is not None and (not isinstance(grid['seeds'], (list, tuple)) or not grid['seeds']
                                      or not all(isinstance(s, int) for s in grid['seeds'])):
        raise GridError(f'{path}: seeds must be a non-empty list of ints, got {grid["seeds"]!r}')
    if grid['plot_x'] is not None and grid['plot_x'] not in axes:
        raise GridError(f'{path}: plot_x={grid["plot_x"]!r} is not an axis; axes: {list(axes)}')
    grid['name'] = osp.splitext(osp.basename(path))[0]
    grid['base'] = _repo_path(grid['base'])
    if not osp.isfile(grid['base']):
        raise FileNotFoundError(f'{path}: base config {grid["base"]!r} does not exist')
    grid['work_dir'] = _repo_path(grid.get('work_dir') or osp.join('work_dirs', 'ablations', grid['name']))
    if grid['checkpoint'] is not None:
        grid['checkpoint'] = _repo_path(grid['checkpoint'])
    grid['path'] = osp.abspath(path)
    return grid


def parse_options(pairs):
    """``KEY=VALUE`` texts as mmengine's ``--cfg-options`` reads them."""
    from mmengine.config import DictAction
    options = {}
    for kv in pairs:
        key, eq, value = kv.partition('=')
        if not eq or not key:
            raise GridError(f'--cfg-options takes KEY=VALUE, got {kv!r}')
        options[key] = DictAction._parse_iterable(value)
    return options


def with_overrides(grid, work_dir=None, options=None):
    """``grid`` with the command line's work dir and extra options (which win over the grid
    file's own ``cfg_options``). An option on an axis key is refused: the axis would override
    it in every variant without a word."""
    clash = sorted(set(options or {}) & set(grid['axes']))
    if clash:
        raise GridError(f'--cfg-options {clash} are axes of {grid["path"]}; an axis sets them per variant '
                        '(edit the grid file to change its values)')
    grid = dict(grid, cfg_options={**grid['cfg_options'], **(options or {})})
    if work_dir:
        grid['work_dir'] = _repo_path(work_dir)
    return grid


def option_text(key, value):
    """``value`` as mmengine's ``--cfg-options`` parser reads it back (numbers, bools, None,
    strings and lists/tuples of them); anything it would read differently is an error."""
    from mmengine.config import DictAction

    def text(v):
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            return '[' + ','.join(text(x) for x in v) + ']'
        if isinstance(v, tuple):
            return '(' + ','.join(text(x) for x in v) + (',)' if len(v) == 1 else ')')
        raise GridError(f'option {key}: {v!r} ({type(v).__name__}) cannot be given on the command line; '
                        'use one axis per dotted key (e.g. model.sampler.num_steps) instead of a dict')
    out = text(value)
    back = DictAction._parse_iterable(out)
    if not _same(back, value):
        raise GridError(f'option {key}: {value!r} would be read back as {back!r} by --cfg-options '
                        '(a string that looks like a number, or one with commas, brackets or spaces)')
    return out


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _labels(keys):
    """The shortest dotted suffix of each key that tells it apart from the others."""
    depth = {k: 1 for k in keys}
    while True:
        label = {k: '.'.join(k.split('.')[-depth[k]:]) for k in keys}
        clash = [k for k in keys if list(label.values()).count(label[k]) > 1 and depth[k] < len(k.split('.'))]
        if not clash:
            return label
        for k in clash:
            depth[k] += 1


def _value_label(v):
    if isinstance(v, (list, tuple)):
        return '-'.join(_value_label(x) for x in v)
    return re.sub(r'[^A-Za-z0-9.+-]', '-', str(v))


def variants(grid):
    """One dict per point of the grid, in grid order: ``name``, ``values`` (axis key → value),
    ``seed`` and ``options`` (every --cfg-options entry as text)."""
    keys = list(grid['axes'])
    labels = _labels(keys)
    seeds = grid['seeds'] if grid['seeds'] is not None else [None]
    out = []
    for combo in itertools.product(*(grid['axes'][k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in seeds:
            parts = [f'{labels[k]}{_value_label(v)}' for k, v in values.items()]
            if seed is not None:
                parts.append(f'seed{seed}')
            options = dict(grid['cfg_options'])
            options.update(values)
            if seed is not None:
                options['randomness.seed'] = seed
            out.append(dict(name='_'.join(parts), values=values, seed=seed,
                            options={k: option_text(k, v) for k, v in options.items()}))
    names = [v['name'] for v in out]
    if len(set(names)) != len(names):
        raise GridError(f'{grid["path"]}: two variants share a name ({names}); give the axes values '
                        'that differ once written as text')
    return out


def command(grid, variant, threads):
    work_dir = osp.join(grid['work_dir'], variant['name'])
    options = [f'{k}={v}' for k, v in variant['options'].items()]
    if grid['checkpoint'] is not None:
        cmd = [sys.executable, osp.abspath(__file__), '--evaluate', grid['base'], grid['checkpoint'],
               '--work-dir', work_dir, '--threads', str(threads)]
    else:
        cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), grid['base'], '--work-dir', work_dir,
               '--resume']
        options.append(f'torch_threads={threads}')
    return cmd + (['--cfg-options'] + options if options else [])


# --- running ------------------------------------------------------------------------------------
def _last_line(path):
    if not osp.isfile(path):
        return '?'
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    return lines[-1] if lines else '(empty log)'


def _write_json(path, data):
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(path + '.tmp', path)


def run_variant(grid, variant, threads):
    """Run one variant unless its metrics.json exists; returns its status dict."""
    work_dir = osp.join(grid['work_dir'], variant['name'])
    metrics = osp.join(work_dir, 'metrics.json')
    if osp.isfile(metrics):
        return dict(status='done', skipped=True)
    os.makedirs(work_dir, exist_ok=True)
    lock = osp.join(work_dir, 'RUNNING')
    try:  # two grid processes must not train into one folder
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(lock) as f:
            pid = f.read().strip()
        if pid.isdigit() and osp.exists(f'/proc/{pid}'):
            return dict(status='failed', error=f'already running in process {pid} (remove {lock} if not)')
        os.remove(lock)  # left by a grid process that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    try:
        cmd = command(grid, variant, threads)
        log = osp.join(work_dir, 'ablate.log')
        start = time.time()
        with open(log, 'w') as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)))
        status = dict(command=shlex.join(cmd), seconds=round(time.time() - start, 1), threads=threads,
                      returncode=proc.returncode)
        if proc.returncode != 0:
            status.update(status='failed', error=_last_line(log))
        elif not osp.isfile(metrics):
            status.update(status='failed', error='finished without writing metrics.json: the config needs an '
                          'evaluation hook that writes it (ToyEvaluationHook or ImageMetricHook)')
        else:
            status.update(status='done')
        _write_json(osp.join(work_dir, 'ablate_status.json'), status)
        return dict(status, skipped=False)
    finally:
        os.remove(lock)


def run_grid(grid, jobs=1, threads=None, dry_run=False, log=print):
    todo = variants(grid)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    threads = threads or max(1, cores // jobs)
    if dry_run:
        for v in todo:
            done = osp.isfile(osp.join(grid['work_dir'], v['name'], 'metrics.json'))
            log(f"{'skip (done)' if done else 'run'}  {v['name']}\n    {shlex.join(command(grid, v, threads))}")
        return None
    os.makedirs(grid['work_dir'], exist_ok=True)

    def one(v):
        s = run_variant(grid, v, threads)
        what = 'skipped (metrics.json exists)' if s.get('skipped') else (
            f"{s['status']} in {s.get('seconds', '?')} s" + (f": {s['error']}" if s['status'] == 'failed' else ''))
        log(f"{v['name']}: {what}")
        return s

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        statuses = list(pool.map(one, todo))
    return collect(grid, todo, statuses)


# --- collecting ---------------------------------------------------------------------------------
def _metric_keys(rows, exclude=()):
    keys = []
    for r in rows:
        for k, v in r.items():
            if k not in NOT_METRICS and k not in exclude and k not in keys and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                keys.append(k)
    return keys


def collect(grid, todo, statuses):
    """results.csv, results.md and results.png in the grid's work dir; returns the records."""
    axis_keys = list(grid['axes'])
    records = []
    for v, s in zip(todo, statuses):
        base = dict(variant=v['name'], **v['values'])
        if grid['seeds'] is not None:
            base['seed'] = v['seed']
        if s['status'] != 'done':
            records.append(dict(base, status='failed', error=s.get('error', '?')))
            continue
        with open(osp.join(grid['work_dir'], v['name'], 'metrics.json')) as f:
            rows = json.load(f)
        if isinstance(rows, dict):  # ImageMetricHook writes {'rows': [...], 'history': [...]}
            rows = rows['rows']
        for r in rows:
            records.append(dict(base, status='done', **r))
    metric_keys = _metric_keys([r for r in records if r['status'] == 'done'], exclude=set(axis_keys) | {'seed'})
    head = ['variant', 'status'] + axis_keys + (['seed'] if grid['seeds'] is not None else []) + \
        ['name', 'sampler', 'nfe'] + metric_keys + ['seconds', 'error']
    path = osp.join(grid['work_dir'], 'results.csv')
    with open(path + '.tmp', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction='ignore')
        w.writeheader()
        for r in records:
            w.writerow({k: _csv_value(r.get(k)) for k in head})
    os.replace(path + '.tmp', path)
    table = markdown(grid, records, metric_keys)
    with open(osp.join(grid['work_dir'], 'results.md'), 'w') as f:
        f.write(table)
    plot(grid, records, metric_keys, osp.join(grid['work_dir'], 'results.png'))
    return records


def _csv_value(v):
    return '' if v is None else (json.dumps(v) if isinstance(v, (list, tuple)) else v)


def _fmt(v):
    if isinstance(v, float):
        return f'{v:.4g}'
    return str(v)


def _shown(grid, record):
    return record['status'] != 'done' or grid['rows'] is None or record['name'] in grid['rows']


def markdown(grid, records, metric_keys):
    labels = _labels(list(grid['axes']))
    head = [labels[k] for k in grid['axes']] + (['seed'] if grid['seeds'] is not None else []) + \
        ['row', 'NFE'] + metric_keys + ['status']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in records:
        if not _shown(grid, r):
            continue
        cells = [str(r[k]) for k in grid['axes']] + ([str(r['seed'])] if grid['seeds'] is not None else [])
        if r['status'] != 'done':
            error = r['error'].replace('|', '/')
            error = error if len(error) <= 200 else error[:197] + '...'
            cells += [''] * (2 + len(metric_keys)) + [f'**failed**: {error}']
        else:
            cells += [str(r['name']), str(r.get('nfe', ''))] + [_fmt(r.get(k, '')) for k in metric_keys] + ['ok']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot(grid, records, metric_keys, path):
    """Each metric against ``plot_x``: one line per (other axis values, row name, NFE); seeds are
    averaged, their range drawn as error bars. Failed variants are named in the title."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = [k for k in (grid['metrics'] or metric_keys) if k in metric_keys] or metric_keys
    x_key = grid['plot_x'] or next(iter(grid['axes']))
    others = [k for k in grid['axes'] if k != x_key]
    labels = _labels(list(grid['axes']))
    xs = list(grid['axes'][x_key])
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    position = {repr(x): (x if numeric else i) for i, x in enumerate(xs)}
    shown = [r for r in records if r['status'] == 'done' and _shown(grid, r)]
    # NFE tells lines apart only where one variant has several rows of one name (e.g. NFE 1/2/4);
    # where the x axis sets the NFE (a sampler grid), a line runs across NFEs
    per_variant = [(r['variant'], r['name']) for r in shown]
    by_nfe = len(set(per_variant)) < len(per_variant)
    lines = {}
    for r in shown:
        line = tuple(f'{labels[k]}={_fmt(r[k])}' for k in others) + \
            ((f"{r['name']} NFE {r.get('nfe', '?')}",) if by_nfe else (str(r['name']),))
        for m in keys:
            if isinstance(r.get(m), (int, float)) and math.isfinite(r[m]):
                lines.setdefault(line, {}).setdefault(m, {}).setdefault(repr(r[x_key]), []).append(r[m])
    failed = sorted({r['variant'] for r in records if r['status'] != 'done'})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, m in zip(axes[0], keys):
        for line, per_metric in lines.items():
            pts = sorted((position[x], vals) for x, vals in per_metric.get(m, {}).items())
            if not pts:
                continue
            px = [p[0] for p in pts]
            mean = [sum(v) / len(v) for _, v in pts]
            err = [[mu - min(v) for mu, (_, v) in zip(mean, pts)], [max(v) - mu for mu, (_, v) in zip(mean, pts)]]
            ax.errorbar(px, mean, yerr=err if any(len(v) > 1 for _, v in pts) else None, marker='o',
                        capsize=3, label=', '.join(line))
        ax.set_title(m)
        ax.set_xlabel(labels[x_key])
        if not numeric:
            ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
        ax.grid(alpha=0.3)
    if lines:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, loc='center left', bbox_to_anchor=(1.0, 0.5))
    title = f"{grid['name']}: {osp.relpath(grid['base'], ROOT)}"
    if failed:
        title += f"   (failed: {', '.join(failed)})"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=120, bbox_inches='tight')
    plt.close(fig)
    os.replace(path + '.tmp.png', path)


# --- evaluating a checkpoint under a variant's config --------------------------------------------
def evaluate(config, checkpoint, work_dir, cfg_options, threads=None):
    """metrics.json of ``checkpoint``'s student with the (variant's) config's ``model.sampler``, on
    the toy mixture and with the sample count and seed of the config's ToyEvaluationHook."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    sys.path.insert(0, ROOT)
    import torch
    from mmengine.registry import DefaultScope

    import gdistill.data  # noqa: F401  (registers everything a config may name)
    import gdistill.distillers  # noqa: F401
    import gdistill.engine  # noqa: F401
    import gdistill.networks  # noqa: F401
    from gdistill.engine.toy_eval import evaluate_samplers, format_table
    from gdistill.engine.runner import load_trained_model
    from train import load_config
    if threads:
        torch.set_num_threads(int(threads))
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist; train it first (see the grid file)')
    cfg = load_config(config, cfg_options=cfg_options)
    hook = next((h for h in cfg.get('custom_hooks', []) if h.get('type') == 'ToyEvaluationHook'), None)
    if hook is None:
        raise ValueError(f'{config}: evaluating a checkpoint needs a toy config with a ToyEvaluationHook '
                         '(for images use tools/eval.py gen)')
    DefaultScope.get_instance(f'gdistill_ablate_{time.time_ns()}', scope_name='gdistill')
    model = load_trained_model(cfg.model, checkpoint, config)
    mixture = hook.get('mixture') or getattr(model.teacher, 'mixture', None)
    if mixture is None:
        raise ValueError(f'{config}: no mixture to evaluate on (neither the hook nor the teacher names one)')
    rows, _ = evaluate_samplers(model, mixture, [dict(name='student', source='student', sampler=dict(cfg.model.sampler))],
                                num_samples=hook.get('num_samples', 20000), seed=hook.get('seed', 0))
    os.makedirs(work_dir, exist_ok=True)
    _write_json(osp.join(work_dir, 'metrics.json'), rows)
    print(format_table(rows))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('grid', nargs='?', help='the grid file')
    p.add_argument('--jobs', type=int, default=1, help='variants run at the same time')
    p.add_argument('--threads', type=int, help='torch threads per variant (default: the cores split between jobs)')
    p.add_argument('--dry-run', action='store_true', help='list the variants and their commands, run nothing')
    p.add_argument('--evaluate', nargs=2, metavar=('CONFIG', 'CHECKPOINT'),
                   help='(one variant of a checkpoint grid) evaluate CHECKPOINT under CONFIG into --work-dir')
    p.add_argument('--work-dir', help="the grid's work dir instead of the grid file's (with --evaluate: "
                   'where metrics.json goes)')
    p.add_argument('--cfg-options', nargs='+', default=[],
                   help="KEY=VALUE options given to every variant, on top of the grid file's cfg_options "
                        '(the same grid on another mixture, say); an axis key is refused')
    args = p.parse_args(argv)
    options = parse_options(args.cfg_options)
    if args.evaluate:
        if not args.work_dir:
            p.error('--evaluate needs --work-dir')
        evaluate(args.evaluate[0], args.evaluate[1], args.work_dir, options, args.threads)
        return None
    if not args.grid:
        p.error('give a grid file (or --evaluate CONFIG CHECKPOINT)')
    if args.jobs < 1:
        p.error(f'--jobs must be >= 1, got {args.jobs}')
    grid = with_overrides(load_grid(args.grid), args.work_dir, options)
    records = run_grid(grid, args.jobs, args.threads, args.dry_run)
    if records is None:
        return None
    with open(osp.join(grid['work_dir'], 'results.md')) as f:
        print(f.read())
    failed = sorted({r['variant'] for r in records if r['status'] != 'done'})
    print(f"{len(variants(grid)) - len(failed)} variant(s) done, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else '') + f"; results in {grid['work_dir']}/results.{{csv,md,png}}")
    return records


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    from gdistill.engine.cli import run  # one line and exit 2 for a user error; --debug: traceback
    run(main)
