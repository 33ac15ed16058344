# What every gdistill run shares: scope, logging, checkpoints, random state, tensorboard.
default_scope = 'gdistill'

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
# Each rank draws its own noise; the seed makes runs repeatable.
randomness = dict(seed=0, diff_rank_seed=True)

log_processor = dict(by_epoch=False, window_size=20)
log_level = 'INFO'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# One DDP wrapper per trained network (the frozen teacher and the EMA copy are left alone).
model_wrapper_cfg = dict(type='MMSeparateDistributedDataParallel', broadcast_buffers=False,
                         find_unused_parameters=False)
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)

load_from = None
resume = False
