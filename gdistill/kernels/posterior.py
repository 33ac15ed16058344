"""The posterior kernel of SIDDM and DDGAN: a generator predicts x̂₀ from x_t, and x_s (s < t) is
drawn from the forward process's Gaussian posterior q(x_s | x_t, x₀ = x̂₀)."""
import torch

from ..registry import KERNELS
from ..utils import append_dims


def _f64(v, device=None):
    return torch.as_tensor(v, dtype=torch.float64, device=device)


@KERNELS.register_module()
class PosteriorKernel:
    """p_θ(x_s | x_t) = q(x_s | x_t, x₀ = G_θ(x_t, t)) on a ``num_steps``-step discretisation
    t_0 < t_1 < … < t_T of any registered schedule x_t = a(t)·x₀ + σ(t)·ε: SIDDM's generator
    (Xu et al. 2023), which keeps DDGAN's parameterisation of p_θ(x_{t−1} | x_t) through the
    posterior (Xiao et al. 2022, §3).

    For s < t the forward transition is q(x_t | x_s) = N(a_{t|s}·x_s, σ²_{t|s} I) with

        a_{t|s} = a(t)/a(s),   σ²_{t|s} = σ(t)² − a_{t|s}²·σ(s)²,

    and Bayes' rule with q(x_s | x₀) = N(a(s)·x₀, σ(s)² I) gives the posterior (Ho et al. 2020,
    eqs. 6–7, for VP and s = t − 1; Kingma et al. 2021 (VDM) write it for general a, σ)

        q(x_s | x_t, x₀) = N(μ, σ̃² I),
        μ   = a_{t|s}·σ(s)²/σ(t)² · x_t + a(s)·σ²_{t|s}/σ(t)² · x₀,
        σ̃² = σ²_{t|s}·σ(s)²/σ(t)².

    Times: ``spacing='uniform'`` puts t_k evenly between ``t_min`` and ``t_max`` (default: the
    schedule's range; DDGAN/SIDDM's choice on the cosine schedule), ``'rho'`` follows EDM's
    ρ-ramp of noise levels (Karras et al. 2022, eq. 5), better for EDM/VE schedules whose t spans
    decades. All coefficients are computed in float64."""

    SPACINGS = ('uniform', 'rho')

    def __init__(self, num_steps=4, spacing='uniform', t_min=None, t_max=None, rho=7.0):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f'PosteriorKernel: num_steps must be an int >= 1, got {num_steps!r}')
        if spacing not in self.SPACINGS:
            raise ValueError(f'PosteriorKernel: spacing must be one of {self.SPACINGS}, got {spacing!r}')
        if t_min is not None and t_max is not None and not t_min < t_max:
            raise ValueError(f'PosteriorKernel: need t_min < t_max, got {t_min}, {t_max}')
        if rho <= 0:
            raise ValueError(f'PosteriorKernel: rho must be > 0, got {rho}')
        self.num_steps, self.spacing, self.rho = num_steps, spacing, float(rho)
        self.t_min, self.t_max = t_min, t_max

    # --- the discretisation ----------------------------------------------------------------
    def times(self, schedule):
        """t_0 < t_1 < … < t_T, float64 [T + 1]."""
        lo = schedule.t_min if self.t_min is None else float(self.t_min)
        hi = schedule.t_max if self.t_max is None else float(self.t_max)
        if not schedule.t_min <= lo < hi <= schedule.t_max:
            raise ValueError(f'PosteriorKernel: times [{lo}, {hi}] outside the schedule\'s range '
                             f'[{schedule.t_min}, {schedule.t_max}] ({schedule!r})')
        T = self.num_steps
        if self.spacing == 'uniform':
            return torch.linspace(lo, hi, T + 1, dtype=torch.float64, device='cpu')
        smin = float(schedule.edm_sigma(_f64(lo)))
        smax = float(schedule.edm_sigma(_f64(hi)))
        u = torch.linspace(1, 0, T + 1, dtype=torch.float64, device='cpu')   # increasing times: decreasing u
        if smin == 0:   # σ_e(t_0) = 0 (e.g. the cosine schedule at t = 0): ramp from σ_max to 0
            sig = (smax ** (1 / self.rho) * (1 - u)) ** self.rho
        else:
            sig = (smax ** (1 / self.rho) + u * (smin ** (1 / self.rho) - smax ** (1 / self.rho))) ** self.rho
        t = schedule.t_from_edm_sigma(sig).to(torch.float64)
        t[0], t[-1] = lo, hi   # exact ends (no round trip through σ_e)
        return t

    def step_times(self, k, schedule, device=None):
        """(s, t) = (t_{k−1}, t_k) for step indices k ∈ {1, …, T} (an int tensor), float64."""
        k = torch.as_tensor(k)
        if k.numel() and (int(k.min()) < 1 or int(k.max()) > self.num_steps):
            raise ValueError(f'PosteriorKernel: step indices must be in 1..{self.num_steps}, got '
                             f'{int(k.min())}..{int(k.max())}')
        grid = self.times(schedule).to(device)
        k = k.to(device)
        return grid[k - 1], grid[k]

    # --- closed forms --------------------------------------------------------------------------
    @staticmethod
    def forward_coefficients(s, t, schedule):
        """(a_{t|s}, σ²_{t|s}) of q(x_t | x_s), float64."""
        s, t = _f64(s), _f64(t)
        a_ts = schedule.alpha(t) / schedule.alpha(s)
        var_ts = schedule.sigma(t) ** 2 - a_ts ** 2 * schedule.sigma(s) ** 2
        return a_ts, var_ts.clamp(min=0)

    @classmethod
    def posterior_coefficients(cls, s, t, schedule):
        """(c_t, c_0, σ̃²) with q(x_s | x_t, x₀) = N(c_t·x_t + c_0·x₀, σ̃² I), float64."""
        s, t = _f64(s), _f64(t)
        if bool((s >= t).any()):
            raise ValueError('PosteriorKernel: the posterior q(x_s | x_t, x₀) needs s < t')
        a_ts, var_ts = cls.forward_coefficients(s, t, schedule)
        var_s, var_t = schedule.sigma(s) ** 2, schedule.sigma(t) ** 2
        return a_ts * var_s / var_t, schedule.alpha(s) * var_ts / var_t, var_ts * var_s / var_t

    def posterior(self, x_t, x0_hat, s, t, schedule):
        """Mean [like x_t] and variance [N] of q(x_s | x_t, x₀ = x̂₀)."""
        c_t, c_0, var = self.posterior_coefficients(s, t, schedule)
        n = x_t.ndim
        mean = append_dims(c_t, n).to(x_t) * x_t + append_dims(c_0, n).to(x_t) * x0_hat
        return mean, var.to(x_t)

    def sample(self, x_t, x0_hat, s, t, schedule, noise):
        """x_s = μ + σ̃·ε, differentiable in x̂₀ (and x_t)."""
        mean, var = self.posterior(x_t, x0_hat, s, t, schedule)
        return mean + append_dims(var.sqrt(), x_t.ndim) * noise

    def conditional_score(self, x_s, x_t, x0_hat, s, t, schedule):
        """∇_{x_s} log q(x_s | x_t, x̂₀) = (μ − x_s)/σ̃²."""
        mean, var = self.posterior(x_t, x0_hat, s, t, schedule)
        return (mean - x_s) / append_dims(var, x_s.ndim)

    # --- the generator ----------------------------------------------------------------------
    @staticmethod
    def predict_x0(net, x_t, t, schedule, labels=None):
        """x̂₀ = G(x_t, t) from an EDM-form network D(x; σ_e, labels) at equal SNR: x = x_t/a(t),
        σ_e = σ(t)/a(t) (the package's one network convention, see docs/design.md)."""
        t = _f64(t, x_t.device)
        x = x_t / append_dims(schedule.alpha(t), x_t.ndim).to(x_t.dtype)
        return net(x, schedule.edm_sigma(t).to(x_t.dtype), labels)

    def __repr__(self):
        return (f'PosteriorKernel(num_steps={self.num_steps}, spacing={self.spacing!r}, '
                f't_min={self.t_min}, t_max={self.t_max})')
