# SiD (Zhou et al. 2024) on CIFAR-10 from EDM's unconditional VP teacher. SiD is CoSIM with a
# fixed mixing time, so this reuses CoSIM's CIFAR-10 set-up (teacher, global batch 2048 by
# accumulation, Adam β₁ = 0 lr 1e-5, EMA half-life 0.5 M images — SiD's own values per
# FACTS) and changes the method: x = G(σ_init·z, σ_init) with σ_init = 2.5, t_max = 800, α = 1.2,
# fake score by denoising score matching (coef = α(1+λ) = ½). Real runs need the pickle:
#   --cfg-options teacher.path=/path/to/edm-cifar10-32x32-uncond-vp.pkl teacher.network=None
_base_ = ['../../projects/cosim/cifar10.py']

sid_sampler = dict(type='MultistepSampler', sigmas=[2.5])
model = dict(
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=0.5,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(_delete_=True, type='FixedMixingTimeSampler', sigma_init=2.5, t_max=800),
    sampler=dict(_delete_=True, **sid_sampler),
)
