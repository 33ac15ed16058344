"""Training throughput of one process against two data-parallel processes (torchrun, gloo).

    python benchmarks/distributed_throughput.py [--method cosim] [--batch 32] [--iters 12]
        [--warmup 3] [--rounds 3] [--json OUT]

The method's config on the benchmark network (``benchmarks/common.py``) is trained in three set-ups,
each a fresh run of the real runner: one process with one torch thread, one process with two
threads, and two processes with one thread each under ``torchrun`` (launcher ``pytorch``, gloo,
one DDP wrapper per trained network). Every process has the same per-process batch, so the two
processes together take twice the samples per step (weak scaling). The set-ups alternate within
each of ``--rounds`` rounds (rotating order); a run's throughput is global samples per second over
the median iteration after ``--warmup``, and the table gives each set-up's median over the rounds
and the ratios between them. Beside it, samples per CPU-second (the CPU time of all processes per
step): on a machine shared with other jobs, wall-clock throughput also measures how large a share
of the cores each set-up won, while CPU time measures the work done — its ratio is the parallel
efficiency (1.0: two processes cost no more CPU per sample than one). Start-up (≈6 s for
torchrun) is not in the figures.

``--worker`` is the training side of one run (what the driver launches).
"""
import argparse
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from common import METHODS, ROOT, machine_note, median, parse_methods  # noqa: E402

SETUPS = [('1 process × 1 thread', 1, 1), ('1 process × 2 threads', 1, 2), ('2 processes × 1 thread', 2, 1)]


def worker(args):
    import torch
    from mmengine.hooks import Hook

    import gdistill.data  # noqa: F401  (registers everything a config may name)
    import gdistill.distillers  # noqa: F401
    import gdistill.engine  # noqa: F401
    import gdistill.networks  # noqa: F401
    from common import bench_config
    from gdistill.engine.runner import build_runner, setup_cpu_distributed
    torch.set_num_threads(args.threads)
    (name, path, options), = parse_methods([args.method])[0]
    times, cpu = [], []

    class IterationTimes(Hook):
        priority = 'LOWEST'

        def before_train(self, runner):
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            t, c = time.perf_counter(), time.process_time()
            if runner.iter >= args.warmup:
                times.append(t - self.mark)
                cpu.append(c - self.cpu_mark)
            self.mark, self.cpu_mark = t, c

    with tempfile.TemporaryDirectory(prefix='bench_dist_') as work_dir:
        cfg = bench_config(path, options, args.batch, work_dir, name=name)
        cfg.train_cfg.max_iters = args.warmup + args.iters
        cfg.launcher = args.launcher
        setup_cpu_distributed(cfg, args.launcher)
        runner = build_runner(cfg)
        runner.register_hook(IterationTimes(), priority='LOWEST')
        runner.train()
        world = runner.world_size
        step = median(times)
        print('RESULT ' + json.dumps(dict(rank=runner.rank, world=world, threads=args.threads, step_s=step,
                                          cpu_s=median(cpu), samples_per_s=world * args.batch / step)), flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(args, processes, threads):
    me = osp.abspath(__file__)
    common = ['--worker', '--method', args.method, '--batch', str(args.batch), '--iters', str(args.iters),
              '--warmup', str(args.warmup), '--threads', str(threads)]
    if processes == 1:
        cmd = [sys.executable, me] + common
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}',
               f'--master_port={free_port()}', me] + common + ['--launcher', 'pytorch']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    lines = [json.loads(line[len('RESULT '):]) for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    if out.returncode != 0 or len(lines) != processes:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}')
    result = next(r for r in lines if r['rank'] == 0)
    # CPU seconds of all processes per step: the work, whatever share of the cores the machine gave
    result['samples_per_cpu_s'] = processes * args.batch / sum(r['cpu_s'] for r in lines)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', default='cosim', help=f'a name ({", ".join(METHODS)}) or NAME=CONFIG')
    p.add_argument('--batch', type=int, default=32, help='per process')
    p.add_argument('--iters', type=int, default=12, help='timed iterations per run')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--json')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--threads', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--launcher', default='none', help=argparse.SUPPRESS)
    p.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    chosen, missing = parse_methods([args.method])
    if missing:
        raise FileNotFoundError(f'{args.method}: config {missing[0][1]} does not exist')
    print(machine_note())
    runs = {label: [] for label, _, _ in SETUPS}
    per_cpu = {label: [] for label, _, _ in SETUPS}
    for r in range(args.rounds):
        order = SETUPS[r % len(SETUPS):] + SETUPS[:r % len(SETUPS)]
        for label, processes, threads in order:
            result = launch(args, processes, threads)
            runs[label].append(result['samples_per_s'])
            per_cpu[label].append(result['samples_per_cpu_s'])
            print(f'round {r + 1}: {label}: {result["samples_per_s"]:.1f} samples/s, '
                  f'{result["samples_per_cpu_s"]:.1f} samples per CPU-second (step {1e3 * result["step_s"]:.0f} ms)',
                  flush=True)
    base = median(runs[SETUPS[0][0]])
    print(f'\n{args.method}, batch {args.batch} per process, {args.iters} timed iterations per run, '
          f'median of {args.rounds} alternating rounds\n')
    base_cpu = median(per_cpu[SETUPS[0][0]])
    print('| set-up | global samples/s (runs) | vs 1 process × 1 thread | samples per CPU-second | vs 1 × 1 |')
    print('|---|---|---|---|---|')
    rows = []
    for label, processes, threads in SETUPS:
        m, c = median(runs[label]), median(per_cpu[label])
        rows.append(dict(setup=label, processes=processes, threads=threads, samples_per_s=m, runs=runs[label],
                         ratio=m / base, samples_per_cpu_s=c, cpu_runs=per_cpu[label], cpu_ratio=c / base_cpu))
        print(f"| {label} | {m:.1f} ({', '.join(f'{x:.1f}' for x in runs[label])}) | {m / base:.2f} | "
              f"{c:.1f} | {c / base_cpu:.2f} |")
    two, one2 = median(runs[SETUPS[2][0]]), median(runs[SETUPS[1][0]])
    print(f'\n2 processes / 1 process on the same 2 threads: {two / one2:.2f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(note=machine_note(), args=vars(args), rows=rows), f, indent=1)
    return rows


if __name__ == '__main__':
    main()
