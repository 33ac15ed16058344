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

**The network's own noise range.** Like EDM's ``generate.py`` ``edm_sampler``, the samplers
adapt the grid to the network they integrate: σ_min and σ_max are first clamped to the
network's range (``max(σ_min, net.sigma_min)``, ``min(σ_max, net.sigma_max)``: 0.02–100 for a
VE network, u_{M−1}–u_0 for iDDPM), then every σ_i is snapped with ``net.round_sigma`` (iDDPM's
discrete levels; the identity for the others). The network's ``sigma_min``, ``sigma_max`` and
``round_sigma`` are read from the denoiser passed in: a teacher or network that has them, or
the ``network`` inside a teacher (:func:`noise_level_range`); a plain function keeps the
nominal grid. ``follow_network=False`` switches this off.

The state is kept in float64 (as EDM's reference sampler does); the denoiser is called with
``x`` and ``sigma`` in ``noise``'s dtype (so a float32 network is fed float32) and its output
is promoted back to float64. The samples come back in ``noise``'s dtype. The samplers do
not switch autograd off: wrap the call in ``torch.no_grad()`` when no gradient is wanted.
"""
import math
import numbers

import torch

from ..registry import SAMPLERS


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


def _ramp(num_steps, sigma_min, sigma_max, rho):
    """EDM eq. 5 in float64, written as ``edm_sampler`` of NVlabs/edm generate.py evaluates it."""
    if num_steps == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64, device='cpu')
    i = torch.arange(num_steps, dtype=torch.float64, device='cpu')
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (num_steps - 1) * (lo - hi)) ** rho


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float64,
                    round_sigma=None):
    """The N + 1 noise levels σ_0 > … > σ_{N−1} > σ_N = 0 of EDM's samplers: the ρ-ramp of
    Karras et al. 2022 eq. 5 (σ_0 = σ_max, σ_{N−1} = σ_min) followed by σ_N = 0, on the CPU.

    With N = 1 the ramp is the single level σ_max (one step straight to σ = 0).
    ``round_sigma`` (e.g. a network's ``round_sigma``) snaps each level of the ramp, as
    ``edm_sampler`` does with ``net.round_sigma``."""
    _check_grid_args('edm_sigma_steps', num_steps, sigma_min, sigma_max, rho)
    ramp = _ramp(int(num_steps), float(sigma_min), float(sigma_max), float(rho))
    if round_sigma is not None:
        ramp = torch.as_tensor(round_sigma(ramp)).to(device='cpu', dtype=torch.float64)
    return torch.cat([ramp, ramp.new_zeros(1)]).to(dtype)


def noise_level_range(denoiser):
    """``(sigma_min, sigma_max, round_sigma)`` that ``denoiser`` declares, as EDM's networks do
    (``EDMPrecond``: 0, ∞, identity; ``VEPrecond``: 0.02, 100, identity; ``iDDPMPrecond``: its
    lowest and highest level, nearest level). Looked up on the denoiser itself, on the object of
    a bound method, then on a wrapped ``module`` or a teacher's ``network``; ``None`` when none
    of them declares any (e.g. a plain function: the grid stays as configured)."""
    obj = getattr(denoiser, '__self__', denoiser)
    for cand in (obj, getattr(obj, 'module', None), getattr(obj, 'network', None)):
        if cand is None:
            continue
        has = [hasattr(cand, k) for k in ('sigma_min', 'sigma_max', 'round_sigma')]
        if any(has):
            lo = float(getattr(cand, 'sigma_min', 0.0) or 0.0)
            hi = float(getattr(cand, 'sigma_max', math.inf))
            return lo, hi, getattr(cand, 'round_sigma', None)
    return None


class _EDMGridSampler:
    """Shared parts of the samplers below: the σ-grid, argument checks, the call of the
    denoiser, repr. Subclasses define ``nfe`` and ``__call__``."""

    def __init__(self, num_steps, sigma_min, sigma_max, rho, follow_network=True):
        _check_grid_args(type(self).__name__, num_steps, sigma_min, sigma_max, rho)
        if not isinstance(follow_network, bool):
            raise TypeError(f'{type(self).__name__}: follow_network must be True or False, got '
                            f'{follow_network!r}')
        self._num_steps = int(num_steps)
        self._sigma_min = float(sigma_min)
        self._sigma_max = float(sigma_max)
        self._rho = float(rho)
        self._follow_network = follow_network
        self._sigmas = edm_sigma_steps(self._num_steps, self._sigma_min, self._sigma_max,
                                       self._rho)

    num_steps = property(lambda self: self._num_steps)
    sigma_min = property(lambda self: self._sigma_min)
    sigma_max = property(lambda self: self._sigma_max)
    rho = property(lambda self: self._rho)

    follow_network = property(lambda self: self._follow_network)

    @property
    def sigmas(self):
        """float64 tensor of the N + 1 noise levels, σ_0 = σ_max … σ_{N−1} = σ_min, σ_N = 0
        (a copy: changing it does not change the sampler), for a network with no range of its
        own; ``sigmas_for(denoiser)`` gives the grid a given network is sampled on."""
        return self._sigmas.clone()

    def _range_for(self, denoiser):
        """(σ_min, σ_max, round_sigma) of the grid for ``denoiser``: the configured ends clamped
        to the network's range, as ``edm_sampler`` of NVlabs/edm generate.py clamps them."""
        spec = noise_level_range(denoiser) if self._follow_network else None
        if spec is None:
            return self._sigma_min, self._sigma_max, None
        net_min, net_max, round_sigma = spec
        lo, hi = max(self._sigma_min, net_min), min(self._sigma_max, net_max)
        if not 0 < lo < hi:
            raise ValueError(f'{type(self).__name__}: the grid [{self._sigma_min}, '
                             f'{self._sigma_max}] clamped to the network\'s noise range '
                             f'[{net_min}, {net_max}] is empty ([{lo}, {hi}]); choose sigma_min/'
                             'sigma_max inside the network\'s range')
        return lo, hi, round_sigma

    def sigmas_for(self, denoiser):
        """The float64 grid (N + 1 levels, last 0) this sampler uses on ``denoiser``: clamped
        to the network's range and snapped with its ``round_sigma`` (see the module doc)."""
        lo, hi, round_sigma = self._range_for(denoiser)
        if round_sigma is None and (lo, hi) == (self._sigma_min, self._sigma_max):
            return self._sigmas.clone()
        return edm_sigma_steps(self._num_steps, lo, hi, self._rho, round_sigma=round_sigma)

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
        f = dict(num_steps=self._num_steps, sigma_min=self._sigma_min,
                 sigma_max=self._sigma_max, rho=self._rho)
        if not self._follow_network:
            f['follow_network'] = False
        return f

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
        follow_network (bool): clamp the grid to the network's σ range and snap it with its
            ``round_sigma``, as EDM's ``edm_sampler`` does (default); False keeps the grid
            as configured.
    """

    def __init__(self, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0, follow_network=True):
        super().__init__(num_steps, sigma_min, sigma_max, rho, follow_network)
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

    def _gammas(self, sigmas=None):
        """γ_i of Algorithm 2 for the N steps of ``sigmas`` (default: the nominal grid), zero
        where σ_i lies outside [S_min, S_max]."""
        g = min(self._S_churn / self._num_steps, math.sqrt(2.0) - 1.0)
        s = (self._sigmas if sigmas is None else sigmas)[:-1]
        inside = (s >= self._S_min) & (s <= self._S_max)
        return torch.where(inside, torch.full_like(s, g), torch.zeros_like(s))

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        self._check_noise(type(self).__name__, noise)
        dtype = noise.dtype
        round_sigma = self._range_for(denoiser)[2]
        grid = self.sigmas_for(denoiser)
        sigmas = grid.tolist()
        gammas = self._gammas(grid).tolist()
        n = self._num_steps
        x_next = noise.to(torch.float64) * sigmas[0]
        for i in range(n):
            s_cur, s_next, gamma = sigmas[i], sigmas[i + 1], gammas[i]
            x_cur = x_next
            # Churn: raise the noise level from σ_i to σ̂ = (1 + γ)σ_i with fresh noise (σ̂
            # snapped to the network's levels, as edm_sampler does; with γ = 0 σ̂ = σ_i).
            s_hat = s_cur + gamma * s_cur
            if gamma > 0 and round_sigma is not None:
                s_hat = float(round_sigma(torch.tensor(s_hat, dtype=torch.float64,
                                                       device='cpu')))
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
        follow_network (bool): as for :class:`EDMHeunSampler`.
    """

    def __init__(self, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 follow_network=True):
        super().__init__(num_steps, sigma_min, sigma_max, rho, follow_network)

    @property
    def nfe(self):
        """Denoiser calls per sample: N."""
        return self._num_steps

    stochastic = property(lambda self: False)

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        """``generator`` is accepted for the shared interface; Euler draws no noise."""
        self._check_noise(type(self).__name__, noise)
        dtype = noise.dtype
        sigmas = self.sigmas_for(denoiser).tolist()
        x = noise.to(torch.float64) * sigmas[0]
        for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = (x - self._denoise(denoiser, x, s_cur, class_labels, dtype)) / s_cur
            x = x + (s_next - s_cur) * d
        return x.to(dtype)
