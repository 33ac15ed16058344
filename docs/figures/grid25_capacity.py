"""How fast can the toy's one-step generator learn grid25 when it is *told* the answer?

    python docs/figures/grid25_capacity.py [--lr 5e-5] [--beta1 0] [--iters 4000] [--init teacher|random]
        [--hidden 256] [--depth 3] [--sigma-init 2.5] [--target transport|ode] [--seed 0] [--teacher-gap]

The SiD / CoSIM student on grid25 is G(z) = D(σ_init·z; σ_init) (SiD's one-step generator), a copy
of the fitted toy teacher (``MLPDenoiser``). Here it is trained by plain regression, with the toy
configs' optimiser (Adam, batch 1 024), onto one exact solution of the task: the separable
monotone transport map T(z)_j = F⁻¹(Φ(z_j)), where F is the CDF of one coordinate of grid25 (five
equal Gaussians at −4, −2, 0, 2, 4 with std 0.1) and Φ the standard normal CDF. T pushes N(0, I)
exactly onto grid25. Every quarter of the run it prints the near-mode fraction and mode TV of
G on 20 000 fixed latents, and the mean squared distance to T.

``--target ode``: regress onto the teacher's own probability-flow map instead, z ↦ its EDM Heun
sampler's output (18 steps, NFE 35) from 80·z, on a pool of 200 000 precomputed pairs (the
regression DMD adds to its distribution-matching loss). It is not separable, so it is a harder
map to fit, and its best is the teacher's own near-mode fraction.

A distillation loss is not expected to move the generator faster than a regression onto a map
that solves the task, so the regression's near-mode fraction after N steps is a practical bound on
what a distilled student with the same network, optimiser and N steps reaches on grid25
(docs/toy_comparison.md).

``--teacher-gap``: instead, how well the fitted teacher's score points off its data. On 40 000
points uniform on [−5, 5]² (a blurred student's samples), at σ = 0.05 … 2, the median cosine
between the teacher's and the exact score D(x; σ) − x and the relative error of D, over the points
outside every mode's 3-std ball (and the error on the points inside).
"""
import argparse
import copy
import os.path as osp
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)


def coordinate_transport(num_points=200_001, span=5.0):
    """z ↦ F⁻¹(Φ(z)) for one coordinate of grid25, by linear interpolation of F on a fine grid
    (float64; the interpolation error is below 1e-4 of a mode's std)."""
    from gdistill.data.toy_mixtures import grid25
    mixture = grid25()  # a product of two equal 1-D mixtures: the x-coordinates of its means
    centres, std = mixture.means[:, 0].unique(), float(mixture.stds[0])
    xs = torch.linspace(-span, span, num_points, dtype=torch.float64)
    cdf = torch.special.ndtr((xs[:, None] - centres) / std).mean(1)

    def transport(z):
        u = torch.special.ndtr(z.to(torch.float64)).clamp(cdf[0].item(), cdf[-1].item())
        i = torch.searchsorted(cdf, u).clamp(1, num_points - 1)
        lo, hi = cdf[i - 1], cdf[i]
        w = ((u - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
        return (xs[i - 1] + w * (xs[i] - xs[i - 1])).to(z.dtype)
    return transport


def teacher_gap(teacher, exact):
    points = torch.rand(40_000, 2, generator=torch.Generator().manual_seed(0)) * 10 - 5
    off = ~exact.mixture.near_mode_mask(points.double(), 3.0)
    for sigma in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0):
        s = torch.full((points.shape[0],), sigma)
        with torch.no_grad():
            d_net = teacher.edm_denoise(points, s)
            d_exact = exact.edm_denoise(points.double(), s.double()).float()
        err = (d_net - d_exact).norm(dim=1) / (d_exact - points).norm(dim=1).clamp_min(1e-8)
        cos = torch.nn.functional.cosine_similarity(d_net - points, d_exact - points, dim=1)
        print(f'σ = {sigma:<5g} off the modes: median cosine {cos[off].median():.3f}, share > 0.9 '
              f'{(cos[off] > 0.9).float().mean():.3f}, median relative error of D {err[off].median():.3f}; '
              f'near the modes: {err[~off].median():.3f}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lr', type=float, default=5e-5, help="the toy configs' rate: 5e-5")
    p.add_argument('--beta1', type=float, default=0.0, help="Adam's β₁ (the toy configs, as SiD and CoSIM: 0)")
    p.add_argument('--iters', type=int, default=4000)
    p.add_argument('--batch-size', type=int, default=1024)
    p.add_argument('--init', choices=['teacher', 'random'], default='teacher')
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--depth', type=int, default=3)
    p.add_argument('--teacher-fit-iters', type=int, default=2000, help='the toy teacher fit (cached)')
    p.add_argument('--sigma-init', type=float, default=2.5, help="SiD's σ_init")
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0, help='the batches and the ODE pairs (the evaluation latents stay fixed)')
    p.add_argument('--target', choices=['transport', 'ode'], default='transport',
                   help="the separable transport map, or the teacher's Heun-35 map from 80·z")
    p.add_argument('--teacher-gap', action='store_true', help="the fitted teacher's score off the modes, then exit")
    args = p.parse_args(argv)

    from mmengine.registry import DefaultScope

    import gdistill.networks  # noqa: F401
    import gdistill.teachers  # noqa: F401
    from gdistill.metrics.toy import mode_tv, near_mode_fraction
    from gdistill.registry import TEACHERS
    torch.set_num_threads(args.threads)
    DefaultScope.get_instance(f'grid25_capacity_{time.time_ns()}', scope_name='gdistill')
    teacher = TEACHERS.build(dict(
        type='NetworkTeacher',
        network=dict(type='MLPDenoiser', dim=2, hidden=args.hidden, depth=args.depth, sigma_data=0.5),
        fit=dict(target=dict(type='MixtureTeacher', mixture=dict(name='grid25')), iters=args.teacher_fit_iters,
                 batch_size=1024)))
    if args.teacher_gap:
        return teacher_gap(teacher, TEACHERS.build(dict(type='MixtureTeacher', mixture=dict(name='grid25'))))
    net = copy.deepcopy(teacher.network)
    if args.init == 'random':
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
    sigma = torch.tensor(args.sigma_init)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(args.beta1, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    z_eval = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1))
    if args.target == 'ode':
        from gdistill.samplers import EDMHeunSampler
        heun = EDMHeunSampler(num_steps=18)
        z_pool = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1000 + args.seed))
        with torch.no_grad():
            x_pool = heun(teacher.network, z_pool).float()
            x_eval = heun(teacher.network, z_eval).float()
        print(f"the teacher's Heun-35 map itself: near-mode {near_mode_fraction(x_eval, 'grid25'):.3f}, "
              f"mode TV {mode_tv(x_eval, 'grid25'):.3f}")

        def batch():
            i = torch.randint(0, z_pool.shape[0], (args.batch_size,), generator=gen)
            return z_pool[i], x_pool[i]
    else:
        transport = coordinate_transport()
        x_eval = transport(z_eval)

        def batch():
            z = torch.randn(args.batch_size, 2, generator=gen)
            return z, transport(z)

    def report(it):
        with torch.no_grad():
            x = net(args.sigma_init * z_eval, sigma)
            mse = (x - x_eval).square().sum(1).mean()
        print(f'iter {it:6d}: near-mode {near_mode_fraction(x, "grid25"):.3f}   mode TV {mode_tv(x, "grid25"):.3f}   '
              f'‖G − target‖² {mse:.4f}', flush=True)

    print(f'target {args.target}, lr {args.lr:g}, β₁ {args.beta1:g}, {args.hidden} × {args.depth}, init {args.init}, '
          f'σ_init {args.sigma_init:g}; exact samples score near-mode 0.989')
    report(0)
    start = time.time()
    for it in range(1, args.iters + 1):
        z, target = batch()
        loss = (net(args.sigma_init * z, sigma) - target).square().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % max(1, args.iters // 4) == 0 or it == args.iters:
            report(it)
    print(f'{time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
