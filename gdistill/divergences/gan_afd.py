"""SIDDM's objective (Xu et al. 2023): an adversarial term that matches the marginal q(x_{t−1}), the
auxiliary-forward-diffusion (AFD) term that matches the conditional q(x_t | x_{t−1}), and a
denoising regulariser of the discriminator.

SIDDM splits the joint matching of DDGAN, q(x_{t−1}, x_t) = q(x_t | x_{t−1})·q(x_{t−1}), into

    min_θ  D_adv(q(x_{t−1}) ‖ p_θ(x_{t−1}))  +  λ_AFD · E KL(p_θ(x_t | x_{t−1}) ‖ q(x_t | x_{t−1})),

with p_θ(x_{t−1}, x_t) = q(x_t)·p_θ(x_{t−1} | x_t) the model's joint: x_t is a real noisy sample,
x_{t−1} the generator's. The forward step q(x_t | x_{t−1}) = N(a·x_{t−1}, v I) is known
(``PosteriorKernel.forward_coefficients``), so the conditional term needs no second network:
with p_θ's conditional taken Gaussian with the forward variance (the AFD approximation),

    KL(N(m, v_p I) ‖ N(a·x_{t−1}, v I)) = ‖m − a·x_{t−1}‖²/(2v) + d/2·(v_p/v − 1 − log(v_p/v)),

an L2 between the real x_t and the re-diffused mean a·x_{t−1}, plus a term free of θ's mean. On
samples x_t of p_θ the L2 ``afd_term`` has expectation KL + d/2·(1 + log(v_p/v)) — the KL up to
a constant (tests/test_siddm.py checks this).

Functions take logits and tensors and return per-sample losses; they know nothing of networks.
"""
import torch
import torch.nn.functional as F

from ..registry import DIVERGENCES
from ..utils import append_dims, per_sample_mean, per_sample_sum


# --- the adversarial (marginal) term -------------------------------------------------------
def discriminator_loss(real_logits, fake_logits):
    """−log D(x_real) − log(1 − D(x_fake)) with D = sigmoid(logit): the discriminator's side of the
    GAN value function (Goodfellow et al. 2014, eq. 1), per sample (softplus keeps it finite for
    any logit). Its minimiser over D is D* = p/(p + q) (their Proposition 1), i.e. the logit is
    log p/q."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def generator_loss(fake_logits):
    """The non-saturating generator loss −log D(x_fake) (Goodfellow et al. 2014, §3: maximise
    log D(G(z)) instead of minimising log(1 − D(G(z)))), per sample; DDGAN and SIDDM use it."""
    return F.softplus(-fake_logits)


# --- the AFD (conditional) term -------------------------------------------------------------
def afd_term(x_t, x_prev, a_step, var_step, noise=None):
    """‖x_t − (a·x_{t−1} + √v·n)‖²/(2v) per sample, summed over the data dimensions: the negative
    log-density of the real x_t under the forward step q(x_t | x_{t−1}) = N(a·x_{t−1}, v I) of
    the generated x_{t−1}, without its normaliser d/2·log(2πv) — the AFD term, equal to
    KL(p_θ(x_t | x_{t−1}) ‖ q(x_t | x_{t−1})) up to a constant (see the module docstring).

    ``a_step``, ``var_step``: a_{t|s} and σ²_{t|s} per sample ([N]) or scalars. ``noise``: re-diffuse
    with noise (x_{t−1} → a·x_{t−1} + √v·n, the re-diffused *sample*); it adds d/2 in
    expectation and no bias to the gradient. Without it the re-diffused *mean* is used."""
    if x_t.shape != x_prev.shape:
        raise ValueError(f'afd_term: x_t {tuple(x_t.shape)} and x_prev {tuple(x_prev.shape)} must have one shape')
    var = torch.as_tensor(var_step, dtype=x_t.dtype, device=x_t.device)
    if bool((var <= 0).any()):
        raise ValueError('afd_term: the forward-step variance must be > 0 (s < t)')
    n = x_t.ndim
    rediffused = append_dims(torch.as_tensor(a_step, dtype=x_t.dtype, device=x_t.device), n) * x_prev
    if noise is not None:
        rediffused = rediffused + append_dims(var.sqrt(), n) * noise
    return per_sample_sum((x_t - rediffused) ** 2) / (2 * var.expand(x_t.shape[0]))


# --- the discriminator's regularisers ---------------------------------------------------------
def denoising_regulariser(x0_pred, x0):
    """‖D_aux(x_{t−1}, t) − x₀‖² per sample, averaged over the data dimensions: SIDDM's auxiliary
    denoising task for the discriminator's shared layers, on real pairs (x₀, x_{t−1})."""
    return per_sample_mean((x0_pred - x0) ** 2)


def r1_penalty(real_logits, real_inputs):
    """‖∇_x logit(x)‖² per sample on real inputs (Mescheder et al. 2018's R1, which DDGAN uses);
    ``real_inputs`` must require grad and ``real_logits`` be computed from them."""
    grad, = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return per_sample_sum(grad ** 2)


@DIVERGENCES.register_module()
class GANAFDDivergence:
    """SIDDM's weighted losses for the two alternating updates.

    Discriminator: ``loss_disc`` (eq. 1 of Goodfellow et al.), ``loss_reg`` = ``reg_weight`` ×
    the denoising regulariser, ``loss_r1`` = ``r1_weight``/2 × R1. Generator: ``loss_gan``
    (non-saturating) and ``loss_afd`` = ``afd_weight`` (λ_AFD) × the AFD term. A term whose weight
    is 0 is left out (``uses_aux`` tells the distiller whether the auxiliary head is needed).

    ``afd_reduction``: 'mean' divides the AFD term by the data dimension d (KL per dimension, so
    λ_AFD transfers between a 2-D toy and 3×32×32 images); 'sum' keeps the KL in nats."""

    REDUCTIONS = ('mean', 'sum')

    def __init__(self, afd_weight=1.0, reg_weight=1.0, r1_weight=0.0, afd_reduction='mean'):
        for name, w in (('afd_weight', afd_weight), ('reg_weight', reg_weight), ('r1_weight', r1_weight)):
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0):
                raise ValueError(f'GANAFDDivergence: {name} must be a number >= 0, got {w!r}')
        if afd_reduction not in self.REDUCTIONS:
            raise ValueError(f'GANAFDDivergence: afd_reduction must be one of {self.REDUCTIONS}, got {afd_reduction!r}')
        self.afd_weight, self.reg_weight, self.r1_weight = float(afd_weight), float(reg_weight), float(r1_weight)
        self.afd_reduction = afd_reduction

    @property
    def uses_aux(self):
        return self.reg_weight > 0

    @property
    def uses_r1(self):
        return self.r1_weight > 0

    def discriminator_losses(self, real_logits, fake_logits, x0_pred=None, x0=None, real_inputs=None):
        out = dict(loss_disc=discriminator_loss(real_logits, fake_logits).mean())
        if self.uses_aux:
            if x0_pred is None or x0 is None:
                raise ValueError('GANAFDDivergence: reg_weight > 0 needs the auxiliary head\'s x0_pred and the real x0')
            out['loss_reg'] = self.reg_weight * denoising_regulariser(x0_pred, x0).mean()
        if self.uses_r1:
            if real_inputs is None:
                raise ValueError('GANAFDDivergence: r1_weight > 0 needs the real inputs (requiring grad)')
            out['loss_r1'] = 0.5 * self.r1_weight * r1_penalty(real_logits, real_inputs).mean()
        return out

    def generator_losses(self, fake_logits, x_t, x_prev, a_step, var_step):
        out = dict(loss_gan=generator_loss(fake_logits).mean())
        if self.afd_weight > 0:
            afd = afd_term(x_t, x_prev, a_step, var_step)
            if self.afd_reduction == 'mean':
                afd = afd / x_t[0].numel()
            out['loss_afd'] = self.afd_weight * afd.mean()
        return out

    def __repr__(self):
        return (f'GANAFDDivergence(afd_weight={self.afd_weight}, reg_weight={self.reg_weight}, '
                f'r1_weight={self.r1_weight}, afd_reduction={self.afd_reduction!r})')
