# SIDDM (Xu et al. 2023) on grid25 (5x5 Gaussians, spacing 2, std 0.1), trained from exact mixture
# samples — no teacher. Generator: the EDM-preconditioned MLP inside a 4-step posterior kernel on the
# cosine VP schedule; discriminator: an MLP with an auxiliary denoising head. Alternating updates
# (one discriminator step, one generator step per iteration) through the shared Distiller loop.
# At the end ToyEvaluationHook writes metrics.json (the student and the exact floor).
#   python tools/train.py configs/siddm/toy2d.py
# Ablations (configs/siddm/ablations/afd.py): model.divergence.afd_weight / reg_weight = 0.
_base_ = ['../_base_/default_runtime.py']

max_iters = 2000
batch_size = 1024
torch_threads = 2
mixture = dict(name='grid25')

schedule = dict(type='CosineSchedule', s=0.008, t_max=0.999)
kernel = dict(type='PosteriorKernel', num_steps=4, spacing='uniform')
posterior_sampler = dict(type='PosteriorSampler', kernel=kernel, schedule=schedule)

model = dict(
    type='SIDDM',
    generator=dict(type='MLPDenoiser', dim=2, hidden=256, depth=3, sigma_data=0.5),
    discriminator=dict(type='MLPDiscriminator', dim=2, hidden=256, depth=3, sigma_data=0.5),
    schedule=schedule,
    kernel=kernel,
    # λ_AFD on the per-dimension AFD KL; the discriminator's denoising regulariser
    divergence=dict(type='GANAFDDivergence', afd_weight=1.0, reg_weight=1.0, afd_reduction='mean'),
    sampler=posterior_sampler,
    discriminator_steps=1,
    ema_half_life_images=100_000,
    ema_rampup=0.5,
)

train_dataloader = dict(batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='MixtureSampleDataset', mixture=mixture, length=1 << 20, seed=0))
# DDGAN's toy optimiser: Adam(0.5, 0.999), the discriminator faster than the generator; fused on CPU
adam = dict(type='Adam', betas=(0.5, 0.999), eps=1e-8, fused=True)
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=dict(adam, lr=1e-4)),
                     discriminator=dict(optimizer=dict(adam, lr=4e-4)))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=1000),
    # no teacher rows: SIDDM has no teacher; the hook adds the exact floor
    dict(type='ToyEvaluationHook', mixture=mixture, num_samples=20000, interval=500, evaluations=[
        dict(name='SIDDM', source='student', sampler=posterior_sampler),
    ]),
]
default_hooks = dict(logger=dict(type='LoggerHook', interval=200),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2))
