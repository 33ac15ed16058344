"""HSIVI (Yu et al. 2023, "Hierarchical Semi-Implicit Variational Inference with Application to
Diffusion Model Acceleration"): K discrete conditional layers trained by SIVI-SM, layer by layer
on the model's own simulated chain — the discrete ancestor of CoSIM."""
import torch
from torch import nn

from ..registry import MODELS
from .base import unwrap
from .semi_implicit import SemiImplicitDistiller


@MODELS.register_module()
class HSIVIDistiller(SemiImplicitDistiller):
    """HSIVI-SM for diffusion acceleration as a semi-implicit distiller.

    The model: layers q_φ(x_{t_{k+1}} | x_{t_k}), k = 0..K−1, on the time grid of the
    ``time_sampler`` (``LayerTimeSampler``), each a ``HierarchicalGaussianKernel`` step — mean
    through the teacher's parameterisation (x̂₀ = G_φ(x_{t_k}, t_k), a DDIM-η step) and std
    γ_k·c₁ with a learnable log γ_k. The K scales are the parameter ``log_std_scale`` of the
    generator network (so the generator's optimiser and EMA carry them, and the sampler finds
    them on the network it is given). G is one network shared by the layers, as in HSIVI.

    The objective (HSIVI §3): Σ_k β(k)·D_Fisher(q_k ‖ p_{t_{k+1}}) with q_k the k-th layer's
    marginal, its input x_{t_k} drawn from the model's own chain simulated from the prior through
    layers 0..k−1 without gradient (layers above k are fixed while layer k learns), a layer k
    per training sample. Each Fisher divergence is SIVI-SM's two-stage form (Yu & Zhang 2023),
    i.e. GFI[h] with h = ‖·‖²/(4α), α = ½, λ = 0 (coef = α(1+λ) = ½): the ψ-stage optimum is the
    conditional score itself (β = 1 in CoSIM eq. 16), reached by denoising score matching of f_ψ on
    ∇log q_φ(x_{t_{k+1}} | x_{t_k}), and the φ-stage is E⟨S − ∇log q, S − f_ψ⟩ − ½‖S − f_ψ‖².
    β(k) is the time sampler's ``weight``; ``aux_steps`` ψ-updates run per φ-update (HSIVI's
    public CIFAR-10 setting: 20).

    Everything but the kernel's step and the mixing samples — the two stages, the divergence, the
    optimisers, the alternation, the EMA — is SemiImplicitDistiller's. ``init_log_std_scale``:
    the starting log γ_k (0: the teacher's DDIM-η step)."""

    def __init__(self, teacher,
                 kernel=dict(type='HierarchicalGaussianKernel', eta=0.2),
                 divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=0.5), coef=0.5,
                                 generator_weight='none', aux_weight='none'),
                 time_sampler=dict(type='LayerTimeSampler', num_steps=4),
                 sampler=dict(type='HierarchicalSampler', num_steps=4),
                 init_log_std_scale=0.0, **kwargs):
        super().__init__(teacher, kernel=kernel, divergence=divergence, time_sampler=time_sampler,
                         sampler=sampler, **kwargs)
        with torch.no_grad():
            for net in (unwrap(self.generator), self.generator_ema):
                if net is not None:
                    net.log_std_scale.fill_(float(init_log_std_scale))
        self._check_sampler()

    # --- set-up -------------------------------------------------------------------------------
    @property
    def num_layers(self):
        return self.time_sampler.num_steps

    def make_ema(self):
        """The layers' std scales belong to the generator: added before its EMA copy is taken."""
        if not hasattr(self.kernel, 'mean_std'):
            raise TypeError(f'HSIVIDistiller needs a layer kernel (HierarchicalGaussianKernel), '
                            f'got {type(self.kernel).__name__}')
        if not (hasattr(self.time_sampler, 'layer_times') and hasattr(self.time_sampler, 'num_steps')):
            raise TypeError(f'HSIVIDistiller needs a layer time sampler (LayerTimeSampler), '
                            f'got {type(self.time_sampler).__name__}')
        net = unwrap(self.generator)
        if not isinstance(getattr(net, 'log_std_scale', None), nn.Parameter):
            net.register_parameter('log_std_scale', nn.Parameter(torch.zeros(self.num_layers)))
        elif tuple(net.log_std_scale.shape) != (self.num_layers,):
            raise ValueError(f'the generator\'s log_std_scale has shape {tuple(net.log_std_scale.shape)}, '
                             f'but the time sampler has {self.num_layers} layers')
        super().make_ema()

    def _check_sampler(self):
        """The default sampler must run the layers that are trained: same grid, same kernel."""
        sampler = self.sampler
        if sampler is None or not hasattr(sampler, 'sigmas') or not hasattr(sampler, 'kernel'):
            return
        mine = self.time_sampler.sigmas()
        theirs = sampler.sigmas() if callable(sampler.sigmas) else sampler.sigmas
        if theirs.shape != mine.shape or not torch.allclose(theirs, mine, rtol=1e-9, atol=0):
            raise ValueError(f'the sampler\'s noise levels {[round(float(v), 4) for v in theirs]} differ from '
                             f'the trained layers\' {[round(float(v), 4) for v in mine]}: give both the same grid')
        if getattr(sampler.kernel, 'eta', None) != getattr(self.kernel, 'eta', None):
            raise ValueError(f'the sampler\'s kernel {sampler.kernel!r} differs from the trained one '
                             f'{self.kernel!r}: give both the same eta')

    # --- one layer ----------------------------------------------------------------------------
    def layer_step(self, net, x_t, s, t, layer, labels, noise):
        """x_{t_{k+1}} ~ q_φ(· | x_{t_k}) for per-sample layers ``layer``: (sample, mean, std)."""
        x0 = self.denoise(net, x_t, t, labels)
        log_scale = unwrap(net).log_std_scale[layer]
        mean, std = self.kernel.mean_std(x_t, x0, s, t, self.schedule, log_scale)
        return self.kernel.sample(mean, std, noise), mean, std

    @torch.no_grad()
    def mixing_samples(self, pairs, labels):
        """x_{t_k} for each sample's layer k: the prior for k = 0, else the model's own chain run from
        the prior through layers 0..k−1 (HSIVI's simulation; no gradient reaches the layers above)."""
        layer = pairs['layer']
        n, sched = layer.shape[0], self.schedule
        zeros = torch.zeros((n,) + self.data_shape, device=self.device_)
        times = self.time_sampler.layer_times(sched).to(device=self.device_, dtype=zeros.dtype)
        x = sched.add_noise(zeros, times[0].expand(n), self._randn(n))
        net = self.generator_ema if (self.mixing_network == 'ema' and self.generator_ema is not None) \
            else unwrap(self.generator)
        for j in range(int(layer.max()) if n else 0):
            go = layer > j
            m = int(go.sum())
            x[go] = self.layer_step(net, x[go], times[j + 1].expand(m), times[j].expand(m),
                                    torch.full((m,), j, device=self.device_, dtype=torch.long),
                                    labels[go] if labels is not None else None, self._randn(m))[0]
        return x

    def kernel_pass(self, n, labels, stage, grad):
        """One layer per sample: x_s = q_φ(x_s | x_t) with x_t from the chain, and the teacher's
        denoiser f_φ(x_s). Under the key ``x0`` it hands the stages the conditional score in
        denoiser units, x̃ (the kernel's ``conditional_x0``), where CoSIM's Gaussian kernel has
        x̂₀: the divergence then compares f_φ − x̃ (∝ S − ∇log q) with f_φ − f_ψ (∝ S − f_ψ)."""
        pairs, x_t = self._draw(n, labels, stage)
        s, t = pairs['s'], pairs['t']
        with torch.set_grad_enabled(grad):
            net = self.generator if grad else unwrap(self.generator)
            x_s, mean, std = self.layer_step(net, x_t, s, t, pairs['layer'], labels, self._randn(n))
            target = self.kernel.conditional_x0(x_s, mean, std, s, self.schedule)
            f_phi = self.teacher.denoise(x_s, s, self.schedule, labels)
        return dict(pairs=pairs, x0=target, x_s=x_s, f_phi=f_phi)
