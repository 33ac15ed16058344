# Train a tiny EDM teacher (EDMPrecond around a small SongUNet) on your own images, with EDM's
# denoising loss (Karras et al. 2022), on one CPU or GPU:
#   python tools/train.py configs/teachers/edm_tiny_images.py \
#       --cfg-options train_dataloader.dataset.path=/path/to/images
# The images: an EDM-format folder or .zip (PNGs, optional dataset.json with labels), square,
# 16x16 RGB by default. For 8x8 add model.network.img_resolution=8
# model.network.attn_resolutions=[4] train_dataloader.dataset.resolution=8 (and
# model.network.img_channels=1 for grey images). For a class-conditional teacher set
# network label_dim (model.network.label_dim=K) and keep use_labels=True; unconditional by default.
_base_ = ['../_base_/default_runtime.py']

img_resolution = 16
img_channels = 3
batch_size = 64
max_iters = 20_000

network = dict(type='EDMPrecond', img_resolution=img_resolution, img_channels=img_channels,
               label_dim=0, model_type='SongUNet', model_channels=32, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[img_resolution // 2], dropout=0.1,
               embedding_type='positional', encoder_type='standard', decoder_type='standard',
               channel_mult_noise=1, resample_filter=[1, 1])
model = dict(type='DenoisingTrainer', network=network, sigma_data=0.5, P_mean=-1.2, P_std=1.2,
             ema_half_life_images=50_000, ema_rampup=0.05,
             sampler=dict(type='EDMHeunSampler', num_steps=18),
             data_preprocessor=dict(type='DistillDataPreprocessor'))

train_dataloader = dict(batch_size=batch_size, num_workers=2,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDMImageDataset', path=None, resolution=img_resolution,
                                     use_labels=False, xflip=True))
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     network=dict(optimizer=dict(type='Adam', lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
                                  clip_grad=None))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook'),
                dict(type='SampleVisualizationHook', interval=2000, num_samples=64)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=100),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000, max_keep_ckpts=3))
