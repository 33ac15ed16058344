# CoSIM on ImageNet 512x512, class-conditional (1000 classes), in the 4x64x64 latent space of Stable
# Diffusion's VAE (sd-vae-ft-mse), from the EDM2-S teacher (Karras et al. 2024) — the CoSIM paper's
# (Yu et al. 2025) ImageNet-512 S setting, Appendix C, Table 5. M and L: imagenet512_m.py,
# imagenet512_l.py (this file with their rows of Table 5). How to encode the data, run and
# evaluate, and the paper's numbers: docs/edm2.md. A real run (8 GPUs):
#   torchrun --nproc_per_node=8 tools/train.py projects/cosim/imagenet512_s.py --launcher pytorch \
#       --cfg-options teacher.path=/ckpt/edm2-img512-s-2147483-0.190.pkl teacher.network=None \
#       train_dataloader.dataset.path=/data/img512-sd.zip
# Without teacher.path the teacher has random weights (smoke tests only). Training reads raw latents
# only (no VAE); the VAE decodes the pictures drawn during training and the samples measured by
#   python tools/eval.py gen projects/cosim/imagenet512_s.py CKPT --num-samples 50000 --batch 64
_base_ = ['../../configs/_base_/image_runtime.py']

# --- files (config keys; the command line sets the dotted keys shown above and in docs/edm2.md) ---
teacher_path = None                              # edm2-img512-s-2147483-0.190.pkl (EDM2's FD-DINOv2 EMA, 68.64)
latent_data = 'data/img512-sd.zip'               # EDM2 latents: tools/encode_latents.py or EDM2's dataset_tool.py encode
vae_path = 'checkpoints/sd-vae-ft-mse'           # local diffusers folder of stabilityai/sd-vae-ft-mse
dinov2_weights = 'checkpoints/dinov2_vitl14_pretrain.pth'   # DINOv2 ViT-L/14 weights (FD-DINOv2's detector)
dinov2_reference = 'data/img512-fd_dinov2.npz'   # tools/eval.py ref of the 512x512 RGB training set

# --- Table 5, ImageNet-512 S ------------------------------------------------------------------
# Global batch 2048 = 8 GPUs x 32 per micro-batch x accumulation 8 (every network accumulates its 8
# micro-batches before its one step). On another number of GPUs keep the product.
batch_per_gpu = 32
num_gpus = 8
accumulative_counts = 8
global_batch = batch_per_gpu * num_gpus * accumulative_counts          # 2048
training_images = 200_000_000                                          # 200 M
max_iters = training_images // global_batch                            # 97 656 iterations
lr = 2e-5
R = 8
dropout = 0.0
edm2_size = dict(model_channels=192, dropout=0.0)                      # EDM2-S (train_edm2.py preset)

# The EDM2 teacher: EDM2Precond on 4x64x64 latents, 1000 classes; EDM2's other settings are the class
# defaults (channel_mult [1,2,3,4], 3 blocks per level, attention at 16 and 8). It runs in float32
# (EDM2Teacher's default dtype) and in eval mode; `dropout` only acts on the students.
teacher = dict(type='EDM2Teacher', path=teacher_path,
               network=dict(type='EDM2Precond', img_resolution=64, img_channels=4, label_dim=1000,
                            use_fp16=True, **edm2_size))

adam = dict(type='Adam', lr=lr, betas=(0.0, 0.99), eps=1e-12)          # Table 5
model = dict(
    type='SemiImplicitDistiller',
    teacher=teacher,
    student_dropout=dropout,
    schedule=dict(type='EDMSchedule'),
    kernel=dict(type='GaussianKernel'),
    divergence=dict(type='GFIDivergence', h=dict(type='QuadraticH', alpha=1.2), coef=1.0,
                    generator_weight='sid', aux_weight='edm'),
    time_sampler=dict(type='CoSIMTimeSampler', sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=R),
    sampler=dict(type='MultistepSampler', num_steps=4),
    ema_half_life_images=2_000_000,                                     # Table 5: 2 M images
    # raw latents (posterior mean and std) -> a fresh whitened draw every step, EDM2's constants
    data_preprocessor=dict(type='LatentDataPreprocessor'),
)

# CoSIM is data-free: the latents are only checked against the teacher's shape; the labels are the
# data's (each draw's class). `dataset=dict(type='DistillationDataset', label_dim=1000)` instead
# runs without any data (class-balanced labels).
train_dataloader = dict(batch_size=batch_per_gpu * accumulative_counts, num_workers=4, persistent_workers=True,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='EDM2LatentDataset', path=latent_data, latent_channels=4, resolution=64))
optim_wrapper = dict(
    constructor='MultiOptimWrapperConstructor',
    generator=dict(optimizer=adam, accumulative_counts=accumulative_counts),
    aux=dict(optimizer=adam, accumulative_counts=accumulative_counts),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

# --- pixels: decoding and FD-DINOv2 ------------------------------------------------------------
# The VAE decodes samples for pictures and metrics (EDM2's uint8 pixels, see DecodedSampler);
# tools/sample.py and tools/eval.py read `decoder`.
decoder = dict(type='StabilityVAE', path=vae_path)
# FD-DINOv2 (EDM2's protocol: ViT-L/14 class token, bicubic antialiased resize to 224) of 50 000
# decoded samples against the statistics of the RGB training images (tools/eval.py gen).
image_metrics = [
    dict(type='FrechetDistance', name='fd_dinov2', detector=dict(type='DINOv2Detector', path=dinov2_weights),
         reference=dinov2_reference),
]
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=2_500, num_samples=64, decoder=decoder),
]
# a checkpoint every 2 500 iterations (≈ 5 M images)
default_hooks = dict(checkpoint=dict(interval=2_500))
