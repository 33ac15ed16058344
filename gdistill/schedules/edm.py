import torch

from ..registry import SCHEDULES
from .base import NoiseSchedule


@SCHEDULES.register_module()
class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022, Table 1 "ours"): a(t) = 1, σ(t) = t, so t is the noise level."""

    def __init__(self, sigma_min=0.002, sigma_max=80.0):
        if not 0 < sigma_min < sigma_max < float('inf'):
            raise ValueError(f'EDMSchedule: need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}')
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def sigma(self, t):
        return torch.as_tensor(t)

    def d_alpha(self, t):
        return torch.zeros_like(torch.as_tensor(t))

    def d_sigma(self, t):
        return torch.ones_like(torch.as_tensor(t))

    def t_from_edm_sigma(self, sigma_e):
        return torch.as_tensor(sigma_e)
