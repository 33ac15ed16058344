from .gaussian import GaussianKernel
