"""HSIVI's layer draw (Yu et al. 2023): which of the K discrete conditional layers a training
sample goes through, with the layer's weight β(k) in the hierarchical objective."""
import math
import numbers

import torch

from ..registry import TIME_SAMPLERS
from .semi_implicit import TimePairs, rho_ramp


def layer_sigmas(num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigmas=None):
    """The K + 1 EDM noise levels σ_0 > σ_1 > … > σ_K of K layers (layer k maps σ_k to σ_{k+1}),
    float64: the given ``sigmas``, or the (K+1)-point ρ-ramp from σ_max to σ_min (Karras et al.
    2022, eq. 5), so σ_0 = σ_max is the prior and σ_K = σ_min the output."""
    if sigmas is not None:
        sig = [float(v) for v in sigmas]
        if len(sig) < 2 or not all(math.isfinite(v) and v > 0 for v in sig) \
                or any(a <= b for a, b in zip(sig, sig[1:])):
            raise ValueError('layer sigmas must be K + 1 >= 2 finite positive noise levels in strictly '
                             f'decreasing order (prior first), got {list(sigmas)}')
        return torch.tensor(sig, dtype=torch.float64, device='cpu')
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f'num_steps (the number of layers K) must be an integer >= 1, got {num_steps!r}')
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(f'need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}')
    u = torch.linspace(0, 1, int(num_steps) + 1, dtype=torch.float64, device='cpu')
    return rho_ramp(u, float(sigma_min), float(sigma_max), float(rho))


@TIME_SAMPLERS.register_module()
class LayerTimeSampler:
    """HSIVI's objective is a weighted sum over the layers (Yu et al. 2023, §3; issue 4 cites it
    as eq. 4–5):

        min_φ Σ_k β(k)·D_Fisher(q_k(x_{t_{k+1}}) ‖ p_{t_{k+1}}),
        q_k(x_{t_{k+1}}) = ∫ q_φ(x_{t_{k+1}} | x_{t_k}) q_{k−1}(x_{t_k}) dx_{t_k}

    with p_t the teacher's marginals. Each training sample draws one layer k uniformly from
    0..K−1 (``stratified``: every layer ⌊n/K⌋ or ⌈n/K⌉ times per batch, from a random start) and
    gets s = t_{k+1}, t = t_k, ``layer`` = k, ``from_prior`` = (k = 0) and ``weight`` = β(k).

    ``weighting``: 'snr' — β(k) = 1/σ_{k+1}², HSIVI's weight σ(t)² on squared *score* errors
    (its public code's ε-prediction loss) written in the denoiser units the divergences use
    (S − ∇log q = (a/σ²)·(f_φ − x̃) and σ_e = σ/a); 'uniform' — β = 1; or a list of K
    non-negative numbers, not all zero."""

    def __init__(self, num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigmas=None,
                 weighting='snr', stratified=True):
        self._sigmas = layer_sigmas(num_steps, sigma_min, sigma_max, rho, sigmas)
        self.num_steps = len(self._sigmas) - 1
        self.sigma_max, self.sigma_min = float(self._sigmas[0]), float(self._sigmas[-1])
        self._weights = self._layer_weights(weighting)
        self.weighting, self.stratified = weighting, bool(stratified)

    def _layer_weights(self, weighting):
        if isinstance(weighting, str):
            if weighting == 'snr':
                return 1.0 / self._sigmas[1:] ** 2
            if weighting == 'uniform':
                return torch.ones(self.num_steps, dtype=torch.float64)
            raise ValueError(f"LayerTimeSampler: weighting is 'snr', 'uniform' or a list of {self.num_steps} "
                             f'weights, got {weighting!r}')
        w = [float(v) for v in weighting]
        if len(w) != self.num_steps or not all(math.isfinite(v) and v >= 0 for v in w) or not any(w):
            raise ValueError(f'LayerTimeSampler: a weighting list needs {self.num_steps} finite weights >= 0, '
                             f'not all zero (one per layer); got {list(weighting)}')
        return torch.tensor(w, dtype=torch.float64)

    def sigmas(self):
        """The K + 1 noise levels σ_0 = σ_max > … > σ_K (float64, a copy)."""
        return self._sigmas.clone()

    def layer_weights(self):
        """β(k), k = 0..K−1 (float64, a copy)."""
        return self._weights.clone()

    def layer_times(self, schedule):
        """The K + 1 times t_0 > … > t_K of ``schedule`` at the grid's noise levels (equal SNR)."""
        return schedule.t_from_edm_sigma(self._sigmas)

    def sample(self, n, schedule, device=None, generator=None, stage='generator'):
        """``stage`` is accepted for the shared interface; both stages draw alike."""
        K = self.num_steps
        if self.stratified:
            start = torch.randint(K, (1,), generator=generator, device='cpu')
            layer = (torch.arange(n, device='cpu') + start) % K
        else:
            layer = torch.randint(K, (n,), generator=generator, device='cpu')
        layer = layer.to(device)
        sig = self._sigmas.to(device)
        sigma_t, sigma_s = sig[layer], sig[layer + 1]
        return TimePairs(s=schedule.t_from_edm_sigma(sigma_s), t=schedule.t_from_edm_sigma(sigma_t),
                         sigma_s=sigma_s, sigma_t=sigma_t, from_prior=layer == 0, layer=layer,
                         weight=self._weights.to(device)[layer])

    def __repr__(self):
        return (f'LayerTimeSampler(sigmas={[round(float(v), 4) for v in self._sigmas]}, '
                f'weighting={self.weighting!r}, stratified={self.stratified})')
