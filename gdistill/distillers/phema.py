"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing
and Improving the Training Dynamics of Diffusion Models", Sec. 3 and App. C; official file
``training/phema.py`` of NVlabs/edm2).

The EMA at training time t (images or steps: only ratios enter) averages the parameters with
the profile p_t(τ) ∝ τ^γ on [0, t] (eq. 120). Its relative width is

    σ_rel = √((γ+1) / ((γ+2)²(γ+3)))                                        (eq. 123)

and γ for a given σ_rel ∈ (0, √(1/12)) is the largest real root of
γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) (eq. 126, Algorithm 2). It is tracked by

    θ̂ ← β·θ̂ + (1 − β)·θ,   β = (1 − Δt/t)^{γ+1}                              (eq. 127)

with t the count *after* the step (the first step gives β = 0: θ̂ = θ). Post-hoc, snapshots
θ̂_i of profiles (t_i, σ_i) are combined into a new profile (t_out, σ_out) by least squares in
L² of the profiles: A_ij = ⟨p_i, p_j⟩, B_i = ⟨p_i, p_out⟩ in closed form (eq. 151, Algorithm 3),
x = A⁻¹B, normalised to sum 1, θ̂_out = Σ x_i θ̂_i.
"""
import math

import numpy as np
import torch

#: σ_rel must lie in (0, SIGMA_REL_MAX): γ → −1 gives σ_rel → √(1/12)
SIGMA_REL_MAX = math.sqrt(1 / 12)


def _check_sigma_rel(sigma_rel, owner='sigma_rel'):
    s = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s >= SIGMA_REL_MAX):
        raise ValueError(f'{owner}: the power-function EMA width σ_rel must lie in (0, '
                         f'{SIGMA_REL_MAX:.4f}) (EDM2 uses 0.05 and 0.10 while training); got '
                         f'{sigma_rel!r}')
    return s


def gamma_to_sigma_rel(gamma):
    """σ_rel of the profile τ^γ, eq. 123 (γ > −1)."""
    g = np.asarray(gamma, dtype=np.float64)
    if np.any(g <= -1):
        raise ValueError(f'gamma_to_sigma_rel: γ must be > −1, got {gamma!r}')
    out = np.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))
    return float(out) if out.ndim == 0 else out


def sigma_rel_to_gamma(sigma_rel):
    """γ of a relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) (eq. 126). Float64; scalar or array."""
    s = _check_sigma_rel(sigma_rel, 'sigma_rel_to_gamma')
    out = np.array([np.roots([1.0, 7.0, 16.0 - v ** -2, 12.0 - v ** -2]).real.max()
                    for v in s.reshape(-1)]).reshape(s.shape)
    return float(out) if out.ndim == 0 else out


def power_ema_beta(sigma_rel, images_after, batch_size):
    """β = (1 − batch/t)^{γ+1} of eq. 127 for the step that brings the count to
    ``images_after`` (0 on the first step, when images_after = batch_size)."""
    if not 0 < batch_size <= images_after:
        raise ValueError(f'power_ema_beta: need 0 < batch_size <= images_after (the count after '
                         f'this step), got batch_size={batch_size}, images_after={images_after}')
    return (1.0 - batch_size / images_after) ** (sigma_rel_to_gamma(sigma_rel) + 1.0)


def profile_inner_products(a_t, a_sigma_rel, b_t, b_sigma_rel):
    """⟨p_a, p_b⟩ of power-function profiles ending at a_t, b_t (eq. 151): with γ_a, γ_b,
    (γ_a+1)(γ_b+1)·(t_a/t_b)^{γ_b if t_a < t_b else −γ_a} / ((γ_a+γ_b+1)·max(t_a, t_b)).
    Broadcasts like numpy."""
    a_t, b_t = np.asarray(a_t, np.float64), np.asarray(b_t, np.float64)
    ga, gb = np.asarray(sigma_rel_to_gamma(a_sigma_rel)), np.asarray(sigma_rel_to_gamma(b_sigma_rel))
    ratio = a_t / b_t
    expo = np.where(a_t < b_t, gb, -ga)
    return (ga + 1) * (gb + 1) * ratio ** expo / ((ga + gb + 1) * np.maximum(a_t, b_t))


def posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """Weights x [n_in, n_out] with Σ_i x_i·p_i ≈ p_out in L² (Algorithm 3): x = A⁻¹B with
    A_ij = ⟨p_i, p_j⟩, B_ij = ⟨p_i, p_out_j⟩, each column normalised to sum 1."""
    in_t, in_s = np.broadcast_arrays(np.asarray(in_t, np.float64), np.asarray(in_sigma_rel, np.float64))
    out_t, out_s = np.broadcast_arrays(np.asarray(out_t, np.float64), np.asarray(out_sigma_rel, np.float64))
    col, row = (lambda v: v.reshape(-1, 1)), (lambda v: v.reshape(1, -1))
    A = profile_inner_products(col(in_t), col(in_s), row(in_t), row(in_s))
    B = profile_inner_products(col(in_t), col(in_s), row(out_t), row(out_s))
    x = np.linalg.solve(A, B)
    return x / x.sum(axis=0, keepdims=True)


def posthoc_reconstruct(state_dicts, in_t, in_sigma_rel, out_sigma_rel, out_t=None):
    """A state_dict with EMA profile (out_t, out_sigma_rel) from snapshots ``state_dicts[i]``
    of profiles (in_t[i], in_sigma_rel[i]) (reconstruct_phema.py): floating tensors are
    Σ x_i·θ_i computed in float32 and returned in the snapshots' dtype; other entries are taken
    from the last snapshot. ``out_t`` defaults to the last input time."""
    if not state_dicts:
        raise ValueError('posthoc_reconstruct: no snapshots given')
    if not len(state_dicts) == len(np.atleast_1d(in_t)) == len(np.atleast_1d(in_sigma_rel)):
        raise ValueError(f'posthoc_reconstruct: {len(state_dicts)} snapshots but '
                         f'{len(np.atleast_1d(in_t))} times and {len(np.atleast_1d(in_sigma_rel))} widths')
    if out_t is None:
        out_t = float(np.atleast_1d(in_t)[-1])
    x = posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel)[:, 0]
    out = {}
    for key, ref in state_dicts[-1].items():
        if torch.is_tensor(ref) and ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float32)
            for w, sd in zip(x, state_dicts):
                acc.add_(sd[key].to(torch.float32), alpha=float(w))
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref
    return out


@torch.no_grad()
def power_ema_step(ema, net, batch_size, images_after, sigma_rel, gather=lambda t: t):
    """One power-function EMA update of ``ema`` towards ``net`` (eq. 127) and a copy of the
    buffers; ``images_after`` counts the images including this batch. ``gather`` turns a
    (sharded) parameter into the whole tensor. Returns β."""
    beta = power_ema_beta(sigma_rel, images_after, batch_size)
    torch._foreach_lerp_(list(ema.parameters()), [gather(p.detach()) for p in net.parameters()],
                         1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(gather(b))
    return beta
