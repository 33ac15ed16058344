# The latent toy's teacher: a tiny class-conditional EDM2 network (EDM2Precond, 4x4x4 latents, 10
# classes) trained with EDM's denoising loss (DenoisingTrainer) on the latents of scikit-learn's 8x8
# digits through a tiny VAE, in EDM2's latent-dataset layout and with EDM2's per-step posterior
# draw. It is the CPU stand-in for the EDM2 ImageNet-512 teachers; projects/cosim/latent_toy.py
# distils it with the imagenet512 config family. tools/latent_toy.py makes the VAE and the data and
# runs both (docs/edm2.md):
#   python tools/latent_toy.py --work-dir work_dirs/latent_toy
_base_ = ['../_base_/default_runtime.py', '../_base_/teachers/edm2_latent_toy.py']

torch_threads = 1
batch_size = 64
max_iters = 2000
warmup_iters = 100

# P_mean/P_std of EDM2's img512 training (training_loop.py presets)
model = dict(type='DenoisingTrainer', network=_base_.toy_network, sigma_data=0.5, P_mean=-0.4, P_std=1.0,
             ema_half_life_images=20_000, ema_rampup=0.05,
             sampler=dict(type='EDM2Sampler', num_steps=16),
             data_preprocessor=dict(type='LatentDataPreprocessor', raw_mean=_base_.toy_raw_mean,
                                    raw_std=_base_.toy_raw_std))

train_dataloader = dict(batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDM2LatentDataset', path=_base_.toy_latent_data, latent_channels=4,
                                     resolution=4))
# EDM2 trains its magnitude-preserving networks at a high rate (α_ref 0.01, Adam β (0.9, 0.99))
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     network=dict(optimizer=dict(type='Adam', lr=1e-2, betas=(0.9, 0.99), eps=1e-8)))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', eta_min=1e-4, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

# tools/sample.py and tools/eval.py decode the samples to 8x8 pixels through the toy VAE, and measure
# FD-digits (the digit classifier of tools/train_digit_classifier.py, see configs/teachers/edm_digits.py)
decoder = _base_.toy_decoder
image_metrics = [dict(type='FrechetDistance', name='fd_digits',
                      detector=dict(type='NetworkDetector', checkpoint='work_dirs/fd_digits/classifier.pth'),
                      reference='work_dirs/fd_digits/ref_train.npz')]
custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook')]
default_hooks = dict(logger=dict(type='LoggerHook', interval=100),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2))
