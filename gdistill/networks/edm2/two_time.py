"""Two-time conditioning for EDM2: f(x; σ, σ_cond) from a one-time EDM2 denoiser D(x; σ).

Students that condition on two times (CoSIM's f_ψ(x_s; s, t), DESIGN "Networks") start from a
copy of the teacher. :class:`EDM2TwoTimePrecond` deep-copies a built :class:`EDM2Precond` and
adds a second time path for ``cond_sigma``, written in EDM2's magnitude-preserving layers:

    e_cond = gate(mp_silu(emb_noise'(emb_fourier'(c_noise(σ_cond)))); gain = cond_gain)
    emb    = mp_silu(mp_sum(emb_noise(emb_fourier(c_noise(σ))), e_label) + e_cond)

``emb_fourier'``/``emb_noise'`` are copies of the teacher's noise-embedding path, ``gate`` an
MPConv(cemb → cemb) and ``cond_gain`` a scalar initialised to 0 — the same zero-gain device
EDM2 uses for ``emb_gain`` and ``out_gain`` (its MPConv weights are normalised, so a gate
cannot start at zero through its weight). At initialisation e_cond = 0 exactly, so the output
equals the wrapped network's bit for bit for any ``cond_sigma``; training opens the gain.
``c_noise`` = ln(σ_cond)/4 as for σ. The wrapped network is not modified.

Added parameters: cnoise·cemb + cemb² + 1 (S: 192·768 + 768² + 1 = 737,281, 0.26 % of
280,212,837).
"""
import copy

import torch
from torch import nn

from ...registry import MODELS
from .layers import MPConv, mp_silu
from .unet import EDM2Precond


class EDM2SecondTimeEmbedding(nn.Module):
    """Copies of an EDM2 UNet's noise-embedding path (``emb_fourier``, ``emb_noise``) and a
    zero-gain MPConv gate into the UNet's embedding space."""

    def __init__(self, unet):
        super().__init__()
        self.emb_fourier = copy.deepcopy(unet.emb_fourier)
        self.emb_noise = copy.deepcopy(unet.emb_noise)
        cemb = unet.emb_channels
        self.gate = MPConv(cemb, cemb, kernel=[])
        self.cond_gain = nn.Parameter(torch.zeros([], device=unet.out_gain.device,
                                                  dtype=unet.out_gain.dtype))
        self.gate.to(device=unet.out_gain.device, dtype=unet.emb_noise.weight.dtype)

    def forward(self, noise_labels):
        e = mp_silu(self.emb_noise(self.emb_fourier(noise_labels)))
        return self.gate(e, gain=self.cond_gain)


@MODELS.register_module()
class EDM2TwoTimePrecond(nn.Module):
    """f(x; σ, σ_cond): an :class:`EDM2Precond` with a second, zero-gain time path.

    Args:
        net: a built ``EDM2Precond`` or its MODELS config; it is deep-copied (``self.net``).

    ``forward(x, sigma, class_labels=None, cond_sigma=None, force_fp32=False,
    return_logvar=False)`` returns D like the wrapped network (and u(σ) when
    ``return_logvar``). ``cond_sigma`` (scalar or [N], > 0) is the second noise level; None
    skips the second path. State dict: the wrapped network's keys under ``net.`` plus
    ``cond_embedding.*``.
    """

    def __init__(self, net):
        super().__init__()
        if isinstance(net, dict):
            net = MODELS.build(net)
        if isinstance(net, EDM2TwoTimePrecond):
            net = net.net
        if not isinstance(net, EDM2Precond):
            raise TypeError(f'EDM2TwoTimePrecond wraps an EDM2Precond; got {type(net).__name__}')
        self.net = copy.deepcopy(net)
        self.cond_embedding = EDM2SecondTimeEmbedding(self.net.unet)

    img_resolution = property(lambda self: self.net.img_resolution)
    img_channels = property(lambda self: self.net.img_channels)
    label_dim = property(lambda self: self.net.label_dim)
    sigma_data = property(lambda self: self.net.sigma_data)
    use_fp16 = property(lambda self: self.net.use_fp16)

    @property
    def num_added_params(self):
        """Parameters of the second time path and its gate (what two-time conditioning adds)."""
        return sum(p.numel() for p in self.cond_embedding.parameters())

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def with_condition_time(self):
        """Already two-time: a deep copy."""
        return copy.deepcopy(self)

    def forward(self, x, sigma, class_labels=None, cond_sigma=None, force_fp32=False,
                return_logvar=False):
        net, unet = self.net, self.net.unet
        x, sigma, class_labels, dtype = net.prepare_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = net.precondition(sigma)
        extra = None
        if cond_sigma is not None:
            cond_sigma = torch.as_tensor(cond_sigma, device=x.device).to(torch.float32)
            extra = self.cond_embedding(net.precondition(cond_sigma.reshape(-1, 1, 1, 1))[3])
        emb = unet.embed(c_noise, class_labels, extra=extra)
        F_x = unet.backbone((c_in * x).to(dtype), emb)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, net.logvar(c_noise)
        return D_x
