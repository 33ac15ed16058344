# CoSIM on ImageNet 512x512 (latent) from the EDM2-L teacher: imagenet512_s.py with Table 5's L row
# (lr 1e-4, R 4, dropout 0.1, 20 M images). A real run:
#   torchrun --nproc_per_node=8 tools/train.py projects/cosim/imagenet512_l.py --launcher pytorch \
#       --cfg-options teacher.path=/ckpt/edm2-img512-l-1879048-0.155.pkl teacher.network=None \
#       train_dataloader.dataset.path=/data/img512-sd.zip
# See docs/edm2.md.
_base_ = ['./imagenet512_s.py']

teacher_path = None                              # edm2-img512-l-1879048-0.155.pkl (EDM2's FD-DINOv2 EMA, 52.25)
lr = 1e-4
R = 4
dropout = 0.1
training_images = 20_000_000
max_iters = training_images // _base_.global_batch                     # 9 765 iterations
edm2_size = dict(model_channels=320, dropout=0.1)                      # EDM2-L (train_edm2.py preset)

model = dict(teacher=dict(network=edm2_size), student_dropout=dropout, time_sampler=dict(R=R))
optim_wrapper = dict(generator=dict(optimizer=dict(lr=lr)), aux=dict(optimizer=dict(lr=lr)))
train_cfg = dict(max_iters=max_iters)
# ≈ 1 M images between checkpoints over the shorter run
default_hooks = dict(checkpoint=dict(interval=500))
