"""Few-step consistency sampling in TrigFlow (Lu & Song 2024, §3 and §5: one step from the prior,
or two with the intermediate time t = 1.1)."""
import math
import numbers

import torch

from ..registry import SAMPLERS
from ..utils import append_dims

#: the paper's intermediate time of 2-step sampling
TWO_STEP_MID_TIME = 1.1


@SAMPLERS.register_module()
class ConsistencySampler:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) in TrigFlow variables:

        x = σ_d·z at t_0;   for i = 0..K−1:  x̂₀ = f(x, t_i);
                            x ← cos t_{i+1}·x̂₀ + sin t_{i+1}·σ_d·ε   (fresh ε ~ N(0, I))

    and the last x̂₀ is the sample; NFE = K. TrigFlow's marginal at any t has per-coordinate
    variance σ_d² for data of std σ_d, so σ_d·z is the prior.

    f(x_t, t) is taken from ``denoiser(x, sigma, class_labels)`` in EDM's variable by equal SNR,
    f(x_t, t) = D(x_t/cos t; σ_d tan t) — a sCM student's ``forward`` (``TrigFlowStudent``) or
    any EDM-form denoiser. The paper starts at t = π/2; an EDM-form network needs a finite σ, so
    t_0 is the time of ``sigma_max`` (σ_d tan t_0 = 80 ⇒ t_0 ≈ 1.5645 for σ_d = 0.5).

    ``times``: the K times t_0 > … > t_{K−1} explicitly. Otherwise K = 1 is (t_0,), K = 2 is
    (t_0, 1.1), the paper's 2-step schedule, and K > 2 puts t_1..t_{K−1} at the interior points
    of a (K+1)-point EDM ρ-ramp from σ_max to σ_min (Karras et al. 2022, eq. 5)."""

    def __init__(self, num_steps=1, times=None, sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, rho=7.0):
        if not (sigma_data > 0 and 0 < sigma_min < sigma_max and math.isfinite(sigma_max) and rho > 0):
            raise ValueError('ConsistencySampler: need sigma_data > 0, 0 < sigma_min < sigma_max < inf and '
                             f'rho > 0; got {sigma_data}, {sigma_min}, {sigma_max}, {rho}')
        self.sigma_data, self.sigma_max, self.sigma_min, self.rho = \
            float(sigma_data), float(sigma_max), float(sigma_min), float(rho)
        if times is not None:
            times = [float(t) for t in times]
            if not times or not all(0 < t < math.pi / 2 for t in times) \
                    or any(a <= b for a, b in zip(times, times[1:])):
                raise ValueError('ConsistencySampler: times must be a non-empty, strictly decreasing list '
                                 f'of TrigFlow times in (0, π/2), got {times}')
            num_steps = len(times)
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f'ConsistencySampler: num_steps must be an integer >= 1, got {num_steps!r}')
        self.num_steps, self._times = int(num_steps), times

    @property
    def nfe(self):
        return self.num_steps

    def times(self):
        """The K TrigFlow times the consistency function is called at (float64)."""
        if self._times is not None:
            return torch.tensor(self._times, dtype=torch.float64, device='cpu')
        t0 = math.atan(self.sigma_max / self.sigma_data)
        if self.num_steps == 1:
            return torch.tensor([t0], dtype=torch.float64, device='cpu')
        if self.num_steps == 2:
            return torch.tensor([t0, TWO_STEP_MID_TIME], dtype=torch.float64, device='cpu')
        u = torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64, device='cpu')[:-1]
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        sigma = (a + u * (b - a)) ** self.rho
        return torch.atan(sigma / self.sigma_data)

    @torch.no_grad()
    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        times = self.times()
        dtype, n = noise.dtype, noise.shape[0]
        x = self.sigma_data * noise.to(torch.float64)
        for i, t in enumerate(times.tolist()):
            cos, sin = math.cos(t), math.sin(t)
            sigma = torch.full((n,), self.sigma_data * math.tan(t), dtype=dtype, device=noise.device)
            x0 = denoiser((x / cos).to(dtype), sigma, class_labels)
            if not isinstance(x0, torch.Tensor) or x0.shape != noise.shape:
                raise ValueError(f'ConsistencySampler: the denoiser must return a tensor of shape '
                                 f'{tuple(noise.shape)}, got {getattr(x0, "shape", type(x0).__name__)}')
            x0 = x0.to(torch.float64)
            if i + 1 == len(times):
                return x0.to(dtype)
            t_next = float(times[i + 1])
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=dtype)
            x = math.cos(t_next) * x0 + math.sin(t_next) * self.sigma_data * eps.to(torch.float64)

    def __repr__(self):
        return f'ConsistencySampler(times={[round(float(t), 4) for t in self.times()]}, nfe={self.nfe})'
