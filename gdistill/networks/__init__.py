from .mlp import MLPDenoiser

# EDM networks (SongUNet, DhariwalUNet, the four preconditioners, two-time variant)
from . import edm  # noqa: F401,E402
