"""The continuous-time consistency objective of sCM (Lu & Song 2024, "Simplifying, stabilizing
and scaling continuous-time consistency models", arXiv 2410.11081), as pure tensor functions.

TrigFlow (§3): x_t = cos t·x₀ + sin t·z, z ~ N(0, σ_d² I); the consistency function
f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t). Its time derivative along the PF-ODE is

    df_θ/dt = −cos t·(σ_d F_θ − dx_t/dt) − sin t·(x_t + σ_d·dF_θ/dt),                  (i)

with dF_θ/dt = ∇_x F_θ·(dx_t/dt)/σ_d + ∂_t F_θ. The continuous-time CM gradient (§4, the
Δt → 0 limit of the discrete consistency loss) is ∇_θ E[−w(t)·σ_d sin t·F_θᵀ·df_θ⁻/dt];
Algorithm 1's tangent corresponds to w(t) = 1/(σ_d tan t), which leaves cos t in front of F_θᵀ:

    g = cos t·df_θ⁻/dt = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t sin t·(x_t + σ_d·dF⁻/dt)    (ii)

(Algorithm 1), with r = 1 the true tangent and r ∈ [0, 1) the tangent warm-up (§4.2, r rising
linearly from 0 to 1). Because ∇_θ E[F_θᵀ y] = ½∇_θ E‖F_θ − sg(F_θ) + y‖² exactly, the
gradient is that of the MSE ‖F_θ − F⁻ − g‖² (F⁻ = sg(F_θ)), and with the learned adaptive weight
w_φ(t) of §4.3 the objective is

    L(θ, φ) = E[ e^{−w_φ(t)}/D · ‖F_θ − F⁻ − g‖² + w_φ(t) ]                                 (iii)

(D the data dimension; w_φ is a log-variance: minimising over it sets e^{w} to the expected
unweighted loss at t, balancing the times). The variance of g is tamed by tangent
normalisation g/(‖g‖ + c) (§4.2, c = 0.1) or by clipping g to [−κ, κ] (§4.2).

The tangent (ii) needs σ_d·cos t sin t·dF⁻/dt; one forward-mode product of F⁻ with the
rearranged tangents (cos t sin t·dx_t/dt, cos t sin t·σ_d) on the inputs (x_t/σ_d, t) returns
exactly that product, pre-scaled (``jvp_term`` below).
"""
import torch

from ..registry import DIVERGENCES
from ..utils import append_dims, per_sample_mean


def _coef(v, like):
    """A per-sample float64 coefficient as a broadcastable tensor of ``like``'s dtype."""
    return append_dims(v.to(torch.float64), like.ndim).to(like.dtype)


def jvp_tangents(t, dxt_dt, sigma_data):
    """The rearranged tangents of the inputs (x_t/σ_d, t) (Lu & Song 2024, §4.2 and
    Algorithm 1): (cos t sin t·dx_t/dt, cos t sin t·σ_d). A JVP of F with them returns
    cos t sin t·σ_d·dF/dt (see ``scm_tangent``)."""
    cs = torch.as_tensor(t).to(torch.float64)
    cs = cs.cos() * cs.sin()
    return _coef(cs, dxt_dt) * dxt_dt, (cs * sigma_data).to(torch.as_tensor(t).dtype)


def consistency_derivative(F, dF_dt, x_t, dxt_dt, t, sigma_data):
    """df/dt of f = cos t·x_t − sin t·σ_d·F along the ODE: eq. (i) of the module docstring."""
    t = torch.as_tensor(t).to(torch.float64)
    return (-_coef(t.cos(), x_t) * (sigma_data * F - dxt_dt)
            - _coef(t.sin(), x_t) * (x_t + sigma_data * dF_dt))


def scm_tangent(F_minus, jvp_term, x_t, dxt_dt, t, sigma_data, r=1.0):
    """g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t sin t·x_t − r·jvp_term: eq. (ii), Algorithm 1 of
    Lu & Song 2024, with ``jvp_term`` = cos t sin t·σ_d·dF⁻/dt (the JVP of F⁻ with
    ``jvp_tangents``). r = 1 gives g = cos t·df⁻/dt; r < 1 is the tangent warm-up."""
    if not 0.0 <= float(r) <= 1.0:
        raise ValueError(f'scm_tangent: the warm-up factor r must lie in [0, 1], got {r}')
    for name, v in (('jvp_term', jvp_term), ('x_t', x_t), ('dxt_dt', dxt_dt)):
        if v.shape != F_minus.shape:
            raise ValueError(f'scm_tangent: {name} has shape {tuple(v.shape)} but F⁻ has '
                             f'{tuple(F_minus.shape)}; every term is per sample and per coordinate')
    t = torch.as_tensor(t).to(torch.float64)
    cos, sin = t.cos(), t.sin()
    return (-_coef(cos ** 2, x_t) * (sigma_data * F_minus - dxt_dt)
            - float(r) * (_coef(cos * sin, x_t) * x_t + jvp_term))


def normalize_tangent(g, c=0.1):
    """Tangent normalisation g/(‖g‖ + c), ‖·‖ the per-sample Euclidean norm (Lu & Song 2024,
    §4.2; c = 0.1 in the paper)."""
    if c <= 0:
        raise ValueError(f'normalize_tangent: c must be > 0, got {c}')
    norm = g.flatten(1).norm(dim=1)
    return g / append_dims(norm + c, g.ndim)


def clip_tangent(g, clip=1.0):
    """Tangent clipping to [−clip, clip] elementwise (Lu & Song 2024, §4.2)."""
    if clip <= 0:
        raise ValueError(f'clip_tangent: clip must be > 0, got {clip}')
    return g.clamp(-clip, clip)


def scm_loss(F, F_minus, g, logvar=None):
    """Per-sample e^{−w}/D·‖F − F⁻ − g‖² + w, eq. (iii) (Lu & Song 2024, Algorithm 1 with
    the adaptive weight written as a log-variance w = ``logvar``, [N]); ``logvar=None`` gives
    the plain MSE ‖F − F⁻ − g‖²/D. F⁻ and g must carry no gradient."""
    if F.shape != F_minus.shape or F.shape != g.shape:
        raise ValueError(f'scm_loss: F {tuple(F.shape)}, F⁻ {tuple(F_minus.shape)} and g '
                         f'{tuple(g.shape)} must have one shape')
    if F_minus.requires_grad or g.requires_grad:
        raise ValueError('scm_loss: F⁻ and the tangent g are stop-gradient targets; detach them '
                         '(or compute them under torch.no_grad())')
    mse = per_sample_mean((F - F_minus - g) ** 2)
    if logvar is None:
        return mse
    if logvar.shape != mse.shape:
        raise ValueError(f'scm_loss: logvar must have one entry per sample, shape {tuple(mse.shape)}; '
                         f'got {tuple(logvar.shape)}')
    return torch.exp(-logvar) * mse + logvar


@DIVERGENCES.register_module()
class SCMDivergence:
    """The sCM objective (Lu & Song 2024, Algorithm 1) with its stabilisers as options.

    ``tangent_norm``: c of g/(‖g‖ + c) (None: off). ``tangent_clip``: κ of clip(g, −κ, κ)
    (None: off; applied after normalisation if both are set). ``warmup_iters``: H of the
    tangent warm-up r = min(1, step/H) (0: r = 1 from the start). ``adaptive_weight``: learn
    w_φ(t) (else w ≡ 0)."""

    def __init__(self, tangent_norm=0.1, tangent_clip=None, warmup_iters=10_000, adaptive_weight=True):
        if tangent_norm is not None and tangent_norm <= 0:
            raise ValueError(f'SCMDivergence: tangent_norm is c > 0 of g/(‖g‖ + c) or None, got {tangent_norm}')
        if tangent_clip is not None and tangent_clip <= 0:
            raise ValueError(f'SCMDivergence: tangent_clip is κ > 0 or None, got {tangent_clip}')
        if warmup_iters < 0:
            raise ValueError(f'SCMDivergence: warmup_iters must be >= 0, got {warmup_iters}')
        self.tangent_norm = tangent_norm
        self.tangent_clip = tangent_clip
        self.warmup_iters = int(warmup_iters)
        self.adaptive_weight = bool(adaptive_weight)

    def warmup_ratio(self, step):
        """r = min(1, step/H): 0 at the first update, 1 from step H on."""
        return 1.0 if self.warmup_iters == 0 else min(1.0, step / self.warmup_iters)

    def tangent(self, F_minus, jvp_term, x_t, dxt_dt, t, sigma_data, step):
        """The tangent g (eq. ii at r = ``warmup_ratio(step)``), normalised and clipped as
        configured, and the per-sample norm of the raw g (for logging)."""
        g = scm_tangent(F_minus, jvp_term, x_t, dxt_dt, t, sigma_data, self.warmup_ratio(step))
        raw_norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm is not None:
            g = normalize_tangent(g, self.tangent_norm)
        if self.tangent_clip is not None:
            g = clip_tangent(g, self.tangent_clip)
        return g, raw_norm

    def loss(self, F, F_minus, g, logvar=None):
        return scm_loss(F, F_minus, g, logvar if self.adaptive_weight else None)

    def __repr__(self):
        return (f'SCMDivergence(tangent_norm={self.tangent_norm}, tangent_clip={self.tangent_clip}, '
                f'warmup_iters={self.warmup_iters}, adaptive_weight={self.adaptive_weight})')
