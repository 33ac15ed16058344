"""Magnitude-preserving building blocks of EDM2 (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", Sec. 2-3 and App. B; official file
``training/networks_edm2.py`` of NVlabs/edm2).

Every layer keeps the parameter and buffer names of the official checkpoints, so a state_dict
written by EDM2 loads here with ``strict=True``:

- ``MPFourier``: buffers ``freqs`` and ``phases`` [n] (random, drawn once at construction and
  stored in every checkpoint; never regenerated);
- ``MPConv``: ``weight`` [out, in, *kernel] and nothing else (EDM2 has no biases);
- ``EDM2Block``: ``emb_gain`` (scalar), ``conv_res0``, ``emb_linear``, ``conv_res1`` and, when
  present, ``conv_skip``, ``attn_qkv``, ``attn_proj`` (absent ones are ``None`` attributes,
  not sub-modules, so they have no state_dict entries).

Every operation here has a forward-mode derivative (plain matmul/softmax attention), so
``torch.func.jvp`` runs through the network.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def normalize(x, dim=None, eps=1e-4):
    """x / (eps + RMS(x)) over ``dim`` (default: every dim but the first), the RMS computed in
    float32 — EDM2 eq. 47/66's normalisation (networks_edm2.py ``normalize``). Note that eps
    is added to the RMS, not to the L2 norm."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x, mode='keep'):
    """EDM2's resampling with the box filter [1, 1] (networks_edm2.py ``resample``): 'down' is
    the 2×2 average (a depthwise stride-2 conv with weights 1/4), 'up' is nearest-neighbour ×2
    (a transposed conv with weights 1), 'keep' is the identity."""
    if mode == 'keep':
        return x
    if mode == 'down':
        return F.avg_pool2d(x, 2)
    if mode == 'up':
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up'; got {mode!r}")


def mp_silu(x):
    """Magnitude-preserving SiLU, EDM2 eq. 81: silu(x)/0.596 (0.596 ≈ RMS of silu(N(0, 1)))."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving sum, EDM2 eq. 88: ((1−t)·a + t·b) / √((1−t)² + t²)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation, EDM2 eq. 103: [a·C(1−t)/√N_a, b·C·t/√N_b] with
    C = √((N_a + N_b)/((1−t)² + t²)); ``a`` is the main path, ``b`` the skip."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features, EDM2 eq. 75: y = √2·cos(x ⊗ freqs + phases) with
    fixed random buffers freqs = 2π·N(0, 1)·bandwidth and phases = 2π·U(0, 1); computed in
    float32, returned in x's dtype."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.num_channels = int(num_channels)
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (4-D weight, 'same' padding) or fully connected layer
    (``kernel=[]``), EDM2 eq. 47 with forced weight normalisation (eq. 66).

    Forward: ŵ = normalize(w) (unit RMS per output row), scaled by gain/√fan_in so each row
    has L2 norm ``gain``. In training mode the stored weight is first overwritten with
    normalize(w) (no gradient) — forced weight normalisation. At inference the stored weight
    is still normalised on the fly, as EMA weights are averages of normalised weights and are
    not exactly normalised. ``gain`` may be a number or a 0-dim parameter; as in the official
    code, gain/√fan_in is computed in the gain's dtype (fp16 for the released checkpoints as
    stored)."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel = tuple(int(k) for k in kernel)
        if len(self.kernel) not in (0, 2):
            raise ValueError(f'MPConv: kernel must be [] (fully connected) or [k, k] (2-D conv); '
                             f'got {list(kernel)}')
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *self.kernel))

    def forward(self, x, gain=1):
        if self.training:
            # Forced weight normalisation (eq. 66), written through ``.data`` so that a second
            # call before backward (a net used twice in one loss) does not invalidate the
            # tensors the first call saved. Those then hold the re-normalised weight, which
            # differs by eps·|1 − RMS| relative (≤ ~1e-4 on the very first steps from released
            # EMA weights, ~1e-8 once the stored rows have unit RMS).
            with torch.no_grad():
                self.weight.data.copy_(normalize(self.weight.data.to(torch.float32)))
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self):
        return f'{self.in_channels}, {self.out_channels}, kernel={list(self.kernel)}'


class EDM2Block(nn.Module):
    """EDM2's UNet block (Fig. 21 of the paper; networks_edm2.py ``Block``).

    ``flavor='enc'``: resample, 1×1 ``conv_skip`` when channels change, pixel norm, then the
    residual branch. ``flavor='dec'``: resample, residual branch (which reads the un-skipped
    x), then ``conv_skip``. The residual branch is
    conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) · (emb_linear(emb; gain=emb_gain) + 1)))),
    joined by mp_sum(x, y, res_balance). Self-attention (when ``attention`` and
    out_channels // channels_per_head > 0 heads) uses per-head RMS-normalised q, k, v with
    interleaved qkv channels (channel = h·3C_h + 3c + {q, k, v}), joined by
    mp_sum(x, ·, attn_balance). Activations are clipped to ±clip_act.
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=(1, 1), attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f"EDM2Block: flavor must be 'enc' or 'dec'; got {flavor!r}")
        if resample_mode not in ('keep', 'up', 'down'):
            raise ValueError(f"EDM2Block: resample_mode must be 'keep', 'up' or 'down'; "
                             f'got {resample_mode!r}')
        if list(resample_filter) != [1, 1]:
            raise ValueError(f'EDM2Block: only the box filter [1, 1] (EDM2\'s default and the one '
                             f'every released model uses) is supported; got {list(resample_filter)}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = float(dropout)
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels,
                                kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = (MPConv(in_channels, out_channels, kernel=[1, 1])
                          if in_channels != out_channels else None)
        self.attn_qkv = (MPConv(out_channels, out_channels * 3, kernel=[1, 1])
                         if self.num_heads else None)
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            n, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(y, dim=2).unbind(3)  # per-head pixel norm, then split
            # [n, heads, q-pixel, k-pixel]: softmax over keys of qᵀk/√C_h
            logits = q.transpose(2, 3) @ (k / math.sqrt(q.shape[2]))
            attn = logits.softmax(dim=3)
            y = v @ attn.transpose(2, 3)  # [n, heads, C_h, q-pixel]
            y = self.attn_proj(y.reshape(n, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, flavor={self.flavor!r}, '
                f'resample_mode={self.resample_mode!r}, num_heads={self.num_heads}, '
                f'dropout={self.dropout}')
