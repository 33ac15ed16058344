"""The generalised Fisher divergence GFI[h] as CoSIM's two-stage objective.

Notation (Yu et al. 2025, §3.3 and App. B.1). For x_s = a(s)·x̂₀ + σ(s)·ε drawn through the
kernel from x_t, with S the teacher's score, ∇log q(x_s | x_t) the kernel's conditional score
and f_ψ the auxiliary score:

    GFI[h](q ‖ p) = E_q h(S − ∇log q),     h(d) = sup_y ⟨d, y⟩ − h*(y)            (eq. 13)

and by the score identity E[∇log q(x_s | x_t) | x_s] = ∇log q(x_s) (eq. 27) the inner sup can
use the conditional score. With y = S − f_ψ and a regulariser λ on the dual (eq. 15):

    ψ-stage:  max_ψ E[⟨S − ∇log q(x_s|x_t), y⟩ − (1+λ)·h*(y)]
    φ-stage:  min_φ E[⟨S − ∇log q(x_s|x_t), y⟩ − h*(y)]       (ψ fixed, gradients through x_s)

For h = ‖·‖²/(4α) the ψ-optimum is f* = β∇log q + (1 − β)S with β = 1/(2α(1+λ)) (eq. 16) and
the φ-objective there equals (1+2λ)/(4α(1+λ)²)·E‖S − ∇log q‖² (App. B.1).

Units. Everything here is written in x̂₀ units: multiplying the scores by σ(s)²/a(s) turns
S − ∇log q(x_s|x_t) into d = f_φ(x_s) − x̂₀ and S − f_ψ into u = f_φ(x_s) − f_ψ(x_s) (f_φ, f_ψ the
teacher's and the auxiliary network's denoisers). The dual variable is y = ∇h(2α·u): for the
quadratic h this is y = u exactly, and for any h it keeps h*(y) finite
(h*(∇h(v)) = ⟨v, ∇h(v)⟩ − h(v)). The per-sample weights w₁ (φ) and w₂ (ψ) replace the factor
a²/σ⁴ as SiD does.

With α(1+λ) = ½ the ψ-stage is plain denoising score matching and the φ-stage is SiD's fused
loss with its α (Zhou et al. 2024, eq. 12); CoSIM's default α = 1.2 with α(1+λ) = 1 keeps the
φ-objective ≥ 0 at the ψ-optimum (SiD's is negative there for α > 1).
"""
import torch

from ..registry import CONVEX_FUNCTIONS, DIVERGENCES, build
from ..utils import per_sample_mean, per_sample_sum
from .convex import QuadraticH


def sid_weight(x0_hat, teacher_x0, sigma, sigma_data, eps=1e-5):
    """SiD's per-sample normaliser w₁ = 1/mean|x̂₀ − f_φ(x_s)| (stop-gradient, clipped)."""
    return 1.0 / per_sample_mean((x0_hat - teacher_x0).abs()).detach().clamp(min=eps)


def edm_weight(x0_hat, teacher_x0, sigma, sigma_data):
    """EDM's loss weight w₂ = (σ² + σ_d²)/(σ·σ_d)² (Karras et al. 2022, Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def unit_weight(x0_hat, teacher_x0, sigma, sigma_data):
    return torch.ones_like(sigma)


WEIGHTS = dict(sid=sid_weight, edm=edm_weight, none=unit_weight)


def _weight_fn(name):
    if name not in WEIGHTS:
        raise KeyError(f'unknown weight {name!r}; known: {", ".join(sorted(WEIGHTS))}')
    return WEIGHTS[name]


@DIVERGENCES.register_module()
class GFIDivergence:
    """Two-stage GFI[h] (CoSIM eq. 15). ``coef`` = α(1+λ) as in the paper's Table 6; give
    either ``coef`` or ``lam``. ``h`` is a registered convex function carrying α."""

    phases = ('aux', 'generator')

    def __init__(self, h=dict(type='QuadraticH', alpha=1.2), coef=1.0, lam=None,
                 generator_weight='sid', aux_weight='edm'):
        self.h = build(CONVEX_FUNCTIONS, h)
        alpha = self.h.alpha
        if lam is not None and coef is not None and coef != 1.0:
            raise ValueError(f'GFIDivergence: give coef = α(1+λ) or lam, not both (coef={coef}, lam={lam})')
        self.lam = float(lam) if lam is not None else coef / alpha - 1.0
        if self.lam <= -1:
            raise ValueError(f'GFIDivergence: need 1 + λ > 0, got λ = {self.lam} (coef = α(1+λ) must be > 0)')
        self.generator_weight = _weight_fn(generator_weight)
        self.aux_weight = _weight_fn(aux_weight)
        self._names = (generator_weight, aux_weight)

    @property
    def alpha(self):
        return self.h.alpha

    @property
    def coef(self):
        return self.alpha * (1 + self.lam)

    @property
    def beta(self):
        """β = 1/(2α(1+λ)) of eq. 16, the share of ∇log q in the ψ-optimum (quadratic h)."""
        return 1.0 / (2 * self.coef)

    @property
    def aux_needs_teacher(self):
        """Whether ``aux_loss`` depends on the teacher's f_φ. Not for the quadratic h at
        α(1+λ) = ½ with a ψ-weight that ignores f_φ ('edm', 'none'): there, with d = f_φ − x̂₀ and
        u = f_φ − f_ψ, the loss w₂·(½‖u‖² − ⟨d, u⟩ + ½‖d‖²) = ½·w₂·‖x̂₀ − f_ψ‖² is plain denoising
        score matching (SiD's fake-score loss), so the ψ-stage can skip the teacher's forward
        pass and call ``aux_loss`` with f_φ = x̂₀ (d = 0)."""
        return not (type(self.h) is QuadraticH and abs(self.coef - 0.5) < 1e-12
                    and self._names[1] in ('edm', 'none'))

    def dual(self, u):
        """y = ∇h(2α·u) and h*(y), per sample."""
        v = 2 * self.alpha * u
        return self.h.grad(v), self.h.conj_at_grad(v)

    def generator_loss(self, d, u, weight):
        """φ-stage, per sample: w₁·(⟨d, y⟩ − h*(y))."""
        y, conj = self.dual(u)
        return weight * (per_sample_sum(d * y) - conj)

    def aux_loss(self, d, u, weight):
        """ψ-stage, per sample, as the Fenchel–Young gap of g = (1+λ)h*:
        w₂·((1+λ)h*(y) − ⟨d, y⟩ + (1+λ)h(d/(1+λ))) ≥ 0, zero at the optimum y = ∇h(d/(1+λ)).
        (The last term is constant in ψ; it makes the logged loss a distance.)"""
        y, conj = self.dual(u)
        k = 1 + self.lam
        return weight * (k * conj - per_sample_sum(d.detach() * y) + k * self.h.h(d.detach() / k))

    def __repr__(self):
        return (f'GFIDivergence(h={self.h!r}, alpha={self.alpha}, lam={self.lam:.4g}, '
                f'coef={self.coef:.4g}, weights={self._names})')
