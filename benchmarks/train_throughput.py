"""Training throughput, peak memory and framework overhead of each method, on one network.

    python benchmarks/train_throughput.py [--methods cosim sid hsivi scm siddm edm NAME=CONFIG ...]
        [--batch 64] [--reps 15] [--warmup 3] [--threads 1] [--json OUT]

Each method's config is put on the benchmark network (``benchmarks/common.py``: the digits
teacher's SongUNet) at the same batch and run by the real runner (``tools/train.py``'s
``build_runner``, hooks, logging, data loader). One step is recorded (``NetworkCallRecorder``:
every network call with its inputs, whether a gradient went through it, the optimiser steps),
and from then on every real iteration is followed by one bare replay of the same network work in
plain PyTorch (``BareStep``), so the two are measured alternately under the same machine load.
Per method it prints: samples/s of the real loop, medians of the real and bare step times, the
framework overhead — the share of a real step that is not network work, (real − bare)/real, the
median over the paired iterations — by wall-clock time and by the process's CPU time (on a
machine shared with other jobs the CPU time is the steadier of the two: waiting for a core is
not counted), and the peak memory of one real step and of one bare step.

A real step's time runs from the end of the previous one (after the bare replay) to the end of
its last hook: data loading, every hook and the loop's own bookkeeping are in it.
"""
import argparse
import json
import os.path as osp
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from common import (METHODS, BareStep, PeakMemory, bench_config, ema_pairs, fix_malloc,  # noqa: E402
                    machine_note, median, now, optimizer_steps, parse_methods, spread)

import gdistill.data  # noqa: E402,F401  (registers everything a config may name)
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.metrics  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
from analyze import NetworkCallRecorder  # noqa: E402
from gdistill.engine.runner import build_runner  # noqa: E402


class AlternatingBenchHook(Hook):
    """Iterations 0..warmup-1 warm up; iteration ``warmup`` is recorded; ``warmup + 1`` measures
    peak memory (and the bare step's); every later iteration is timed and followed by a timed
    bare step. Runs after every other hook."""

    priority = 'LOWEST'

    def __init__(self, warmup):
        self.warmup = warmup
        self.real, self.bare = [], []            # wall-clock seconds
        self.real_cpu, self.bare_cpu = [], []    # CPU seconds of this process
        self.memory = {}
        self.bare_step = None
        self.calls = []

    def before_train(self, runner):
        self.mark, self.cpu_mark = now(), time.process_time()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        i = runner.iter
        model = getattr(runner.model, 'module', runner.model)
        if i == self.warmup:
            self.recorder = NetworkCallRecorder(model).__enter__()
            self.counts, self.restore = optimizer_steps(runner.optim_wrapper)
        elif i == self.warmup + 1:
            self.peak = PeakMemory().__enter__()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        t, c = now(), time.process_time()
        i = runner.iter
        model = getattr(runner.model, 'module', runner.model)
        if i == self.warmup:
            self.recorder.__exit__()
            self.restore()
            self.calls = self.recorder.calls
            optimizers = []
            for name, wrapper in runner.optim_wrapper.items():
                clip = getattr(wrapper, 'clip_grad_kwargs', None) if getattr(wrapper, 'clip_func', None) is \
                    torch.nn.utils.clip_grad_norm_ else None
                optimizers.append((wrapper.optimizer, self.counts[name], dict(clip) if clip else None))
            self.optimizer_steps = {n: c for n, c in self.counts.items()}
            self.bare_step = BareStep(self.calls, optimizers, ema_pairs(model))
            self.bare_step()                      # its own warm-up
        elif i == self.warmup + 1:
            self.peak.__exit__()
            self.memory['real'] = self.peak.peak
            with PeakMemory() as peak:
                self.bare_step()
            self.memory['bare'] = peak.peak
        elif i > self.warmup + 1:
            self.real.append(t - self.mark)
            self.real_cpu.append(c - self.cpu_mark)
            start, cpu = now(), time.process_time()
            self.bare_step()
            self.bare.append(now() - start)
            self.bare_cpu.append(time.process_time() - cpu)
        self.mark, self.cpu_mark = now(), time.process_time()


def run_method(name, path, options, args):
    with tempfile.TemporaryDirectory(prefix=f'bench_{name}_') as work_dir:
        cfg = bench_config(path, options, args.batch, work_dir, name=name)
        cfg.train_cfg.max_iters = args.warmup + 2 + args.reps
        runner = build_runner(cfg)
        hook = AlternatingBenchHook(args.warmup)
        runner.register_hook(hook, priority='LOWEST')
        runner.train()
    calls = hook.calls
    pairs = [(r - b) / r for r, b in zip(hook.real, hook.bare)]
    cpu_pairs = [(r - b) / r for r, b in zip(hook.real_cpu, hook.bare_cpu)]
    real, bare = median(hook.real), median(hook.bare)
    return dict(
        method=name, config=osp.relpath(path, osp.dirname(osp.dirname(osp.abspath(__file__)))),
        batch=args.batch, reps=len(hook.real),
        samples_per_s=args.batch / real, bare_samples_per_s=args.batch / bare,
        real_ms=real * 1e3, real_iqr_ms=[x * 1e3 for x in spread(hook.real)],
        bare_ms=bare * 1e3, bare_iqr_ms=[x * 1e3 for x in spread(hook.bare)],
        overhead=median(pairs), overhead_iqr=list(spread(pairs)),
        cpu_overhead=median(cpu_pairs), cpu_overhead_iqr=list(spread(cpu_pairs)),
        real_cpu_ms=median(hook.real_cpu) * 1e3, bare_cpu_ms=median(hook.bare_cpu) * 1e3,
        peak_mb=None if hook.memory.get('real') is None else hook.memory['real'] / 2 ** 20,
        bare_peak_mb=None if hook.memory.get('bare') is None else hook.memory['bare'] / 2 ** 20,
        network_calls=len(calls), backward_calls=sum(c.backward for c in calls), jvp_calls=sum(c.jvp for c in calls),
        optimizer_steps=hook.optimizer_steps)


def table(results):
    head = ['method', 'samples/s', 'step ms (IQR)', 'bare step ms (IQR)', 'overhead, wall (IQR)',
            'step CPU ms', 'bare CPU ms', 'overhead, CPU (IQR)', 'peak MB (bare)', 'calls fwd / bwd / jvp',
            'optimiser steps']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        mem = '—' if r['peak_mb'] is None else f"{r['peak_mb']:.1f} ({r['bare_peak_mb']:.1f})"
        lines.append(
            f"| {r['method']} | {r['samples_per_s']:.1f} | {r['real_ms']:.1f} ({r['real_iqr_ms'][0]:.1f}–"
            f"{r['real_iqr_ms'][1]:.1f}) | {r['bare_ms']:.1f} ({r['bare_iqr_ms'][0]:.1f}–{r['bare_iqr_ms'][1]:.1f}) | "
            f"{100 * r['overhead']:.1f} % ({100 * r['overhead_iqr'][0]:.1f}–{100 * r['overhead_iqr'][1]:.1f}) | "
            f"{r['real_cpu_ms']:.1f} | {r['bare_cpu_ms']:.1f} | {100 * r['cpu_overhead']:.1f} % "
            f"({100 * r['cpu_overhead_iqr'][0]:.1f}–{100 * r['cpu_overhead_iqr'][1]:.1f}) | "
            f"{mem} | {r['network_calls']} / {r['backward_calls']} / {r['jvp_calls']} | "
            + ', '.join(f'{k} {v}' for k, v in r['optimizer_steps'].items()) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=list(METHODS),
                   help=f'names ({", ".join(METHODS)}) or NAME=CONFIG')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--reps', type=int, default=15, help='timed iterations (each paired with a bare step)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--json', help='write the results here too')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fix_malloc()
    chosen, missing = parse_methods(args.methods)
    print(machine_note())
    for name, path, _ in missing:
        print(f'skipped {name}: its config {path} does not exist')
    results = []
    for name, path, options in chosen:
        r = run_method(name, path, options, args)
        print(f"{name}: {r['samples_per_s']:.1f} samples/s, overhead {100 * r['overhead']:.1f} % (wall), "
              f"{100 * r['cpu_overhead']:.1f} % (CPU)", flush=True)
        results.append(r)
    print(f'\nbatch {args.batch}, {args.reps} paired iterations per method, medians\n')
    print(table(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(note=machine_note(), args=vars(args), results=results), f, indent=1)
    return results


if __name__ == '__main__':
    main()
