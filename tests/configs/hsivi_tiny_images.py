# The CIFAR-10 HSIVI config shrunk for end-to-end tests: a tiny random 8x8 SongUNet teacher,
# batch 2, 3 layers, 2 f_ψ-steps per layer update, a few iterations on one CPU thread.
_base_ = ['../../configs/hsivi/cifar10.py']

torch_threads = 1
grid = dict(num_steps=3, sigma_min=0.002, sigma_max=80.0, rho=7.0)
model = dict(teacher=dict(network=dict(
    _delete_=True, type='EDMPrecond', img_resolution=8, img_channels=3, label_dim=0,
    model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.0)),
    time_sampler=grid, sampler=grid, aux_steps=2)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False)
train_cfg = dict(max_iters=4)
custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook'),
                dict(type='SampleVisualizationHook', interval=2, num_samples=4)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
