import torch

from ..registry import SCHEDULES
from .base import NoiseSchedule, _check_range


@SCHEDULES.register_module()
class VPSchedule(NoiseSchedule):
    """Variance preserving with linear β(t) = β_min + β_d·t (Song et al. 2021, eq. 33; EDM
    Table 1 "VP"): a(t) = exp(−¼β_d t² − ½β_min t), σ(t) = √(1 − a(t)²), t ∈ [ε_t, 1].

    The EDM noise level is σ_e(t) = √(exp(½β_d t² + β_min t) − 1) (EDM eq. 7's σ(t)).
    β_d = 0, β_min = 2 gives the Ornstein–Uhlenbeck form a = e^{−t}."""

    def __init__(self, beta_d=19.9, beta_min=0.1, t_min=1e-5, t_max=1.0):
        if beta_d < 0 or beta_min < 0 or beta_d + beta_min <= 0:
            raise ValueError(f'VPSchedule: need beta_d, beta_min >= 0 and not both 0, got {beta_d}, {beta_min}')
        _check_range('VPSchedule', t_min, t_max)
        if t_min < 0:
            raise ValueError(f'VPSchedule: need t_min >= 0, got {t_min}')
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def _exponent(self, t):  # ∫₀ᵗ β = ½β_d t² + β_min t
        t = torch.as_tensor(t)
        return 0.5 * self.beta_d * t ** 2 + self.beta_min * t

    def alpha(self, t):
        return torch.exp(-0.5 * self._exponent(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._exponent(t)))

    def d_alpha(self, t):
        t = torch.as_tensor(t)
        return -0.5 * (self.beta_d * t + self.beta_min) * self.alpha(t)

    def d_sigma(self, t):
        t = torch.as_tensor(t)
        # d/dt √(1 − a²) = −a·a' / σ
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def edm_sigma(self, t):
        return torch.sqrt(torch.expm1(self._exponent(t)))

    def t_from_edm_sigma(self, sigma_e):
        L = torch.log1p(torch.as_tensor(sigma_e) ** 2)  # ½β_d t² + β_min t = log(1 + σ_e²)
        if self.beta_d == 0:
            return L / self.beta_min
        return (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * L) - self.beta_min) / self.beta_d
