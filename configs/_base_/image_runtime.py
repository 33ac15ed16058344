# What every image-distillation run adds to the default runtime: step speed, exact-resume random
# state, a 64-sample grid from fixed noise every 2 500 iterations, and a checkpoint every 5 000.
# A config changes an interval by merging, e.g. default_hooks = dict(checkpoint=dict(interval=2_500)).
_base_ = ['./default_runtime.py']

custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=2_500, num_samples=64),
]
default_hooks = dict(logger=dict(type='LoggerHook', interval=100),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=5_000, max_keep_ckpts=3))
