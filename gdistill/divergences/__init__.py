"""Divergences between score fields and the convex functions they are built on."""
from .convex import ConvexFunction, PowerH, PseudoHuberH, QuadraticH, RadialConvexFunction  # noqa: F401
from .gfi import GFIDivergence  # noqa: F401
from .gan_afd import GANAFDDivergence  # noqa: F401
from .scm import SCMDivergence  # noqa: F401
