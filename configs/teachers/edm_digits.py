# The digits teacher: a class-conditional EDM denoiser (EDMPrecond around a small SongUNet)
# trained with EDM's loss (Karras et al. 2022) on the training split of scikit-learn's 8x8
# digits (1 347 images; 450 held out), in under 20 minutes on 2 CPU cores:
#   python tools/train_digit_classifier.py          # the FD-digits detector (seconds)
#   python tools/eval.py ref --dataset digits:train --detector network:work_dirs/fd_digits/classifier.pth \
#       --out work_dirs/fd_digits/ref_train.npz --save-features
#   python tools/train.py configs/teachers/edm_digits.py
# The CoSIM distillation of this teacher is projects/cosim/digits.py; the results are in
# docs/digits.md.
_base_ = ['../_base_/default_runtime.py']

# One thread: on a CPU shared with other jobs two OpenMP threads spin-wait on each other and a
# step took 11x longer (measured here: 2.9 s vs 0.26 s); unshared, one thread still fits the budget.
torch_threads = 1
num_classes = 10
batch_size = 128
max_iters = 5000
warmup_iters = 200

network = dict(type='EDMPrecond', img_resolution=8, img_channels=1, label_dim=num_classes,
               model_type='SongUNet', model_channels=32, channel_mult=[1, 1], num_blocks=1,
               attn_resolutions=[4], dropout=0.1, embedding_type='positional',
               encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
               resample_filter=[1, 1])
model = dict(type='DenoisingTrainer', network=network, sigma_data=0.5, P_mean=-1.2, P_std=1.2,
             ema_half_life_images=25_000, ema_rampup=0.05,
             sampler=dict(type='EDMHeunSampler', num_steps=18),
             data_preprocessor=dict(type='DistillDataPreprocessor'))

train_dataloader = dict(batch_size=batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='DigitsDataset', split='train'))
optim_wrapper = dict(constructor='MultiOptimWrapperConstructor',
                     network=dict(optimizer=dict(type='Adam', lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                                                 fused=True)))
# linear warm-up, then a cosine decay to 1 % of the peak rate
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', eta_min=2e-5, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)

# FD-digits (penultimate features of the digit classifier) against the training split, k-NN
# precision/recall, and label accuracy; read by tools/eval.py (gen/data) and ImageMetricHook.
# FD is also given over blocks of 450 samples, the size of the held-out split, so it compares
# with the real-vs-real floor (`tools/eval.py data ... --dataset digits:held_out`).
digits_dir = 'work_dirs/fd_digits'
classifier = dict(type='NetworkDetector', checkpoint=digits_dir + '/classifier.pth')
reference = digits_dir + '/ref_train.npz'
image_metrics = [
    dict(type='FrechetDistance', name='fd_digits', detector=classifier, reference=reference, block_size=450),
    dict(type='PrecisionRecall', name='pr', detector=classifier, reference=reference, k=3),
    dict(type='LabelAccuracy', classifier=dict(classifier, method='forward')),
]

custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook'),
                dict(type='SampleVisualizationHook', interval=1000, num_samples=100)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=100),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=5))
