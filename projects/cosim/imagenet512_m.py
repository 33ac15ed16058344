# CoSIM on ImageNet 512x512 (latent) from the EDM2-M teacher: imagenet512_s.py with Table 5's M row
# (lr 2e-5, R 4, dropout 0.1, 200 M images). A real run:
#   torchrun --nproc_per_node=8 tools/train.py projects/cosim/imagenet512_m.py --launcher pytorch \
#       --cfg-options teacher.path=/ckpt/edm2-img512-m-2147483-0.155.pkl teacher.network=None \
#       train_dataloader.dataset.path=/data/img512-sd.zip
# See docs/edm2.md.
_base_ = ['./imagenet512_s.py']

teacher_path = None                              # edm2-img512-m-2147483-0.155.pkl (EDM2's FD-DINOv2 EMA, 58.44)
lr = 2e-5
R = 4
dropout = 0.1
training_images = 200_000_000
max_iters = training_images // _base_.global_batch                     # 97 656 iterations
edm2_size = dict(model_channels=256, dropout=0.1)                      # EDM2-M (train_edm2.py preset)

model = dict(teacher=dict(network=edm2_size), student_dropout=dropout, time_sampler=dict(R=R))
optim_wrapper = dict(generator=dict(optimizer=dict(lr=lr)), aux=dict(optimizer=dict(lr=lr)))
train_cfg = dict(max_iters=max_iters)
