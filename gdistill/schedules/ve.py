import math

import torch

from ..registry import SCHEDULES
from .base import NoiseSchedule, _check_range


@SCHEDULES.register_module()
class VESchedule(NoiseSchedule):
    """Variance exploding (Song et al. 2021, eq. 31): a(t) = 1,
    σ(t) = σ_min·(σ_max/σ_min)^t for t ∈ [0, 1]."""

    def __init__(self, sigma_min=0.002, sigma_max=80.0):
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f'VESchedule: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = 0.0, 1.0
        _check_range('VESchedule', self.t_min, self.t_max)

    @property
    def _log_ratio(self):
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * torch.as_tensor(t))

    def d_alpha(self, t):
        return torch.zeros_like(torch.as_tensor(t))

    def d_sigma(self, t):
        return self._log_ratio * self.sigma(t)

    def t_from_edm_sigma(self, sigma_e):
        return torch.log(torch.as_tensor(sigma_e) / self.sigma_min) / self._log_ratio
