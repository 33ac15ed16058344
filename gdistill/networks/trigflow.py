"""TrigFlow's network F (Lu & Song 2024, "Simplifying, stabilizing and scaling continuous-time
consistency models", §3) built from any denoiser in EDM form.

TrigFlow writes x_t = cos t·x₀ + sin t·z, z ~ N(0, σ_d² I), t ∈ [0, π/2], and parameterises

    PF-ODE:               dx_t/dt = σ_d·F(x_t/σ_d, t)
    consistency function: f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t)

so that f(x_t, t) is the model's estimate of x₀. A denoiser D(x; σ) ≈ E[x₀ | x₀ + σ·n = x] in
EDM's variable serves the same time by equal SNR: x_t/cos t = x₀ + σ_d tan t·(z/σ_d) is EDM's x
at σ = σ_d·tan t. Hence x̂₀ = D(x_t/cos t; σ_d tan t), and from f = x̂₀,

    F(x_t/σ_d, t) = (cos t·x_t − D(x_t/cos t; σ_d tan t)) / (σ_d sin t).

For EDM's own preconditioning (c_skip = cos²t, c_out = σ_d sin t, c_in = cos t/σ_d at this σ)
this is exactly −F_EDM(x_t/σ_d, ¼ ln σ) — the raw network, with no division; for VP/VE
preconditioners it is the same map written through their D. The coefficients are computed in
float64 (1/sin t reaches 500 at σ = 0.002) and only then cast to the data's dtype.
"""
import math

import torch
from torch import nn

from ..registry import MODELS, build
from ..utils import append_dims


def trigflow_coefficients(t, sigma_data):
    """(c_in, c_skip, c_out, σ) in float64 for F = c_skip·x_in − c_out·D(c_in·x_in; σ), with
    x_in = x_t/σ_d: c_in = σ_d/cos t, c_skip = cos t/sin t, c_out = 1/(σ_d sin t),
    σ = σ_d·tan t (the EDM noise level of equal SNR)."""
    t64 = torch.as_tensor(t).to(torch.float64)
    cos, sin = t64.cos(), t64.sin()
    return sigma_data / cos, cos / sin, 1.0 / (sigma_data * sin), sigma_data * sin / cos


def trigflow_F(denoiser, x_in, t, sigma_data, class_labels=None):
    """TrigFlow's F(x_in, t) with x_in = x_t/σ_d, from ``denoiser(x, sigma, class_labels)`` in
    EDM's variable (see the module docstring). ``t`` has shape [N]; differentiable in x_in and
    t, so ``torch.func.jvp`` gives dF/dt."""
    c_in, c_skip, c_out, sigma = trigflow_coefficients(t, sigma_data)
    dtype = x_in.dtype
    d = denoiser(x_in * append_dims(c_in.to(dtype), x_in.ndim), sigma.to(dtype), class_labels)
    return append_dims(c_skip.to(dtype), x_in.ndim) * x_in - append_dims(c_out.to(dtype), x_in.ndim) * d.to(dtype)


class TrigFlowF(nn.Module):
    """F of TrigFlow for any denoiser in EDM form — a teacher (``Teacher.edm_denoise``, whatever
    its native schedule: EDM, VP or VE preconditioning) or a network D(x; σ, labels).
    ``forward(x_in, t, class_labels)`` with x_in = x_t/σ_d; ``velocity(x_t, t)`` = dx_t/dt =
    σ_d·F(x_t/σ_d, t), the PF-ODE of TrigFlow."""

    def __init__(self, denoiser, sigma_data=0.5):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f'TrigFlowF: sigma_data must be > 0, got {sigma_data}')
        self.denoiser = denoiser
        self.sigma_data = float(sigma_data)

    def _denoise(self, x, sigma, class_labels):
        fn = getattr(self.denoiser, 'edm_denoise', None) or self.denoiser
        return fn(x, sigma, class_labels)

    def forward(self, x_in, t, class_labels=None):
        return trigflow_F(self._denoise, x_in, t, self.sigma_data, class_labels)

    def velocity(self, x_t, t, class_labels=None):
        return self.sigma_data * self(x_t / self.sigma_data, t, class_labels)


class LogVarianceHead(nn.Module):
    """The adaptive weight w_φ(t) of sCM (Lu & Song 2024, §4.3, "adaptive weighting"): a
    learned log-variance of the loss at time t, read from a fixed Fourier embedding of the
    time — cos/sin(2π·f·c), f ~ N(0, 1), c = ¼·ln σ with σ = σ_d tan t (EDM's c_noise, which
    spreads small and large noise levels evenly) — through one linear layer initialised to
    zero (w ≡ 0 at the start, i.e. weight 1). ``forward(sigma)`` takes the EDM noise level."""

    def __init__(self, channels=128, seed=0):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f'LogVarianceHead: channels must be an even number >= 2, got {channels}')
        g = torch.Generator().manual_seed(seed)
        # drawn on the CPU (the same features on every device), then on the default device
        self.register_buffer('freqs', torch.randn(channels // 2, generator=g, device='cpu').to(torch.get_default_device()))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma):
        c = torch.as_tensor(sigma).to(torch.float64).log().reshape(-1) / 4
        phase = 2 * math.pi * c[:, None] * self.freqs[None].to(torch.float64)
        emb = torch.cat([phase.cos(), phase.sin()], dim=1).to(self.linear.weight.dtype)
        return self.linear(emb).squeeze(1)


@MODELS.register_module()
class TrigFlowStudent(nn.Module):
    """The sCM student: a denoiser network D_θ(x; σ, labels) in EDM form (e.g. a copy of the
    teacher's) seen through TrigFlow, plus the adaptive-weight head w_φ, trained together.

    - ``forward(x, sigma, class_labels, with_logvar=False)``: the consistency function in EDM's
      variable, f(x_t, t) = D_θ(x_t/cos t; σ_d tan t) — so the student is a drop-in denoiser
      for every sampler — and, with ``with_logvar``, also w_φ at σ (one call through a DDP
      wrapper trains both);
    - ``F(x_in, t, class_labels)``: TrigFlow's F_θ(x_t/σ_d, t) (``trigflow_F``);
    - ``consistency(x_t, t, class_labels)``: f = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t);
    - ``log_variance(t)``: w_φ(t).

    ``network``: a MODELS config or a built module. ``sigma_data`` defaults to the network's."""

    def __init__(self, network, sigma_data=None, logvar_channels=128):
        super().__init__()
        self.network = build(MODELS, network) if isinstance(network, dict) else network
        if not isinstance(self.network, nn.Module):
            raise TypeError(f'TrigFlowStudent: network must be a MODELS config or an nn.Module, '
                            f'got {type(network).__name__}')
        sd = sigma_data if sigma_data is not None else getattr(self.network, 'sigma_data', None)
        if sd is None:
            raise ValueError(f'TrigFlowStudent: {type(self.network).__name__} has no sigma_data; give sigma_data=')
        self.sigma_data = float(sd)
        self.logvar = LogVarianceHead(logvar_channels)
        for name in ('label_dim', 'dim', 'img_resolution', 'img_channels'):
            if hasattr(self.network, name):
                setattr(self, name, getattr(self.network, name))

    def forward(self, x, sigma, class_labels=None, with_logvar=False):
        out = self.network(x, sigma, class_labels)
        return (out, self.logvar(sigma)) if with_logvar else out

    def F(self, x_in, t, class_labels=None):  # noqa: N802 (the paper's name)
        return trigflow_F(self.network, x_in, t, self.sigma_data, class_labels)

    def consistency(self, x_t, t, class_labels=None):
        t64 = torch.as_tensor(t).to(torch.float64)
        cos = append_dims(t64.cos().to(x_t.dtype), x_t.ndim)
        sin = append_dims(t64.sin().to(x_t.dtype), x_t.ndim)
        return cos * x_t - sin * self.sigma_data * self.F(x_t / self.sigma_data, t, class_labels)

    def log_variance(self, t):
        return self.logvar(self.sigma_data * torch.as_tensor(t).to(torch.float64).tan())


def student_F_and_logvar(student, x_in, t, sigma_data, class_labels=None):
    """F_θ(x_in, t) and w_φ(t) from one call of ``student`` (a ``TrigFlowStudent`` or a DDP
    wrapper of one: the call goes through its ``forward``, so gradient synchronisation sees it)."""
    logvar = []

    def denoise(x, sigma, labels):
        d, w = student(x, sigma, labels, with_logvar=True)
        logvar.append(w)
        return d
    return trigflow_F(denoise, x_in, t, sigma_data, class_labels), logvar[0]
