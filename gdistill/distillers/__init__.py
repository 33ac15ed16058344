from .base import BaseDistiller
from .semi_implicit import SemiImplicitDistiller
from .denoising import DenoisingTrainer
from .hsivi import HSIVIDistiller
from .siddm import SIDDM  # noqa: F401
from .consistency import ConsistencyDistiller
