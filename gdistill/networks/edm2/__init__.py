"""EDM2's networks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), re-implemented with the official checkpoints' module tree and state_dict
keys: the magnitude-preserving layers, the UNet, the preconditioner with its log-variance head,
and the two-time variant used by students."""
from .layers import (EDM2Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize,
                     resample)
from .two_time import EDM2SecondTimeEmbedding, EDM2TwoTimePrecond
from .unet import EDM2Precond, EDM2UNet, edm2_config

__all__ = [
    'EDM2Precond', 'EDM2UNet', 'EDM2Block', 'EDM2TwoTimePrecond', 'EDM2SecondTimeEmbedding',
    'MPConv', 'MPFourier', 'normalize', 'resample', 'mp_silu', 'mp_sum', 'mp_cat', 'edm2_config',
]
