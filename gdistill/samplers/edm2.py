"""EDM2's sampler (Karras et al. 2024; official ``edm_sampler`` in NVlabs/edm2
generate_images.py:75-117), with guidance by a separate guide network as EDM2's "guid" and
"autog" presets use (Karras et al. 2024b, "Guiding a Diffusion Model with a Bad Version of
Itself", eq. 1).

It is EDM's Heun sampler (Karras et al. 2022, Algorithms 1-2) with EDM2's differences: the
ρ-ramp σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ is computed **in float32**
(σ_0 = 79.999985, σ_{N−1} = 0.0019999996 at the defaults) followed by σ_N = 0, the state is
float32, and there is **no clamping of the grid to the network's σ range and no round_sigma**.
The guided denoiser is D̃ = D_guide + w·(D − D_guide), the guide receiving the same labels; at
w = 1 the guide is never called.
"""
import math
import numbers

import torch

from ..registry import SAMPLERS, TEACHERS, build
from .edm import _check_grid_args

_STATE_DTYPES = {'float32': torch.float32, 'float64': torch.float64}


def edm2_sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float32,
                     device=None):
    """EDM2's N + 1 noise levels, computed as generate_images.py:96-98 computes them: the ramp
    in ``dtype`` (float32 there) from a float32 index vector, then σ_N = 0. N = 1 gives
    [σ_max, 0]."""
    _check_grid_args('edm2_sigma_steps', num_steps, sigma_min, sigma_max, rho)
    n = int(num_steps)
    if n == 1:
        ramp = torch.full((1,), float(sigma_max), dtype=dtype, device=device)
    else:
        idx = torch.arange(n, dtype=dtype, device=device)
        ramp = (sigma_max ** (1 / rho) + idx / (n - 1)
                * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([ramp, torch.zeros_like(ramp[:1])])


@SAMPLERS.register_module()
class EDM2Sampler:
    """EDM2's deterministic (or churned) Heun sampler with optional guidance.

    Args:
        num_steps (int): N ≥ 1 (32 in EDM2: NFE 2N − 1 = 63).
        sigma_min, sigma_max, rho: the ramp, 0.002 / 80 / 7 as in EDM2.
        guidance (float): w; 1 means no guidance.
        guide: the guide network D_guide(x, σ, labels) — a TEACHERS config (e.g.
            ``dict(type='EDM2Teacher', path='edm2-img512-xs-uncond-2147483-0.045.pkl')``) or a
            built module/callable. Needed when w ≠ 1.
        S_churn, S_min, S_max, S_noise: EDM's stochastic churn (0 = deterministic, EDM2's
            default); the extra noise is drawn from ``generator``.
        dtype (str): the state's precision, ``'float32'`` as in EDM2 (``'float64'`` allowed).

    ``sampler(denoiser, noise, class_labels=None, generator=None)`` returns x at σ = 0 in
    ``noise``'s dtype; ``denoiser(x, sigma [B], class_labels)`` is called 2N − 1 times
    (``nfe``), the guide as often when w ≠ 1 (``guide_nfe``).
    """

    def __init__(self, num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.0,
                 guide=None, S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0,
                 dtype='float32'):
        name = type(self).__name__
        _check_grid_args(name, num_steps, sigma_min, sigma_max, rho)
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) \
                or not math.isfinite(guidance):
            raise ValueError(f'{name}: guidance must be a finite number (1 = no guidance), '
                             f'got {guidance!r}')
        if guidance != 1 and guide is None:
            raise ValueError(f'{name}: guidance={guidance} needs a guide network (guide=, e.g. '
                             "dict(type='EDM2Teacher', path=...) of an unconditional or smaller "
                             'EDM2 net); use guidance=1 for none')
        for k, v in (('S_churn', S_churn), ('S_min', S_min), ('S_max', S_max), ('S_noise', S_noise)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ValueError(f'{name}: {k} must be a real number, got {v!r}')
        if not math.isfinite(S_churn) or S_churn < 0:
            raise ValueError(f'{name}: S_churn must be finite and >= 0, got {S_churn}')
        if dtype not in _STATE_DTYPES:
            raise ValueError(f'{name}: dtype must be one of {sorted(_STATE_DTYPES)}, got {dtype!r}')
        self.num_steps, self.sigma_min, self.sigma_max, self.rho = (
            int(num_steps), float(sigma_min), float(sigma_max), float(rho))
        self.guidance = float(guidance)
        self.guide = build(TEACHERS, guide) if isinstance(guide, dict) else guide
        if self.guide is not None and not callable(self.guide):
            raise TypeError(f'{name}: guide must be a TEACHERS config or a callable network, got '
                            f'{type(self.guide).__name__}')
        self.S_churn, self.S_min, self.S_max, self.S_noise = (
            float(S_churn), float(S_min), float(S_max), float(S_noise))
        self.dtype = _STATE_DTYPES[dtype]

    @property
    def nfe(self):
        """Denoiser calls per sample: 2N − 1."""
        return 2 * self.num_steps - 1

    @property
    def guide_nfe(self):
        """Guide calls per sample: 2N − 1 when guided, else 0."""
        return self.nfe if self.guidance != 1 else 0

    @property
    def sigmas(self):
        """The N + 1 noise levels in the state's dtype (float32: EDM2's own grid)."""
        return edm2_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max, self.rho, self.dtype)

    def _denoise(self, denoiser, x, sigma, labels):
        sig = sigma.expand(x.shape[0])
        out = denoiser(x, sig, labels)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f'{type(self).__name__}: the denoiser must return a tensor of the '
                             f'input shape {tuple(x.shape)}, got {got}')
        out = out.to(self.dtype)
        if self.guidance == 1:
            return out
        ref = self.guide(x, sig, labels).to(self.dtype)
        return ref.lerp(out, self.guidance)

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
            raise TypeError(f'{type(self).__name__}: noise must be a floating-point tensor [B, ...]')
        if isinstance(self.guide, torch.nn.Module) and self.guidance != 1:
            self.guide.to(noise.device)
        t_steps = edm2_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max, self.rho,
                                   self.dtype, noise.device)
        n = self.num_steps
        gamma0 = min(self.S_churn / n, math.sqrt(2) - 1)
        x_next = noise.to(self.dtype) * t_steps[0]
        for i in range(n):
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            x_cur = x_next
            if self.S_churn > 0 and self.S_min <= float(t_cur) <= self.S_max:
                t_hat = t_cur + gamma0 * t_cur
                eps = torch.randn(x_cur.shape, generator=generator, dtype=x_cur.dtype,
                                  device=x_cur.device)
                x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * self.S_noise * eps
            else:
                t_hat, x_hat = t_cur, x_cur
            d_cur = (x_hat - self._denoise(denoiser, x_hat, t_hat, class_labels)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if i < n - 1:
                d_prime = (x_next - self._denoise(denoiser, x_next, t_next, class_labels)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next.to(noise.dtype)

    def __repr__(self):
        guide = type(self.guide).__name__ if self.guide is not None else None
        return (f'{type(self).__name__}(num_steps={self.num_steps}, sigma_min={self.sigma_min}, '
                f'sigma_max={self.sigma_max}, rho={self.rho}, guidance={self.guidance}, '
                f'guide={guide}, S_churn={self.S_churn}, nfe={self.nfe})')
