from .mlp import MLPDenoiser
from .discriminators import ConvDiscriminator, MLPDiscriminator  # noqa: F401

# EDM networks (SongUNet, DhariwalUNet, the four preconditioners, two-time variant)
from . import edm  # noqa: F401,E402
from .trigflow import TrigFlowF, TrigFlowStudent  # noqa: F401,E402
