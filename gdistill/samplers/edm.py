"""EDM's ODE/SDE samplers (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models").

Both samplers work in EDM's variable x = x₀ + σ·n and integrate the probability-flow ODE
dx/dσ = (x − D(x; σ))/σ (EDM eq. 3 with s(t) = 1, σ(t) = t) from σ_max down to 0 on the
ρ-ramp of EDM eq. 5,

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  i = 0 … N−1,   σ_N = 0.

The sampler interface shared by the whole package::

    samples = sampler(denoiser, noise, class_labels=None, generator=None)

``denoiser(x, sigma, class_labels)`` returns x̂₀ with ``sigma`` a tensor of shape [B];
``noise`` is a standard-normal latent of the data's shape [B, ...] which the sampler scales
by σ_max; ``generator`` drives every extra random draw (stochastic churn), so a fixed
generator gives identical samples. ``sampler.nfe`` is the number of denoiser calls per sample.

The state is kept in float64 (as EDM's reference sampler does); the denoiser is called with
``x`` and ``sigma`` in ``noise``'s dtype (so a float32 network is fed float32) and its output
is promoted back to float64. The samples come back in ``noise``'s dtype. The samplers do
not switch autograd off: wrap the call in ``torch.no_grad()`` when no gradient is wanted.
"""
import math
import numbers

import torch

from ..registry import SAMPLERS
from ..schedules.edm import EDMSchedule


def _check_grid_args(owner, num_steps, sigma_min, sigma_max, rho):
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f'{owner}: num_steps must be an integer >= 1, got {num_steps!r}')
    if num_steps < 1:
        raise ValueError(f'{owner}: num_steps must be >= 1, got {num_steps}')
    for name, v in (('sigma_min', sigma_min), ('sigma_max', sigma_max), ('rho', rho)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f'{owner}: {name} must be a finite real number, got {v!r}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'{owner}: need 0 < sigma_min < sigma_max, '
                         f'got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if rho <= 0:
        raise ValueError(f'{owner}: rho must be > 0, got {rho}')


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float64):
    """The N + 1 noise levels σ_0 > … > σ_{N−1} > σ_N = 0 of EDM's samplers: the ρ-ramp of
    Karras et al. 2022 eq. 5 (σ_0 = σ_max, σ_{N−1} = σ_min) followed by σ_N = 0.

    With N = 1 the ramp is the single level σ_max (one step straight to σ = 0)."""
    _check_grid_args('edm_sigma_steps', num_steps, sigma_min, sigma_max, rho)
    ramp = EDMSchedule(sigma_min, sigma_max).edm_time_grid(int(num_steps), rho=rho,
                                                           dtype=torch.float64)
    return torch.cat([ramp, ramp.new_zeros(1)]).to(dtype)


class _EDMGridSampler:
    """Shared parts of the samplers below: the σ-grid, argument checks, the call of the
    denoiser, repr. Subclasses define ``nfe`` and ``__call__``."""

    def __init__(self, num_steps, sigma_min, sigma_max, rho):
        _check_grid_args(type(self).__name__, num_steps, sigma_min, sigma_max, rho)
        self._num_steps = int(num_steps)
        self._sigma_min = float(sigma_min)
        self._sigma_max = float(sigma_max)
        self._rho = float(rho)
        self._sigmas = edm_sigma_steps(self._num_steps, self._sigma_min, self._sigma_max,
                                       self._rho)

    num_steps = property(lambda self: self._num_steps)
    sigma_min = property(lambda self: self._sigma_min)
    sigma_max = property(lambda self: self._sigma_max)
    rho = property(lambda self: self._rho)

    @property
    def sigmas(self):
        """float64 tensor of the N + 1 noise levels, σ_0 = σ_max … σ_{N−1} = σ_min, σ_N = 0
        (a copy: changing it does not change the sampler)."""
        return self._sigmas.clone()

    @staticmethod
    def _check_noise(owner, noise):
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f'{owner}: noise must be a floating-point tensor, got '
                            f'{type(noise).__name__}'
                            + (f' of dtype {noise.dtype}' if isinstance(noise, torch.Tensor) else ''))
        if noise.ndim < 1 or noise.shape[0] == 0:
            raise ValueError(f'{owner}: noise must have shape [B, ...] with B >= 1, '
                             f'got {tuple(noise.shape)}')

    @staticmethod
    def _denoise(denoiser, x, sigma, class_labels, dtype):
        """One call of the denoiser at noise level ``sigma`` (a Python float) for every sample;
        x is handed over in ``dtype`` and the result comes back in float64."""
        sig = torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)
        out = denoiser(x.to(dtype), sig, class_labels)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f'the denoiser must return a tensor of the input shape '
                             f'{tuple(x.shape)}, got {got}')
        return out.to(torch.float64)

    def _fields(self):
        return dict(num_steps=self._num_steps, sigma_min=self._sigma_min,
                    sigma_max=self._sigma_max, rho=self._rho)

    def __repr__(self):
        fields = ', '.join(f'{k}={v!r}' for k, v in self._fields().items())
        return f'{type(self).__name__}({fields}, nfe={self.nfe})'


@SAMPLERS.register_module()
class EDMHeunSampler(_EDMGridSampler):
    """EDM's 2nd-order Heun sampler: Karras et al. 2022, Algorithm 1 (deterministic,
    ``S_churn = 0``) and Algorithm 2 (stochastic churn).

    Time steps follow eq. 5 (``edm_sigma_steps``) with σ_N = 0. At step i, when
    S_min ≤ σ_i ≤ S_max, the noise level is first raised to σ̂ = (1 + γ_i)·σ_i with
    γ_i = min(S_churn/N, √2 − 1) by adding fresh noise of std S_noise·√(σ̂² − σ_i²); then an
    Euler step to σ_{i+1} is taken and corrected with Heun's trapezoid rule on every step but
    the last (the last one lands on σ = 0 where the ODE's slope is undefined). The denoiser
    is therefore called 2N − 1 times per sample (``nfe``); e.g. N = 18 gives 35.

    Args:
        num_steps (int): N ≥ 1.
        sigma_min, sigma_max (float): ends of the ramp, 0 < σ_min < σ_max.
        rho (float): ρ > 0 of eq. 5.
        S_churn, S_min, S_max, S_noise (float): Algorithm 2's stochasticity settings;
            ``S_churn = 0`` (default) gives the deterministic Algorithm 1.
    """

    def __init__(self, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0):
        super().__init__(num_steps, sigma_min, sigma_max, rho)
        name = type(self).__name__
        for k, v in (('S_churn', S_churn), ('S_min', S_min), ('S_max', S_max),
                     ('S_noise', S_noise)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ValueError(f'{name}: {k} must be a real number, got {v!r}')
        if not math.isfinite(S_churn) or S_churn < 0:
            raise ValueError(f'{name}: S_churn must be finite and >= 0, got {S_churn}')
        if not math.isfinite(S_noise) or S_noise < 0:
            raise ValueError(f'{name}: S_noise must be finite and >= 0, got {S_noise}')
        if S_min < 0 or S_min > S_max:
            raise ValueError(f'{name}: need 0 <= S_min <= S_max, got S_min={S_min}, S_max={S_max}')
        self._S_churn, self._S_min = float(S_churn), float(S_min)
        self._S_max, self._S_noise = float(S_max), float(S_noise)

    S_churn = property(lambda self: self._S_churn)
    S_min = property(lambda self: self._S_min)
    S_max = property(lambda self: self._S_max)
    S_noise = property(lambda self: self._S_noise)

    @property
    def nfe(self):
        """Denoiser calls per sample: 2N − 1."""
        return 2 * self._num_steps - 1

    @property
    def stochastic(self):
        """True when some step adds churn noise (so ``generator`` matters)."""
        return bool(self._gammas().gt(0).any())

    def _gammas(self):
        """γ_i of Algorithm 2 for the N steps (zero outside [S_min, S_max])."""
        g = min(self._S_churn / self._num_steps, math.sqrt(2.0) - 1.0)
        s = self._sigmas[:-1]
        inside = (s >= self._S_min) & (s <= self._S_max)
        return torch.where(inside, torch.full_like(s, g), torch.zeros_like(s))

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        self._check_noise(type(self).__name__, noise)
        dtype = noise.dtype
        sigmas = self._sigmas.tolist()
        gammas = self._gammas().tolist()
        n = self._num_steps
        x_next = noise.to(torch.float64) * sigmas[0]
        for i in range(n):
            s_cur, s_next, gamma = sigmas[i], sigmas[i + 1], gammas[i]
            x_cur = x_next
            # Churn: raise the noise level from σ_i to σ̂ = (1 + γ)σ_i with fresh noise.
            s_hat = s_cur + gamma * s_cur
            if gamma > 0:
                eps = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64,
                                  device=x_cur.device)
                x_hat = x_cur + math.sqrt(s_hat ** 2 - s_cur ** 2) * self._S_noise * eps
            else:
                x_hat = x_cur
            # Euler step σ̂ → σ_{i+1}.
            d_cur = (x_hat - self._denoise(denoiser, x_hat, s_hat, class_labels, dtype)) / s_hat
            x_next = x_hat + (s_next - s_hat) * d_cur
            # Heun's 2nd-order correction, skipped on the last step (σ_{i+1} = 0).
            if i < n - 1:
                d_prime = (x_next - self._denoise(denoiser, x_next, s_next, class_labels,
                                                  dtype)) / s_next
                x_next = x_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next.to(dtype)

    def _fields(self):
        f = super()._fields()
        f.update(S_churn=self._S_churn, S_min=self._S_min, S_max=self._S_max,
                 S_noise=self._S_noise)
        return f


@SAMPLERS.register_module()
class EulerSampler(_EDMGridSampler):
    """1st-order Euler integration of EDM's probability-flow ODE on the grid of Karras et al.
    2022 eq. 5 (σ_N = 0): Algorithm 1 without the Heun correction. Deterministic; one
    denoiser call per step, so ``nfe`` = N. The last step (σ_min → 0) returns D(x; σ_min).

    Args:
        num_steps (int): N ≥ 1.
        sigma_min, sigma_max (float): ends of the ramp, 0 < σ_min < σ_max.
        rho (float): ρ > 0 of eq. 5.
    """

    def __init__(self, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        super().__init__(num_steps, sigma_min, sigma_max, rho)

    @property
    def nfe(self):
        """Denoiser calls per sample: N."""
        return self._num_steps

    stochastic = property(lambda self: False)

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        """``generator`` is accepted for the shared interface; Euler draws no noise."""
        self._check_noise(type(self).__name__, noise)
        dtype = noise.dtype
        sigmas = self._sigmas.tolist()
        x = noise.to(torch.float64) * sigmas[0]
        for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = (x - self._denoise(denoiser, x, s_cur, class_labels, dtype)) / s_cur
            x = x + (s_next - s_cur) * d
        return x.to(dtype)
