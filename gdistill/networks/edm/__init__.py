"""EDM's networks (Karras et al. 2022), re-implemented with the official checkpoints' module
tree and state_dict keys: the SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM) backbones, the
four preconditioners, and the two-time variant used by students."""
from .dhariwal_unet import DhariwalUNet
from .layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding,
                     UNetBlock, attention, weight_init)
from .precond import (MODEL_TYPES, EDMPrecond, Preconditioner, VEPrecond, VPPrecond,
                      iDDPMPrecond, iddpm_u_table, sampling_precision)
from .song_unet import SongUNet
from .two_time import SecondTimeEmbedding, TwoTimePrecond

__all__ = [
    'SongUNet', 'DhariwalUNet', 'EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond',
    'Preconditioner', 'TwoTimePrecond', 'SecondTimeEmbedding', 'MODEL_TYPES', 'iddpm_u_table',
    'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding',
    'attention', 'weight_init', 'sampling_precision',
]
