from .base import NoiseSchedule
from .cosine import CosineSchedule
from .edm import EDMSchedule
from .trigflow import TrigFlowSchedule
from .ve import VESchedule
from .vp import VPSchedule

__all__ = ['NoiseSchedule', 'EDMSchedule', 'VESchedule', 'VPSchedule', 'TrigFlowSchedule', 'CosineSchedule']
