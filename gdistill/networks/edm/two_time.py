"""Two-time conditioning: turn a one-time EDM network D(x; σ) into f(x; σ, σ_cond).

Students that condition on two times (e.g. CoSIM's f_ψ(x_s; s, t), DESIGN "Networks") start
from a copy of the teacher. :class:`TwoTimePrecond` deep-copies a built preconditioner and adds
a second time-embedding path for ``cond_sigma``:

    e_cond = SiLU(L1'(SiLU(L0'(map_noise'(c_noise(σ_cond))))))     (copies of the teacher's
                                                                      noise-embedding layers)
    emb    = emb_teacher(c_noise(σ), labels) + G·e_cond + g         (G, g zero-initialised)

``c_noise`` is the wrapped preconditioner's own (EDM: ln σ/4, VP: 999·t(σ), …), so σ_cond is
preconditioned exactly as σ. The gate G, g starts at zero, so at initialisation the output
equals the wrapped network's bit for bit, for any ``cond_sigma``; training opens the gate.
The original network is not modified.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import MODELS
from .layers import Linear
from .precond import Preconditioner


class SecondTimeEmbedding(nn.Module):
    """Copies of a UNet's noise-embedding path (``map_noise``, ``map_layer0``, ``map_layer1``)
    followed by a zero-initialised linear gate into the UNet's embedding space."""

    def __init__(self, unet):
        super().__init__()
        self.swap_halves = unet.swap_noise_embedding_halves
        self.map_noise = copy.deepcopy(unet.map_noise)
        self.map_layer0 = copy.deepcopy(unet.map_layer0)
        self.map_layer1 = copy.deepcopy(unet.map_layer1)
        self.gate = Linear(unet.emb_channels, unet.emb_channels)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, noise_labels):
        emb = self.map_noise(noise_labels)
        if self.swap_halves:  # SongUNet's cos|sin → sin|cos, as in its own embedding
            emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))
        return self.gate(emb)


@MODELS.register_module()
class TwoTimePrecond(nn.Module):
    """f(x; σ, σ_cond): a preconditioned EDM network with a second, gated time embedding.

    Args:
        net: a built preconditioner (``EDMPrecond``, ``VPPrecond``, ``VEPrecond`` or
            ``iDDPMPrecond`` around a ``SongUNet`` or ``DhariwalUNet``) or its MODELS config.
            It is deep-copied (``self.net``); the argument is left as it was.

    ``forward(x, sigma, class_labels=None, cond_sigma=None, force_fp32=False, **model_kwargs)``
    returns the denoised x̂₀ like the wrapped network. ``cond_sigma`` (scalar or [N]) is the
    second noise level; ``None`` skips the second path (the output is then the wrapped
    network's). As for ``sigma``, EDM/VE preconditioning takes ln σ_cond: pass σ_cond > 0.
    State dict: the wrapped network's keys under ``net.`` plus ``cond_embedding.*``.
    """

    def __init__(self, net):
        super().__init__()
        if isinstance(net, dict):
            net = MODELS.build(net)
        if isinstance(net, TwoTimePrecond):
            net = net.net
        if not isinstance(net, Preconditioner):
            raise TypeError(f'TwoTimePrecond wraps an EDM preconditioner (EDMPrecond, '
                            f'VPPrecond, VEPrecond, iDDPMPrecond); got {type(net).__name__}')
        self.net = copy.deepcopy(net)
        self.cond_embedding = SecondTimeEmbedding(self.net.model)

    # --- what callers read off a network -----------------------------------------------------
    @property
    def img_resolution(self):
        return self.net.img_resolution

    @property
    def img_channels(self):
        return self.net.img_channels

    @property
    def label_dim(self):
        return self.net.label_dim

    @property
    def sigma_min(self):
        return self.net.sigma_min

    @property
    def sigma_max(self):
        return self.net.sigma_max

    @property
    def sigma_data(self):
        if not hasattr(self.net, 'sigma_data'):
            raise AttributeError(f'{type(self.net).__name__} has no sigma_data')
        return self.net.sigma_data

    @property
    def num_added_params(self):
        """Parameters of the second time path and its gate (what two-time conditioning adds)."""
        return sum(p.numel() for p in self.cond_embedding.parameters())

    def round_sigma(self, sigma, **kwargs):
        return self.net.round_sigma(sigma, **kwargs)

    def with_condition_time(self):
        """Already two-time: a deep copy."""
        return copy.deepcopy(self)

    def forward(self, x, sigma, class_labels=None, cond_sigma=None, force_fp32=False,
                **model_kwargs):
        net, unet = self.net, self.net.model
        x, sigma, class_labels, dtype = net.prepare_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = net.precondition(sigma)
        with net.precision(dtype, x.device):     # a half dtype: F wholly in it (see Preconditioner)
            emb = unet.embed(c_noise.flatten(), class_labels, **model_kwargs)
            if cond_sigma is not None:
                cond_sigma = torch.as_tensor(cond_sigma, device=x.device)
                cond_sigma = cond_sigma.to(torch.float32).reshape(-1, 1, 1, 1)
                emb = emb + self.cond_embedding(net.precondition(cond_sigma)[3].flatten())
            F_x = unet.backbone(net.model_input(c_in * x, dtype), emb)
        return net.combine(x, F_x, c_skip, c_out)
