from .gaussian import GaussianKernel
from .hierarchical import HierarchicalGaussianKernel
from .posterior import PosteriorKernel
