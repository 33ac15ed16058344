"""Time-conditioned discriminators with an auxiliary denoising head (SIDDM, Xu et al. 2023).

Both take EDM's variables, as the package's generators do: x = x_s/a(s) at noise level
σ = σ(s)/a(s) ≥ 0, and return ``(logits [N], x0_pred)``. The logit scores "real" (D = sigmoid);
``x0_pred`` is the auxiliary head's estimate of x₀, computed from the same shared layers and
preconditioned as EDM's denoisers (Karras et al. 2022, Table 1):

    x̂₀ = c_skip(σ)·x + c_out(σ)·H(features),  c_skip = σ_d²/(σ² + σ_d²),  c_out = σσ_d/√(σ² + σ_d²),

which is exact (x̂₀ = x) at σ = 0, the last step's clean level. Unlike EDM's c_noise = ¼·ln σ the
noise level is embedded through (2/π)·atan(σ/σ_d) ∈ [0, 1), finite at σ = 0 and at σ → ∞.
``aux=False`` skips the head (``x0_pred`` is None)."""
import math

import torch
from torch import nn

from ..registry import MODELS
from ..utils import append_dims
from .mlp import FourierTimeEmbedding


class _NoiseConditioned(nn.Module):
    """What both discriminators share: σ's embedding and the preconditioning of the head."""

    def _setup(self, emb_dim, width, sigma_data, label_dim):
        if sigma_data <= 0:
            raise ValueError(f'{type(self).__name__}: sigma_data must be > 0, got {sigma_data}')
        self.sigma_data, self.label_dim = float(sigma_data), int(label_dim)
        self.time_emb = FourierTimeEmbedding(emb_dim)
        self.map_time = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.map_label = nn.Linear(label_dim, width, bias=False) if label_dim else None

    def _sigma(self, sigma, x):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if bool((sigma < 0).any()):
            raise ValueError(f'{type(self).__name__}: noise levels must be >= 0')
        return sigma

    def embed(self, sigma, class_labels=None):
        level = (2 / math.pi) * torch.atan(sigma / self.sigma_data)
        emb = self.map_time(self.time_emb(level))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f'{type(self).__name__} is conditional on {self.label_dim} classes: give class_labels')
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        return emb

    def c_in(self, sigma, ndim):
        return append_dims(1 / (sigma ** 2 + self.sigma_data ** 2).sqrt(), ndim)

    def precondition_head(self, x, sigma, raw):
        sd = self.sigma_data
        c_skip = append_dims(sd ** 2 / (sigma ** 2 + sd ** 2), x.ndim)
        c_out = append_dims(sigma * sd / (sigma ** 2 + sd ** 2).sqrt(), x.ndim)
        return c_skip * x + c_out * raw


@MODELS.register_module()
class MLPDiscriminator(_NoiseConditioned):
    """An MLP discriminator for low-dimensional (toy) data: ``depth`` residual SiLU layers of
    width ``hidden`` with the noise embedding added to each; a linear logit head and a linear
    auxiliary denoising head on the last hidden layer (so the regulariser shapes every layer
    the logit uses).

    ``fourier_features`` F > 0 feeds [x, sin 2πBx, cos 2πBx] (B: d×F, fixed, N(0, ``fourier_scale``²))
    to the first layer instead of x (Tancik et al. 2020): a plain MLP learns the sharp bumps of a
    mixture like grid25 (modes of std 0.1) far too slowly to tell them from a blur (spectral bias)."""

    def __init__(self, dim=2, hidden=256, depth=3, emb_dim=64, sigma_data=0.5, label_dim=0,
                 fourier_features=0, fourier_scale=1.0, seed=0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f'MLPDiscriminator: dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}')
        if fourier_features < 0 or fourier_scale <= 0:
            raise ValueError(f'MLPDiscriminator: need fourier_features >= 0 and fourier_scale > 0, got '
                             f'{fourier_features}, {fourier_scale}')
        self.dim = int(dim)
        self._setup(emb_dim, hidden, sigma_data, label_dim)
        g = torch.Generator().manual_seed(seed)
        # drawn on the CPU (the same features on every device), then on the default device
        self.register_buffer('fourier', torch.randn(dim, int(fourier_features), generator=g, device='cpu')
                             .to(torch.get_default_device()) * fourier_scale)
        self.inp = nn.Linear(dim + 2 * int(fourier_features), hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.act = nn.SiLU()
        self.logit = nn.Linear(hidden, 1)
        self.aux_head = nn.Linear(hidden, dim)

    def forward(self, x, sigma, class_labels=None, aux=True):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f'MLPDiscriminator: expected points [N, {self.dim}], got {tuple(x.shape)}')
        sigma = self._sigma(sigma, x)
        emb = self.embed(sigma, class_labels)
        h = self.c_in(sigma, x.ndim) * x
        if self.fourier.shape[1]:
            angle = (2 * math.pi) * h @ self.fourier.to(h.dtype)
            h = torch.cat([h, angle.sin(), angle.cos()], dim=1)
        h = self.act(self.inp(h) + emb)
        for block in self.blocks:
            h = h + self.act(block(h) + emb)
        logits = self.logit(h).squeeze(-1)
        return logits, (self.precondition_head(x, sigma, self.aux_head(h)) if aux else None)


def _groups(channels, max_groups=32, min_per_group=4):
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0 and channels // g >= min_per_group:
            return g
    return 1


class _ResBlock(nn.Module):
    """GroupNorm–SiLU–conv twice, the noise embedding added as a per-channel shift in between."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm0, self.conv0 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, cout)
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x, emb):
        h = self.conv0(self.act(self.norm0(x)))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.act(self.norm1(h)))
        return (self.skip(x) + h) / math.sqrt(2)


@MODELS.register_module()
class ConvDiscriminator(_NoiseConditioned):
    """A time-conditioned convolutional encoder for images: a stem conv, then per resolution
    level one residual block (the noise embedding as a per-channel shift) and a 2× average-pool
    down to the next level; the logit is a linear map of the last level's summed features.

    The auxiliary denoising head is a light decoder on the *same* encoder: from the last level
    it upsamples 2× per level and adds each level's encoder features (1×1-projected), then a 3×3
    conv to ``img_channels``, preconditioned as above. Channels per level:
    ``model_channels × channel_mult[i]``."""

    def __init__(self, img_resolution=32, img_channels=3, model_channels=64, channel_mult=(1, 2, 2, 2),
                 emb_dim=128, sigma_data=0.5, label_dim=0):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or model_channels < 1 or any(m < 1 for m in channel_mult):
            raise ValueError(f'ConvDiscriminator: need model_channels >= 1 and a non-empty channel_mult of '
                             f'positive ints, got {model_channels}, {channel_mult}')
        if img_resolution % (2 ** (levels - 1)):
            raise ValueError(f'ConvDiscriminator: img_resolution {img_resolution} must be divisible by '
                             f'2^(levels − 1) = {2 ** (levels - 1)} for {levels} levels (channel_mult {channel_mult})')
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        chans = [model_channels * m for m in channel_mult]
        width = chans[-1]
        self._setup(emb_dim, width, sigma_data, label_dim)
        self.stem = nn.Conv2d(img_channels, chans[0], 3, padding=1)
        self.enc = nn.ModuleList(_ResBlock(cin, cout, width) for cin, cout in zip([chans[0]] + chans[:-1], chans))
        self.pool = nn.AvgPool2d(2)
        self.act = nn.SiLU()
        self.logit = nn.Linear(width, 1)
        # the auxiliary head: up one level at a time, adding the encoder's features there
        self.aux_lateral = nn.ModuleList(nn.Conv2d(c, chans[0], 1) for c in chans)
        self.aux_up = nn.ModuleList(nn.Conv2d(chans[0], chans[0], 3, padding=1) for _ in chans[:-1])
        self.aux_out = nn.Sequential(nn.GroupNorm(_groups(chans[0]), chans[0]), nn.SiLU(),
                                     nn.Conv2d(chans[0], img_channels, 3, padding=1))

    def forward(self, x, sigma, class_labels=None, aux=True):
        want = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f'ConvDiscriminator: expected images [N, {want[0]}, {want[1]}, {want[2]}], '
                             f'got {tuple(x.shape)}')
        sigma = self._sigma(sigma, x)
        emb = self.act(self.embed(sigma, class_labels))
        h = self.stem(self.c_in(sigma, x.ndim) * x)
        feats = []
        for i, block in enumerate(self.enc):
            h = block(h, emb)
            feats.append(h)
            if i + 1 < len(self.enc):
                h = self.pool(h)
        logits = self.logit(self.act(h).sum(dim=(2, 3))).squeeze(-1)
        if not aux:
            return logits, None
        y = self.aux_lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            y = nn.functional.interpolate(y, scale_factor=2, mode='nearest')
            y = self.act(self.aux_up[i](y)) + self.aux_lateral[i](feats[i])
        return logits, self.precondition_head(x, sigma, self.aux_out(y))
