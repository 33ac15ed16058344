# CoSIM on ring8 (8 Gaussians on a circle of radius 4, std 0.15) on one CPU in a few minutes.
# The teacher is a small EDM-preconditioned MLP fitted to the mixture's exact denoiser (cached
# after the first run); the generator and f_ψ start from it (Algorithm 2). At the end the
# evaluation hook writes metrics.json, prints the table and saves samples.png.
_base_ = ['../../configs/_base_/default_runtime.py']

mixture = dict(name='ring8')
network = dict(type='MLPDenoiser', dim=2, hidden=256, depth=3, sigma_data=0.5)
batch_size = 1024
max_iters = 4000
torch_threads = 2

model = dict(
    type='SemiImplicitDistiller',
    teacher=dict(type='NetworkTeacher', network=network,
                 fit=dict(target=dict(type='MixtureTeacher', mixture=mixture), iters=2000, batch_size=1024)),
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(type='CoSIMTimeSampler', sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=2),
    sampler=dict(type='MultistepSampler', num_steps=4, scale=1.7),
    ema_half_life_images=100_000,
    ema_rampup=0.5,
)

train_dataloader = dict(batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(type='DistillationDataset'))
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=dict(type='Adam', lr=5e-5, betas=(0.0, 0.999), eps=1e-8)),
    aux=dict(optimizer=dict(type='Adam', lr=5e-5, betas=(0.0, 0.999), eps=1e-8)),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

_student = dict(type='MultistepSampler', scale=1.7)
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=1000),
    dict(type='ToyEvaluationHook', mixture=mixture, num_samples=20000, interval=1000, evaluations=[
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=4)),
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=2)),
        dict(name='CoSIM', source='student', sampler=dict(_student, num_steps=1)),
        dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=18)),
        dict(name='teacher Euler', source='teacher', sampler=dict(type='EulerSampler', num_steps=4)),
        dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=2)),
    ]),
]
default_hooks = dict(logger=dict(type='LoggerHook', interval=200),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2))
