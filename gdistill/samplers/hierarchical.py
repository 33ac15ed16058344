"""Sampling a hierarchical semi-implicit model: its K conditional layers in turn (HSIVI)."""
import torch

from ..registry import KERNELS, SAMPLERS, build
from ..schedules.edm import EDMSchedule
from ..time_samplers.hsivi import layer_sigmas


@SAMPLERS.register_module()
class HierarchicalSampler:
    """HSIVI's sampler (Yu et al. 2023): x = σ_0·z, then for k = 0..K−1 one layer
    x ← mean_k + std_k·ε of the kernel (``HierarchicalGaussianKernel``: x̂₀ = G(x; σ_k), a DDIM-η
    step to σ_{k+1} with std γ_k·c₁) with fresh ε. NFE = K. The last layer returns its mean,
    as HSIVI's sampler does (``final_noise=True`` adds its noise too).

    The std scales γ_k = exp(log_std_scale[k]) come from the denoiser's ``log_std_scale``
    parameter (the one HSIVIDistiller trains); a denoiser without one (e.g. the teacher) runs
    with γ = 1, i.e. the plain DDIM-η sampler on the same grid.

    Noise levels: ``layer_sigmas`` — the (K+1)-point ρ-ramp σ_max … σ_min, or ``sigmas``. It
    works in EDM variables (a = 1, σ = t); the kernel's step is schedule-free in x/a, so layers
    trained in another schedule's variables run here unchanged."""

    def __init__(self, num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigmas=None,
                 kernel=dict(type='HierarchicalGaussianKernel', eta=0.2), final_noise=False):
        self._sigmas = layer_sigmas(num_steps, sigma_min, sigma_max, rho, sigmas)
        self.num_steps = len(self._sigmas) - 1
        self.kernel = build(KERNELS, kernel)
        if not hasattr(self.kernel, 'mean_std'):
            raise TypeError(f'HierarchicalSampler needs a layer kernel with mean_std (e.g. '
                            f'HierarchicalGaussianKernel), got {type(self.kernel).__name__}')
        self.final_noise = bool(final_noise)
        self._edm = EDMSchedule()  # a = 1, σ = t: only its closed forms are used, not its range

    @property
    def nfe(self):
        return self.num_steps

    def sigmas(self):
        """The K + 1 noise levels σ_0 > … > σ_K (float64, a copy)."""
        return self._sigmas.clone()

    def log_scales(self, denoiser, device, dtype):
        """log γ_k of the K layers: the denoiser's ``log_std_scale``, or zeros if it has none."""
        p = getattr(denoiser, 'log_std_scale', None)
        if p is None:
            return torch.zeros(self.num_steps, device=device, dtype=dtype)
        if tuple(p.shape) != (self.num_steps,):
            raise ValueError(f'HierarchicalSampler with {self.num_steps} layers: the denoiser\'s log_std_scale '
                             f'must have shape ({self.num_steps},), got {tuple(p.shape)}')
        return p.detach().to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim < 1 or not noise.shape[0]:
            raise ValueError('HierarchicalSampler: noise must be a floating-point tensor [B, ...] with B >= 1')
        n, dtype, device = noise.shape[0], noise.dtype, noise.device
        sig = self._sigmas.tolist()
        log_scale = self.log_scales(denoiser, device, dtype)
        x = noise * sig[0]
        for k in range(self.num_steps):
            t = torch.full((n,), sig[k], dtype=dtype, device=device)
            s = torch.full((n,), sig[k + 1], dtype=dtype, device=device)
            x0 = denoiser(x, t, class_labels)
            mean, std = self.kernel.mean_std(x, x0, s, t, self._edm, log_scale[k].expand(n))
            if k + 1 == self.num_steps and not self.final_noise:
                return mean
            eps = torch.randn(noise.shape, generator=generator, device=device, dtype=dtype)
            x = self.kernel.sample(mean, std, eps)
        return x

    def __repr__(self):
        return (f'HierarchicalSampler(sigmas={[round(float(v), 4) for v in self._sigmas]}, '
                f'kernel={self.kernel!r}, final_noise={self.final_noise})')
