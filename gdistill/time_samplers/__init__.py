from .semi_implicit import CoSIMTimeSampler, FixedMixingTimeSampler, rho_ramp
from .hsivi import LayerTimeSampler, layer_sigmas
from .trigflow import TrigFlowLogNormalTimeSampler
