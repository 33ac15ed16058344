# CoSIM on ring8 (8 Gaussians on a circle of radius 4, std 0.15) on one CPU in under 5 minutes.
# The generator and f_ψ start from the fitted MLP teacher (Algorithm 2). At the end the
# evaluation hook writes metrics.json, prints the table and saves samples.png.
_base_ = ['../../configs/_base_/toy/ring8.py']

max_iters = 4000

model = dict(
    type='SemiImplicitDistiller',
    teacher=_base_.teacher,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    # α = 1.2 and coef = α(1+λ) = 1 (the paper's default)
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(type='CoSIMTimeSampler', sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=2),
    sampler=dict(type='MultistepSampler', num_steps=4, scale=1.7),
    share_batch=True,  # one kernel draw for the ψ- and the φ-update: a third fewer forward passes
    ema_half_life_images=100_000,
    ema_rampup=0.5,
)

optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=_base_.adam), aux=dict(optimizer=_base_.adam))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

_student = dict(type='MultistepSampler', scale=1.7)
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=1000),
    dict(type='ToyEvaluationHook', num_samples=20000, interval=1000, evaluations=[
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=4)),
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=2)),
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=1)),
    ] + _base_.teacher_rows),
]
