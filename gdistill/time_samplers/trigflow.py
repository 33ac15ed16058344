"""sCM's training-time distribution (Lu & Song 2024, Algorithm 1): log-normal on the EDM noise
level σ = σ_d·tan t of TrigFlow."""
import math

import torch

from ..registry import TIME_SAMPLERS


@TIME_SAMPLERS.register_module()
class TrigFlowLogNormalTimeSampler:
    """τ ~ N(P_mean, P_std²), t = arctan(e^τ/σ_d) (Lu & Song 2024, Algorithm 1; the paper's
    CIFAR-10 setting is P_mean = −1.0, P_std = 1.4), i.e. ln(σ_d tan t) ~ N(P_mean, P_std²) —
    EDM's training distribution of ln σ (Karras et al. 2022, §5) carried to TrigFlow by equal
    SNR. Times are handed back in the distiller's schedule (``schedule.t_from_edm_sigma``, so a
    TrigFlow schedule gets t itself) and clamped to its [t_min, t_max].

    ``sample(n, schedule, device, generator)`` → ``{'t': [n] float64, 'sigma': [n] float64}``
    (σ the EDM noise level after clamping)."""

    def __init__(self, P_mean=-1.0, P_std=1.4):
        if not (math.isfinite(P_mean) and math.isfinite(P_std) and P_std > 0):
            raise ValueError(f'TrigFlowLogNormalTimeSampler: need finite P_mean and P_std > 0, '
                             f'got P_mean={P_mean}, P_std={P_std}')
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def sample(self, n, schedule, device=None, generator=None):
        f64 = torch.float64
        tau = self.P_mean + self.P_std * torch.randn(n, generator=generator, dtype=f64, device=device)
        lo = schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=f64, device='cpu'))
        hi = schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=f64, device='cpu'))
        sigma = tau.exp().clamp(float(lo), float(hi))
        return dict(t=schedule.t_from_edm_sigma(sigma), sigma=sigma)

    def __repr__(self):
        return f'TrigFlowLogNormalTimeSampler(P_mean={self.P_mean}, P_std={self.P_std})'
