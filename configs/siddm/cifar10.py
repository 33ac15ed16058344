# SIDDM (Xu et al. 2023) on CIFAR-10 32x32, unconditional, trained from the images (no teacher):
# a 4-step posterior kernel on the cosine VP schedule (the paper's T = 4), the generator an
# EDM-preconditioned DDPM++ SongUNet (EDM's CIFAR-10 architecture, randomly initialised), the
# discriminator a time-conditioned conv encoder with an auxiliary denoising decoder.
# Optimisation after DDGAN's CIFAR-10 script, which SIDDM builds on: Adam(0.5, 0.9), lr 1.6e-4 (G)
# and 1.25e-4 (D), batch 64 per GPU on 4 GPUs, R1 γ = 0.02, EMA 0.9999 per step. Differences:
# the generator has no latent z input (the posterior noise is the only randomness per step), and
# R1 is applied every step (DDGAN: lazily, every 15).
#   torchrun --nproc_per_node=4 tools/train.py configs/siddm/cifar10.py --launcher pytorch \
#       --cfg-options train_dataloader.dataset.path=/path/to/cifar10-32x32.zip
# The images: EDM's dataset layout (tools of the EDM repository: dataset_tool.py), a zip or folder.
_base_ = ['../_base_/image_runtime.py']

batch_per_gpu = 64
num_gpus = 4
global_batch = batch_per_gpu * num_gpus                                     # 256
max_iters = 400_000

schedule = dict(type='CosineSchedule', s=0.008, t_max=0.999)
kernel = dict(type='PosteriorKernel', num_steps=4, spacing='uniform')
posterior_sampler = dict(type='PosteriorSampler', kernel=kernel, schedule=schedule)

model = dict(
    type='SIDDM',
    generator=dict(type='EDMPrecond', img_resolution=32, img_channels=3, label_dim=0,
                   model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=128, channel_mult=[2, 2, 2], attn_resolutions=[16], num_blocks=4,
                   dropout=0.0),
    discriminator=dict(type='ConvDiscriminator', img_resolution=32, img_channels=3, model_channels=64,
                       channel_mult=[1, 2, 4, 4], emb_dim=128, label_dim=0),
    schedule=schedule,
    kernel=kernel,
    divergence=dict(type='GANAFDDivergence', afd_weight=1.0, reg_weight=1.0, r1_weight=0.02, afd_reduction='mean'),
    sampler=posterior_sampler,
    discriminator_steps=1,
    # EMA β = 0.9999 per step: half-life ln ½ / ln 0.9999 ≈ 6 931 steps x 256 images
    ema_half_life_images=1_774_000,
)

train_dataloader = dict(batch_size=batch_per_gpu, num_workers=4, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDMImageDataset', path='datasets/cifar10-32x32.zip', resolution=32,
                                     use_labels=False, xflip=True))
adam = dict(type='Adam', betas=(0.5, 0.9), eps=1e-8)
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     generator=dict(optimizer=dict(adam, lr=1.6e-4)),
                     discriminator=dict(optimizer=dict(adam, lr=1.25e-4)))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

default_hooks = dict(checkpoint=dict(interval=10_000))
