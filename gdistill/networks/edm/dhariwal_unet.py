"""DhariwalUNet: the ADM UNet of Dhariwal & Nichol (2021) as configured in EDM (Karras et al.
2022, App. F.2; the ImageNet-64 "adm" checkpoint), our own re-implementation.

Module names (``map_noise``, ``map_augment``, ``map_layer0/1``, ``map_label``,
``enc.<res>x<res>_*``, ``dec.<res>x<res>_*``, ``out_norm``, ``out_conv``) equal the official
checkpoint's, so its state_dict loads strictly.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import MODELS
from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock


@MODELS.register_module()
class DhariwalUNet(nn.Module):
    """F(x, c_noise, labels) of ADM.

    Args follow EDM's ``DhariwalUNet``: ``img_resolution``, ``in_channels``, ``out_channels``,
    ``label_dim``, ``augment_dim``, ``model_channels``, ``channel_mult``, ``channel_mult_emb``,
    ``num_blocks``, ``attn_resolutions``, ``dropout``, ``label_dropout``.
    """

    swap_noise_embedding_halves = False

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                 num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        self.emb_channels = emb_channels
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3),
                    init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                     init=init, init_zero=init_zero)

        # Embedding of noise level, augmentation labels and class label.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder: stem conv, then per level an optional downsampling block and num_blocks blocks.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: mirror image, concatenating every encoder activation on the way up.
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
                    cin, cout, attention=(res in attn_resolutions), **block)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        """The conditioning vector fed to every block: [N, emb_channels]."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:  # absent = zeros
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if labels is None:
                raise ValueError(f'{type(self).__name__} has label_dim='
                                 f'{self.map_label.in_features}: pass class_labels of '
                                 f'shape [N, {self.map_label.in_features}] (one-hot)')
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def backbone(self, x, emb):
        """Encoder, decoder and output head given the conditioning vector ``emb``."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return self.backbone(x, self.embed(noise_labels, class_labels, augment_labels))
