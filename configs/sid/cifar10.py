# SiD (Zhou et al. 2024) on CIFAR-10 32x32, unconditional, from EDM's DDPM++ "VP" teacher — the
# official recipe: `run_sid.sh cifar10-uncond` and the defaults of `sid_train.py` /
# `training/sid_training_loop.py` (mingyuanzhou/SiD). Real runs need the pickle:
#   torchrun --nproc_per_node=4 tools/train.py configs/sid/cifar10.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-cifar10-32x32-uncond-vp.pkl teacher.network=None
# Without teacher.path the teacher has random weights (smoke tests only).
#
# Where gdistill departs from the official loop on purpose:
# - a non-finite loss or gradient skips the update (model.nonfinite_patience); the official code
#   replaces NaN/inf gradient entries by 0/±1e5 (torch.nan_to_num) and steps anyway;
# - f_ψ has CoSIM's second time input (cond_sigma = σ_init), gated to zero at initialisation so
#   it starts equal to the teacher; with SiD's fixed σ_init it is a constant embedding;
# - the loss scales: the official G loss is 100× gdistill's (--lsg 100) and its fake-score loss
#   2× (gdistill's ψ-loss is ½·w·‖f_ψ − x_g‖²); Adam's step changes only through eps.
_base_ = ['../_base_/image_runtime.py', '../_base_/teachers/edm_cifar10_uncond_vp.py']

# run_sid.sh: --batch 256 on 4 GPUs with --batch-gpu 16, i.e. 4 accumulation rounds per GPU;
# every network accumulates its micro-batches before its one step (the official alternation).
batch_per_gpu = 16                                                      # --batch-gpu
num_gpus = 4                                                            # --nproc_per_node
accumulative_counts = 4
global_batch = batch_per_gpu * num_gpus * accumulative_counts          # --batch 256
training_images = 500_000_000                                          # --duration 500 (Mimg)
max_iters = training_images // global_batch

dropout = 0.13                                                          # sid_train.py --dropout default
teacher = _base_.teacher
teacher.network.dropout = dropout

# sid_train.py: Adam betas [0, 0.999] for f_ψ (and --g_beta1 0 for G), eps 1e-8 (--fp16 0),
# --lr 1e-5 (f_ψ) and --glr 1e-5 (G)
adam = dict(type='Adam', lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
sid_sampler = dict(type='MultistepSampler', sigmas=[2.5])              # x = G(σ_init·z, σ_init)
model = dict(
    type='SemiImplicitDistiller',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    # --alpha 1.2; f_ψ by EDM's denoising loss (coef = α(1+λ) = ½), G's loss normalised per
    # sample by mean|x_g − f_φ| (sid_loss.py)
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=0.5,
                    generator_weight='sid', aux_weight='edm'),
    # --init_sigma 2.5, --tmax 800; the fake-score step draws ln σ ~ N(−1.2, 1.2²)
    time_sampler=dict(type='FixedMixingTimeSampler', sigma_init=2.5, t_max=800),
    sampler=sid_sampler,
    inactive_mode='eval',       # G in eval mode in the fake-score update, f_ψ in the generator update
    nonfinite='batch',          # NaN samples dropped, the loss divided by the whole batch
    # --augment 0.12 (sid_train.py default) with its transforms, on the generated images of the
    # fake-score update; the teacher's augment_dim=9 takes the labels
    augment=dict(type='AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                 translate_frac=1),
    ema_half_life_images=500_000,                                       # --ema 0.5 (Mimg)
    ema_rampup=0.05,                                                    # ema_rampup_ratio default
)

# data-free: the loader only paces the run (the official loop reads CIFAR-10 batches only for
# their labels, none here as the teacher is unconditional)
train_dataloader = dict(batch_size=batch_per_gpu * accumulative_counts, num_workers=2, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(type='DistillationDataset'))
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=adam, accumulative_counts=accumulative_counts),
    aux=dict(optimizer=adam, accumulative_counts=accumulative_counts),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
default_hooks = dict(checkpoint=dict(interval=20_000))
