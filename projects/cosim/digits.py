# CoSIM (Yu et al. 2025) on the 8x8 digits: the class-conditional EDM teacher of
# configs/teachers/edm_digits.py distilled into a 1-4 step generator on 2 CPU cores (timings in
# docs/digits.md), with DMD's regression term at the sampler's levels (model.regression).
# The generator and f_ψ start from the teacher (Algorithm 2); α = 1.2 with
# α(1+λ) = 1 as in the paper. Every 250 iterations FD-digits, precision/recall and label
# accuracy of the 4-step sampler (900 samples) go to the log and tensorboard; at the end
# metrics.json holds every row below on 4 500 samples and samples_final.png their first 100.
#   python tools/train.py configs/teachers/edm_digits.py    # the teacher (see that file)
#   python tools/train.py projects/cosim/digits.py
#   python tools/eval.py gen projects/cosim/digits.py work_dirs/digits/iter_1000.pth
# Results and every command: docs/digits.md.
_base_ = ['../../configs/teachers/edm_digits.py']

teacher_checkpoint = 'work_dirs/edm_digits/iter_5000.pth'
batch_size = 64
# 1 000 iterations: with the term at every level FD-digits at NFE 4 still fell after that (3 seeds:
# 1.835 ± 0.032 at 1 000, 1.809 ± 0.005 at 1 500); without σ = 20's term it is lower at 1 000 already
max_iters = 1000
# the sampler's noise levels (MultistepSampler(sigmas=...)): the generator is called at 80, 70, 20
# and 0.4; over 3 seeds FD-digits 2.52 ± 0.06 against 3.29 ± 0.05 with the ρ-ramp's interior ×4
# and 4.65 ± 0.21 with the ramp itself (docs/digits.md, "The sampler's levels")
levels = [80.0, 70.0, 20.0, 0.4]

# the teacher's EMA weights, read from the DenoisingTrainer checkpoint (only its tensors)
teacher = dict(type='EDMTeacher', network=_base_.network, checkpoint=teacher_checkpoint)
# f_ψ is updated twice per generator update, at twice the generator's rate: with one update at an
# equal rate (lr 1e-4, 3 000 iterations) the generator drifted towards the teacher's modes after
# ~1 000 iterations (recall 0.90 -> 0.78, FD-digits at NFE 4 6.5 -> 12.1; docs/digits.md).
adam = dict(type='Adam', lr=1e-4, betas=(0.0, 0.999), eps=1e-8, fused=True)
model = dict(
    _delete_=True,
    type='SemiImplicitDistiller',
    teacher=teacher,
    student_dropout=0.0,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                    generator_weight='sid', aux_weight='edm'),
    # window='sampler' would train at the sampler's levels (recall 0.891 ± 0.006 against 0.854 ± 0.003,
    # FD-digits 2.71 ± 0.24 against 2.52 ± 0.06): CoSIM's window stays
    time_sampler=dict(type='CoSIMTimeSampler', sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=4,
                      sampler_sigmas=levels),
    sampler=dict(type='MultistepSampler', sigmas=levels),
    aux_steps=2,
    share_batch=True,  # the last ψ-update and the φ-update share one kernel draw
    # DMD's regression onto 10 000 of the teacher's Heun-35 samples (not in CoSIM) at the sampler's
    # levels 80, 70 and 0.4; the call at σ = 20 is left out (λ's multiplier 0 there). Over 3 seeds
    # FD-digits at NFE 4 1.453 ± 0.028 (1.16× the teacher) and recall 0.918 ± 0.002 at 1 000 iterations; with the term at every level FD-digits 1.809 ± 0.005 but recall 0.902 ± 0.008
    # (1 500 iterations), without the term 2.52 ± 0.06 and 0.854 ± 0.003 (docs/digits.md, "DMD's
    # regression term" and "The call at σ = 20").
    # The pool is computed before the first update (minutes on a CPU) and cached in work_dirs/pairs.
    regression=dict(weight=10.0, num_pairs=10_000, levels=levels, level_weights=[1.0, 1.0, 0.0, 1.0],
                    cache_dir='work_dirs/pairs'),
    ema_half_life_images=20_000,
    ema_rampup=0.5,
)

# data-free: the loader only paces the run and cycles the class labels
train_dataloader = dict(_delete_=True, batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(type='DistillationDataset', label_dim=_base_.num_classes))
# the generator at 3e-4 with β₁ = 0.9, the rate the regression term needs (with the term at every
# level, 1 500 iterations: FD-digits at NFE 4 / 2 / 1 1.809 / 2.14 / 2.67 against 1.826 / 2.90 / 4.23
# at 5e-5, β₁ = 0)
optim_wrapper = dict(_delete_=True, constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=dict(adam, lr=3e-4, betas=(0.9, 0.999))), aux=dict(optimizer=adam))
param_scheduler = []  # constant rates (the teacher's warm-up and decay are not inherited)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

# NFE 2 from 80 straight to 0.4: FD-digits 4.91 ± 0.22 against 7.84 ± 0.02 at (80, 10.1)
_cosim = dict(type='MultistepSampler')
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=500, num_samples=100),
    dict(type='ImageMetricHook', metrics=_base_.image_metrics, num_samples=4500, batch_size=500,
         interval=250, interval_samples=900, seed=0, evaluations=[
             dict(name='CoSIM', source='student', sampler=dict(_cosim, sigmas=levels)),
             dict(name='CoSIM', source='student', sampler=dict(_cosim, sigmas=[80.0, 0.4])),
             dict(name='CoSIM', source='student', sampler=dict(_cosim, num_steps=1)),
             dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=18)),
             dict(name='teacher Heun', source='teacher', sampler=dict(type='EDMHeunSampler', num_steps=2)),
             dict(name='teacher Euler', source='teacher', sampler=dict(type='EulerSampler', num_steps=4)),
         ]),
]
default_hooks = dict(logger=dict(type='LoggerHook', interval=50),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=6))
