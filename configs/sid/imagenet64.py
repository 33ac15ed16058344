# SiD (Zhou et al. 2024) on ImageNet 64x64, class-conditional, from EDM's ADM teacher — the
# official recipe: `run_sid.sh imagenet64-cond` and the defaults of `sid_train.py` /
# `training/sid_training_loop.py` (mingyuanzhou/SiD). Real runs need the pickle:
#   torchrun --nproc_per_node=8 tools/train.py configs/sid/imagenet64.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl teacher.network=None
# Without teacher.path the teacher has random weights (smoke tests only).
#
# Where gdistill departs from the official loop on purpose:
# - a non-finite loss or gradient skips the update (model.nonfinite_patience); the official code
#   replaces NaN/inf gradient entries by 0/±1e5 (torch.nan_to_num) and steps anyway;
# - f_ψ has CoSIM's second time input (cond_sigma = σ_init), gated to zero at initialisation;
# - the loss scales: the official G loss is 100× gdistill's (--lsg 100), its fake-score loss 2×;
# - labels: the official loop takes each batch's labels from ImageNet; here DistillationDataset
#   cycles the 1000 classes (class-balanced; ImageNet's classes are nearly balanced).
_base_ = ['../_base_/image_runtime.py', '../_base_/teachers/edm_imagenet64_cond_adm.py']

# run_sid.sh: --batch 8192 on 4 GPUs with --batch-gpu 16 (128 accumulation rounds per GPU).
# Here 8 GPUs x 32 per micro-batch x 32 rounds = 8192; keep the product on other set-ups.
batch_per_gpu = 32
num_gpus = 8
accumulative_counts = 32
global_batch = batch_per_gpu * num_gpus * accumulative_counts          # --batch 8192
training_images = 1_000_000_000                                        # --duration 1000 (Mimg)
max_iters = training_images // global_batch

dropout = 0.1                                                           # --dropout 0.1
teacher = _base_.teacher
teacher.network.dropout = dropout
teacher.network.use_fp16 = True                                         # --fp16 1

# sid_train.py with --fp16 1: Adam betas [0, 0.999], eps 1e-6; --lr 4e-6 (f_ψ), --glr 4e-6 (G)
adam = dict(type='Adam', lr=4e-6, betas=(0.0, 0.999), eps=1e-6)
sid_sampler = dict(type='MultistepSampler', sigmas=[2.5])
model = dict(
    type='SemiImplicitDistiller',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=0.5,
                    generator_weight='sid', aux_weight='edm'),                 # --alpha 1.2
    time_sampler=dict(type='FixedMixingTimeSampler', sigma_init=2.5, t_max=800),  # --init_sigma, --tmax
    sampler=sid_sampler,
    inactive_mode='eval',       # G in eval mode in the fake-score update, f_ψ in the generator update
    nonfinite='batch',          # NaN samples dropped, the loss divided by the whole batch
    augment=None,               # --augment 0
    ema_half_life_images=2_000_000,                                     # --ema 2 (Mimg)
    ema_rampup=0.05,                                                    # ema_rampup_ratio default
)

train_dataloader = dict(batch_size=batch_per_gpu * accumulative_counts, num_workers=2, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='DistillationDataset', label_dim=1000))
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=adam, accumulative_counts=accumulative_counts),
    aux=dict(optimizer=adam, accumulative_counts=accumulative_counts),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
default_hooks = dict(checkpoint=dict(interval=2_500))
