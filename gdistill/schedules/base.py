"""Noise schedules: x_t = a(t)·x₀ + σ(t)·ε, ε ~ N(0, I).

Every schedule is fixed by (a, σ) and compared with any other through its log signal-to-noise
ratio λ(t) = 2·log(a(t)/σ(t)), or equivalently its *EDM noise level* σ_e(t) = σ(t)/a(t): the
scaled variable x_t / a(t) = x₀ + σ_e(t)·ε is EDM's x at noise level σ_e (Karras et al. 2022,
eq. 4 with s(t) = a(t)). Conversions between schedules run in float64.
"""
import math

import torch

from ..utils import append_dims


class NoiseSchedule:
    """Base class. Subclasses define ``alpha``, ``sigma``, their derivatives and
    ``t_from_edm_sigma`` in closed form; everything else is derived here."""

    t_min: float
    t_max: float

    # --- per-schedule closed forms -------------------------------------------------------
    def alpha(self, t):
        raise NotImplementedError(f'{type(self).__name__} must define alpha(t)')

    def sigma(self, t):
        raise NotImplementedError(f'{type(self).__name__} must define sigma(t)')

    def d_alpha(self, t):
        raise NotImplementedError(f'{type(self).__name__} must define d_alpha(t)')

    def d_sigma(self, t):
        raise NotImplementedError(f'{type(self).__name__} must define d_sigma(t)')

    def t_from_edm_sigma(self, sigma_e):
        raise NotImplementedError(f'{type(self).__name__} must define t_from_edm_sigma')

    # --- derived ---------------------------------------------------------------------------
    def edm_sigma(self, t):
        """σ_e(t) = σ(t)/a(t), the EDM noise level of equal SNR."""
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t):
        """λ(t) = log(a²/σ²) = −2·log σ_e(t)."""
        return -2.0 * torch.log(self.edm_sigma(t))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return self.t_from_edm_sigma(torch.exp(-0.5 * lam))

    def convert_time(self, t, other):
        """The time in schedule ``other`` whose SNR equals this schedule's SNR at ``t``
        (computed in float64, returned in ``t``'s dtype)."""
        t = torch.as_tensor(t)
        out = other.t_from_edm_sigma(self.edm_sigma(t.to(torch.float64)))
        return out.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def prior_std(self, sigma_data=0.5):
        """Std of x_{t_max} per coordinate for data of std ``sigma_data``."""
        t = torch.tensor(self.t_max, dtype=torch.float64)
        return float(torch.sqrt(self.alpha(t) ** 2 * sigma_data ** 2 + self.sigma(t) ** 2))

    # --- the few formulas every method needs ------------------------------------------------
    def add_noise(self, x0, t, noise):
        """x_t = a(t)·x₀ + σ(t)·ε."""
        return append_dims(self.alpha(t), x0.ndim) * x0 + append_dims(self.sigma(t), x0.ndim) * noise

    def score_from_x0(self, x_t, x0_hat, t):
        """Tweedie's identity: ∇ log p_t(x_t) = (a(t)·E[x₀|x_t] − x_t) / σ(t)².

        The one place the package turns a denoiser into a score (DESIGN: written once)."""
        a = append_dims(self.alpha(t), x_t.ndim)
        s = append_dims(self.sigma(t), x_t.ndim)
        return (a * x0_hat - x_t) / s ** 2

    def x0_from_score(self, x_t, score, t):
        a = append_dims(self.alpha(t), x_t.ndim)
        s = append_dims(self.sigma(t), x_t.ndim)
        return (x_t + s ** 2 * score) / a

    def edm_time_grid(self, n, rho=7.0, sigma_min=None, sigma_max=None, dtype=torch.float64):
        """``n`` times (decreasing) whose EDM noise levels follow EDM's ρ-ramp
        σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. eq. 5)."""
        smin = float(self.edm_sigma(torch.tensor(self.t_min, dtype=torch.float64))) \
            if sigma_min is None else sigma_min
        smax = float(self.edm_sigma(torch.tensor(self.t_max, dtype=torch.float64))) \
            if sigma_max is None else sigma_max
        u = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        sig = (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        return self.t_from_edm_sigma(sig).to(dtype)

    def __repr__(self):
        fields = ', '.join(f'{k}={v}' for k, v in vars(self).items())
        return f'{type(self).__name__}({fields})'


def _check_range(name, t_min, t_max):
    if not (math.isfinite(t_min) and math.isfinite(t_max) and t_min < t_max):
        raise ValueError(f'{name}: need finite t_min < t_max, got t_min={t_min}, t_max={t_max}')
