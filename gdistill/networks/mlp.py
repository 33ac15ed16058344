"""A small EDM-preconditioned MLP denoiser for low-dimensional (toy) data."""
import copy
import math

import torch
from torch import nn

from ..registry import MODELS
from ..utils import append_dims


class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of c_noise (fixed), followed by a learned projection."""

    def __init__(self, dim, scale=16.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # drawn on the CPU (the same features on every device), then on the default device
        self.register_buffer('freqs', torch.randn(dim // 2, generator=g, device='cpu').to(torch.get_default_device()) * scale)

    def forward(self, c_noise):
        arg = 2 * math.pi * c_noise[:, None] * self.freqs[None].to(c_noise.dtype)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


@MODELS.register_module()
class MLPDenoiser(nn.Module):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with EDM's preconditioning
    (Karras et al. 2022, Table 1: c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
    c_in = 1/√(σ²+σ_d²), c_noise = ¼·ln σ); F is an MLP with SiLU and a Fourier time embedding
    added to every hidden layer.

    ``cond_sigma`` (a second time, for the auxiliary network f_ψ(x_s; s, t)) is only accepted
    by the module ``with_condition_time()`` returns. ``time_scale``: the std of the Fourier
    frequencies (16 as EDM's NCSN++; a small one, e.g. 0.5, keeps F smooth in σ, which sCM's
    time derivatives need — Lu & Song 2024, §4.1)."""

    def __init__(self, dim=2, hidden=256, depth=3, emb_dim=64, sigma_data=0.5, label_dim=0,
                 dropout=0.0, time_scale=16.0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f'MLPDenoiser: dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}')
        self.dim, self.sigma_data, self.label_dim = dim, float(sigma_data), label_dim
        self.img_resolution = None
        self.time_emb = FourierTimeEmbedding(emb_dim, scale=time_scale)
        self.map_time = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.cond_time = None  # filled by with_condition_time()
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def precondition(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def embed(self, sigma, class_labels=None, cond_sigma=None):
        emb = self.map_time(self.time_emb(self.precondition(sigma)[3]))
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        if cond_sigma is not None:
            if self.cond_time is None:
                raise ValueError('cond_sigma given to a network without a second time path; '
                                 'build the auxiliary network with with_condition_time()')
            emb = emb + self.cond_time(self.time_emb(self.precondition(cond_sigma)[3]))
        return emb

    def forward(self, x, sigma, class_labels=None, cond_sigma=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if cond_sigma is not None:
            cond_sigma = torch.as_tensor(cond_sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, _ = (append_dims(c, x.ndim) for c in self.precondition(sigma))
        emb = self.embed(sigma, class_labels, cond_sigma)
        h = self.act(self.inp(c_in * x) + emb)
        for block in self.blocks:
            h = h + self.drop(self.act(block(h) + emb))
        return c_skip * x + c_out * self.out(h)

    def with_condition_time(self):
        """A copy that also takes ``cond_sigma``: a second time path initialised from this
        network's own time MLP, joined through a zero-initialised last layer, so the copy's
        output equals this network's exactly at initialisation."""
        net = copy.deepcopy(self)
        path = copy.deepcopy(self.map_time)
        nn.init.zeros_(path[-1].weight)
        nn.init.zeros_(path[-1].bias)
        net.cond_time = path
        return net
