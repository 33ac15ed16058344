"""EDM2's UNet and its preconditioner (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Fig. 21, eq. 21 and App. B; official file
``training/networks_edm2.py`` of NVlabs/edm2: ``UNet`` and ``Precond``).

Module tree and state_dict keys equal the official ones (``unet.enc.64x64_conv.weight``,
``unet.dec.8x8_in0.attn_qkv.weight``, ``logvar_fourier.freqs``, …), so every released EDM2
network (img512 XS…XXL, img64 S…XL) loads with ``strict=True``; see
``gdistill.teachers.edm_pickle`` for reading the released pickles safely.
"""
import copy
import math

import torch
from torch import nn

from ...registry import MODELS
from .layers import EDM2Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum


@MODELS.register_module()
class EDM2UNet(nn.Module):
    """EDM2's magnitude-preserving UNet F(x, c_noise, labels) (networks_edm2.py ``UNet``).

    Levels ℓ = 0…L−1 run at resolution R>>ℓ with ``model_channels``·channel_mult[ℓ] channels.
    Encoder (``enc``, a ModuleDict in this order): ``{R}x{R}_conv`` (3×3 MPConv of
    img_channels + 1 inputs — a constant-1 channel is appended) at level 0,
    ``{r}x{r}_down`` at later levels, then ``{r}x{r}_block{0..num_blocks−1}``; every output is
    a skip. Decoder (``dec``): ``{r}x{r}_in0`` (attention always on) and ``_in1`` at the
    deepest level, ``{r}x{r}_up`` at the others, then ``{r}x{r}_block{0..num_blocks}``, each
    preceded by mp_cat(x, skip, concat_balance). Output: ``out_conv`` with gain ``out_gain``
    (0 at initialisation). The embedding is
    mp_silu(mp_sum(emb_noise(emb_fourier(c_noise)), emb_label(onehot·√label_dim), label_balance)).
    ``block_kwargs`` go to every :class:`EDM2Block` (``dropout``, ``channels_per_head``, …).
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f'EDM2UNet: img_resolution {img_resolution} must be divisible by '
                             f'2^(len(channel_mult) - 1) = {1 << (len(channel_mult) - 1)}')
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.emb_channels = cemb
        self.noise_channels = cnoise
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = EDM2Block(cout, cout, cemb, flavor='enc',
                                                          resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = EDM2Block(
                    cin, cout, cemb, flavor='enc', attention=res in attn_resolutions,
                    **block_kwargs)

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                         attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                         **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                        resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = EDM2Block(
                    cin, cout, cemb, flavor='dec', attention=res in attn_resolutions,
                    **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embed(self, noise_labels, class_labels=None, extra=None):
        """The block embedding. ``extra`` (same shape as the noise embedding, or None) is added
        before the final mp_silu; the two-time network passes its gated second time path here."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f'EDM2UNet: a conditional network (label_dim={self.label_dim}) '
                                 'needs class_labels [N, label_dim]')
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])),
                         t=self.label_balance)
        if extra is not None:
            emb = emb + extra
        return mp_silu(emb)

    def backbone(self, x, emb):
        """Encoder, decoder and output convolution for a given embedding."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith('_conv') else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def forward(self, x, noise_labels, class_labels=None):
        return self.backbone(x, self.embed(noise_labels, class_labels))


@MODELS.register_module()
class EDM2Precond(nn.Module):
    """EDM2's preconditioned denoiser with its uncertainty head (networks_edm2.py ``Precond``):

        D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise),  c_skip = σ_d²/(σ²+σ_d²),
        c_out = σσ_d/√(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²),  c_noise = ln(σ)/4

    (EDM's Table 1 formulas, σ_d = 0.5 for latents and pixels alike), and with
    ``return_logvar=True`` also u(σ) = logvar_linear(logvar_fourier(c_noise)) [N, 1, 1, 1], the
    log-variance of EDM2 eq. 21's loss weighting. F runs in fp16 only on CUDA when
    ``use_fp16`` and not ``force_fp32``; D is returned in float32. A conditional network given
    no labels uses zeros (as EDM2 does) — that is not an unconditional model.

    ``unet_kwargs`` go to :class:`EDM2UNet` (``model_channels``, ``channel_mult``,
    ``num_blocks``, ``attn_resolutions``, ``dropout``, …).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels,
                             label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def prepare_inputs(self, x, sigma, class_labels=None, force_fp32=False):
        """x and σ in float32 (σ as [N, 1, 1, 1]), labels as float32 [N, label_dim] (zeros
        [1, label_dim] when a conditional net gets none; None when unconditional) and the dtype
        the UNet runs in."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if not self.label_dim:
            class_labels = None
        elif class_labels is None:
            class_labels = x.new_zeros([1, self.label_dim])
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        return x, sigma, class_labels, (torch.float16 if fp16 else torch.float32)

    def precondition(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for σ of shape [N, 1, 1, 1]; c_noise is [N]."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        return c_skip, c_out, c_in, c_noise

    def logvar(self, c_noise):
        """u(σ) of EDM2 eq. 21 as [N, 1, 1, 1] from c_noise = ln(σ)/4 [N]."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        x, sigma, class_labels, dtype = self.prepare_inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar(c_noise)
        return D_x

    def round_sigma(self, sigma):
        """Every σ > 0 is accepted: EDM2 has no discrete levels and no σ range (the official
        Precond has no such method; this identity lets EDM's samplers, which ask for one, run
        unchanged)."""
        return torch.as_tensor(sigma)

    def with_condition_time(self):
        """A deep copy conditioned on a second time: f(x; σ, cond_sigma), equal to this network
        at initialisation (see ``gdistill.networks.edm2.two_time``). ``self`` is unchanged."""
        from .two_time import EDM2TwoTimePrecond
        return EDM2TwoTimePrecond(self)


def edm2_config(size, img_resolution=64, img_channels=4, label_dim=1000, **overrides):
    """The MODELS config of a released EDM2 size (train_edm2.py presets): ``size`` in
    xs/s/m/l/xl/xxl gives model_channels 128/192/256/320/384/448 and dropout 0/0/.1/.1/.1/.1;
    every other setting is the class default (channel_mult [1,2,3,4], num_blocks 3, attention
    at 16 and 8). Defaults are ImageNet-512's latent layout (4×64×64, 1000 classes);
    ``overrides`` replace or add keys (e.g. ``dropout=0``)."""
    sizes = dict(xs=(128, 0.0), s=(192, 0.0), m=(256, 0.1), l=(320, 0.1), xl=(384, 0.1),
                 xxl=(448, 0.1))
    key = str(size).lower()
    if key not in sizes:
        raise ValueError(f'unknown EDM2 size {size!r}; choose one of {list(sizes)}')
    channels, dropout = sizes[key]
    cfg = dict(type='EDM2Precond', img_resolution=img_resolution, img_channels=img_channels,
               label_dim=label_dim, model_channels=channels, dropout=dropout, use_fp16=True)
    cfg.update(overrides)
    return copy.deepcopy(cfg)
