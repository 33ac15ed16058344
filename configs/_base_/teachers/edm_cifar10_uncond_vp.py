# EDM's unconditional CIFAR-10 teacher (edm-cifar10-32x32-uncond-vp.pkl): EDMPrecond around the
# DDPM++ SongUNet, 55 733 891 parameters. path=None builds it with random weights from
# `network` (smoke tests); for real runs point it at the official pickle:
#   --cfg-options teacher.path=/path/to/edm-cifar10-32x32-uncond-vp.pkl teacher.network=None
# (tools/train.py reads `teacher.X` as `model.teacher.X`). The teacher is frozen and runs in eval
# mode, so `dropout` here only matters for the students, which start as deep copies of it.
teacher = dict(
    type='EDMTeacher', path=None,
    network=dict(type='EDMPrecond', img_resolution=32, img_channels=3, label_dim=0,
                 model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                 decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                 model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13))
