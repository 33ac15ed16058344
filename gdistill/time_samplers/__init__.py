from .semi_implicit import CoSIMTimeSampler, FixedMixingTimeSampler, rho_ramp
