import hashlib
import json
import os
import os.path as osp
import time

import torch
from mmengine.logging import print_log

from ..registry import MODELS, TEACHERS, build
from ..utils import append_dims, per_sample_sum
from .base import Teacher


@TEACHERS.register_module()
class NetworkTeacher(Teacher):
    """A teacher that is a gdistill network D(x; σ) (EDM preconditioned).

    Its weights come from ``checkpoint`` (a plain state_dict saved by torch.save, loaded with
    ``weights_only=True``), or from fitting it to the exact denoiser of ``fit.target`` (a
    teacher with ``sample_data``, e.g. a ``MixtureTeacher``): regression on x = x₀ + σ·n with
    ln σ ~ N(P_mean, P_std²) and EDM's weight (σ² + σ_d²)/(σσ_d)² (Karras et al. 2022, eq. 2
    and Table 1), Adam. The fitted weights are cached under ``fit.cache_dir`` keyed by the
    network and fit settings, so later runs reuse them."""

    def __init__(self, network, checkpoint=None, fit=None, label_dim=0):
        super().__init__()
        self.network = build(MODELS, network)
        self.sigma_data = float(getattr(self.network, 'sigma_data', 0.5))
        self.label_dim = int(getattr(self.network, 'label_dim', label_dim) or 0)
        self.fit_report = None
        self.mixture = None
        if checkpoint is not None:
            if not osp.isfile(checkpoint):
                raise FileNotFoundError(f'NetworkTeacher: checkpoint {checkpoint!r} does not exist')
            from ..engine.checkpoint import read_state_dict  # weights_only=True, digest checked
            self.network.load_state_dict(read_state_dict(checkpoint), strict=True)
        if fit is not None:
            self._fit_or_load(network, dict(fit))
        dim = getattr(self.network, 'dim', None)
        self.data_shape = (dim,) if dim is not None else tuple(getattr(self, 'data_shape', ()))

    def edm_denoise(self, x, sigma, class_labels=None):
        return self.network(x, sigma, class_labels)

    # --- fitting to an exact target -------------------------------------------------------------
    def _fit_or_load(self, network_cfg, fit):
        target = build(TEACHERS, fit.pop('target'))
        dim = getattr(self.network, 'dim', None)
        if dim is not None and tuple(target.data_shape) != (dim,):
            raise ValueError(f'NetworkTeacher: the network takes {dim}-dimensional data but the fit '
                             f'target {type(target).__name__} has shape {tuple(target.data_shape)}; '
                             f'set network.dim={target.data_shape[0]}')
        self.mixture = getattr(target, 'mixture', None)  # the exact distribution, for evaluation
        settings = dict(iters=3000, batch_size=1024, lr=2e-3, P_mean=-1.2, P_std=1.6, seed=0)
        unknown = set(fit) - set(settings) - {'cache_dir'}
        if unknown:
            raise KeyError(f'NetworkTeacher.fit: unknown keys {sorted(unknown)}; known: '
                           f'{sorted(settings) + ["cache_dir", "target"]}')
        settings.update({k: v for k, v in fit.items() if k != 'cache_dir'})
        # 'init': fits before the seeded initialisation are not reused
        key = hashlib.sha1(json.dumps([network_cfg, repr(target.mixture) if hasattr(target, 'mixture') else repr(target),
                                       settings, 'init'], sort_keys=True, default=str).encode()).hexdigest()[:16]
        cache_dir = fit.get('cache_dir', osp.join('work_dirs', '.teacher_cache'))
        path = osp.join(cache_dir, f'teacher_{key}.pt')
        if osp.isfile(path):
            state = torch.load(path, map_location='cpu', weights_only=True)
            self.network.load_state_dict(state['state_dict'])
            self.fit_report = state['report']
            print_log(f'NetworkTeacher: loaded the fitted teacher from {path}', logger='current')
            return
        # the initial weights come from the fit's seed, not the run's: every seed of a run (and every
        # process racing for an empty cache) then fits the same teacher; the run's generator is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings['seed'])
            self.network = build(MODELS, network_cfg)
        start = time.time()
        self.fit_report = fit_denoiser(self.network, target, **settings)
        self.fit_report['seconds'] = round(time.time() - start, 1)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        torch.save(dict(state_dict=self.network.state_dict(), report=self.fit_report), tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
        print_log(f'NetworkTeacher: fitted in {self.fit_report["seconds"]} s, cached at {path}; '
                  f'score error vs exact: {self.fit_report["relative_error"]}', logger='current')


def fit_denoiser(network, target, iters, batch_size, lr, P_mean, P_std, seed):
    """Fit ``network`` to ``target``'s exact denoiser; return its relative denoiser (= score)
    error at a few noise levels: E‖D − D*‖² / E‖D* − x‖² (the score error relative to the
    score's size, since S = (D − x)/σ²)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    sd = float(getattr(network, 'sigma_data', 0.5))
    network.train()
    for _ in range(iters):
        x0 = target.sample_data(batch_size, generator=g)
        sigma = (P_mean + P_std * torch.randn(batch_size, generator=g)).exp()
        x = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            d_star = target.edm_denoise(x, sigma)
        w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = (w * per_sample_sum((network(x, sigma) - d_star) ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    network.eval()
    report = {}
    with torch.no_grad():
        for s in (0.01, 0.1, 0.5, 1.0, 5.0, 20.0):
            x0 = target.sample_data(8192, generator=g)
            x = x0 + s * torch.randn(x0.shape, generator=g)
            sig = torch.full((x.shape[0],), s)
            d_star = target.edm_denoise(x, sig)
            err = per_sample_sum((network(x, sig) - d_star) ** 2).mean()
            scale = per_sample_sum((d_star - x) ** 2).mean()
            report[str(s)] = round(float(err / scale), 5)
    return dict(relative_error=report)
