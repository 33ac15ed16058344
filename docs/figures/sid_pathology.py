"""Makes docs/figures/sid_pathology.png: the φ-objective at the ψ-stage optimum vs α, for SiD
(α(1+λ) = ½) and CoSIM (α(1+λ) = 1), closed form (App. B.1) and Monte Carlo on Gaussians.

    python docs/figures/sid_pathology.py
"""
import math
import os.path as osp
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from gdistill.divergences.gfi import GFIDivergence  # noqa: E402

# Gaussians (EDM variables): p = N(0, s_p²), x̂₀ = g·x_t + b with x_t ~ N(0, v_t), x_s = x̂₀ + σ·ε
S_P, V_T, G, B, SIGMA, D, N = 1.0, 2.0, 0.5, 0.3, 0.7, 3, 200_000


def monte_carlo(alpha, coef):
    """E[φ-loss] at f_ψ = f* (eq. 16), relative to E‖σ²(S − ∇log q)‖² (the Fisher term)."""
    gen = torch.Generator().manual_seed(0)
    x0 = G * math.sqrt(V_T) * torch.randn(N, D, generator=gen, dtype=torch.float64) + B
    x_s = x0 + SIGMA * torch.randn(N, D, generator=gen, dtype=torch.float64)
    S = -x_s / (S_P ** 2 + SIGMA ** 2)
    grad_log_q = -(x_s - B) / (G ** 2 * V_T + SIGMA ** 2)
    div = GFIDivergence(h=dict(type='QuadraticH', alpha=alpha), coef=coef, generator_weight='none')
    f_phi = S_P ** 2 / (S_P ** 2 + SIGMA ** 2) * x_s
    f_star = x_s + SIGMA ** 2 * (div.beta * grad_log_q + (1 - div.beta) * S)
    value = div.generator_loss(f_phi - x0, f_phi - f_star, torch.ones(N, dtype=torch.float64)).mean()
    fisher = (SIGMA ** 4 * (S - grad_log_q) ** 2).sum(1).mean()
    return float(value / fisher)


def closed_form(alpha, coef):
    lam = coef / alpha - 1
    return (1 + 2 * lam) / (4 * alpha * (1 + lam) ** 2)


def main():
    alphas = torch.linspace(0.5, 2.5, 81).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for coef, name, color in ((0.5, 'SiD: α(1+λ) = ½', 'tab:red'), (1.0, 'CoSIM: α(1+λ) = 1', 'tab:blue')):
        ax.plot(alphas, [closed_form(a, coef) for a in alphas], color=color, label=name + ' (App. B.1)')
        pts = [0.6, 1.0, 1.2, 1.5, 2.0]
        ax.plot(pts, [monte_carlo(a, coef) for a in pts], 'o', color=color, ms=4)
    ax.axhline(0, color='k', lw=0.6)
    ax.axvline(1.2, color='gray', ls=':', lw=0.8)
    ax.set_xlabel('α')
    ax.set_ylabel('φ-objective at ψ-optimum / Fisher')
    ax.set_title('dots: Monte Carlo on Gaussians (200 k samples)', fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = osp.join(osp.dirname(osp.abspath(__file__)), 'sid_pathology.png')
    fig.savefig(out)
    print('wrote', out)


if __name__ == '__main__':
    main()
