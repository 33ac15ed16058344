# CoSIM on ImageNet 64x64, class-conditional (1000 classes), from EDM's ADM teacher — the settings
# of the CoSIM paper (Yu et al. 2025), Appendix C, Table 5. Real runs need the official pickle:
#   torchrun --nproc_per_node=8 tools/train.py projects/cosim/imagenet64.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl teacher.network=None
# Without teacher.path the teacher has random weights (smoke tests only).
_base_ = ['../../configs/_base_/image_runtime.py', '../../configs/_base_/teachers/edm_imagenet64_cond_adm.py']

# Global batch 2048 (Table 5) = 8 GPUs x 256 per GPU, each GPU's 256 taken as accumulative_counts
# 8 micro-batches of 32 (what one forward/backward holds); every network accumulates its 8
# micro-batches before its one step, so the alternation is that of one step on 2048.
# On another number of GPUs keep the product: e.g. 16 GPUs -> accumulative_counts=4.
batch_per_gpu = 32                                                      # micro-batch
num_gpus = 8
accumulative_counts = 8
global_batch = batch_per_gpu * num_gpus * accumulative_counts          # 2048
training_images = 200_000_000                                          # Table 5: 200 M
# One iteration is one optimiser step on the global batch: 200 M / 2048 = 97 656 iterations.
max_iters = training_images // global_batch

dropout = 0.1                                                           # Table 5
# The students are deep copies of the teacher network; the frozen teacher runs in eval mode, so
# dropout only acts on the generator and f_ψ (`student_dropout` sets it on the copies).
teacher = _base_.teacher
teacher.network.dropout = dropout

adam = dict(type='Adam', lr=4e-6, betas=(0.0, 0.99), eps=1e-12)        # Table 5
model = dict(
    type='SemiImplicitDistiller',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(type='CoSIMTimeSampler', sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=8),
    sampler=dict(type='MultistepSampler', num_steps=4),
    ema_half_life_images=2_000_000,                                     # Table 5: 2 M images
)

# Data-free: the dataset only paces the run and hands out class-balanced one-hot labels, which
# the distiller passes to the teacher, G and f_ψ.
train_dataloader = dict(batch_size=batch_per_gpu * accumulative_counts, num_workers=2, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='DistillationDataset', label_dim=1000))
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=adam, accumulative_counts=accumulative_counts),
    aux=dict(optimizer=adam, accumulative_counts=accumulative_counts),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

# a checkpoint every 2 500 iterations (≈ 5 M images)
default_hooks = dict(checkpoint=dict(interval=2_500))
