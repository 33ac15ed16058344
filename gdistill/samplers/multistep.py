"""Multistep sampling of a semi-implicit generator (CoSIM, Yu et al. 2025, Algorithm 1)."""
import torch

from ..registry import SAMPLERS
from ..time_samplers.semi_implicit import rho_ramp


@SAMPLERS.register_module()
class MultistepSampler:
    """CoSIM's Algorithm 1 in EDM variables: x = σ_0·z; for i = 0..K−1:
    x̂₀ = G(x; σ_i), then x ← x̂₀ + σ_{i+1}·ε with fresh ε (the Gaussian kernel of eq. 9), and
    the last x̂₀ is the sample. NFE = K.

    Noise levels: σ_0 = σ_max, then the K−1 interior points of a (K+1)-point ρ-ramp from σ_max
    to σ_min (Karras et al. eq. 5), each multiplied by ``scale`` (> 1 lands the later steps at
    noisier levels). ``sigmas`` gives the K levels explicitly instead. K = 1 with
    σ_max = σ_init is SiD's one-step generator."""

    def __init__(self, num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, scale=1.0, sigmas=None):
        if sigmas is not None:
            sigmas = [float(s) for s in sigmas]
            if not sigmas or any(s <= 0 for s in sigmas):
                raise ValueError(f'MultistepSampler: sigmas must be a non-empty list of positive '
                                 f'noise levels, got {sigmas}')
            num_steps = len(sigmas)
        if num_steps < 1:
            raise ValueError(f'MultistepSampler: num_steps must be >= 1, got {num_steps}')
        if not 0 < sigma_min < sigma_max or rho <= 0 or scale <= 0:
            raise ValueError('MultistepSampler: need 0 < sigma_min < sigma_max, rho > 0, scale > 0; '
                             f'got {sigma_min}, {sigma_max}, {rho}, {scale}')
        self.num_steps, self.sigma_min, self.sigma_max = int(num_steps), float(sigma_min), float(sigma_max)
        self.rho, self.scale, self._sigmas = float(rho), float(scale), sigmas

    @property
    def nfe(self):
        return self.num_steps

    def sigmas(self):
        """The K noise levels the generator is called at, in float64."""
        if self._sigmas is not None:
            return torch.tensor(self._sigmas, dtype=torch.float64, device='cpu')
        u = torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64, device='cpu')[:-1]
        sig = rho_ramp(u, self.sigma_min, self.sigma_max, self.rho)
        sig[1:] = (sig[1:] * self.scale).clamp(max=self.sigma_max)
        return sig

    @torch.no_grad()
    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        sig = self.sigmas()
        x = noise.to(torch.float64) * sig[0]
        for i in range(self.num_steps):
            sigma = torch.full((noise.shape[0],), float(sig[i]), dtype=noise.dtype, device=noise.device)
            x0 = denoiser(x.to(noise.dtype), sigma, class_labels).to(torch.float64)
            if i + 1 == self.num_steps:
                return x0.to(noise.dtype)
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x = x0 + float(sig[i + 1]) * eps.to(torch.float64)

    def __repr__(self):
        return (f'MultistepSampler(num_steps={self.num_steps}, sigmas='
                f'{[round(float(s), 4) for s in self.sigmas()]})')


def config_with_steps(cfg, steps):
    """A copy of the sampler config ``cfg`` with ``num_steps=steps`` (a tool's ``--steps``). A
    config that lists its levels (``sigmas``) fixes its own number of steps: asking it for another
    number is an error that names the levels, not a silent change of sampler."""
    cfg = dict(cfg)
    if not steps:
        return cfg
    sigmas = cfg.get('sigmas')
    if sigmas is not None and len(sigmas) != steps:
        raise ValueError(f"the config's sampler lists its noise levels sigmas={list(sigmas)} ({len(sigmas)} "
                         f"steps), so --steps {steps} cannot set its number of steps; give the levels "
                         f"instead: --sampler \"dict(type='{cfg.get('type')}', sigmas=[...])\" "
                         f"(or num_steps={steps} for the ρ-ramp)")
    cfg['num_steps'] = steps
    return cfg
