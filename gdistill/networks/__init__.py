from .mlp import MLPDenoiser
from .discriminators import ConvDiscriminator, MLPDiscriminator  # noqa: F401

# EDM networks (SongUNet, DhariwalUNet, the four preconditioners, two-time variant)
from . import edm  # noqa: F401,E402
# EDM2 networks (magnitude-preserving UNet, Precond with log-variance, two-time variant)
from . import edm2  # noqa: F401,E402
from .trigflow import TrigFlowF, TrigFlowStudent  # noqa: F401,E402
# the latent space of EDM2's ImageNet-512 models (diffusers is imported only when a VAE is built)
from .vae import StabilityVAE  # noqa: F401,E402
