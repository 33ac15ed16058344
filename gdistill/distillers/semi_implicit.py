"""The semi-implicit family: CoSIM (Yu et al. 2025), and SiD (Zhou et al. 2024) as its
special case with a fixed mixing time."""
import torch

from ..registry import DIVERGENCES, KERNELS, MODELS, TIME_SAMPLERS, build
from .base import BaseDistiller, frozen, unwrap, world_size


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
    alive across the ψ-update. Algorithm 2 draws afresh for each update (the default)."""

    trained = ('aux', 'generator')

    def __init__(self, teacher, schedule=dict(type='EDMSchedule'),
                 kernel=dict(type='GaussianKernel'), divergence=dict(type='GFIDivergence'),
                 time_sampler=dict(type='CoSIMTimeSampler'),
                 sampler=dict(type='MultistepSampler', num_steps=4),
                 generator=None, aux=None, aux_steps=1, mixing_network='generator', share_batch=False,
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
        self._aux_done, self._shared = 0, []
        self.make_ema()

    def phases(self):
        return ('aux',) * self.aux_steps + ('generator',)

    # --- one draw of (s, t, x_t) --------------------------------------------------------------
    def _randn(self, n):
        return torch.randn((n,) + self.data_shape, device=self.device_)

    @torch.no_grad()
    def mixing_samples(self, pairs, labels):
        """x_t for each pair: the prior at t (σ(t)·z), or the model's own sample diffused to t."""
        t, rest = pairs['t'], ~pairs['from_prior']
        n, sched = t.shape[0], self.schedule
        zeros = torch.zeros((n,) + self.data_shape, device=self.device_)
        x_t = sched.add_noise(zeros, t, self._randn(n))
        if rest.any():
            m = int(rest.sum())
            sigma_max = torch.tensor(self.time_sampler.sigma_max, dtype=torch.float64)
            t_max = sched.t_from_edm_sigma(sigma_max).to(t.dtype).expand(m)
            x_T = sched.add_noise(zeros[:m], t_max, self._randn(m))
            net = self.generator_ema if (self.mixing_network == 'ema' and self.generator_ema is not None) \
                else unwrap(self.generator)
            x0 = self.denoise(net, x_T, t_max, labels[rest] if labels is not None else None)
            x_t[rest] = sched.add_noise(x0, t[rest], self._randn(m))
        return x_t

    def _draw(self, n, labels, stage):
        pairs = self.time_sampler.sample(n, self.schedule, device=self.device_, stage=stage)
        dtype = torch.get_default_dtype()
        pairs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in pairs.items()}
        return pairs, self.mixing_samples(pairs, labels)

    # --- the two stages -------------------------------------------------------------------------
    def kernel_pass(self, n, labels, stage, grad):
        """One draw through the kernel: x̂₀ = G(x_t, t), x_s = a(s)·x̂₀ + σ(s)·ε and the teacher's
        denoiser f_φ(x_s), with gradients (to G and through x_s) when ``grad``."""
        pairs, x_t = self._draw(n, labels, stage)
        s, t = pairs['s'], pairs['t']
        with torch.set_grad_enabled(grad):
            x0 = self.denoise(self.generator if grad else unwrap(self.generator), x_t, t, labels)
            x_s = self.kernel.sample(x0, s, self.schedule, self._randn(n))
            f_phi = self.teacher.denoise(x_s, s, self.schedule, labels)
        return dict(pairs=pairs, x0=x0, x_s=x_s, f_phi=f_phi)

    def aux_losses(self, n, labels, data):
        i, m = self.micro_batch
        if i == 0:                      # a new ψ-update starts (its micro-batches follow)
            self._aux_done += 1
            self._shared = []
        # DDP pairs each forward with one backward: several kept micro-batch graphs of G would
        # break that, so across processes only an unsplit batch is shared
        keep = (self.share_batch and self._aux_done == self.aux_steps and torch.is_grad_enabled()
                and (m == 1 or world_size() == 1))
        k = self.kernel_pass(n, labels, 'generator' if keep else 'aux', grad=keep)
        if keep:                        # the φ-update's micro-batch i takes draw i
            self._shared.append(k)
        pairs, x0, x_s, f_phi = k['pairs'], k['x0'].detach(), k['x_s'].detach(), k['f_phi'].detach()
        f_psi = self.denoise(self.aux, x_s, pairs['s'], labels, cond_t=pairs['t'])
        w = self.divergence.aux_weight(x0, f_phi, pairs['sigma_s'], self.teacher.sigma_data)
        w = w * pairs.get('weight', 1.0)   # a time sampler's per-pair weight (HSIVI's β(k))
        loss = self.divergence.aux_loss(f_phi - x0, f_phi - f_psi, w)
        return dict(loss_aux=_finite_mean(loss))

    def generator_losses(self, n, labels, data):
        i, m = self.micro_batch
        shared = self._shared if self._shared and len(self._shared) == m else None
        if i == m - 1:
            self._shared, self._aux_done = [], 0
        k = shared[i] if shared else self.kernel_pass(n, labels, 'generator', grad=True)
        pairs, x0, x_s, f_phi = k['pairs'], k['x0'], k['x_s'], k['f_phi']
        with frozen(unwrap(self.aux)) as aux:
            f_psi = self.denoise(aux, x_s, pairs['s'], labels, cond_t=pairs['t'])
        w = self.divergence.generator_weight(x0, f_phi, pairs['sigma_s'], self.teacher.sigma_data)
        w = w * pairs.get('weight', 1.0)
        loss = self.divergence.generator_loss(f_phi - x0, f_phi - f_psi, w)
        return dict(loss_generator=_finite_mean(loss))


def _finite_mean(per_sample):
    """Mean over the samples whose loss is finite (SiD drops NaN samples); a batch with none
    keeps its NaN so the non-finite guard sees it."""
    ok = torch.isfinite(per_sample)
    if ok.all() or not ok.any():
        return per_sample.mean()
    return per_sample[ok].mean()
