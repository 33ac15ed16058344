"""Sampling time of the students at NFE 1/2/4 against the teacher's Heun sampler at NFE 35.

    python benchmarks/sampling_throughput.py [--methods cosim sid hsivi ...] [--steps 1 2 4]
        [--batch 256] [--reps 15] [--threads 1] [--json OUT]

Every model is its method's config on the benchmark network (``benchmarks/common.py``), random
weights. Timed, in a rotating order within each repetition so that every sampler sees the same
machine load: CoSIM's multistep sampler (Algorithm 1) on the EMA generator at each ``--steps``,
each other method's own configured sampler on its student, EDM's Heun sampler (18 steps, NFE 35)
on the teacher, and one bare network call (the denoiser on the same batch, no sampler around it).

Printed per sampler: median time, samples/s, time per network call relative to the bare call
(1.0 = no sampler overhead), and the ratio to the Heun NFE-35 time beside the ideal ratio NFE/35.
Target: NFE 4 within 1.3 × (4/35) × the NFE-35 time.
"""
import argparse
import json
import os.path as osp
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from common import METHODS, bench_config, machine_note, median, now, parse_methods, spread  # noqa: E402

import gdistill.data  # noqa: E402,F401  (registers everything a config may name)
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
from gdistill.registry import MODELS, SAMPLERS, build  # noqa: E402

TEACHER_STEPS = 18   # Heun, NFE 2·18 − 1 = 35 (EDM's CIFAR-10 setting)


def build_model(name, path, options, batch):
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = bench_config(path, options, batch, work_dir, name=name)
    DefaultScope.get_instance(cfg.experiment_name, scope_name='gdistill')
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


def entries(chosen, steps, batch):
    """(label, method, sampler, network) for every timed sampler; the CoSIM model provides the
    teacher and the bare call."""
    out, reference = [], None
    for name, path, options in chosen:
        model = build_model(name, path, options, batch)
        student = model.sampling_network()
        if reference is None:
            reference = model
        if name == 'cosim':
            for k in steps:
                out.append((f'{name} multistep', name, build(SAMPLERS, dict(type='MultistepSampler', num_steps=k)),
                            student))
        elif model.sampler is not None:
            out.append((f'{name} {type(model.sampler).__name__}', name, model.sampler, student))
    if reference is None:
        raise ValueError('no method to time')
    teacher = reference.teacher
    out.append(('teacher EDM Heun', 'teacher', build(SAMPLERS, dict(type='EDMHeunSampler', num_steps=TEACHER_STEPS)),
                teacher))
    return out, reference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=['cosim', 'sid', 'hsivi', 'scm', 'siddm'],
                   help=f'names ({", ".join(METHODS)}) or NAME=CONFIG; cosim is timed at every --steps')
    p.add_argument('--steps', nargs='+', type=int, default=[1, 2, 4])
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen, missing = parse_methods(args.methods)
    print(machine_note())
    for name, path, _ in missing:
        print(f'skipped {name}: its config {path} does not exist')
    timed, reference = entries(chosen, args.steps, args.batch)
    device = reference.device_
    shape = reference.data_shape
    k = reference.teacher.label_dim
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn((args.batch,) + shape, generator=g, device=device)
    labels = torch.nn.functional.one_hot(torch.arange(args.batch, device=device) % k, k).float() if k else None
    sigma = torch.full((args.batch,), 1.0, device=device)
    denoiser = reference.sampling_network()

    def bare():
        with torch.no_grad():
            denoiser(noise, sigma, labels)

    jobs = [(label, method, s, net) for label, method, s, net in timed]
    times = {i: [] for i in range(len(jobs) + 1)}
    for rep in range(args.reps + 1):          # the first round warms up
        order = list(range(len(jobs) + 1))
        order = order[rep % len(order):] + order[:rep % len(order)]
        for i in order:
            start = now()
            if i == len(jobs):
                bare()
            else:
                _, _, sampler, net = jobs[i]
                sampler(net, noise, labels, generator=torch.Generator(device=device).manual_seed(rep))
            if rep:
                times[i].append(now() - start)
    call = median(times[len(jobs)])
    heun = median(times[len(jobs) - 1])
    rows = []
    for i, (label, method, sampler, _) in enumerate(jobs):
        t = median(times[i])
        nfe = sampler.nfe
        rows.append(dict(sampler=label, method=method, nfe=nfe, ms=t * 1e3,
                         iqr_ms=[x * 1e3 for x in spread(times[i])], samples_per_s=args.batch / t,
                         per_call_vs_bare=t / (nfe * call), vs_heun35=t / heun, ideal=nfe / (2 * TEACHER_STEPS - 1)))
    print(f'\nbatch {args.batch}, {args.reps} interleaved repetitions, medians; bare network call '
          f'{call * 1e3:.2f} ms\n')
    print('| sampler | NFE | ms (IQR) | samples/s | time / (NFE × bare call) | time / Heun-35 time | ideal NFE/35 |'
          ' ratio to ideal |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['sampler']} | {r['nfe']} | {r['ms']:.1f} ({r['iqr_ms'][0]:.1f}–{r['iqr_ms'][1]:.1f}) | "
              f"{r['samples_per_s']:.0f} | {r['per_call_vs_bare']:.3f} | {r['vs_heun35']:.4f} | {r['ideal']:.4f} | "
              f"{r['vs_heun35'] / r['ideal']:.3f} |")
    four = [r for r in rows if r['method'] == 'cosim' and r['nfe'] == 4]
    if four:
        r = four[0]
        verdict = 'met' if r['vs_heun35'] <= 1.3 * r['ideal'] else 'MISSED'
        print(f"\ntarget NFE 4 ≤ 1.3 × (4/35) × NFE-35: {r['vs_heun35']:.4f} vs {1.3 * r['ideal']:.4f} — {verdict}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(note=machine_note(), args=vars(args), bare_call_ms=call * 1e3, rows=rows), f, indent=1)
    return rows


if __name__ == '__main__':
    main()
