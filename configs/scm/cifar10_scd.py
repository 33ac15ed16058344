# sCD (Lu & Song 2024, continuous-time consistency distillation on TrigFlow) on CIFAR-10 32x32,
# unconditional, from EDM's DDPM++ teacher read through TrigFlow by equal SNR (the teacher stays
# in EDM form; see gdistill/networks/trigflow.py). sCD trains on data: x_t = cos t·x₀ + sin t·z
# with x₀ from EDM's CIFAR-10 archive. Real runs:
#   torchrun --nproc_per_node=8 tools/train.py configs/scm/cifar10_scd.py --launcher pytorch \
#       --cfg-options teacher.path=/path/to/edm-cifar10-32x32-uncond-vp.pkl teacher.network=None \
#       train_dataloader.dataset.path=/path/to/cifar10-32x32.zip
# Without teacher.path the teacher has random weights (smoke tests only).
#
# From the paper (Algorithm 1, §4, App. G): log-normal time on σ_d·tan t with P_mean −1.0,
# P_std 1.4; tangent normalisation c = 0.1; tangent warm-up over the first 10 k iterations;
# learned adaptive weight; 1- and 2-step sampling (t = 1.1). The paper's own CIFAR-10 model is a
# TrigFlow-trained network with c_noise = t; this config keeps EDM's pickle and its c_noise = ¼ ln σ.
# Batch, learning rate, EMA and run length below are this config's choices, not the paper's table.
_base_ = ['../_base_/image_runtime.py', '../_base_/teachers/edm_cifar10_uncond_vp.py']

batch_per_gpu = 64
num_gpus = 8
global_batch = batch_per_gpu * num_gpus                                  # 512
max_iters = 200_000
sigma_data = 0.5                                                        # EDM's σ_d (data in [−1, 1])
dropout = 0.2

teacher = _base_.teacher
teacher.network.dropout = dropout

model = dict(
    type='ConsistencyDistiller',
    mode='scd',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='TrigFlowSchedule', sigma_data=sigma_data),
    divergence=dict(type='SCMDivergence', tangent_norm=0.1, warmup_iters=10_000, adaptive_weight=True),
    time_sampler=dict(type='TrigFlowLogNormalTimeSampler', P_mean=-1.0, P_std=1.4),
    sampler=dict(type='ConsistencySampler', num_steps=2, sigma_data=sigma_data),
    tangent='jvp',
    ema_half_life_images=500_000,
    data_preprocessor=dict(type='DistillDataPreprocessor'),
)

# sCD needs data x₀ (not data-free like CoSIM): EDM's dataset layout, uint8 images → [−1, 1]
train_dataloader = dict(batch_size=batch_per_gpu, num_workers=4, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDMImageDataset', path=None, resolution=32, use_labels=False,
                                     xflip=True))
adam = dict(type='Adam', lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor', generator=dict(optimizer=adam))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
