# The toy CoSIM run shrunk to seconds for end-to-end tests: a 32-wide MLP, batch 64, no final evaluation.
_base_ = ['../../projects/cosim/toy2d.py']

torch_threads = 1
model = dict(teacher=dict(network=dict(hidden=32, depth=2), fit=dict(iters=20, batch_size=64)))
train_dataloader = dict(batch_size=64)
train_cfg = dict(max_iters=6)
custom_hooks = [dict(type='SpeedHook'), dict(type='RandomStateHook')]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=3))
