# SiD (Zhou et al. 2024) on ImageNet 64x64 (class-conditional) from EDM's ADM teacher: CoSIM's
# ImageNet-64 set-up (teacher, batch, Adam lr 4e-6, EMA half-life 2 M images — SiD's own values
# per FACTS) with SiD's method: σ_init = 2.5, t_max = 800, α = 1.2, coef = α(1+λ) = ½.
#   --cfg-options teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl teacher.network=None
_base_ = ['../../projects/cosim/imagenet64.py']

sid_sampler = dict(type='MultistepSampler', sigmas=[2.5])
model = dict(
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=0.5,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(_delete_=True, type='FixedMixingTimeSampler', sigma_init=2.5, t_max=800),
    sampler=dict(_delete_=True, **sid_sampler),
)
