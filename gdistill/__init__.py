"""gdistill: distil pretrained diffusion models into few-step generators."""
__version__ = '0.1.0'
