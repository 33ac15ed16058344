"""The conditional layers of hierarchical semi-implicit models (HSIVI, Yu et al. 2023)."""
import numbers

import torch

from ..registry import KERNELS
from ..utils import append_dims


@KERNELS.register_module()
class HierarchicalGaussianKernel:
    """One HSIVI layer q_φ(x_s | x_t), s < t: a DDIM step with stochasticity η (Song et al.
    2021, "Denoising Diffusion Implicit Models", eq. 12, written for any schedule) whose standard
    deviation a learnable per-layer scale γ_k multiplies — the conditional layers of HSIVI's
    diffusion acceleration (Yu et al. 2023, §4, as its public code parameterises them):

        x̂₀ = G_φ(x_t, t),      ε̂ = (x_t − a(t)·x̂₀)/σ(t)
        c₁ = η·σ(s)·√(1 − r²),  r = a(t)σ(s) / (a(s)σ(t)) = σ_e(s)/σ_e(t)
        c₂ = √(σ(s)² − c₁²)
        q_φ(x_s | x_t) = N(a(s)·x̂₀ + c₂·ε̂,  (γ_k·c₁)² I),       γ_k = exp(log_scale_k).

    c₁ is η times the std of the forward process's posterior q(x_s | x_t, x₀), so η = 1, γ = 1
    is the ancestral (DDPM) step with x₀ = x̂₀ and η → 0 the deterministic DDIM step. The
    conditional score is analytic, ∇_{x_s} log q_φ(x_s | x_t) = (mean − x_s)/std².

    Written on the ratio r of EDM noise levels the step is the same for every schedule after the
    rescaling x ↦ x/a (a DDIM step commutes with it), so a sampler in EDM variables runs the
    layers a distiller trained in any schedule's variables.

    ``eta`` ∈ (0, 1]: η = 0 would give a point mass, whose score does not exist."""

    def __init__(self, eta=0.2):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 < eta <= 1:
            raise ValueError(f'HierarchicalGaussianKernel: eta must be a number in (0, 1] (η = 0 is a '
                             f'deterministic step with no conditional score), got {eta!r}')
        self.eta = float(eta)

    def coefficients(self, s, t, schedule):
        """(a(s), c₂/σ(t), c₁) per sample, float64: mean = a(s)·x̂₀ + (c₂/σ(t))·(x_t − a(t)·x̂₀)."""
        s = torch.as_tensor(s).to(torch.float64)
        t = torch.as_tensor(t).to(torch.float64)
        r = schedule.edm_sigma(s) / schedule.edm_sigma(t)
        if bool((r >= 1).any()):
            raise ValueError('HierarchicalGaussianKernel: a layer must go down in noise (σ_e(s) < σ_e(t)); '
                             f'got σ_e(s)/σ_e(t) up to {float(r.max()):.4g}')
        sig_s = schedule.sigma(s)
        c1 = self.eta * sig_s * torch.sqrt(1 - r ** 2)
        c2 = torch.sqrt((sig_s ** 2 - c1 ** 2).clamp(min=0))
        return schedule.alpha(s), c2 / schedule.sigma(t), c1

    def mean_std(self, x_t, x0_hat, s, t, schedule, log_scale):
        """Mean [B, ...] and std (shape [B, 1, ...]) of q_φ(x_s | x_t); ``log_scale`` ([B]) is
        log γ_k of each sample's layer and carries the gradient to the std scale."""
        a_s, k_eps, c1 = (append_dims(c, x_t.ndim).to(x_t.dtype) for c in self.coefficients(s, t, schedule))
        a_t = append_dims(schedule.alpha(torch.as_tensor(t)), x_t.ndim).to(x_t.dtype)
        mean = a_s * x0_hat + k_eps * (x_t - a_t * x0_hat)
        std = torch.exp(append_dims(log_scale, x_t.ndim).to(x_t.dtype)) * c1
        return mean, std

    @staticmethod
    def sample(mean, std, noise):
        """x_s = mean + std·ε (reparameterised: gradients reach the mean and the std scale)."""
        return mean + std * noise

    @staticmethod
    def conditional_score(x_s, mean, std):
        """∇_{x_s} log q_φ(x_s | x_t) = (mean − x_s)/std²."""
        return (mean - x_s) / std ** 2

    def conditional_x0(self, x_s, mean, std, s, schedule):
        """The conditional score in denoiser units: the x̃ with (a(s)·x̃ − x_s)/σ(s)² equal to
        ∇log q_φ(x_s | x_t) (Tweedie's form inverted), i.e. what the ψ-stage's optimal denoiser
        f_ψ(x_s) averages to. The divergences compare f_φ(x_s) − x̃ with f_φ(x_s) − f_ψ(x_s)."""
        s = torch.as_tensor(s)
        a = append_dims(schedule.alpha(s), x_s.ndim).to(x_s.dtype)
        sig2 = append_dims(schedule.sigma(s), x_s.ndim).to(x_s.dtype) ** 2
        return (x_s + sig2 * self.conditional_score(x_s, mean, std)) / a

    def __repr__(self):
        return f'HierarchicalGaussianKernel(eta={self.eta})'
