import math

import torch

from ..registry import SCHEDULES
from .base import NoiseSchedule, _check_range


@SCHEDULES.register_module()
class CosineSchedule(NoiseSchedule):
    """The cosine variance-preserving schedule of Nichol & Dhariwal 2021 (eq. 17), in continuous
    time t ∈ [0, 1] (their t/T):

        ᾱ(t) = f(t)/f(0),   f(t) = cos²(u(t)),   u(t) = (t + s)/(1 + s)·π/2,

    so a(t) = √ᾱ(t) = cos u(t)/cos u(0) and σ(t) = √(1 − ᾱ(t)); the offset s (0.008) keeps the
    noise at t = 0 from vanishing too fast. SIDDM (Xu et al. 2023) and DDGAN train on T-step
    discretisations of it.

    ᾱ(1) = 0 makes the EDM noise level σ_e = σ/a infinite at t = 1, so ``t_max`` must be < 1
    (the paper clips β_t at 0.999 for the same reason); the default 0.999 has σ_e ≈ 640, where
    x_{t_max} differs from N(0, I) by a(t_max) ≈ 0.0016 times the data.

    EDM noise level in closed form: σ_e² = (1 − a²)/a², so a = 1/√(1 + σ_e²) and
    t = (1 + s)·(2/π)·arccos(cos u(0)/√(1 + σ_e²)) − s."""

    def __init__(self, s=0.008, t_min=0.0, t_max=0.999):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f'CosineSchedule: the offset s must be finite and > 0, got {s}')
        _check_range('CosineSchedule', t_min, t_max)
        if t_min < 0 or t_max >= 1:
            raise ValueError(f'CosineSchedule: need 0 <= t_min < t_max < 1 (a(1) = 0, so the EDM noise level '
                             f'is infinite at t = 1); got t_min={t_min}, t_max={t_max}')
        self.s, self.t_min, self.t_max = float(s), float(t_min), float(t_max)

    def _u(self, t):
        return (torch.as_tensor(t) + self.s) / (1 + self.s) * (math.pi / 2)

    @property
    def _cos_u0(self):
        return math.cos(self.s / (1 + self.s) * math.pi / 2)

    def alpha(self, t):
        return torch.cos(self._u(t)) / self._cos_u0

    def sigma(self, t):
        a = self.alpha(t)
        return torch.sqrt((1 - a) * (1 + a))   # 1 − a² without cancellation near a = 1

    def d_alpha(self, t):
        return -torch.sin(self._u(t)) / self._cos_u0 * (math.pi / (2 * (1 + self.s)))

    def d_sigma(self, t):
        # d/dt √(1 − a²) = −a·a'/σ
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_edm_sigma(self, sigma_e):
        sigma_e = torch.as_tensor(sigma_e)
        u = torch.arccos(self._cos_u0 / torch.sqrt(1 + sigma_e ** 2))
        return u * (2 * (1 + self.s) / math.pi) - self.s
