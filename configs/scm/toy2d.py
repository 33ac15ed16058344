# sCD (Lu & Song 2024, continuous-time consistency distillation on TrigFlow) on ring8, on one CPU
# in a few minutes. The teacher is the toy base's MLP fitted the same way but with a smooth time
# embedding (below; cached in work_dirs/.teacher_cache); the student starts as a copy of it plus
# a zero log-variance head. x₀ comes from the teacher's exact mixture (the toy's "data set"), since
# the loader here is data-free. At the end ToyEvaluationHook writes metrics.json and prints the
# table: the student at 1 and 2 steps next to the teacher's rows.
#   python tools/train.py configs/scm/toy2d.py
# sCT instead of sCD: configs/scm/toy2d_sct.py (or --cfg-options model.mode=sct).
_base_ = ['../_base_/toy/ring8.py']

max_iters = 4000
batch_size = 1024
# TrigFlow takes z ~ N(0, σ_d² I) and x_t = cos t·x₀ + sin t·z, which spreads the noise levels
# evenly over t only when σ_d is the data's std: ring8 and grid25 have std ≈ 2.8 per coordinate
# (with EDM's 0.5, sCD plateaued at MMD²×10³ ≈ 40 on ring8; with 2.0 it reached 27 in 1 500
# iterations, docs/scm.md)
sigma_data = 2.0

# The teacher is the toy base's MLP, fitted the same way, with that σ_d in its preconditioning and
# Fourier time features of scale 0.5 instead of 16: sCM differentiates F in time, and a rapidly
# oscillating time embedding makes dF/dt, hence the tangent, blow up (Lu & Song 2024, §4.1; with
# scale 16 the raw tangent norm grows past 100 and the student never leaves the mean).
teacher = _base_.teacher
teacher.network.time_scale = 0.5
teacher.network.sigma_data = sigma_data

model = dict(
    type='ConsistencyDistiller',
    mode='scd',
    teacher=teacher,
    schedule=dict(type='TrigFlowSchedule', sigma_data=sigma_data),
    # tangent normalisation c = 0.1 and a linear tangent warm-up over the first 300 iterations
    divergence=dict(type='SCMDivergence', tangent_norm=0.1, warmup_iters=300, adaptive_weight=True),
    # EDM's log-normal on σ = σ_d tan t (P_mean −1.2 at σ_d = 0.5) carried to σ_d = 2 and widened,
    # so that the large σ where one-step sampling starts are trained too
    time_sampler=dict(type='TrigFlowLogNormalTimeSampler', P_mean=0.5, P_std=2.0),
    sampler=dict(type='ConsistencySampler', num_steps=1, sigma_data=sigma_data),
    tangent='jvp',
    ema_half_life_images=100_000,
    ema_rampup=0.5,
)

train_dataloader = dict(batch_size=batch_size)
adam = dict(type='Adam', lr=2e-4, betas=(0.9, 0.99), eps=1e-8, fused=True)
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor', generator=dict(optimizer=adam))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
# a cosine decay of the rate to 0 over the run: at a constant rate the student is best after
# ~1 000 iterations and then blurs again (ring8 MMD²×10³ 35 at 4 000; with the decay 17; docs/scm.md)
param_scheduler = [dict(type='CosineAnnealingLR', T_max=max_iters, eta_min=0.0, by_epoch=False, begin=0, end=max_iters)]

method = 'sCD'
eval_interval = 500
student_sampler = dict(type='ConsistencySampler', sigma_data=sigma_data)
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=eval_interval),
    dict(type='ToyEvaluationHook', num_samples=20000, interval=eval_interval, evaluations=[
        dict(name=method, source='student', sampler=dict(student_sampler, num_steps=1)),
        dict(name=method, source='student', sampler=dict(student_sampler, num_steps=2)),
    ] + _base_.teacher_rows),
]
default_hooks = dict(checkpoint=dict(interval=1000))
