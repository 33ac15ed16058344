# EDM's class-conditional ImageNet-64 teacher (edm-imagenet-64x64-cond-adm.pkl): EDMPrecond around
# the ADM DhariwalUNet, 1000 classes, 295 899 267 parameters. path=None builds it with random
# weights from `network` (smoke tests); for real runs:
#   --cfg-options teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl teacher.network=None
# The teacher is frozen and runs in eval mode; `dropout` only matters for the students.
teacher = dict(
    type='EDMTeacher', path=None,
    network=dict(type='EDMPrecond', img_resolution=64, img_channels=3, label_dim=1000,
                 model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4],
                 dropout=0.1))
