"""Where CoSIM's multistep chain loses the mode weights, and which sampler time points keep them.

    python docs/figures/cosim_weights.py RUN_DIR [RUN_DIR ...] [--samplers NAME=S0,S1,... ...]
        [--num-samples 20000] [--rejump] [--out FILE.json]

Each RUN_DIR is a toy CoSIM run (its config ``*.py`` as dumped by ``tools/compare_toy.py`` or
``vis_data/config.py``, and its ``iter_*.pth`` checkpoints). For every checkpoint and every
sampler (``MultistepSampler(sigmas=[...])``; ``default`` = the run's own sampler) it computes, on
``--num-samples`` samples (seed 0, the same latents for every sampler), the mode TV, the
near-mode TV (``gdistill.metrics.toy.near_mode_tv``) and the near-mode fraction; on the last
checkpoint also MMD² and sliced-W2. This is the evaluation history of a sampler the run did not
train with, without training again.

``--rejump``: on the last checkpoint, for each σ of a sweep, the one-step sample
x̂₀ = G(σ_max·z; σ_max) is noised to σ and passed through G(·; σ) once more — the input law the
kernel is trained on at that mixing time (model mixing) — and the mode TV of the output is
reported next to that of x̂₀: the σ at which a single kernel jump moves the weights.
``--fisher MIXTURE``: no run needed. The weights' visibility to the Fisher divergence at each σ:
E_q‖σ(∇log q_σ − ∇log p_σ)‖² (exact scores, 20 000 samples of q_σ) for q = the mixture with its
weights moved by TV 0.1 along roll(w, 1) − w (each mode's weight shifted towards its neighbour's),
or, for equal weights (ring8, grid25), along an alternating ±1 pattern: every other mode gains
mass. Prints (σ, value) rows.

``--summarize A.json [B.json ...]``: markdown tables from such outputs, runs grouped by their
mixture (the path's ``<mixture>/<method>/seed<S>``): per sampler, the last checkpoint's metrics as
mean ± std over the seeds, and the mode-TV history with its best, last − best, and the number of
seeds that end within 0.01 of their best.

Prints markdown tables and writes everything to ``--out`` (JSON).
"""
import argparse
import glob
import json
import os
import os.path as osp
import re
import sys

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))


def _config(run_dir):
    found = [p for p in glob.glob(osp.join(run_dir, '*.py'))]
    found += glob.glob(osp.join(run_dir, '*', 'vis_data', 'config.py'))
    if not found:
        raise FileNotFoundError(f'{run_dir}: no config (*.py or */vis_data/config.py)')
    return sorted(found)[0]


def _checkpoints(run_dir):
    paths = glob.glob(osp.join(run_dir, 'iter_*.pth'))
    return sorted(paths, key=lambda p: int(re.search(r'iter_(\d+)\.pth$', p).group(1)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='*')
    p.add_argument('--fisher', default=None, help='a mixture name (wring8, random16, ring8, grid25): weight visibility')
    p.add_argument('--samplers', nargs='*', default=[],
                   help='NAME=S0,S1,... : a MultistepSampler with these noise levels (NFE = their number)')
    p.add_argument('--num-samples', type=int, default=20000)
    p.add_argument('--mmd-samples', type=int, default=None,
                   help='MMD² and sliced-W2 on the first N samples only (default: all; MMD costs N²)')
    p.add_argument('--rejump', action='store_true')
    p.add_argument('--sigmas', default='0.1,0.3,0.5,1,2,4.28,10,29.7', help='the re-jump sweep')
    p.add_argument('--last-only', action='store_true', help='only the last checkpoint of each run')
    p.add_argument('--out', default=None)
    p.add_argument('--summarize', nargs='+', default=None, help='JSON outputs of earlier calls: print tables')
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))

    from mmengine.registry import DefaultScope

    import gdistill.data  # noqa: F401
    import gdistill.distillers  # noqa: F401
    import gdistill.engine  # noqa: F401
    import gdistill.networks  # noqa: F401
    from gdistill.data.toy_mixtures import make_mixture  # noqa: F401
    from gdistill.engine.runner import load_trained_model
    from gdistill.metrics.toy import mmd, default_bandwidth, mode_tv, near_mode_fraction, near_mode_tv, sliced_w2
    from gdistill.registry import SAMPLERS, build
    from train import load_config

    DefaultScope.get_instance('cosim_weights', scope_name='gdistill')
    if args.fisher:
        return fisher_visibility(args.fisher, args.sigmas)
    samplers = [('default', None)]
    for spec in args.samplers:
        name, eq, sig = spec.partition('=')
        try:
            sigmas = [float(s) for s in sig.split(',')] if eq and name else None
        except ValueError:
            sigmas = None
        if not sigmas:
            raise SystemExit(f"--samplers: {spec!r} is not NAME=S0,S1,... (e.g. hi=80,20,10,0.3); the run's own "
                             "sampler is always evaluated, as 'default'")
        samplers.append((name, sigmas))
    out = []
    for run in args.runs:
        config = _config(run)
        cfg = load_config(config)
        ckpts = _checkpoints(run)
        if not ckpts:
            raise FileNotFoundError(f'{run}: no iter_*.pth checkpoints')
        if args.last_only:
            ckpts = ckpts[-1:]
        for ckpt in ckpts:
            it = int(re.search(r'iter_(\d+)\.pth$', ckpt).group(1))
            model = load_trained_model(cfg.model, ckpt, config)
            mixture = model.teacher.mixture
            g = torch.Generator().manual_seed(0)
            reference = mixture.sample(args.num_samples, generator=g)
            noise = torch.randn((args.num_samples, mixture.dim), generator=g)
            net = model.sampling_network()
            for name, sig in samplers:
                sampler = model.sampler if sig is None else build(SAMPLERS, dict(type='MultistepSampler', sigmas=sig))
                with torch.no_grad():
                    x = sampler(net, noise, None, generator=torch.Generator().manual_seed(1))
                row = dict(run=run, iter=it, sampler=name, nfe=sampler.nfe,
                           sigmas=[round(float(s), 4) for s in sampler.sigmas()],
                           mode_tv=mode_tv(x, mixture), near_mode_tv=near_mode_tv(x, mixture),
                           near_mode=near_mode_fraction(x, mixture))
                if ckpt == ckpts[-1]:
                    m = args.mmd_samples or args.num_samples
                    row.update(mmd=mmd(x[:m], reference[:m], default_bandwidth(mixture)),
                               sw2=sliced_w2(x[:m], reference[:m], generator=torch.Generator().manual_seed(2)),
                               mmd_samples=m)
                out.append(row)
                print(json.dumps(row), flush=True)
            if args.rejump and ckpt == ckpts[-1]:
                smax = float(model.sampler.sigmas()[0])
                with torch.no_grad():
                    full = lambda s: torch.full((noise.shape[0],), s)  # noqa: E731
                    x0 = net(noise * smax, full(smax), None)
                    base = mode_tv(x0, mixture)
                    for s in (float(v) for v in args.sigmas.split(',')):
                        eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))
                        y = net(x0 + s * eps, full(s), None)
                        row = dict(run=run, iter=it, rejump_sigma=s, one_step_mode_tv=base,
                                   mode_tv=mode_tv(y, mixture), near_mode_tv=near_mode_tv(y, mixture))
                        out.append(row)
                        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    return out


def _ms(vals, fmt='{:.3f}', scale=1.0):
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return '–'
    mu = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt.format(mu)
    sd = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f'{fmt.format(mu)} ± {fmt.format(sd)}'


def summarize(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)
    rows = [r for r in rows if 'sampler' in r]
    for r in rows:
        parts = osp.normpath(r['run']).split(os.sep)
        r['mixture'] = parts[-3] if len(parts) >= 3 else r['run']
    lines = []
    for mixture in sorted({r['mixture'] for r in rows}):
        rs = [r for r in rows if r['mixture'] == mixture]
        runs = sorted({r['run'] for r in rs})
        last = {run: max(r['iter'] for r in rs if r['run'] == run) for run in runs}
        iters = sorted({r['iter'] for r in rs})
        samplers = list(dict.fromkeys(r['sampler'] for r in rs))
        lines += [f'### {mixture}: last checkpoint, {len(runs)} seed(s)', '',
                  '| sampler | NFE | σ | MMD²×10³ | mode TV | near-mode TV | near-mode | sliced-W2 |',
                  '|---|---|---|---|---|---|---|---|']
        for name in samplers:
            end = [r for r in rs if r['sampler'] == name and r['iter'] == last[r['run']]]
            if not end:
                continue
            sig = ', '.join(f'{v:g}' for v in end[0]['sigmas'])
            lines.append(f"| {name} | {end[0]['nfe']} | {sig} | {_ms([r.get('mmd') for r in end], '{:.2f}', 1e3)} | "
                         f"{_ms([r['mode_tv'] for r in end])} | {_ms([r['near_mode_tv'] for r in end])} | "
                         f"{_ms([r['near_mode'] for r in end])} | {_ms([r.get('sw2') for r in end])} |")
        lines += ['', f'### {mixture}: mode TV over training (mean ± std over seeds)', '',
                  '| sampler | ' + ' | '.join(f'it {i}' for i in iters) + ' | best | last − best | seeds ≤ best + 0.01 |',
                  '|---|' + '---|' * (len(iters) + 3)]
        for name in samplers:
            cells = [_ms([r['mode_tv'] for r in rs if r['sampler'] == name and r['iter'] == i]) for i in iters]
            best, gap = [], []
            for run in runs:
                h = sorted((r['iter'], r['mode_tv']) for r in rs if r['sampler'] == name and r['run'] == run)
                if h:
                    best.append(min(v for _, v in h))
                    gap.append(h[-1][1] - best[-1])
            ok = sum(g <= 0.01 + 1e-9 for g in gap)
            lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {_ms(best)} | {_ms(gap)} | {ok}/{len(gap)} |')
        lines.append('')
    text = '\n'.join(lines)
    print(text)
    return text


def shifted_weights(w, tv):
    """Mode weights at total variation ``tv`` from ``w``: along roll(w, 1) − w, or, where that is
    zero (equal weights), along an alternating ±1 pattern centred to sum 0."""
    direction = torch.roll(w, 1) - w
    if float(direction.abs().sum()) < 1e-12:
        direction = torch.tensor([(-1.0) ** k for k in range(len(w))], dtype=w.dtype, device=w.device)
        direction = direction - direction.mean()
    q = w + tv * direction / (0.5 * direction.abs().sum())
    if float(q.min()) < 0:
        raise ValueError(f'shifted_weights: TV {tv} moves a weight below 0 ({float(q.min()):.3g}); use a smaller tv')
    return q


def fisher_visibility(name, sigmas, tv=0.1, n=20000):
    """E_q‖σ(∇log q_σ − ∇log p_σ)‖² for q = p with weights at TV ``tv`` from p's (exact scores)."""
    from gdistill.data.toy_mixtures import GaussianMixture, make_mixture
    named = dict(wring8=dict(name='weighted_ring'), random16=dict(name='random_mixture', dim=16),
                 ring8=dict(name='ring8'))
    p = make_mixture(named.get(name, name))
    q = GaussianMixture(p.means, p.stds, shifted_weights(p.weights, tv))
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in (float(v) for v in sigmas.split(',')):
        x = q.sample(n, generator=g).to(torch.float64)
        x = x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
        diff = (q.edm_score(x, s) - p.edm_score(x, s)) * s
        rows.append(dict(mixture=name, sigma=s, tv=tv, fisher=float((diff ** 2).sum(-1).mean())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == '__main__':
    main()
