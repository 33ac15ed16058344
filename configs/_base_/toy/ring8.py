# What every toy-mixture run shares: the mixture, the teacher (a small EDM-preconditioned MLP
# fitted to the mixture's exact denoiser, cached in work_dirs/.teacher_cache after the first
# run), the data pacing, Adam, logging and the teacher's rows of the evaluation table.
# Another mixture from the command line (the evaluation follows the teacher's mixture):
#   --cfg-options teacher.fit.target.mixture.name=grid25
#   --cfg-options teacher.fit.target.mixture.name=random_mixture teacher.network.dim=16
_base_ = ['../default_runtime.py']

mixture = dict(name='ring8')
network = dict(type='MLPDenoiser', dim=2, hidden=256, depth=3, sigma_data=0.5)
teacher = dict(type='NetworkTeacher', network=network,
               fit=dict(target=dict(type='MixtureTeacher', mixture=mixture), iters=2000, batch_size=1024))
batch_size = 1024
torch_threads = 2

train_dataloader = dict(batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(type='DistillationDataset'))
# β₁ = 0 as SiD and CoSIM train; fused Adam is several times cheaper per step on CPU
adam = dict(type='Adam', lr=5e-5, betas=(0.0, 0.999), eps=1e-8, fused=True)

# The teacher's rows of ToyEvaluationHook: EDM-Heun at NFE 35 and the best 3–4 NFE samplers.
teacher_rows = [
    dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=18)),
    dict(name='teacher Euler', source='teacher', sampler=dict(type='EulerSampler', num_steps=4)),
    dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=2)),
]
default_hooks = dict(logger=dict(type='LoggerHook', interval=200),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2))
