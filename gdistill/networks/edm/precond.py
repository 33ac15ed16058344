"""EDM's four preconditioners (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and App. B.6), our own re-implementation.

Each wraps a raw network F (``SongUNet`` or ``DhariwalUNet``, in ``self.model``) into a
denoiser

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))

with the coefficients of its row of Table 1. Constructor signatures, ``forward`` and the
state_dict layout (``model.*``, plus ``u`` for iDDPM) equal EDM's, so the official pickles'
networks load strictly (see ``gdistill.teachers.edm_pickle``).
"""
import contextlib
import math

import torch
from torch import nn

from ...registry import MODELS
from .dhariwal_unet import DhariwalUNet
from .song_unet import SongUNet

MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
PRECISIONS = ('fp32', 'bf16')


def sampling_precision(precision, device):
    """The context a sampler runs in for ``precision``: ``'fp32'`` (as is) or ``'bf16'`` (a
    bfloat16 autocast region on ``device``'s type, in which every EDM preconditioner runs its F
    wholly in bfloat16 — ``autocast_mode='cast'`` — and other networks op by op; the samplers'
    own arithmetic and the denoised outputs stay float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision is one of {PRECISIONS}, got {precision!r}')
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)



class InPrecision:
    """A denoiser whose every call runs under ``sampling_precision(precision, device)`` — what a
    sampler is given for bf16 sampling, so that only the network calls change precision (a
    decoder or a feature detector after the sampler stays float32). Outputs are float32; every
    other attribute (``sigma_min``, ``round_sigma``, …) is the network's."""

    def __init__(self, net, precision, device):
        sampling_precision(precision, device)       # checks the name
        self.net, self.precision, self.device = net, precision, device

    def __call__(self, *args, **kwargs):
        with sampling_precision(self.precision, self.device):
            out = self.net(*args, **kwargs)
        return out.float() if torch.is_tensor(out) else out

    def __getattr__(self, name):
        return getattr(self.__dict__['net'], name)


def in_precision(net, precision, device):
    """``net`` for ``precision='fp32'``, else ``InPrecision(net, precision, device)``."""
    return net if precision == 'fp32' else InPrecision(net, precision, device)


class Preconditioner(nn.Module):
    """Shared machinery of the four preconditioners of the EDM paper (Karras et al. 2022,
    Table 1 and App. B.6): input casting, the fp16 switch, class labels, and
    D = c_skip·x + c_out·F(c_in·x, c_noise). Subclasses define ``precondition``.

    ``forward(x, sigma, class_labels=None, force_fp32=False, **model_kwargs)`` returns the
    denoised x̂₀ in float32; ``model_kwargs`` (e.g. ``augment_labels``) go to F. Like EDM, fp16
    is used only on CUDA and only when ``use_fp16`` and not ``force_fp32``.

    Speed options (keyword arguments of every preconditioner, also attributes; none changes a
    float32 result or the state_dict):

    - ``use_bf16``: F runs wholly in bfloat16 — its input cast once, every layer in bf16 (weights
      cast per call, GroupNorm, SiLU and attention in bf16 with float32 statistics inside the
      kernels), the embedding in float32 — as EDM's ``use_fp16`` runs it in float16 (on any
      device; ``force_fp32`` turns it off per call);
    - ``autocast_mode``: what F does under a half-precision ``torch.autocast`` region (the
      distillers' ``mixed_precision='bf16'``): ``'cast'`` (default) runs it as ``use_bf16`` does
      in the autocast dtype, with autocast off inside F (no float32 round trip around every
      GroupNorm); ``'ops'`` leaves it to autocast op by op (torch's own policy);
    - ``channels_last``: F's activations and convolution weights in channels-last layout
      (``set_channels_last``), which cuDNN's fastest half-precision kernels use.
    """

    AUTOCAST_MODES = ('cast', 'ops')

    out_channels_per_image_channel = 1  # iDDPM's F also predicts variances (2×)

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type,
                 model_kwargs):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f'{type(self).__name__}: model_type={model_type!r} is not supported;'
                             f' choose one of {sorted(MODEL_TYPES)}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        model_kwargs = dict(model_kwargs)
        self.use_bf16 = bool(model_kwargs.pop('use_bf16', False))
        autocast_mode = model_kwargs.pop('autocast_mode', 'cast')
        if autocast_mode not in self.AUTOCAST_MODES:
            raise ValueError(f"{type(self).__name__}: autocast_mode is 'cast' (F wholly in the autocast dtype) "
                             f"or 'ops' (torch's per-op autocast), got {autocast_mode!r}")
        self.autocast_mode = autocast_mode
        channels_last = bool(model_kwargs.pop('channels_last', False))
        self.model_type = model_type
        self.model = MODEL_TYPES[model_type](
            img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels * self.out_channels_per_image_channel,
            label_dim=label_dim, **model_kwargs)
        self.channels_last = False
        if channels_last:
            self.set_channels_last(True)

    def set_channels_last(self, enabled=True):
        """Keep F's convolution weights and activations channels-last (or back to contiguous).
        Values and state_dict keys are unchanged. Call it before wrapping the network in
        DDP/FSDP (it replaces the weights' storage)."""
        self.channels_last = bool(enabled)
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for p in self.model.parameters():
            if p.ndim == 4:
                p.data = p.data.contiguous(memory_format=fmt)
        return self

    # --- the one method a preconditioner defines ---------------------------------------------
    def precondition(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` of shape [N, 1, 1, 1]."""
        raise NotImplementedError(f'{type(self).__name__} must define precondition(sigma)')

    # --- shared ------------------------------------------------------------------------------
    def prepare_inputs(self, x, sigma, class_labels=None, force_fp32=False):
        """x and σ in float32 (σ as [N, 1, 1, 1]), labels as [N, label_dim] float32 (zeros
        [1, label_dim] when a conditional net gets none; None when unconditional) and the dtype
        F runs in."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], dtype=torch.float32, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels, self.compute_dtype(x.device, force_fp32)

    def compute_dtype(self, device, force_fp32=False):
        """The dtype F runs in: float16 for EDM's ``use_fp16`` (CUDA only), bfloat16 for
        ``use_bf16``, the autocast dtype inside a half-precision autocast region when
        ``autocast_mode='cast'``, else float32."""
        device = torch.device(device).type
        if force_fp32:
            return torch.float32
        if self.use_fp16 and device == 'cuda':
            return torch.float16
        if getattr(self, 'use_bf16', False):
            return torch.bfloat16
        if getattr(self, 'autocast_mode', 'cast') == 'cast' and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if dtype in (torch.float16, torch.bfloat16):
                return dtype
        return torch.float32

    def precision(self, dtype, device):
        """The context F runs in: for a half dtype, autocast off (F manages its dtypes itself,
        as EDM's use_fp16 path does); otherwise the caller's."""
        if dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(torch.device(device).type, enabled=False)
        return contextlib.nullcontext()

    def model_input(self, x, dtype):
        """F's image input in ``dtype`` and the configured memory layout."""
        x = x.to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if getattr(self, 'channels_last', False) else x

    def combine(self, x, F_x, c_skip, c_out):
        """D = c_skip·x + c_out·F (only F's first img_channels channels are the image)."""
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self.prepare_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        with self.precision(dtype, x.device):
            F_x = self.model(self.model_input(c_in * x, dtype), c_noise.flatten(), class_labels=class_labels,
                             **model_kwargs)
        return self.combine(x, F_x, c_skip, c_out)

    def round_sigma(self, sigma):
        """Noise levels the network accepts (all of them, except for iDDPM's discrete grid)."""
        return torch.as_tensor(sigma)

    def with_condition_time(self):
        """A deep copy conditioned on a second time: f(x; σ, cond_sigma), equal to this
        network at initialisation (see ``gdistill.networks.edm.two_time``). ``self`` is left
        unchanged."""
        from .two_time import TwoTimePrecond
        return TwoTimePrecond(self)


@MODELS.register_module()
class VPPrecond(Preconditioner):
    """Variance-preserving preconditioning (Song et al. 2021's DDPM++ "VP"), EDM paper
    (Karras et al. 2022) Table 1 column "VP" and App. B.6:

        c_skip = 1,  c_out = −σ,  c_in = 1/√(σ²+1),  c_noise = (M−1)·σ⁻¹(σ),
        σ(t) = √(exp(½β_d·t² + β_min·t) − 1),  t ∈ [ε_t, 1].
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # python floats, not tensors: also right when built under torch.device('meta')
        self.sigma_min = math.sqrt(math.expm1(0.5 * beta_d * epsilon_t ** 2
                                              + beta_min * epsilon_t))
        self.sigma_max = math.sqrt(math.expm1(0.5 * beta_d + beta_min))

    def sigma(self, t):
        """σ(t) = √(exp(½β_d t² + β_min t) − 1)."""
        t = torch.as_tensor(t)
        return (0.5 * self.beta_d * t ** 2 + self.beta_min * t).expm1().sqrt()

    def sigma_inv(self, sigma):
        """t(σ) = (√(β_min² + 2β_d·ln(1+σ²)) − β_min) / β_d, the inverse of ``sigma``
        (log1p/expm1: exact to float32 rounding even at σ ≈ 0.002)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2).log1p()).sqrt()
                - self.beta_min) / self.beta_d

    def precondition(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


@MODELS.register_module()
class VEPrecond(Preconditioner):
    """Variance-exploding preconditioning (Song et al. 2021's NCSN++ "VE"), EDM paper
    (Karras et al. 2022) Table 1 column "VE" and App. B.6:

        c_skip = 1,  c_out = σ,  c_in = 1,  c_noise = ln(σ/2),  σ ∈ [σ_min, σ_max].
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def precondition(self, sigma):
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


def iddpm_u_table(M=1000, C_1=0.001, C_2=0.008):
    """iDDPM's discrete noise levels u_0 > … > u_M = 0 (EDM paper, Karras et al. 2022, Table 1
    "iDDPM+DDIM" and App. B.6 / C.3.4):

        ᾱ(j) = sin²(π/2 · j / (M(C_2+1))),
        u_{j−1} = √((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C_1) − 1).

    The recursion runs in float32, as ``iDDPMPrecond.__init__`` of NVlabs/edm
    training/networks.py runs it, so the table equals the buffer of the official checkpoints bit
    for bit (a float64 recursion differs by 3e-6 at u_{M−1}). Computed on the CPU and returned
    on the default device.
    """
    j = torch.arange(M + 1, dtype=torch.float32, device='cpu')
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)  # ᾱ(j−1)/ᾱ(j) for j = 1 … M
    u = torch.zeros(M + 1, dtype=torch.float32, device='cpu')
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / ratio[i - 1] - 1).sqrt()
    return u.to(torch.get_default_device())


@MODELS.register_module()
class iDDPMPrecond(Preconditioner):  # noqa: N801 (EDM's class name)
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021), EDM paper (Karras et al. 2022)
    Table 1 column "iDDPM+DDIM" and App. B.6:

        c_skip = 1,  c_out = −σ,  c_in = 1/√(σ²+1),  c_noise = M − 1 − argmin_j |u_j − σ|,

    on the discrete grid ``u`` of :func:`iddpm_u_table`. F predicts 2·img_channels channels
    (mean and variance); only the first img_channels enter D.
    """

    out_channels_per_image_channel = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001,
                 C_2=0.008, M=1000, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer('u', iddpm_u_table(M, C_1, C_2))

    # read from the buffer, so that they are those of the loaded checkpoint
    sigma_min = property(lambda self: float(self.u[self.M - 1]), doc='u_{M−1}, the lowest σ > 0')
    sigma_max = property(lambda self: float(self.u[0]), doc='u_0, the highest σ')

    def alpha_bar(self, j):
        """ᾱ(j) = sin²(π/2 · j / (M(C_2+1)))."""
        j = torch.as_tensor(j, dtype=torch.float64)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """The nearest grid level u_j to each σ (or its index j)."""
        sigma = torch.as_tensor(sigma)
        flat = sigma.detach().reshape(-1, 1).to(self.u.device, torch.float32)
        index = (flat - self.u.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def precondition(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise


@MODELS.register_module()
class EDMPrecond(Preconditioner):
    """EDM's own preconditioning, EDM paper (Karras et al. 2022) Table 1 column "ours" and
    App. B.6 (eq. 7 and the derivation of c_skip, c_out, c_in):

        c_skip = σ_d²/(σ²+σ_d²),  c_out = σ·σ_d/√(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²),
        c_noise = ln(σ)/4,  σ_d = ``sigma_data`` (0.5).

    All official EDM checkpoints use it ("vp"/"ve"/"adm" name the inner architecture).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet',
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def precondition(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise
