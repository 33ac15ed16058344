"""The semi-implicit family: CoSIM (Yu et al. 2025), and SiD (Zhou et al. 2024) as its
special case with a fixed mixing time."""
import contextlib
import inspect
import logging

import torch
from mmengine.logging import print_log

from ..registry import DIVERGENCES, KERNELS, MODELS, TIME_SAMPLERS, build
from ..utils import append_dims, per_sample_sum
from .base import BaseDistiller, frozen, unwrap, world_size
from .regression import TeacherPairRegression


@MODELS.register_module()
class SemiImplicitDistiller(BaseDistiller):
    """Algorithm 2 of CoSIM: a generator G_φ(x_t, t) inside the kernel q_φ(x_s | x_t), an
    auxiliary score network f_ψ(x_s; s, t), alternating ψ- and φ-updates of the divergence.

    Mixing samples x_t (the kernel's input): for pairs the time sampler marks ``from_prior``,
    x_t = σ(t_max)·z; otherwise x_t = a(t)·sg(G(x_{t_max}, t_max)) + σ(t)·ε — the model's own
    one-jump sample, so training needs no simulation of the chain.

    ``aux_steps``: ψ-updates per φ-update. ``generator``/``aux``: network configs; by default
    both start from the teacher's network, f_ψ with a second time path (equal to the teacher
    at initialisation).

    ``share_batch``: the last ψ-update and the φ-update use one draw of (s, t, x_t, ε), so the
    generator's and the teacher's forward passes run once per iteration, not twice (G has not
    changed between the two updates, so the ψ-stage sees the same x̂₀ and x_s it would compute
    itself). About a third fewer forward passes, for the memory of keeping those two graphs
    alive across the ψ-update. Algorithm 2 draws afresh for each update (the default).

    ``mixing``: where the kernel's input x_t comes from (pairs marked ``from_prior`` are always
    σ(t)·z):

    - ``'model'`` (default): the model's own one-jump sample a(t)·sg(G(x_{t_max}, t_max)) + σ(t)·ε,
      so the run needs no data;
    - ``'data'``: CoSIM eq. 8 / Algorithm 2, x₀ from the dataset and x_t ~ p(x_t | x₀) =
      a(t)·x₀ + σ(t)·ε. x₀ is the dataloader batch's samples (``inputs``: a toy mixture's exact
      samples from ``MixtureSampleDataset``, images from ``DigitsDataset`` / ``EDMImageDataset``),
      and its labels are the batch's labels;
    - ``'chain'`` (not in the paper; measured in docs/digits.md and docs/toy2d.md): with the time
      sampler's ``window='sampler'``, x_t at the sampler's level σ_i is the sampler's own chain
      run to σ_i with sg(G) (x = σ_max·z; x ← a·G(x, σ_j) + σ_{j+1}·ε for j < i), i.e. the input
      G meets at that step when it samples. Costs K − 1 generator forwards without gradient
      (K the sampler's steps) instead of one.

    ``inactive_mode``: the mode of the network that an update does not train — G when it
    makes the ψ-stage's samples (and the mixing samples), f_ψ inside the φ-update: ``'train'``
    (default; both networks stay in train mode) or ``'eval'`` (SiD's official loop,
    ``training/sid_training_loop.py``: ``G_ddp.eval()`` during the fake-score update,
    ``fake_score_ddp.eval()`` during the generator update). It matters wherever dropout > 0.

    ``nonfinite``: samples whose loss inputs (x̂₀, f_φ, f_ψ) or loss are not finite are dropped
    from the update (masked before the loss, so they pass no gradient), and the loss is the sum
    over the rest divided by ``'batch'``: the whole batch B (SiD's ``sid_loss.py``: the NaN
    samples are indexed out, then ``loss.sum() / batch``), or ``'finite'``: their count (a mean
    over the finite samples, B/(B − k) times the ``'batch'`` step). All on the device, without a
    host sync; a batch with no finite sample gives a NaN loss, which the non-finite guard skips.

    ``augment``: an augmentation pipe (e.g. ``dict(type='AugmentPipe', p=0.12, ...)``, EDM's)
    applied to the generated x̂₀ in the ψ-update before the kernel noises it, its augmentation
    labels given to f_ψ as ``augment_labels`` (SiD's fake-score loss, ``sid_loss.py``
    ``__call__``); the φ-update is not augmented, as in SiD. None (default): no augmentation.

    ``regression`` (not in CoSIM or SiD): DMD's regression term (Yin et al. 2024, §3.3) added to
    the φ-update, ``dict(weight=λ_reg, num_pairs=…, sampler=…, levels=…, cache_dir=…)`` (see
    ``gdistill/distillers/regression.py``): the one-step generator G(σ_g·z) is pulled towards
    the teacher's deterministic sample from the same latent, on a fixed pool of pairs computed
    before the first update, and logged as ``loss_regression``; with ``levels`` (the sampler's)
    the later calls too, from the teacher's trajectory points at those levels (``level_weights``:
    λ_reg's multiplier per level). None (default): off."""

    MIXING = ('model', 'data', 'chain')
    INACTIVE_MODES = ('train', 'eval')
    NONFINITE = ('batch', 'finite')

    trained = ('aux', 'generator')

    def __init__(self, teacher, schedule=dict(type='EDMSchedule'),
                 kernel=dict(type='GaussianKernel'), divergence=dict(type='GFIDivergence'),
                 time_sampler=dict(type='CoSIMTimeSampler'),
                 sampler=dict(type='MultistepSampler', num_steps=4),
                 generator=None, aux=None, aux_steps=1, mixing_network='generator', share_batch=False,
                 mixing='model', inactive_mode='train', nonfinite='finite', augment=None, regression=None,
                 **kwargs):
        super().__init__(teacher, schedule=schedule, sampler=sampler, **kwargs)
        self.kernel = build(KERNELS, kernel)
        self.divergence = build(DIVERGENCES, divergence)
        self.time_sampler = build(TIME_SAMPLERS, time_sampler)
        self.generator = build(MODELS, generator) if generator is not None else self.student_from_teacher()
        aux_net = build(MODELS, aux) if aux is not None else self.student_from_teacher()
        self.aux = aux_net.with_condition_time()
        if aux_steps < 1:
            raise ValueError(f'aux_steps must be >= 1, got {aux_steps}')
        if mixing_network not in ('generator', 'ema'):
            raise ValueError(f"mixing_network is 'generator' or 'ema', got {mixing_network!r}")
        self.aux_steps, self.mixing_network = int(aux_steps), mixing_network
        if share_batch and getattr(self.time_sampler, 'aux_lognormal', None) is not None:
            raise ValueError('share_batch needs one time distribution for both stages, but the time '
                             f'sampler draws the ψ-stage differently (aux_lognormal={self.time_sampler.aux_lognormal})')
        self.share_batch = bool(share_batch)
        self._set_fidelity_options(mixing, inactive_mode, nonfinite, augment)
        self.regression = self._build_regression(regression)
        self._aux_done, self._shared = 0, []
        self.make_ema()

    def _set_fidelity_options(self, mixing, inactive_mode, nonfinite, augment):
        name = type(self).__name__
        if mixing not in self.MIXING:
            raise ValueError(f"{name}: mixing is 'model' (the model's one-jump sample), 'data' "
                             f"(x_t ~ p(x_t | x0) with x0 from the dataset, CoSIM eq. 8) or 'chain' (the "
                             f"sampler's chain, with window='sampler'), got {mixing!r}")
        if mixing != 'model' and type(self).mixing_samples is not SemiImplicitDistiller.mixing_samples:
            raise ValueError(f"{name} draws its own mixing samples (its chain); mixing={mixing!r} is "
                             "SemiImplicitDistiller's (CoSIM, SiD) only: use mixing='model'")
        if mixing == 'chain' and getattr(self.time_sampler, 'window', None) != 'sampler':
            raise ValueError(f"{name}: mixing='chain' runs the sampler's chain to the pair's mixing time, "
                             "so the mixing times must be the sampler's levels: give the time sampler "
                             "window='sampler' and sampler_sigmas (CoSIMTimeSampler), got "
                             f"{type(self.time_sampler).__name__} with window="
                             f"{getattr(self.time_sampler, 'window', None)!r}")
        if inactive_mode not in self.INACTIVE_MODES:
            raise ValueError(f"{name}: inactive_mode is 'train' or 'eval' (SiD's official loop), "
                             f'got {inactive_mode!r}')
        if nonfinite not in self.NONFINITE:
            raise ValueError(f"{name}: nonfinite is 'batch' (divide by the whole batch, SiD's official "
                             f"code) or 'finite' (by the finite samples' count), got {nonfinite!r}")
        self.mixing, self.inactive_mode, self.nonfinite = mixing, inactive_mode, nonfinite
        self.augment_pipe = build(MODELS, augment)
        if self.augment_pipe is not None:
            if len(self.data_shape) != 3:
                raise ValueError(f'{name}: augment transforms images [C, H, W], but the teacher makes '
                                 f'samples of shape {self.data_shape}; drop augment for this data')
            if self.share_batch:
                raise ValueError(f'{name}: share_batch reuses the ψ-stage draw in the φ-update, but with '
                                 'augment the ψ-stage sees augmented images and the φ-update must not '
                                 '(SiD); use share_batch=False with augment')
            if type(self).kernel_pass is not SemiImplicitDistiller.kernel_pass:
                raise ValueError(f'{name} has its own kernel; augment is SemiImplicitDistiller\'s only')
            width = [m.in_features for n_, m in self.aux.named_modules() if n_.endswith('map_augment')
                     and hasattr(m, 'in_features')]
            if width != [self.augment_pipe.label_dim]:
                print_log(f'{name}: the augmentation pipe writes {self.augment_pipe.label_dim} label columns '
                          f'but f_ψ takes {width[0] if width else "no"} augment labels (augment_dim), so it '
                          'cannot tell augmented images apart and may learn the augmentation; build the '
                          f'teacher with augment_dim={self.augment_pipe.label_dim} (EDM\'s CIFAR-10 networks '
                          'have 9)', logger='current', level=logging.WARNING)

    def _build_regression(self, cfg):
        if cfg is None:
            return None
        name = type(self).__name__
        if (type(self).generator_losses is not SemiImplicitDistiller.generator_losses
                or type(self).kernel_pass is not SemiImplicitDistiller.kernel_pass):
            raise ValueError(f'{name} has its own kernel or generator loss; regression is '
                             "SemiImplicitDistiller's (CoSIM, SiD) only")
        if not hasattr(self.time_sampler, 'prior_sigma'):
            raise ValueError(f'{name}: regression feeds the generator prior_sigma·z, which '
                             f'{type(self.time_sampler).__name__} does not define; use CoSIMTimeSampler or '
                             'FixedMixingTimeSampler')
        if not isinstance(cfg, dict):
            raise TypeError(f'{name}: regression is a dict of TeacherPairRegression options, e.g. '
                            f'dict(weight=0.25, num_pairs=10000), got {type(cfg).__name__}')
        known = [k for k in inspect.signature(TeacherPairRegression).parameters if k != 'prior_sigma']
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise KeyError(f'{name}: regression takes no {unknown}; its options are {known}')
        return TeacherPairRegression(prior_sigma=self.time_sampler.prior_sigma, **cfg)

    def regression_losses(self, n):
        """λ_reg·½‖G(x; σ) − y‖² per sample on n pairs of the pool (computed at the first call),
        each with its own label: x = σ_g·z at the one-step level σ_g, the teacher's trajectory
        point at a lower level (``regression.levels``)."""
        reg = self.regression
        if reg.pool is None:
            reg.load_or_compute(self.teacher, self.data_shape, self.teacher.label_dim, self.device_)
        z, y, lab, k, at = reg.batch(n, self.device_)
        dtype = torch.get_default_dtype()
        sigma = reg.pool['levels'][k]
        x_edm = append_dims(sigma.to(dtype), z.ndim) * z.to(dtype)
        if at is not None:             # below σ_g: the trajectory's point (x in EDM's variable)
            x_edm = torch.where(append_dims(k > 0, z.ndim), at.to(dtype), x_edm)
        t = self.schedule.t_from_edm_sigma(sigma).to(dtype)
        x_t = append_dims(self.schedule.alpha(t), z.ndim).to(dtype) * x_edm
        return reg.loss(self.denoise(self.generator, x_t, t, lab), y, k)

    def phases(self):
        return ('aux',) * self.aux_steps + ('generator',)

    @contextlib.contextmanager
    def inactive(self, net):
        """``net`` in eval mode inside the block when ``inactive_mode='eval'`` (restored after);
        otherwise as it is."""
        if self.inactive_mode != 'eval' or not net.training:
            yield net
            return
        net.train(False)
        try:
            yield net
        finally:
            net.train(True)

    def data_samples(self, data, n):
        """The batch's data x₀ ([n, *data_shape]) for ``mixing='data'``."""
        x0 = data.get('inputs') if data is not None else None
        if x0 is None:
            raise ValueError("mixing='data' draws x_t ~ p(x_t | x0) with x0 from the dataset (CoSIM eq. 8), "
                             'but the batch has no samples: give the train_dataloader a dataset with '
                             "samples ('img' items: MixtureSampleDataset for a toy mixture, DigitsDataset or "
                             "EDMImageDataset for images) instead of DistillationDataset, or use mixing='model'")
        if tuple(x0.shape) != (n,) + self.data_shape:
            raise ValueError(f"mixing='data': the batch's samples have shape {tuple(x0.shape)}, expected "
                             f'{(n,) + self.data_shape} (batch {n} of the teacher\'s {self.data_shape})')
        return x0

    # --- one draw of (s, t, x_t) --------------------------------------------------------------
    def _randn(self, n):
        return torch.randn((n,) + self.data_shape, device=self.device_)

    @torch.no_grad()
    def mixing_samples(self, pairs, labels, data=None):
        """x_t for each pair: the prior at t (σ(t)·z), or x₀ diffused to t — the model's own
        sample (``mixing='model'``) or the batch's data (``mixing='data'``, CoSIM eq. 8)."""
        t, rest = pairs['t'], ~pairs['from_prior']
        n, sched = t.shape[0], self.schedule
        if self.mixing == 'data':      # a(t)·x₀ + σ(t)·ε, and σ(t)·ε for the prior pairs; no host sync
            x0 = self.data_samples(data, n).to(t.dtype)
            x0 = torch.where(append_dims(rest, x0.ndim), x0, torch.zeros_like(x0))
            return sched.add_noise(x0, t, self._randn(n).to(x0.dtype))
        zeros = torch.zeros((n,) + self.data_shape, device=self.device_)
        x_t = sched.add_noise(zeros, t, self._randn(n))
        # SiD's γ = 1: every pair starts from the prior (no host read of the mask)
        if getattr(self.time_sampler, 'gamma', None) != 1.0 and rest.any():
            m = int(rest.sum())
            sigma_max = torch.tensor(self.time_sampler.sigma_max, dtype=torch.float64, device=t.device)
            t_max = sched.t_from_edm_sigma(sigma_max).to(t.dtype).expand(m)
            x_T = sched.add_noise(zeros[:m], t_max, self._randn(m))
            net = self.generator_ema if (self.mixing_network == 'ema' and self.generator_ema is not None) \
                else unwrap(self.generator)
            lab = labels[rest] if labels is not None else None
            with self.inactive(net):
                if self.mixing == 'chain':
                    x_t[rest] = self._chain_to(net, x_T, t_max, pairs['sigma_t'][rest], lab)
                else:
                    x0 = self.denoise(net, x_T, t_max, lab)
                    x_t[rest] = sched.add_noise(x0, t[rest], self._randn(m))
        return x_t

    def _chain_to(self, net, x, t_max, sigma_t, labels):
        """The sampler's chain from x = x_{t_max}, stopped for each sample at its σ_t (one of the
        time sampler's levels after σ_max): every sample runs all levels, and keeps its own."""
        sched, out, t_j = self.schedule, x, t_max
        for level in self.time_sampler.sampler_sigmas[1:]:
            x0 = self.denoise(net, x, t_j, labels)
            sig = torch.full_like(sigma_t, level, dtype=torch.float64)
            t_j = sched.t_from_edm_sigma(sig).to(t_max.dtype)
            x = sched.add_noise(x0, t_j, self._randn(x.shape[0]).to(x0.dtype))
            out = torch.where(append_dims(torch.isclose(sigma_t.double(), sig), x.ndim), x, out)
        return out

    def _draw(self, n, labels, stage, data=None):
        pairs = self.time_sampler.sample(n, self.schedule, device=self.device_, stage=stage)
        dtype = torch.get_default_dtype()
        pairs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in pairs.items()}
        if self.mixing == 'data':
            return pairs, self.mixing_samples(pairs, labels, data)
        return pairs, self.mixing_samples(pairs, labels)

    def _pass_options(self, data, augment):
        """kernel_pass's keyword options this run uses (none for a subclass's own kernel_pass)."""
        out = {}
        if self.mixing == 'data':
            out['data'] = data
        if augment and self.augment_pipe is not None:
            out['augment'] = True
        return out

    # --- the two stages -------------------------------------------------------------------------
    def kernel_pass(self, n, labels, stage, grad, data=None, augment=False, teacher=True):
        """One draw through the kernel: x̂₀ = G(x_t, t), x_s = a(s)·x̂₀ + σ(s)·ε and the teacher's
        denoiser f_φ(x_s), with gradients (to G and through x_s) when ``grad``. ``data``: the
        batch (for ``mixing='data'``). ``augment``: x̂₀ goes through the augmentation pipe before
        the kernel (its labels under ``augment_labels``; the teacher gets none, as SiD's).
        ``teacher=False`` skips the teacher's forward pass (``f_phi`` is None)."""
        pairs, x_t = self._draw(n, labels, stage, data)
        s, t = pairs['s'], pairs['t']
        out = {}
        with torch.set_grad_enabled(grad):
            if grad:
                x0 = self.denoise(self.generator, x_t, t, labels)
            else:
                with self.inactive(unwrap(self.generator)) as g:
                    x0 = self.denoise(g, x_t, t, labels)
            if augment and self.augment_pipe is not None:
                x0, out['augment_labels'] = self.augment_pipe(x0)
            x_s = self.kernel.sample(x0, s, self.schedule, self._randn(n))
            f_phi = self.teacher.denoise(x_s, s, self.schedule, labels) if teacher else None
        return dict(pairs=pairs, x0=x0, x_s=x_s, f_phi=f_phi, **out)

    def aux_losses(self, n, labels, data):
        i, m = self.micro_batch
        if i == 0:                      # a new ψ-update starts (its micro-batches follow)
            self._aux_done += 1
            self._shared = []
        # DDP pairs each forward with one backward: several kept micro-batch graphs of G would
        # break that, so across processes only an unsplit batch is shared
        keep = (self.share_batch and self._aux_done == self.aux_steps and torch.is_grad_enabled()
                and (m == 1 or world_size() == 1))
        # a ψ-loss free of f_φ (SiD's coef = ½: ``divergence.aux_needs_teacher``) skips the teacher
        skip = (not keep and not getattr(self.divergence, 'aux_needs_teacher', True)
                and type(self).kernel_pass is SemiImplicitDistiller.kernel_pass)
        k = self.kernel_pass(n, labels, 'generator' if keep else 'aux', grad=keep,
                             **self._pass_options(data, augment=True), **(dict(teacher=False) if skip else {}))
        if keep:                        # the φ-update's micro-batch i takes draw i
            self._shared.append(k)
        pairs, x0, x_s = k['pairs'], k['x0'].detach(), k['x_s'].detach()
        f_phi = x0 if skip else k['f_phi'].detach()     # f_φ = x̂₀ gives the same loss there (d = 0)
        extra = {} if k.get('augment_labels') is None else dict(augment_labels=k['augment_labels'])
        f_psi = self.denoise(self.aux, x_s, pairs['s'], labels, cond_t=pairs['t'], **extra)
        ok, (x0, f_phi, f_psi) = finite_samples(x0, f_phi, f_psi)
        w = self.divergence.aux_weight(x0, f_phi, pairs['sigma_s'], self.teacher.sigma_data)
        w = w * pairs.get('weight', 1.0)   # a time sampler's per-pair weight (HSIVI's β(k))
        loss = self.divergence.aux_loss(f_phi - x0, f_phi - f_psi, w)
        return dict(loss_aux=reduce_finite(loss, ok, self.nonfinite))

    def generator_losses(self, n, labels, data):
        i, m = self.micro_batch
        shared = self._shared if self._shared and len(self._shared) == m else None
        if i == m - 1:
            self._shared, self._aux_done = [], 0
        k = shared[i] if shared else self.kernel_pass(n, labels, 'generator', grad=True,
                                                      **self._pass_options(data, augment=False))
        pairs, x0, x_s, f_phi = k['pairs'], k['x0'], k['x_s'], k['f_phi']
        with frozen(unwrap(self.aux)) as aux, self.inactive(aux):
            f_psi = self.denoise(aux, x_s, pairs['s'], labels, cond_t=pairs['t'])
        ok, (x0, f_phi, f_psi) = finite_samples(x0, f_phi, f_psi)
        w = self.divergence.generator_weight(x0, f_phi, pairs['sigma_s'], self.teacher.sigma_data)
        w = w * pairs.get('weight', 1.0)
        loss = self.divergence.generator_loss(f_phi - x0, f_phi - f_psi, w)
        out = dict(loss_generator=reduce_finite(loss, ok, self.nonfinite))
        if self.regression is not None:
            reg = self.regression_losses(n)
            out['loss_regression'] = reduce_finite(reg, torch.ones_like(reg, dtype=torch.bool), self.nonfinite)
        return out


def finite_samples(*tensors):
    """(ok, tensors): ok [B] marks the samples finite in every tensor (None entries skipped);
    the others are replaced by zeros with ``torch.where``, so the loss built from them is finite
    and passes them no gradient (SiD's ``sid_loss.py`` indexes them out before the loss)."""
    present = [x for x in tensors if x is not None]
    total = sum(per_sample_sum(x) for x in present)   # finite iff every entry of the sample is
    ok = torch.isfinite(total)
    clean = tuple(None if x is None else torch.where(append_dims(ok, x.ndim), x, torch.zeros_like(x))
                  for x in tensors)
    return ok, clean


def reduce_finite(per_sample, ok, divide_by='batch'):
    """Σ of the per-sample losses over the finite samples (``ok`` and a finite loss), divided by
    the batch size (``'batch'``, SiD's official normalisation) or by their count (``'finite'``).
    No host sync; a batch with no finite sample gives NaN, so the non-finite guard skips it."""
    ok = ok & torch.isfinite(per_sample)
    total = torch.where(ok, per_sample, torch.zeros_like(per_sample)).sum()
    if divide_by == 'batch':
        value = total / per_sample.shape[0]
    elif divide_by == 'finite':
        value = total / ok.sum().clamp(min=1).to(total.dtype)
    else:
        raise ValueError(f"divide_by is 'batch' or 'finite', got {divide_by!r}")
    return torch.where(ok.any(), value, torch.full_like(value, float('nan')))
