# HSIVI (Yu et al. 2023) on CIFAR-10 32x32, unconditional, from EDM's DDPM++ "VP" teacher: K = 10
# layers (NFE 10, the paper's CIFAR-10 setting) on the EDM ρ-ramp, SIVI-SM per layer with
# β(k) = 1/σ_{k+1}². Optimisation as HSIVI's public CIFAR-10 run (8 GPUs x 16 images, f_ψ updated
# 20 times per layer update, η = 0.2, Adam(0.9, 0.999, amsgrad), lr 1.6e-5 / 8e-5, gradient clip 1,
# linear warm-up over 2 500 f_ψ-steps, lr x 0.9 every 3 000 f_ψ-steps, EMA 0.999 per φ-step,
# 200 000 f_ψ-steps). Differences: the teacher is EDM's (the paper used a DDPM ε-network) and the
# time grid is EDM's ρ-ramp (the paper's: a quadratic grid of DDPM steps up to t = 800).
#   torchrun --nproc_per_node=8 tools/train.py configs/hsivi/cifar10.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-cifar10-32x32-uncond-vp.pkl teacher.network=None
# Without teacher.path the teacher has random weights (smoke tests only).
_base_ = ['../_base_/image_runtime.py', '../_base_/teachers/edm_cifar10_uncond_vp.py']

batch_per_gpu = 16
num_gpus = 8
global_batch = batch_per_gpu * num_gpus                                  # 128
aux_steps = 20                                                           # f_ψ-steps per φ-step
# one iteration = aux_steps f_ψ-updates + one layer update: 200 000 f_ψ-steps = 10 000 iterations
max_iters = 200_000 // aux_steps

dropout = 0.0
teacher = _base_.teacher
teacher.network.dropout = dropout

grid = dict(num_steps=10, sigma_min=0.002, sigma_max=80.0, rho=7.0)
layer_kernel = dict(type='HierarchicalGaussianKernel', eta=0.2)
model = dict(
    type='HSIVIDistiller',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='EDMSchedule'),
    kernel=layer_kernel,
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=0.5), coef=0.5,
                    generator_weight='none', aux_weight='none'),
    time_sampler=dict(type='LayerTimeSampler', weighting='snr', **grid),
    sampler=dict(type='HierarchicalSampler', kernel=layer_kernel, **grid),
    aux_steps=aux_steps,
    share_batch=True,
    # EMA β = 0.999 per φ-step: half-life ln ½ / ln 0.999 ≈ 692.8 steps x 128 images
    ema_half_life_images=88_680,
)

train_dataloader = dict(batch_size=batch_per_gpu, num_workers=2, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(type='DistillationDataset'))
adam = dict(type='Adam', betas=(0.9, 0.999), amsgrad=True, weight_decay=0.0)
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=dict(adam, lr=1.6e-5), clip_grad=dict(max_norm=1.0)),
    aux=dict(optimizer=dict(adam, lr=8e-5), clip_grad=dict(max_norm=1.0)),
)
# in iterations (each = aux_steps f_ψ-steps): warm-up 2 500 / 20 = 125, decay every 3 000 / 20 = 150
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 125, by_epoch=False, begin=0, end=125),
    dict(type='StepLR', step_size=150, gamma=0.9, by_epoch=False, begin=0, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=1000))
