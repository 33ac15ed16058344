"""Gaussian transition kernels of the semi-implicit family."""
from ..registry import KERNELS
from ..utils import append_dims


@KERNELS.register_module()
class GaussianKernel:
    """CoSIM's transition kernel (Yu et al. 2025, §3.2, eq. 9 with the mean of eq. 22):

        q_φ(x_s | x_t) = N(a(s)·G_φ(x_t, t), σ(s)² I),   so  x_s = a(s)·x̂₀ + σ(s)·ε,

    where x̂₀ = G_φ(x_t, t) is the generator's EDM-preconditioned prediction. Its conditional
    score is analytic: ∇_{x_s} log q(x_s | x_t) = (a(s)·x̂₀ − x_s)/σ(s)² — Tweedie's form, so it
    is the schedule's ``score_from_x0``. SiD's one-step generator is the same kernel with the
    mixing time t fixed (x_t = σ_init·z).

    ``std_scale`` multiplies σ(s) (1 for CoSIM and SiD)."""

    def __init__(self, std_scale=1.0):
        if std_scale <= 0:
            raise ValueError(f'GaussianKernel: std_scale must be > 0, got {std_scale}')
        self.std_scale = float(std_scale)

    def std(self, s, schedule):
        return self.std_scale * schedule.sigma(s)

    def sample(self, x0_hat, s, schedule, noise):
        """x_s = a(s)·x̂₀ + std(s)·ε."""
        a = append_dims(schedule.alpha(s), x0_hat.ndim).to(x0_hat.dtype)
        std = append_dims(self.std(s, schedule), x0_hat.ndim).to(x0_hat.dtype)
        return a * x0_hat + std * noise

    def conditional_score(self, x_s, x0_hat, s, schedule):
        """∇_{x_s} log q_φ(x_s | x_t) = (a(s)·x̂₀ − x_s)/std(s)²."""
        a = append_dims(schedule.alpha(s), x_s.ndim).to(x_s.dtype)
        std = append_dims(self.std(s, schedule), x_s.ndim).to(x_s.dtype)
        return (a * x0_hat - x_s) / std ** 2

    def __repr__(self):
        return f'GaussianKernel(std_scale={self.std_scale})'
