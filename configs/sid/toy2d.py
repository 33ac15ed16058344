# SiD (Zhou et al. 2024) on ring8: CoSIM's runner with the mixing time fixed at σ_init = 2.5,
# one step, and SiD's fused loss (α = 1.2 with coef = α(1+λ) = ½: the fake score f_ψ is trained
# by plain denoising score matching). Same teacher, batch, optimiser and budget as
# projects/cosim/toy2d.py. SiD with CoSIM's regulariser: --cfg-options model.divergence.coef=1.0
_base_ = ['../_base_/toy/ring8.py']

max_iters = 4000
sid_sampler = dict(type='MultistepSampler', sigmas=[2.5])   # x = G(σ_init·z, σ_init)

model = dict(
    type='SemiImplicitDistiller',
    teacher=_base_.teacher,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=0.5,
                    generator_weight='sid', aux_weight='edm'),
    # s on the ρ-ramp up to t_max = 800 (σ_s ≤ 24.4); the ψ-stage draws ln σ ~ N(−1.2, 1.2²)
    time_sampler=dict(type='FixedMixingTimeSampler', sigma_init=2.5, t_max=800),
    sampler=sid_sampler,
    # SiD's official loop: the network an update does not train runs in eval mode, and NaN
    # samples are dropped with the loss divided by the whole batch (no effect on this MLP
    # without dropout, nor on a finite batch)
    inactive_mode='eval',
    nonfinite='batch',
    ema_half_life_images=100_000,
    ema_rampup=0.5,
)

optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=_base_.adam), aux=dict(optimizer=_base_.adam))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=1000),
    dict(type='ToyEvaluationHook', num_samples=20000, interval=1000,
         evaluations=[dict(name='SiD', source='student', sampler=sid_sampler)] + _base_.teacher_rows),
]
