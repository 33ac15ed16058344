# The CIFAR-10 CoSIM config shrunk for end-to-end tests: a tiny random 8x8 SongUNet teacher,
# batch 2, no gradient accumulation, a few iterations on one CPU thread.
_base_ = ['../../projects/cosim/cifar10.py']

torch_threads = 1
model = dict(teacher=dict(network=dict(
    _delete_=True, type='EDMPrecond', img_resolution=8, img_channels=3, label_dim=0,
    model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.0)))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False)
optim_wrapper = dict(generator=dict(accumulative_counts=1), aux=dict(accumulative_counts=1))
train_cfg = dict(max_iters=4)
custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook'),
                dict(type='SampleVisualizationHook', interval=2, num_samples=4)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
