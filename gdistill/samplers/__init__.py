from .edm import EDMHeunSampler, EulerSampler, edm_sigma_steps  # noqa: F401
from .multistep import MultistepSampler  # noqa: F401
