from .edm import EDMHeunSampler, EulerSampler, edm_sigma_steps  # noqa: F401
from .edm2 import EDM2Sampler, edm2_sigma_steps  # noqa: F401
from .multistep import MultistepSampler, config_with_steps  # noqa: F401
from .hierarchical import HierarchicalSampler  # noqa: F401
from .posterior import PosteriorSampler  # noqa: F401
from .consistency import ConsistencySampler  # noqa: F401
from .decoded import DecodedSampler, with_decoder  # noqa: F401
