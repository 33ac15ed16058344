# sCD (Lu & Song 2024) on ImageNet 64x64, class-conditional (1000 classes), from EDM's ADM teacher
# read through TrigFlow by equal SNR. x₀ and labels come from EDM's ImageNet-64 archive. Real runs:
#   torchrun --nproc_per_node=8 tools/train.py configs/scm/imagenet64_scd.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl teacher.network=None \
#       train_dataloader.dataset.path=/path/to/imagenet-64x64.zip
# Without teacher.path the teacher has random weights (smoke tests only).
#
# From the paper (Algorithm 1, §4, App. G): log-normal time on σ_d·tan t with P_mean −0.8,
# P_std 1.6; tangent normalisation c = 0.1; tangent warm-up over the first 10 k iterations;
# learned adaptive weight; 1- and 2-step sampling (t = 1.1). Batch, learning rate, EMA, dropout
# and run length are this config's choices, not the paper's table.
_base_ = ['../_base_/image_runtime.py', '../_base_/teachers/edm_imagenet64_cond_adm.py']

batch_per_gpu = 16                                                      # micro-batch
num_gpus = 8
accumulative_counts = 8
global_batch = batch_per_gpu * num_gpus * accumulative_counts           # 1024
max_iters = 200_000
sigma_data = 0.5
dropout = 0.1

teacher = _base_.teacher
teacher.network.dropout = dropout

model = dict(
    type='ConsistencyDistiller',
    mode='scd',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='TrigFlowSchedule', sigma_data=sigma_data),
    divergence=dict(type='SCMDivergence', tangent_norm=0.1, warmup_iters=10_000, adaptive_weight=True),
    time_sampler=dict(type='TrigFlowLogNormalTimeSampler', P_mean=-0.8, P_std=1.6),
    sampler=dict(type='ConsistencySampler', num_steps=2, sigma_data=sigma_data),
    tangent='jvp',
    ema_half_life_images=2_000_000,
    data_preprocessor=dict(type='DistillDataPreprocessor'),
)

# x₀ with their class labels (one-hot, passed to the teacher and the student)
train_dataloader = dict(batch_size=batch_per_gpu * accumulative_counts, num_workers=4, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDMImageDataset', path=None, resolution=64, use_labels=True,
                                     xflip=False))
adam = dict(type='Adam', lr=5e-5, betas=(0.9, 0.99), eps=1e-8)
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=adam, accumulative_counts=accumulative_counts))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
