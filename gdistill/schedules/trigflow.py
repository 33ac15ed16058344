import math

import torch

from ..registry import SCHEDULES
from .base import NoiseSchedule


@SCHEDULES.register_module()
class TrigFlowSchedule(NoiseSchedule):
    """TrigFlow (Lu & Song 2024, eq. 1): x_t = cos t·x₀ + sin t·z with z ~ N(0, σ_d² I), so in
    this package's ε-convention a(t) = cos t, σ(t) = σ_d·sin t, t ∈ [0, π/2).

    Its EDM noise level is σ_e = σ_d·tan t. The default range matches σ_e ∈ [0.002, 80]."""

    def __init__(self, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0):
        if sigma_data <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError('TrigFlowSchedule: need sigma_data > 0 and 0 < sigma_min < sigma_max, '
                             f'got {sigma_data}, {sigma_min}, {sigma_max}')
        self.sigma_data = float(sigma_data)
        self.t_min = math.atan(sigma_min / sigma_data)
        self.t_max = math.atan(sigma_max / sigma_data)

    def alpha(self, t):
        return torch.cos(torch.as_tensor(t))

    def sigma(self, t):
        return self.sigma_data * torch.sin(torch.as_tensor(t))

    def d_alpha(self, t):
        return -torch.sin(torch.as_tensor(t))

    def d_sigma(self, t):
        return self.sigma_data * torch.cos(torch.as_tensor(t))

    def edm_sigma(self, t):
        return self.sigma_data * torch.tan(torch.as_tensor(t))

    def t_from_edm_sigma(self, sigma_e):
        return torch.atan(torch.as_tensor(sigma_e) / self.sigma_data)
