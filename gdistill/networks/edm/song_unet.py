"""SongUNet: the DDPM++ / NCSN++ UNet of Song et al. (2021) as configured in EDM
(Karras et al. 2022, App. F.2 "Network architectures"), our own re-implementation.

- DDPM++ ("vp" checkpoints): ``embedding_type='positional'``, ``encoder_type='standard'``,
  ``decoder_type='standard'``, ``channel_mult_noise=1``, ``resample_filter=[1, 1]``.
- NCSN++ ("ve" checkpoints): ``embedding_type='fourier'``, ``encoder_type='residual'``,
  ``decoder_type='standard'``, ``channel_mult_noise=2``, ``resample_filter=[1, 3, 3, 1]``.

Module names (``map_noise``, ``map_label``, ``map_augment``, ``map_layer0/1``,
``enc.<res>x<res>_*``, ``dec.<res>x<res>_*``) equal the official checkpoints', so their
state_dicts load strictly.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import MODELS
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

_CHOICES = dict(embedding_type=('positional', 'fourier'),
                encoder_type=('standard', 'skip', 'residual'),
                decoder_type=('standard', 'skip'))


@MODELS.register_module()
class SongUNet(nn.Module):
    """F(x, c_noise, labels) of DDPM++/NCSN++.

    Args follow EDM's ``SongUNet``: ``img_resolution``, ``in_channels``, ``out_channels``,
    ``label_dim`` (0 = unconditional), ``augment_dim`` (0 = no augmentation conditioning),
    ``model_channels``, ``channel_mult`` (per resolution level), ``channel_mult_emb``,
    ``num_blocks`` (per level), ``attn_resolutions``, ``dropout``, ``label_dropout``,
    ``embedding_type``, ``channel_mult_noise``, ``encoder_type``, ``decoder_type``,
    ``resample_filter``.
    """

    # the noise embedding's cos/sin halves are swapped before use (DDPM++ convention)
    swap_noise_embedding_halves = True

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
                 num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0,
                 embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=(1, 1)):
        for name, value in (('embedding_type', embedding_type), ('encoder_type', encoder_type),
                            ('decoder_type', decoder_type)):
            allowed = _CHOICES[name]
            if value not in allowed:
                raise ValueError(f'SongUNet: {name}={value!r} is not supported; '
                                 f'choose one of {allowed}')
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.emb_channels = emb_channels
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                     skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                     resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
                     init_attn=init_attn)

        # Embedding of noise level, class label and augmentation labels.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True)
                          if embedding_type == 'positional' else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (Linear(augment_dim, noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: a stem conv, then per level an optional downsampling block and num_blocks
        # blocks; the residual encoder adds a downsampled copy of the input path ("aux").
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block)
        skips = [m.out_channels for name, m in self.enc.items() if 'aux' not in name]

        # Decoder: mirror image, concatenating encoder activations (skips) on the way up;
        # the output head ("aux_norm"/"aux_conv") sits at full resolution (and at every level
        # for the 'skip' decoder, whose outputs are upsampled and summed).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True,
                        resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3,
                                                           **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        """The conditioning vector fed to every block: [N, emb_channels]."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # cos|sin → sin|cos
        if self.map_label is not None:
            labels = class_labels
            if labels is None:
                raise ValueError(f'{type(self).__name__} has label_dim='
                                 f'{self.map_label.in_features}: pass class_labels of '
                                 f'shape [N, {self.map_label.in_features}] (one-hot)')
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:  # absent = zeros
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def backbone(self, x, emb):
        """Encoder and decoder given the conditioning vector ``emb``."""
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        head = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                head = block(x)
            elif 'aux_conv' in name:
                head = block(F.silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return self.backbone(x, self.embed(noise_labels, class_labels, augment_labels))
