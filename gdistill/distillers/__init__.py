from .base import BaseDistiller
from .semi_implicit import SemiImplicitDistiller
from .denoising import DenoisingTrainer
