# The latent toy: CoSIM with the ImageNet-512 config family (imagenet512_s.py: EDM2 teacher, raw
# latents with a fresh posterior draw per step, Table 5's optimiser form, decoding through a VAE)
# scaled down to the CPU: the tiny EDM2 teacher of configs/teachers/edm2_latent_toy.py on 4x4x4
# latents of the 8x8 digits, one process, batch 64. tools/latent_toy.py makes the VAE and the data,
# trains the teacher, then runs this config (docs/edm2.md):
#   python tools/latent_toy.py --work-dir work_dirs/latent_toy
_base_ = ['./imagenet512_s.py', '../../configs/_base_/teachers/edm2_latent_toy.py']

torch_threads = 1
batch_size = 64
max_iters = 1000
teacher_checkpoint = 'work_dirs/latent_toy/teacher/iter_2000.pth'    # the DenoisingTrainer run's (its EMA)
lr = 1e-4

model = dict(
    teacher=dict(_delete_=True, type='EDM2Teacher', network=_base_.toy_network, checkpoint=teacher_checkpoint),
    time_sampler=dict(R=4),
    ema_half_life_images=20_000, ema_rampup=0.5,
    data_preprocessor=dict(raw_mean=_base_.toy_raw_mean, raw_std=_base_.toy_raw_std),
)
train_dataloader = dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                        dataset=dict(path=_base_.toy_latent_data, resolution=4))
optim_wrapper = dict(generator=dict(optimizer=dict(lr=lr), accumulative_counts=1),
                     aux=dict(optimizer=dict(lr=lr), accumulative_counts=1))
train_cfg = dict(max_iters=max_iters)

decoder = _base_.toy_decoder
# FD-digits of decoded samples (the digit classifier of tools/train_digit_classifier.py; see
# configs/teachers/edm_digits.py), for tools/eval.py gen
image_metrics = [dict(type='FrechetDistance', name='fd_digits',
                      detector=dict(type='NetworkDetector', checkpoint='work_dirs/fd_digits/classifier.pth'),
                      reference='work_dirs/fd_digits/ref_train.npz')]
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=500, num_samples=100, decoder=decoder),
]
default_hooks = dict(logger=dict(interval=100), checkpoint=dict(interval=500, max_keep_ckpts=2))
