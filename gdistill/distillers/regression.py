"""DMD's regression term: the one-step generator regressed onto the teacher's own deterministic
samples (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", §3.3):

    L_reg = E_{(z, y) ~ D} ℓ(G(σ_g·z), y),     y = ODE_teacher(σ_max·z),

D a fixed set of latent–sample pairs computed once with the teacher's deterministic sampler
(EDM's Heun, 18 steps, NFE 35). The generator's term becomes L_div + λ_reg·L_reg. DMD uses
LPIPS for ℓ and λ_reg = 0.25; here ℓ(x, y) = ½‖x − y‖² summed over the sample's entries, the
units of the semi-implicit generator losses (a per-sample sum, whose per-entry gradient does not
depend on the data's size), so its λ is chosen by measurement, not copied.

One latent z serves both sides: the teacher's chain starts at σ_max·z (its sampler's own σ_max)
and the generator sees σ_g·z, σ_g the time sampler's ``prior_sigma`` (CoSIM's σ_max, SiD's
σ_init), as a sampler that starts from the same latent would.

``levels`` (not in DMD) extends the term to a multistep sampler's later calls: for a level σ_i
below the prior, the generator's input is the teacher's ODE trajectory from the same latent at
σ_i, x_{σ_i}, and the target its end y:

    L_reg = E_{(z, y), i} ℓ(G(x_{σ_i}; σ_i), y).

The trajectory's points at σ_i are distributed as the teacher's marginal p_{σ_i}, the law of
the input a chain at σ_i meets once its earlier samples are right, and the ODE maps that law
onto the teacher's samples; so this regresses each call onto one map that makes the chain exact
(the flow map a consistency model learns), where plain DMD only fixes the first."""
import hashlib
import os
import os.path as osp

import torch
from mmengine.logging import print_log

from ..registry import SAMPLERS, build
from ..samplers.edm import EDMHeunSampler
from ..utils import per_sample_sum


class TeacherPairRegression:
    """The pool of DMD's pairs and the per-sample loss.

    ``num_pairs``: size of the pool D (drawn once: latents from a CPU generator seeded with
    ``seed``, so the pool does not depend on the device; class labels i mod label_dim).
    ``sampler``: the teacher's deterministic sampler (SAMPLERS config; a stochastic one is refused,
    the pairs must be a map). ``weight``: λ_reg. ``chunk``: pairs per sampler call.
    ``prior_sigma``: σ_g, the generator's one-step level (set by the distiller).
    ``levels``: None (DMD: the one-step map only), or the sampler's levels (σ_g, σ_1, …):
    each regressed sample draws its level uniformly; below σ_g the input is the teacher's
    trajectory point there. ``level_weights`` (with ``levels``): a multiplier of λ_reg per level
    (not in DMD; None = 1 at every level), to weaken or drop the term at some calls.
    The trajectory is EDM's Heun ODE integration (Karras et al. 2022,
    Algorithm 1) on ``sampler``'s grid with the levels added to it, so ``sampler`` must then be
    an ``EDMHeunSampler`` with S_churn = 0.
    ``cache_dir``: a folder for pools (``torch.save`` of plain tensors), one file per setting,
    named by a hash of everything the pool depends on (size, shape, labels, sampler, levels, seed
    and the teacher's weights): read when it exists, written atomically after it is computed
    otherwise, so runs with other seeds or other λ reuse one pool. Every process of a distributed
    run computes the pool itself unless the file exists."""

    def __init__(self, prior_sigma, weight=0.25, num_pairs=10_000,
                 sampler=dict(type='EDMHeunSampler', num_steps=18), levels=None, level_weights=None, seed=0, chunk=1000,
                 cache_dir=None):
        if not weight > 0:
            raise ValueError(f'regression: weight (λ_reg) must be > 0, got {weight}')
        if int(num_pairs) < 1 or int(chunk) < 1:
            raise ValueError(f'regression: num_pairs and chunk must be >= 1, got {num_pairs}, {chunk}')
        self.weight, self.num_pairs, self.seed, self.chunk = float(weight), int(num_pairs), int(seed), int(chunk)
        self.sampler = build(SAMPLERS, sampler)
        if getattr(self.sampler, 'stochastic', True):
            raise ValueError(f'regression: the pairs need a deterministic teacher sampler (a map z ↦ y), '
                             f'got {self.sampler!r}; e.g. EDMHeunSampler with S_churn=0 or EulerSampler')
        self.prior_sigma = float(prior_sigma)
        self.levels = [self.prior_sigma] if levels is None else [float(v) for v in levels]
        below = self.levels[1:]
        if (self.levels[0] != self.prior_sigma or any(not 0 < b < a for a, b in zip(self.levels, below))):
            raise ValueError(f'regression: levels start at the generator\'s one-step level σ_g = {self.prior_sigma:g} '
                             f'and decrease strictly to > 0 (the sampler\'s levels), got {list(levels)}')
        if below and (not isinstance(self.sampler, EDMHeunSampler) or below[0] >= self.sampler.sigma_max):
            raise ValueError(f'regression: levels below σ_g take the teacher\'s trajectory, integrated with '
                             f'EDMHeunSampler from its sigma_max above them; got {self.sampler!r} for levels {below}')
        if level_weights is not None and (len(level_weights) != len(self.levels) or min(level_weights) < 0
                                          or not max(level_weights) > 0):
            raise ValueError(f'regression: level_weights takes one multiplier >= 0 per level of {self.levels}, '
                             f'not all 0; got {list(level_weights)}')
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]
        self.sampler_cfg = repr(self.sampler)
        self.cache_dir = cache_dir
        self.pool = None

    def _fingerprint(self, teacher):
        h = hashlib.sha256()
        for name, p in sorted(teacher.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to('cpu', torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _meta(self, teacher, data_shape, label_dim):
        return dict(num_pairs=self.num_pairs, data_shape=list(data_shape), label_dim=int(label_dim),
                    sampler=self.sampler_cfg, levels=self.levels[1:], seed=self.seed,
                    teacher=self._fingerprint(teacher))

    @torch.no_grad()
    def compute(self, teacher, data_shape, label_dim, device):
        """The pool: latents z [N, *shape], the teacher's samples y, one-hot labels (or None), and
        with levels below σ_g the trajectory's points there, ``points`` [N, L − 1, *shape]."""
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn((self.num_pairs,) + tuple(data_shape), generator=gen)
        labels = (torch.nn.functional.one_hot(torch.arange(self.num_pairs) % label_dim, label_dim).float()
                  if label_dim else None)
        ys, points = [], []
        for i in range(0, self.num_pairs, self.chunk):
            lab = labels[i:i + self.chunk].to(device) if labels is not None else None
            zi = z[i:i + self.chunk].to(device)
            if len(self.levels) == 1:
                ys.append(self.sampler(teacher, zi, lab).float().cpu())
            else:
                y, at = heun_trajectory(self.sampler, teacher, zi, lab, self.levels[1:])
                ys.append(y.float().cpu())
                points.append(at.float().cpu())
        return dict(latents=z, samples=torch.cat(ys), labels=labels,
                    points=torch.cat(points) if points else None)

    def cache_path(self, meta):
        key = hashlib.sha256(repr(sorted(meta.items())).encode()).hexdigest()[:16]
        return osp.join(self.cache_dir, f'teacher_pairs_{key}.pt')

    def load_or_compute(self, teacher, data_shape, label_dim, device):
        path = self.cache_path(self._meta(teacher, data_shape, label_dim)) if self.cache_dir else None
        if path and osp.exists(path):
            pool = torch.load(path, map_location='cpu', weights_only=True)
            print_log(f'regression: {self.num_pairs} teacher pairs read from {path}', logger='current')
        else:
            print_log(f'regression: {self.num_pairs} teacher pairs with {self.sampler_cfg}'
                      + (f', trajectory points at σ = {self.levels[1:]}' if len(self.levels) > 1 else ''),
                      logger='current')
            pool = self.compute(teacher, data_shape, label_dim, device)
            if path:
                os.makedirs(self.cache_dir, exist_ok=True)
                tmp = f'{path}.tmp{os.getpid()}'
                torch.save({k: v for k, v in pool.items() if v is not None}, tmp)
                os.replace(tmp, path)       # a crash never leaves a half-written pool
        self.pool = {k: (pool.get(k).to(device) if pool.get(k) is not None else None)
                     for k in ('latents', 'samples', 'labels', 'points')}
        self.pool['levels'] = torch.tensor(self.levels, dtype=torch.float64, device=device)  # no copy per step
        self.pool['level_weights'] = (None if self.level_weights is None else
                                      torch.tensor(self.level_weights, dtype=torch.float64, device=device))

    def batch(self, n, device):
        """n pairs drawn uniformly from the pool, each at a level drawn uniformly from ``levels``:
        (z, y, labels, level index [n], the trajectory's point x_{σ_i} (None with one level))."""
        i = torch.randint(0, self.num_pairs, (n,), device=device)
        lab = self.pool['labels']
        z, y, lab = self.pool['latents'][i], self.pool['samples'][i], (lab[i] if lab is not None else None)
        if len(self.levels) == 1:
            return z, y, lab, torch.zeros_like(i), None
        k = torch.randint(0, len(self.levels), (n,), device=device)
        at = self.pool['points'][i, (k - 1).clamp(min=0)]       # level 0 reads σ_g·z instead
        return z, y, lab, k, at

    def loss(self, x, y, k=None):
        """λ_reg·½‖x − y‖², per sample; times ``level_weights[k]`` for samples at level index k."""
        out = self.weight * 0.5 * per_sample_sum((x - y.to(x.dtype)).square())
        if k is not None and self.level_weights is not None:
            out = out * self.pool['level_weights'][k].to(out.dtype)
        return out


def heun_trajectory(sampler, denoiser, z, labels, levels):
    """EDM's deterministic Heun integration (Karras et al. 2022, Algorithm 1) from
    sampler.sigma_max·z to 0 on ``sampler``'s grid for ``denoiser`` with ``levels`` added to it:
    (the end y, the states at the levels [B, len(levels), ...]), float64. The Heun correction is
    skipped on the last step to σ = 0, as the sampler does."""
    grid = sampler.sigmas_for(denoiser)[:-1].tolist()
    grid = sorted(set(grid) | set(levels), reverse=True) + [0.0]
    dtype, x, kept = z.dtype, z.to(torch.float64) * grid[0], {}

    def slope(x, s):
        return (x - sampler._denoise(denoiser, x, s, labels, dtype)) / s
    for s_cur, s_next in zip(grid[:-1], grid[1:]):
        if s_cur in levels:
            kept[s_cur] = x
        d = slope(x, s_cur)
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d + slope(x_next, s_next))
        x = x_next
    return x, torch.stack([kept[v] for v in levels], 1)
